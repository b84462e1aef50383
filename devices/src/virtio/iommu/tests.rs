//! virtio-iommu driven through its queues, as a driver would: activation,
//! requests on queue 0, fault reports on queue 1, and what the endpoints'
//! DMA views see in between.

use super::request::{T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP};
use super::*;
use crate::dma::{direct_view, translated_view, DmaMemory};
use crate::virtio::net::testutil::{wait_for, Desc, Irq, TestQueue};
use crate::virtio::{ActiveQueue, DeviceMetrics, InterruptCause};
use std::sync::atomic::Ordering;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const EP: u32 = 0x10;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;
const ALL: u64 = features::VERSION_1 | F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG;

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn attach(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut b = vec![T_ATTACH, 0, 0, 0];
    for v in [domain, endpoint, flags, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn detach(domain: u32, endpoint: u32) -> Vec<u8> {
    let mut b = vec![T_DETACH, 0, 0, 0];
    for v in [domain, endpoint, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut b = vec![T_MAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    for v in [start, end, phys] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

fn unmap(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut b = vec![T_UNMAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    for v in [start, end] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&[0; 4]);
    b
}

fn probe(endpoint: u32) -> Vec<u8> {
    let mut b = vec![T_PROBE, 0, 0, 0];
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    b
}

/// A driver: the two queues, and one endpoint (`EP`) whose view is `ep`.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    req: TestQueue<'a>,
    evt: TestQueue<'a>,
    req_kick: EventFd,
    evt_kick: EventFd,
    irq: Arc<Irq>,
    metrics: Arc<DeviceMetrics>,
    iommu: Iommu,
    translation: Arc<DmaTranslation>,
    ep: DmaMemory,
}

impl<'a> Driver<'a> {
    fn start(mem: &'a GuestMemoryMmap, bypass: bool, acked: u64) -> Driver<'a> {
        let translation = Arc::new(DmaTranslation::new());
        let ep = translated_view(mem.clone(), translation.clone());
        let iommu = Iommu::new("iommu0", vec![(EP, translation.clone())], bypass).unwrap();
        let mut d = Driver {
            mem,
            req: TestQueue::new(mem, 0, 16),
            evt: TestQueue::new(mem, 0x1_0000, 16),
            req_kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            evt_kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            irq: Arc::new(Irq::default()),
            metrics: Arc::new(DeviceMetrics::default()),
            iommu,
            translation,
            ep,
        };
        d.activate(acked);
        d
    }

    /// FEATURES_OK with `acked`, fresh rings, DRIVER_OK.
    fn activate(&mut self, acked: u64) {
        self.req = TestQueue::new(self.mem, 0, 16);
        self.evt = TestQueue::new(self.mem, 0x1_0000, 16);
        self.iommu.accept_features(acked).unwrap();
        self.iommu
            .activate(Activation {
                mem: direct_view(self.mem.clone()),
                queues: vec![
                    ActiveQueue {
                        index: 1,
                        queue: self.evt.queue(),
                        notify: self.evt_kick.try_clone().unwrap(),
                    },
                    ActiveQueue {
                        index: 0,
                        queue: self.req.queue(),
                        notify: self.req_kick.try_clone().unwrap(),
                    },
                ],
                interrupt: self.irq.clone(),
                acked_features: acked,
                metrics: self.metrics.clone(),
            })
            .unwrap();
    }

    /// Sends one request with `writable` device-writable bytes (pre-filled
    /// with 0xee); returns the used length and those bytes.
    fn send(&mut self, readable: &[u8], writable: u32) -> (u32, Vec<u8>) {
        let (inp, out) = (0x20_0000, 0x21_0000);
        self.mem.write_slice(readable, GuestAddress(inp)).unwrap();
        self.mem
            .write_slice(&vec![0xee; writable as usize], GuestAddress(out))
            .unwrap();
        let head = self
            .req
            .add(&[Desc::r(inp, readable.len() as u32), Desc::w(out, writable)]);
        self.req_kick.write(1).unwrap();
        let used = self.req.wait_used(1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        let mut back = vec![0; writable as usize];
        self.mem.read_slice(&mut back, GuestAddress(out)).unwrap();
        (used[0].1, back)
    }

    /// Sends a request with a 4-byte tail; returns its status.
    fn status(&mut self, readable: &[u8]) -> u8 {
        let (len, back) = self.send(readable, 4);
        assert_eq!(len, 4, "used length");
        assert_eq!(&back[1..], &[0, 0, 0], "tail reserved bytes");
        back[0]
    }

    fn counter(&self, f: impl Fn(&DeviceMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.metrics).load(Ordering::Relaxed)
    }
}

const OK: u8 = Status::Ok as u8;

#[test]
fn requests_are_served_through_the_queue() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, ALL);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x10_0000, 0x10_1fff, 0x30_0000, RW)), OK);
    // The endpoint reaches guest-physical 0x301010 through IOVA 0x101010.
    d.ep.write_obj(0xfeed_u16, GuestAddress(0x10_1010)).unwrap();
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x30_1010)).unwrap(), 0xfeed);

    assert_eq!(d.status(&map(1, 0x10_1000, 0x10_1fff, 0, RW)), Status::Inval as u8);
    assert_eq!(d.status(&map(1, 0x10_1000, 0x10_17ff, 0, RW)), Status::Range as u8);
    assert_eq!(d.status(&map(2, 0x20_0000, 0x20_0fff, 0, RW)), Status::NoEnt as u8);
    assert_eq!(
        d.status(&unmap(1, 0x10_0000, 0x10_0fff)),
        Status::Range as u8,
        "would split"
    );
    assert_eq!(d.status(&attach(1, 99, 0)), Status::NoEnt as u8);
    assert_eq!(d.status(&attach(DOMAIN_END + 1, EP, 0)), Status::Range as u8);
    assert_eq!(d.status(&detach(2, EP)), Status::Inval as u8);
    // Too short for a MAP: INVAL, the tail can still be found.
    assert_eq!(d.status(&map(1, 0, 0, 0, 0)[..20]), Status::Inval as u8);

    assert_eq!(d.status(&unmap(1, 0x10_0000, 0x10_1fff)), OK);
    assert!(
        d.ep.read_obj::<u16>(GuestAddress(0x10_1010)).is_err(),
        "unmapped before OK"
    );
    assert_eq!(d.status(&detach(1, EP)), OK);

    wait_for(|| d.irq.count(InterruptCause::Queue(0)) >= 1);
    assert_eq!(d.counter(|m| &m.iommu_attaches), 3);
    assert_eq!(d.counter(|m| &m.iommu_maps), 4);
    assert_eq!(d.counter(|m| &m.iommu_unmaps), 2);
    assert_eq!(d.counter(|m| &m.iommu_detaches), 2);
    assert_eq!(d.counter(|m| &m.iommu_refused), 8);
    assert_eq!(d.counter(|m| &m.requests), 12);
}

