//! Arbitrary TX and RX chains through the net device's worker, on a
//! loopback backend: every frame sent comes back on the receive queue.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use veil_devices::dma::direct_view;
use veil_devices::virtio::net::{Net, NetBackend};
use veil_devices::virtio::{features, Activation, DeviceMetrics};
use veil_fuzz::{assert_writes_within, fill_data, guest, snapshot, Input, Irq, Offer, Rings};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest();
    let rx = Rings::at(0);
    let tx = Rings::at(0x1000);
    let mut net = Net::new("net0", NetBackend::loopback_with_capacity(8), [2, 0, 0, 0, 0, 1]);
    let mut worker = net
        .sync_worker(Activation {
            mem: direct_view(mem.clone()),
            queues: vec![rx.active(0), tx.active(1)],
            interrupt: Arc::new(Irq::default()),
            acked_features: features::VERSION_1,
            metrics: Arc::new(DeviceMetrics::default()),
        })
        .unwrap();
    let sent = tx.fill(&mem, &mut input, 0x800);
    let posted = rx.fill(&mem, &mut input, 0x800);
    fill_data(&mem, input.0);
    let tx_offer = Offer::read(&mem, &tx, sent);
    let rx_offer = Offer::read(&mem, &rx, posted);
    let mut allowed = tx_offer.allowed.clone();
    allowed.extend_from_slice(&rx_offer.allowed);
    let before = snapshot(&mem);
    worker.process_tx();
    // TX writes nothing but its used ring, with length 0.
    assert_writes_within(&mem, &before, &[tx.used_range()]);
    if !tx_offer.rewrites(&tx_offer) {
        for (id, len) in tx_offer.check_used(&mem, &tx) {
            assert_eq!(len, 0, "tx chain {id} used with length {len}");
        }
    }
    worker.process_rx();
    if !rx_offer.rewrites(&rx_offer) && !tx_offer.rewrites(&rx_offer) {
        assert_writes_within(&mem, &before, &allowed);
        rx_offer.check_used(&mem, &rx);
    }
});
