use super::testutil::{wait_for, Desc, Irq, TestQueue};
use super::*;
use crate::dma::{direct_view, DmaMode};
use crate::virtio::transport::{Half, QueueAddress, VirtioState};
use crate::virtio::{status, InterruptCause};
use event_manager::{EventManager, SubscriberOps};
use std::sync::atomic::Ordering;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A frame of `len` bytes whose content depends on `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

/// A worker driven by hand (no thread, no epoll) over two test queues.
struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    rx: TestQueue<'m>,
    tx: TestQueue<'m>,
    w: NetWorker,
    irq: Arc<Irq>,
    metrics: Arc<DeviceMetrics>,
}

/// A worker over two test queues, with a loopback or other backend.
fn worker(
    mem: &GuestMemoryMmap,
    rx: &TestQueue,
    tx: &TestQueue,
    backend: NetBackend,
    event_idx: bool,
) -> (NetWorker, Arc<Irq>, Arc<DeviceMetrics>) {
    let active = |tq: &TestQueue, index| {
        let mut queue = tq.queue();
        queue.set_event_idx(event_idx);
        ActiveQueue {
            index,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    };
    let irq = Arc::new(Irq::default());
    let metrics = Arc::new(DeviceMetrics::default());
    let w = NetWorker::new(
        direct_view(mem.clone()),
        active(rx, 0),
        active(tx, 1),
        backend.connect().unwrap(),
        irq.clone(),
        metrics.clone(),
    );
    (w, irq, metrics)
}

fn rig(mem: &GuestMemoryMmap, backend: NetBackend, event_idx: bool) -> Rig<'_> {
    let rx = TestQueue::new(mem, 0, 16);
    let tx = TestQueue::new(mem, 0x4000, 16);
    let (w, irq, metrics) = worker(mem, &rx, &tx, backend, event_idx);
    Rig {
        mem,
        rx,
        tx,
        w,
        irq,
        metrics,
    }
}

/// Queues `data` for transmission at `at`: a header full of garbage (the
/// device must not pass it on) in its own buffer, then the frame split in
/// two buffers.
fn put_frame(mem: &GuestMemoryMmap, tx: &mut TestQueue, at: u64, data: &[u8]) -> u16 {
    mem.write_slice(&[0xee; NET_HDR_LEN], GuestAddress(at)).unwrap();
    mem.write_slice(data, GuestAddress(at + 0x100)).unwrap();
    let half = data.len() / 2;
    tx.add(&[
        Desc::r(at, NET_HDR_LEN as u32),
        Desc::r(at + 0x100, half as u32),
        Desc::r(at + 0x100 + half as u64, (data.len() - half) as u32),
    ])
}

/// Offers a receive chain of `len` bytes at `at`, in two buffers.
fn put_buffer(mem: &GuestMemoryMmap, rx: &mut TestQueue, at: u64, len: u32) -> u16 {
    mem.write_slice(&vec![0xaa; len as usize], GuestAddress(at)).unwrap();
    let first = len.min(20);
    rx.add(&[Desc::w(at, first), Desc::w(at + u64::from(first), len - first)])
}

impl Rig<'_> {
    fn send(&mut self, at: u64, data: &[u8]) -> u16 {
        put_frame(self.mem, &mut self.tx, at, data)
    }

    fn post(&mut self, at: u64, len: u32) -> u16 {
        put_buffer(self.mem, &mut self.rx, at, len)
    }

    /// The header and frame of a `used_len`-byte receive at `at`.
    fn received(&self, at: u64, used_len: u32) -> ([u8; NET_HDR_LEN], Vec<u8>) {
        let mut all = vec![0u8; used_len as usize];
        self.mem.read_slice(&mut all, GuestAddress(at)).unwrap();
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr.copy_from_slice(&all[..NET_HDR_LEN]);
        (hdr, all[NET_HDR_LEN..].to_vec())
    }

    fn run(&mut self) {
        self.w.process_tx();
        self.w.process_rx();
    }
}

const ZERO_HDR_ONE_BUFFER: [u8; NET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

#[test]
fn loopback_returns_the_frame_byte_identical_with_a_clean_header() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback(), false);
    let rx_head = r.post(0x10_0000, 2048);
    let data = frame(1000, 3);
    let tx_head = r.send(0x40_0000, &data);
    r.run();
    assert_eq!(r.tx.used(), vec![(u32::from(tx_head), 0)]);
    let used = r.rx.used();
    assert_eq!(used, vec![(u32::from(rx_head), 1012)]);
    let (hdr, got) = r.received(0x10_0000, 1012);
    assert_eq!(hdr, ZERO_HDR_ONE_BUFFER);
    assert_eq!(got, data);
    let m = &r.metrics;
    assert_eq!(counter(&m.requests), 2, "one frame out, one in");
    assert_eq!(counter(&m.bytes_read), 1012);
    assert_eq!(counter(&m.bytes_written), 1012);
    assert_eq!(r.irq.count(InterruptCause::Queue(0)), 1);
    assert_eq!(r.irq.count(InterruptCause::Queue(1)), 1);
}

#[test]
fn frames_wait_for_receive_buffers_and_arrive_in_order() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback(), false);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
    for (i, f) in frames.iter().enumerate() {
        r.send(0x40_0000 + 0x1_0000 * i as u64, f);
    }
    r.run();
    assert_eq!(r.tx.used().len(), 3);
    assert!(r.rx.used().is_empty());
    assert!(r.w.pending.is_some(), "the first frame waits in hand");
    assert_eq!(r.irq.count(InterruptCause::Queue(0)), 0);

    let a = r.post(0x10_0000, 2048);
    let b = r.post(0x11_0000, 2048);
    r.w.process_rx();
    let used = r.rx.used();
    assert_eq!(used, vec![(u32::from(a), 112), (u32::from(b), 113)]);
    assert_eq!(r.received(0x10_0000, 112).1, frames[0]);
    assert_eq!(r.received(0x11_0000, 113).1, frames[1]);

    let c = r.post(0x12_0000, 2048);
    r.w.process_rx();
    assert_eq!(r.rx.used(), vec![(u32::from(c), 114)]);
    assert_eq!(r.received(0x12_0000, 114).1, frames[2]);
    assert!(r.w.pending.is_none());
    assert_eq!(counter(&r.metrics.io_errors), 0);
}

/// Runs the loop until nothing is ready; a loop that never settles is a
/// busy loop.
fn settle(em: &mut EventManager<NetWorker>) {
    for _ in 0..20 {
        if em.run_with_timeout(20).unwrap() == 0 {
            return;
        }
    }
    panic!("the event loop keeps waking up");
}

#[test]
fn the_backend_is_not_read_while_a_frame_waits_for_a_buffer() {
    let mem = guest();
    let mut rx = TestQueue::new(&mem, 0, 16);
    let mut tx = TestQueue::new(&mem, 0x4000, 16);
    let (w, _irq, metrics) = worker(&mem, &rx, &tx, NetBackend::loopback(), false);
    let rx_kick = w.rx.notify.try_clone().unwrap();
    let tx_kick = w.tx.notify.try_clone().unwrap();
    let mut em = EventManager::<NetWorker>::new().unwrap();
    let id = em.add_subscriber(w);
    put_frame(&mem, &mut tx, 0x40_0000, &frame(80, 1));
    put_frame(&mem, &mut tx, 0x41_0000, &frame(81, 2));
    tx_kick.write(1).unwrap();
    // Transmit, then the loopback becomes readable, then nothing: the
    // frame in hand has no buffer and the backend is left alone.
    settle(&mut em);
    let w = em.subscriber_mut(id).unwrap();
    assert_eq!(w.pending, Some(80));
    assert!(!w.backend_watched);
    assert!(rx.used().is_empty());
    // Buffers and a receive notification re-arm it: both frames arrive.
    put_buffer(&mem, &mut rx, 0x10_0000, 2048);
    put_buffer(&mem, &mut rx, 0x11_0000, 2048);
    rx_kick.write(1).unwrap();
    settle(&mut em);
    let used = rx.used();
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![92, 93]);
    let w = em.subscriber_mut(id).unwrap();
    assert!(w.pending.is_none() && w.backend_watched);
    assert_eq!(counter(&metrics.requests), 4);
}

#[test]
fn frame_larger_than_the_receive_chain_is_dropped_and_the_chain_kept() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback(), false);
    let head = r.post(0x10_0000, (NET_HDR_LEN + 64) as u32);
    r.send(0x40_0000, &frame(65, 1));
    r.run();
    assert!(r.rx.used().is_empty(), "a too-small chain must not be used");
    assert_eq!(counter(&r.metrics.bad_requests), 1);
    assert!(r.w.pending.is_none(), "the frame is gone");
    // The same chain takes the next frame that fits.
    let small = frame(64, 2);
    r.send(0x41_0000, &small);
    r.run();
    assert_eq!(r.rx.used(), vec![(u32::from(head), 76)]);
    assert_eq!(r.received(0x10_0000, 76).1, small);
}

#[test]
fn transmit_chains_are_bounded_by_header_and_64k() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback(), false);
    let post = |r: &mut Rig, at| r.post(at, (NET_HDR_LEN + MAX_FRAME_LEN) as u32);
    post(&mut r, 0x10_0000);
    // Exactly the largest frame goes through.
    let max = frame(MAX_FRAME_LEN, 9);
    r.send(0x40_0000, &max);
    // One byte more is dropped, and so is a header with no frame.
    let over = r.send(0x60_0000, &frame(MAX_FRAME_LEN + 1, 9));
    let empty = r.tx.add(&[Desc::r(0x80_0000, NET_HDR_LEN as u32)]);
    let short = r.tx.add(&[Desc::r(0x80_0000, 4)]);
    r.run();
    let used = r.tx.used();
    assert_eq!(used.len(), 4);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert!(used.contains(&(u32::from(over), 0)));
    assert!(used.contains(&(u32::from(empty), 0)));
    assert!(used.contains(&(u32::from(short), 0)));
    assert_eq!(counter(&r.metrics.bad_requests), 3);
    let rx_used = r.rx.used();
    assert_eq!(rx_used.len(), 1);
    assert_eq!(rx_used[0].1 as usize, NET_HDR_LEN + MAX_FRAME_LEN);
    assert_eq!(r.received(0x10_0000, rx_used[0].1).1, max);
    // Nothing else was looped back.
    post(&mut r, 0x20_0000);
    r.run();
    assert!(r.rx.used().is_empty());
}

#[test]
fn bad_descriptors_are_counted_and_chains_given_back() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback(), false);
    // Transmit: a loop, a buffer outside guest memory, writable-then-readable.
    let looped = r.tx.add_raw(&[(0x40_0000, 12, 1, 1), (0x40_1000, 64, 1, 0)]);
    let outside = r.tx.add(&[Desc::r(0x40_0000, 12), Desc::r(0x7fff_0000, 64)]);
    let order = r.tx.add(&[Desc::w(0x40_0000, 12), Desc::r(0x40_1000, 64)]);
    r.w.process_tx();
    assert_eq!(
        r.tx.used(),
        vec![(u32::from(looped), 0), (u32::from(outside), 0), (u32::from(order), 0)]
    );
    assert_eq!(counter(&r.metrics.bad_descriptors), 3);
    assert_eq!(counter(&r.metrics.requests), 0);

    // Receive: a broken chain and a chain with a readable buffer are given
    // back empty; the frame waits for the good chain after them.
    let broken = r.rx.add_raw(&[(0x10_0000, 2048, 3, 40)]);
    let readable = r.rx.add(&[Desc::r(0x11_0000, 12), Desc::w(0x11_1000, 2048)]);
    let unmapped = r.rx.add(&[Desc::w(0x7fff_0000, 2048)]);
    let good = r.post(0x12_0000, 2048);
    let data = frame(300, 5);
    r.send(0x41_0000, &data);
    r.run();
    assert_eq!(
        r.rx.used(),
        vec![
            (u32::from(broken), 0),
            (u32::from(readable), 0),
            (u32::from(unmapped), 0),
            (u32::from(good), 312)
        ]
    );
    assert_eq!(r.received(0x12_0000, 312).1, data);
    assert_eq!(counter(&r.metrics.bad_descriptors), 5);
    assert_eq!(counter(&r.metrics.bad_requests), 1);
}

#[test]
fn a_full_loopback_drops_and_counts() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback_with_capacity(2), false);
    for i in 0..4u8 {
        r.send(0x40_0000 + 0x1_0000 * u64::from(i), &frame(60, i));
    }
    r.w.process_tx();
    assert_eq!(r.tx.used().len(), 4);
    assert_eq!(counter(&r.metrics.io_errors), 2, "two frames over capacity");
    assert_eq!(counter(&r.metrics.requests), 2);
    for i in 0..3 {
        r.post(0x10_0000 + 0x1_0000 * i, 2048);
    }
    r.w.process_rx();
    let used = r.rx.used();
    assert_eq!(used.len(), 2);
    assert_eq!(r.received(0x10_0000, used[0].1).1, frame(60, 0));
    assert_eq!(r.received(0x11_0000, used[1].1).1, frame(60, 1));
}

#[test]
fn event_idx_publishes_avail_event_and_honours_used_event() {
    let mem = guest();
    let mut r = rig(&mem, NetBackend::loopback(), true);
    for i in 0..2 {
        r.post(0x10_0000 + 0x1_0000 * i, 2048);
    }
    // The driver wants a transmit interrupt only once two are used.
    r.tx.set_used_event(1);
    r.send(0x40_0000, &frame(60, 0));
    r.w.process_tx();
    assert_eq!(r.irq.count(InterruptCause::Queue(1)), 0);
    assert_eq!(r.tx.avail_event(), 1, "device asks to hear of the next chain");
    r.send(0x41_0000, &frame(60, 1));
    r.w.process_tx();
    assert_eq!(r.irq.count(InterruptCause::Queue(1)), 1);
    assert_eq!(r.tx.avail_event(), 2);
    r.w.process_rx();
    assert_eq!(r.rx.used().len(), 2);
    // used_event 0 on rx: the first used entry interrupts, later ones in the
    // same batch do not add more.
    assert_eq!(r.irq.count(InterruptCause::Queue(0)), 1);
    // Out of receive buffers with a frame in hand: avail_event says "tell me
    // about the next buffer".
    r.send(0x42_0000, &frame(60, 2));
    r.run();
    assert!(r.w.pending.is_some());
    assert_eq!(r.rx.avail_event(), 2);
}

#[test]
fn config_space_and_features() {
    let mut net = Net::new("net0", NetBackend::loopback(), MAC);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = net.device_features();
    for want in [
        features::VERSION_1,
        features::RING_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(f & want, 0, "{want:#x} not offered");
    }
    // No CSUM, GUEST_CSUM, GSO, MRG_RXBUF, CTRL_VQ, MQ.
    for bit in [0, 1, 6, 7, 11, 15, 17, 22] {
        assert_eq!(f & (1 << bit), 0, "bit {bit} offered");
    }
    let mut cfg = [0xffu8; 10];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(&cfg[6..8], &VIRTIO_NET_S_LINK_UP.to_le_bytes());
    assert_eq!(&cfg[8..], &[0, 0]);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 1);
    assert!(!net.write_config(0, &[0; 6]), "the MAC is read-only");
    assert_eq!(net.mac(), MAC);
}

#[test]
fn activation_needs_both_queues() {
    let mem = guest();
    let tq = TestQueue::new(&mem, 0, 16);
    let mut net = Net::new("net0", NetBackend::loopback(), MAC);
    let r = net.activate(Activation {
        mem: direct_view(mem.clone()),
        queues: vec![ActiveQueue {
            index: 0,
            queue: tq.queue(),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }],
        interrupt: Arc::new(Irq::default()),
        acked_features: features::VERSION_1,
        metrics: Arc::default(),
    });
    assert!(matches!(r, Err(ActivateError::Invalid(_))));
}

const DRIVER: u8 = status::ACKNOWLEDGE | status::DRIVER;

/// What a driver does: negotiate, describe both queues, DRIVER_OK.
fn bring_up(s: &mut VirtioState, rx: &TestQueue, tx: &TestQueue, feats: u64) {
    s.set_status(status::ACKNOWLEDGE);
    s.set_status(DRIVER);
    s.select_driver_features(0);
    s.write_driver_features(feats as u32);
    s.select_driver_features(1);
    s.write_driver_features((feats >> 32) as u32);
    s.set_status(DRIVER | status::FEATURES_OK);
    for (i, q) in [(0, rx), (1, tx)] {
        s.select_queue(i);
        s.set_queue_size(16);
        for (which, addr) in [
            (QueueAddress::Desc, q.desc_table_addr()),
            (QueueAddress::Avail, q.avail_addr()),
            (QueueAddress::Used, q.used_addr()),
        ] {
            s.set_queue_address(which, Half::Low, addr as u32);
            s.set_queue_address(which, Half::High, (addr >> 32) as u32);
        }
        s.set_queue_ready(true);
    }
    s.set_status(DRIVER | status::FEATURES_OK | status::DRIVER_OK);
}

#[test]
fn driver_ok_starts_a_worker_that_answers_notifications_until_reset() {
    let mem = guest();
    let irq = Arc::new(Irq::default());
    let metrics = Arc::new(DeviceMetrics::default());
    let net = Net::new("net0", NetBackend::loopback(), MAC);
    let mut s = VirtioState::new(
        Box::new(net),
        DmaMode::Bypass,
        false,
        direct_view(mem.clone()),
        irq.clone(),
        metrics.clone(),
    )
    .unwrap();
    let feats = s.offered_features();
    assert_ne!(feats & features::RING_EVENT_IDX, 0);

    for (round, base) in [(0u8, 0u64), (1, 0x8000)] {
        let mut rx = TestQueue::new(&mem, base, 16);
        let mut tx = TestQueue::new(&mem, base + 0x4000, 16);
        bring_up(&mut s, &rx, &tx, feats);
        assert_eq!(s.status() & status::DRIVER_OK, status::DRIVER_OK);
        assert_eq!(s.status() & status::DEVICE_NEEDS_RESET, 0);

        // Guest: two receive buffers, one frame, notify through the
        // ioeventfds the VMM would register.
        mem.write_slice(&[0; 4096], GuestAddress(0x10_0000)).unwrap();
        rx.add(&[Desc::w(0x10_0000, 2048)]);
        rx.add(&[Desc::w(0x10_1000, 2048)]);
        s.notify_events()[0].write(1).unwrap();
        let data = frame(500, round);
        mem.write_slice(&[0; NET_HDR_LEN], GuestAddress(0x40_0000)).unwrap();
        mem.write_slice(&data, GuestAddress(0x40_1000)).unwrap();
        let tx_head = tx.add(&[Desc::r(0x40_0000, NET_HDR_LEN as u32), Desc::r(0x40_1000, 500)]);
        s.notify_events()[1].write(1).unwrap();

        assert_eq!(tx.wait_used(1), vec![(u32::from(tx_head), 0)]);
        let used = rx.wait_used(1);
        assert_eq!(used[0].1, 512);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[..NET_HDR_LEN], ZERO_HDR_ONE_BUFFER);
        assert_eq!(got[NET_HDR_LEN..], data[..]);
        wait_for(|| {
            irq.count(InterruptCause::Queue(0)) > usize::from(round)
                && irq.count(InterruptCause::Queue(1)) > usize::from(round)
        });

        // Reset: the worker stops; a later notification is not served.
        s.set_status(0);
        tx.add(&[Desc::r(0x40_0000, NET_HDR_LEN as u32), Desc::r(0x40_1000, 500)]);
        s.notify(1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(tx.used().is_empty(), "served after reset");
    }
    assert_eq!(counter(&metrics.activations), 2);
    assert_eq!(counter(&metrics.resets), 2);
    assert_eq!(counter(&metrics.requests), 4);
}

/// The TAP test runs in a network namespace of its own: the test binary
/// re-runs itself, for this test only, under `unshare -n`, as root. There it
/// creates `veiltap0`, gives the host side 10.11.12.1/24 and serves the
/// device's queues with a real worker:
/// - guest to host: the guest transmits a UDP datagram to 10.11.12.1:5555;
///   a UDP socket bound there must receive its payload from 10.11.12.2;
/// - host to guest: the guest transmits an ARP request for 10.11.12.1; the
///   kernel's ARP reply must arrive in a receive buffer, with a clean header.
///
/// Without root (or without `unshare`, `ip` or /dev/net/tun) it prints why
/// and passes without testing.
#[test]
fn tap_carries_frames_both_ways_in_a_network_namespace() {
    const CHILD: &str = "VEIL_TAP_TEST_IN_NETNS";
    if std::env::var_os(CHILD).is_some() {
        return tap_round_trip();
    }
    let usable = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !std::path::Path::new("/dev/net/tun").exists() {
        return eprintln!("skipped: no /dev/net/tun");
    }
    if !usable("unshare", &["-n", "true"]) {
        return eprintln!("skipped: cannot create a network namespace (needs root and unshare)");
    }
    if !usable("ip", &["-V"]) {
        return eprintln!("skipped: no `ip` command");
    }
    let path = module_path!();
    let name = format!(
        "{}::tap_carries_frames_both_ways_in_a_network_namespace",
        path.split_once("::").map_or(path, |(_, rest)| rest)
    );
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .arg("-n")
        .arg(exe)
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "TAP test in the namespace failed:\n{stdout}\n{stderr}"
    );
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?} failed");
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const GUEST_IP: [u8; 4] = [10, 11, 12, 2];
const HOST_IP: [u8; 4] = [10, 11, 12, 1];

fn udp_frame(dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4444u16.to_be_bytes());
    f.extend_from_slice(&5555u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(payload);
    f
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f
}

/// The body of the TAP test, inside the namespace.
fn tap_round_trip() {
    let backend = NetBackend::tap("veiltap%d").unwrap();
    let ifname = backend.tap_name().unwrap().to_string();
    assert!(ifname.starts_with("veiltap"), "{ifname}");
    // Keep IPv6 chatter (router solicitations...) off the link.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "1");
    ip(&["addr", "add", "10.11.12.1/24", "dev", &ifname]);
    ip(&["link", "set", "dev", &ifname, "up"]);
    // (/sys shows the namespace it was mounted in, not this one: ask `ip`.)
    let link = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", &ifname])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    let mut words = link.split_whitespace().skip_while(|&w| w != "link/ether");
    let mac_text = words.nth(1).expect("no MAC address in `ip link` output");
    let host_mac: Vec<u8> = mac_text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let host_mac: [u8; 6] = host_mac.try_into().unwrap();
    let sock = std::net::UdpSocket::bind("10.11.12.1:5555").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let mem = guest();
    let mut rx = TestQueue::new(&mem, 0, 16);
    let mut tx = TestQueue::new(&mem, 0x4000, 16);
    let rx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let tx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let metrics = Arc::new(DeviceMetrics::default());
    let mut net = Net::new("net0", backend, MAC);
    net.activate(Activation {
        mem: direct_view(mem.clone()),
        queues: vec![
            ActiveQueue {
                index: 0,
                queue: rx.queue(),
                notify: rx_notify.try_clone().unwrap(),
            },
            ActiveQueue {
                index: 1,
                queue: tx.queue(),
                notify: tx_notify.try_clone().unwrap(),
            },
        ],
        interrupt: Arc::new(Irq::default()),
        acked_features: features::VERSION_1,
        metrics: metrics.clone(),
    })
    .unwrap();
    let mut heads = Vec::new();
    for i in 0..8u64 {
        heads.push(rx.add(&[Desc::w(0x10_0000 + 0x1000 * i, 2048)]));
    }
    rx_notify.write(1).unwrap();

    // Guest to host.
    let payload = b"hello from the guest";
    let out = udp_frame(host_mac, payload);
    mem.write_slice(&[0; NET_HDR_LEN], GuestAddress(0x40_0000)).unwrap();
    mem.write_slice(&out, GuestAddress(0x40_1000)).unwrap();
    tx.add(&[
        Desc::r(0x40_0000, NET_HDR_LEN as u32),
        Desc::r(0x40_1000, out.len() as u32),
    ]);
    tx_notify.write(1).unwrap();
    let mut got = [0u8; 64];
    let (n, from) = sock.recv_from(&mut got).unwrap();
    assert_eq!(&got[..n], payload);
    assert_eq!(from, "10.11.12.2:4444".parse().unwrap());

    // Host to guest: the kernel answers our ARP request.
    let arp = arp_request();
    mem.write_slice(&arp, GuestAddress(0x41_1000)).unwrap();
    mem.write_slice(&[0; NET_HDR_LEN], GuestAddress(0x41_0000)).unwrap();
    tx.add(&[
        Desc::r(0x41_0000, NET_HDR_LEN as u32),
        Desc::r(0x41_1000, arp.len() as u32),
    ]);
    tx_notify.write(1).unwrap();
    let mut found = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !found && std::time::Instant::now() < deadline {
        for (id, len) in rx.used() {
            let slot = heads.iter().position(|&h| u32::from(h) == id).unwrap();
            let at = 0x10_0000 + 0x1000 * slot as u64;
            let mut f = vec![0u8; len as usize];
            mem.read_slice(&mut f, GuestAddress(at)).unwrap();
            assert_eq!(f[..NET_HDR_LEN], ZERO_HDR_ONE_BUFFER);
            let eth = &f[NET_HDR_LEN..];
            let is_reply = eth.len() >= 42
                && eth[..6] == MAC
                && eth[12..14] == [0x08, 0x06]
                && eth[20..22] == [0, 2]
                && eth[22..28] == host_mac
                && eth[28..32] == HOST_IP
                && eth[32..38] == MAC
                && eth[38..42] == GUEST_IP;
            found |= is_reply;
            // Give the buffer back for whatever else arrives.
            heads[slot] = rx.add(&[Desc::w(at, 2048)]);
            rx_notify.write(1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(found, "no ARP reply from the host");
    assert_eq!(counter(&metrics.io_errors), 0);
    assert!(counter(&metrics.requests) >= 3);
    net.reset();
}