#[test]
fn probe_lists_the_msi_window() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, ALL);
    let (len, back) = d.send(&probe(EP), PROBE_SIZE + 4);
    assert_eq!(len, PROBE_SIZE + 4);
    let mut expect = vec![0u8; PROBE_SIZE as usize + 4];
    expect[..24].copy_from_slice(&[
        1, 0, 20, 0, // RESV_MEM, 20 bytes
        1, 0, 0, 0, // MSI
        0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0, // 0xfee00000
        0xff, 0xff, 0xef, 0xfe, 0, 0, 0, 0, // 0xfeefffff
    ]);
    assert_eq!(back, expect, "properties, NONE, zeroes, status OK");

    let (len, back) = d.send(&probe(EP + 1), PROBE_SIZE + 4);
    assert_eq!(len, PROBE_SIZE + 4);
    assert!(back[..PROBE_SIZE as usize].iter().all(|&b| b == 0));
    assert_eq!(back[PROBE_SIZE as usize], Status::NoEnt as u8);

    // Room for fewer than probe_size bytes of properties: INVAL, none written.
    let (len, back) = d.send(&probe(EP), 64 + 4);
    assert_eq!(len, 68);
    assert_eq!(back[64], Status::Inval as u8);
    assert!(back[..64].iter().all(|&b| b == 0));
    let (_, back) = d.send(&probe(EP + 1), 64 + 4);
    assert_eq!(back[64], Status::Inval as u8, "size is checked first");
    // The probed MSI window cannot be mapped.
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW)), Status::Range as u8);
}

#[test]
fn unanswerable_requests_are_given_back_untouched() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, ALL);
    let mut unknown = attach(1, EP, 0);
    unknown[0] = 9;
    let (len, back) = d.send(&unknown, 4);
    assert_eq!((len, back), (0, vec![0xee; 4]), "unknown type");
    let (len, _) = d.send(&attach(1, EP, 0), 2);
    assert_eq!(len, 0, "no room for the tail");
    let (len, _) = d.send(&attach(1, EP, 0), PROBE_SIZE + 8);
    assert_eq!(len, 0, "far too much room");
    assert_eq!(d.counter(|m| &m.bad_requests), 3);
    assert_eq!(d.counter(|m| &m.iommu_attaches), 0);
}

