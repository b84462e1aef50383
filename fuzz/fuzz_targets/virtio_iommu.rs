//! Arbitrary request queues through the virtio-iommu's request handler.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use veil_devices::dma::{direct_view, translated_view, DmaTranslation};
use veil_devices::virtio::iommu::{Iommu, Limits};
use veil_devices::virtio::{features, Activation, DeviceMetrics, VirtioDevice};
use veil_fuzz::{assert_writes_within, fill_data, guest, snapshot, Input, Irq, Offer, Rings};
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest();
    let translations: Vec<_> = (0..2).map(|_| Arc::new(DmaTranslation::new())).collect();
    let views: Vec<_> = translations
        .iter()
        .map(|t| translated_view(mem.clone(), t.clone()))
        .collect();
    let endpoints = vec![(0x10, translations[0].clone()), (0x10000, translations[1].clone())];
    // Small limits so that NOMEM is reachable.
    let limits = Limits {
        domains: 4,
        mappings_per_domain: 6,
        mappings: 8,
    };
    let flags = input.u8();
    let mut iommu = Iommu::with_limits("iommu0", endpoints, flags & 1 != 0, limits).unwrap();
    let acked = features::VERSION_1 | u64::from(input.u8() & 0x7f);
    iommu.accept_features(acked).unwrap();
    let req = Rings::at(0);
    let evt = Rings::at(0x1000);
    let metrics = Arc::new(DeviceMetrics::default());
    let mut worker = iommu
        .sync_worker(Activation {
            mem: direct_view(mem.clone()),
            queues: vec![req.active(0), evt.active(1)],
            interrupt: Arc::new(Irq::default()),
            acked_features: acked,
            metrics: metrics.clone(),
        })
        .unwrap();
    let offered = req.fill(&mem, &mut input, 0x100);
    fill_data(&mem, input.0);
    let offer = Offer::read(&mem, &req, offered);
    let before = snapshot(&mem);
    worker.process_requests();
    if !offer.rewrites(&offer) {
        assert_writes_within(&mem, &before, &offer.allowed);
        offer.check_used(&mem, &req);
    }
    // Whatever the mappings now are, the endpoints' views answer without
    // panicking, and faults go to the event queue.
    for v in &views {
        let mut b = [0u8; 8];
        let _ = v.read_slice(&mut b, GuestAddress(0x1_8000));
        let _ = v.write_slice(&b, GuestAddress(0x1_8000));
    }
    let events = evt.fill(&mem, &mut Input(&[]), 0x100);
    let offer = Offer::read(&mem, &evt, events);
    let before = snapshot(&mem);
    worker.report_faults();
    if !offer.rewrites(&offer) {
        assert_writes_within(&mem, &before, &offer.allowed);
        offer.check_used(&mem, &evt);
    }
});