#[test]
fn features_gate_map_probe_and_attach_bypass() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, features::VERSION_1);
    assert_eq!(d.status(&attach(1, EP, ATTACH_F_BYPASS)), Status::Inval as u8);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x1000, 0x1fff, 0x1000, RW)), Status::Unsupp as u8);
    assert_eq!(d.status(&unmap(1, 0x1000, 0x1fff)), Status::Unsupp as u8);
    let (len, _) = d.send(&probe(EP), PROBE_SIZE + 4);
    assert_eq!(len, 0, "PROBE not negotiated");
    drop(d);

    let mut d = Driver::start(&mem, false, ALL);
    mem.write_obj(0x5a_u8, GuestAddress(0x3_0000)).unwrap();
    assert_eq!(d.status(&attach(1, EP, ATTACH_F_BYPASS)), OK);
    assert_eq!(
        d.ep.read_obj::<u8>(GuestAddress(0x3_0000)).unwrap(),
        0x5a,
        "bypass domain"
    );
    assert_eq!(d.status(&map(1, 0x1000, 0x1fff, 0x1000, RW)), Status::Inval as u8);
}

#[test]
fn device_identity_features_and_config() {
    let t = Arc::new(DmaTranslation::new());
    let mut iommu = Iommu::new("iommu0", vec![(EP, t.clone())], true).unwrap();
    assert_eq!(iommu.device_type(), 23);
    assert_eq!(iommu.queue_max_sizes(), &[REQUEST_QUEUE_SIZE, EVENT_QUEUE_SIZE]);
    let f = iommu.device_features();
    assert_eq!(f & ALL, ALL);
    assert_eq!(f & (F_BYPASS | F_MMIO), 0);

    let mut c = [0u8; CONFIG_LEN];
    iommu.read_config(0, &mut c);
    assert_eq!(&c[0..8], &0xffff_ffff_ffff_f000u64.to_le_bytes(), "page_size_mask");
    assert_eq!(&c[8..16], &0u64.to_le_bytes());
    assert_eq!(&c[16..24], &0xffff_ffff_ffffu64.to_le_bytes(), "48-bit input range");
    assert_eq!(&c[24..28], &0u32.to_le_bytes());
    assert_eq!(&c[28..32], &1023u32.to_le_bytes(), "domain range");
    assert_eq!(&c[32..36], &512u32.to_le_bytes(), "probe_size");
    assert_eq!(&c[36..40], &[1, 0, 0, 0], "bypass");

    let mem = guest();
    let ep = translated_view(mem.clone(), t.clone());
    assert!(ep.read_obj::<u8>(GuestAddress(0x1000)).is_ok(), "bypass at first");
    assert!(!iommu.write_config(36, &[0]), "BYPASS_CONFIG not negotiated");
    iommu.accept_features(ALL).unwrap();
    assert!(!iommu.write_config(36, &[2]));
    assert!(!iommu.write_config(32, &[0]));
    assert!(!iommu.write_config(36, &[0, 0, 0, 0]));
    assert!(iommu.write_config(36, &[0]));
    assert!(!iommu.bypass());
    assert!(
        ep.read_obj::<u8>(GuestAddress(0x1000)).is_err(),
        "bypass off: detached endpoints stop"
    );
    let mut b = [9u8; 1];
    iommu.read_config(36, &mut b);
    assert_eq!(b, [0]);
    // Kept over a device reset, and writable again only once negotiated.
    iommu.reset();
    assert!(!iommu.bypass());
    assert!(!iommu.write_config(36, &[1]));
    iommu.accept_features(ALL).unwrap();
    assert!(iommu.write_config(36, &[1]));
    assert!(ep.read_obj::<u8>(GuestAddress(0x1000)).is_ok());
}

#[test]
fn endpoints_are_checked_at_construction() {
    let a = Arc::new(DmaTranslation::new());
    let b = Arc::new(DmaTranslation::new());
    assert!(Iommu::new("i", vec![(1, a.clone()), (1, b.clone())], false).is_err());
    assert!(Iommu::new("i", vec![(1, a.clone()), (2, a.clone())], false).is_err());
    assert_eq!(a.endpoint(), None, "nothing bound by a failed construction");
    let _first = Iommu::new("i", vec![(1, a.clone())], false).unwrap();
    assert_eq!(a.endpoint(), Some(1));
    assert!(Iommu::new("j", vec![(1, a)], false).is_err(), "one vIOMMU per endpoint");
}

/// Reads event buffer `i` (24 bytes at 0x220000 + i * 0x100).
fn event(mem: &GuestMemoryMmap, i: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    mem.read_slice(&mut b, GuestAddress(0x22_0000 + i * 0x100)).unwrap();
    b
}

#[test]
fn faults_are_reported_on_the_event_queue() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, ALL);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x5000, 0x5fff, 0x30_0000, MAP_F_READ)), OK);
    for i in 0..2 {
        d.evt.add(&[Desc::w(0x22_0000 + i * 0x100, 24)]);
    }
    d.evt_kick.write(1).unwrap();

    mem.write_obj(0x1234_u16, GuestAddress(0x30_0100)).unwrap();
    assert!(d.ep.write_obj(0_u16, GuestAddress(0x5100)).is_err(), "read-only");
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(0x30_0100)).unwrap(),
        0x1234,
        "untouched"
    );
    assert_eq!(d.translation.faults(), 1);
    let used = d.evt.wait_used(1);
    assert_eq!(used[0].1, 24);
    let mut expect = [0u8; 24];
    expect[0] = 2; // R_MAPPING
    expect[4..8].copy_from_slice(&0x102u32.to_le_bytes()); // WRITE | ADDRESS
    expect[8..12].copy_from_slice(&EP.to_le_bytes());
    expect[16..24].copy_from_slice(&0x5100u64.to_le_bytes());
    assert_eq!(event(&mem, 0), expect);
    wait_for(|| d.irq.count(InterruptCause::Queue(1)) >= 1);

    // Detached, bypass off: a domain fault on a read.
    assert_eq!(d.status(&detach(1, EP)), OK);
    assert!(d.ep.read_obj::<u8>(GuestAddress(0x5000)).is_err());
    let used = d.evt.wait_used(1);
    assert_eq!(used[0].1, 24);
    let e = event(&mem, 1);
    assert_eq!((e[0], e[4], e[5]), (1, 1, 1), "R_DOMAIN, READ | ADDRESS");
    wait_for(|| d.counter(|m| &m.iommu_faults) == 2);
    assert_eq!(d.counter(|m| &m.iommu_faults_dropped), 0);
}

#[test]
fn faults_wait_for_event_buffers_and_stay_bounded() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, ALL);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    let extra = 5u64;
    for i in 0..PENDING_FAULTS as u64 + extra {
        assert!(d.ep.read_obj::<u8>(GuestAddress(0x1000 * i)).is_err());
    }
    assert_eq!(d.iommu.pending_faults(), PENDING_FAULTS);
    // A buffer too small for a report is given back empty.
    d.evt.add(&[Desc::w(0x22_0000, 8)]);
    d.evt.add(&[Desc::w(0x22_0100, 24)]);
    d.evt_kick.write(1).unwrap();
    let used = d.evt.wait_used(2);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0, 24]);
    let e = event(&mem, 1);
    assert_eq!(
        &e[16..24],
        &(0x1000 * extra).to_le_bytes(),
        "the oldest ones were dropped"
    );
    assert_eq!(d.iommu.pending_faults(), PENDING_FAULTS - 1);
    wait_for(|| d.counter(|m| &m.iommu_faults_dropped) == extra);
    wait_for(|| d.counter(|m| &m.iommu_faults) == PENDING_FAULTS as u64 + extra);
    wait_for(|| d.counter(|m| &m.bad_requests) == 1);
}

#[test]
fn reset_detaches_and_the_device_can_start_again() {
    let mem = guest();
    let mut d = Driver::start(&mem, false, ALL);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x1000, 0x1fff, 0x1000, RW)), OK);
    assert!(d.ep.read_obj::<u8>(GuestAddress(0x1000)).is_ok());
    assert!(d.ep.read_obj::<u8>(GuestAddress(0x9000)).is_err());
    assert_eq!(d.iommu.pending_faults(), 1, "no event buffers");
    d.iommu.reset();
    assert_eq!(d.iommu.pending_faults(), 0, "faults forgotten at reset");
    assert!(
        d.ep.read_obj::<u8>(GuestAddress(0x1000)).is_err(),
        "detached by the reset"
    );
    // The same device, activated again: domains did not survive.
    d.activate(ALL);
    assert_eq!(d.status(&map(1, 0x1000, 0x1fff, 0x1000, RW)), Status::NoEnt as u8);
    assert_eq!(d.status(&attach(1, EP, 0)), OK);
    assert_eq!(d.status(&map(1, 0x1000, 0x1fff, 0x1000, RW)), OK);
    assert!(d.ep.read_obj::<u8>(GuestAddress(0x1000)).is_ok());
}
