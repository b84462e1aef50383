//! virtio-console (virtio 1.2 §5.3) in its single-port form: no MULTIPORT,
//! so just receiveq (0) and transmitq (1) of port 0.
//!
//! Guest output (transmitq) goes to a sink, any `Write`: the legacy
//! serial's `SerialSink` (stdout, a file, nothing) fits. Host input, if
//! given, is read from a file descriptor and written into receive buffers;
//! while the guest has none, the input is not read, and the next receiveq
//! notification re-arms it. At end of input it is no longer watched.
//!
//! Features: VERSION_1, RING_EVENT_IDX, EMERG_WRITE (a write to `emerg_wr`
//! prints its low byte at once) and, when a size is given, SIZE.
//! Configuration: cols, rows (valid with SIZE), max_nr_ports (reads 1; only
//! meaningful with MULTIPORT, which is not offered), emerg_wr.
//!
//! Counters: `requests` per chain, `bytes_read` (output) and
//! `bytes_written` (input); `io_errors` when the sink fails or the input
//! fails; `bad_requests` for transmit chains over `MAX_TX_CHAIN` bytes
//! (dropped) and receive chains with device-readable buffers or no room
//! (given back empty); `bad_descriptors` / `dma_denied` as for every device.

use super::net::chain::{complete, memory_error_counter, notify_used, pop_chain, read_config_bytes, Buffers};
use super::take_queues;
use super::worker::Worker;
use super::{
    device_type, features, ActivateError, Activation, ActiveQueue, DeviceMetrics, VirtioDevice, VirtioInterrupt,
};
use crate::dma::DmaMemory;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

/// Configuration has valid `cols` and `rows`.
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// Multiple ports and a control queue (not offered).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// Emergency writes through `emerg_wr`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 64;
/// Largest transmit chain printed; longer ones are dropped.
pub const MAX_TX_CHAIN: u64 = 64 * 1024;

/// Queue 0 receives, queue 1 transmits.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Offset of `emerg_wr` in the configuration.
const EMERG_WR: u64 = 8;
const CONFIG_LEN: usize = 12;
/// Host input read at once.
const INPUT_CHUNK: usize = 4096;
const BUDGET: usize = 256;

const EV_RX: u32 = 0;
const EV_TX: u32 = 1;
const EV_INPUT: u32 = 2;

/// Where guest console output goes; shared by the worker and emergency
/// writes from the vCPU thread.
type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// A single-port virtio console.
pub struct Console {
    name: String,
    sink: Sink,
    input: Option<File>,
    size: Option<(u16, u16)>,
    worker: Option<Worker>,
}

impl Console {
    /// A console called `name` whose output goes to `sink` and whose input,
    /// if any, is read from `input` (e.g. a duplicate of stdin).
    pub fn new(name: &str, sink: Box<dyn Write + Send>, input: Option<File>) -> Console {
        Console {
            name: name.to_string(),
            sink: Arc::new(Mutex::new(sink)),
            input,
            size: None,
            worker: None,
        }
    }

    /// Reports a console of `cols` x `rows` (offers VIRTIO_CONSOLE_F_SIZE).
    pub fn with_size(mut self, cols: u16, rows: u16) -> Console {
        self.size = Some((cols, rows));
        self
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let (cols, rows) = self.size.unwrap_or((0, 0));
        let mut c = [0u8; CONFIG_LEN];
        c[0..2].copy_from_slice(&cols.to_le_bytes());
        c[2..4].copy_from_slice(&rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        // emerg_wr (8..12) is write-only; it reads as zero.
        c
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        let size = if self.size.is_some() { VIRTIO_CONSOLE_F_SIZE } else { 0 };
        features::VERSION_1 | features::RING_EVENT_IDX | VIRTIO_CONSOLE_F_EMERG_WRITE | size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    /// Only `emerg_wr` is writable: its low byte goes to the sink at once.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset != EMERG_WR || !matches!(data.len(), 1 | 2 | 4) {
            return false;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = sink.write_all(&data[..1]).and_then(|_| sink.flush()) {
            log::debug!("{}: emergency write lost: {e}", self.name);
        }
        true
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let Activation {
            mem,
            queues,
            interrupt,
            metrics,
            ..
        } = activation;
        let [rx, tx] = take_queues(queues, &self.name)?;
        let input = match &self.input {
            Some(f) => Some(f.try_clone()?),
            None => None,
        };
        let handler = ConsoleWorker {
            mem,
            rx,
            tx,
            sink: self.sink.clone(),
            input_done: input.is_none(),
            input,
            input_watched: false,
            pending: Vec::with_capacity(INPUT_CHUNK),
            pending_at: 0,
            interrupt,
            metrics,
            bufs: Buffers::default(),
            chunk: vec![0; 4096],
        };
        self.worker = Some(Worker::spawn(&self.name, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

struct ConsoleWorker {
    mem: DmaMemory,
    rx: ActiveQueue,
    tx: ActiveQueue,
    sink: Sink,
    input: Option<File>,
    /// No input, or it ended or failed.
    input_done: bool,
    input_watched: bool,
    /// Input read but not yet in a guest buffer, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    bufs: Buffers,
    chunk: Vec<u8>,
}

impl ConsoleWorker {
    /// Prints every available transmit chain (up to the budget).
    fn process_tx(&mut self) {
        let ConsoleWorker {
            mem,
            tx,
            sink,
            interrupt,
            metrics,
            bufs,
            chunk,
            ..
        } = self;
        if let Err(e) = tx.queue.disable_notification(mem) {
            log::debug!("console tx: cannot disable notifications: {e}");
        }
        let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = 0;
        while let Some(chain) = pop_chain(&mut tx.queue, mem, metrics) {
            match bufs.load(chain) {
                Ok(()) => print_chain(bufs, mem, metrics, sink.as_mut(), chunk),
                Err(e) => {
                    DeviceMetrics::inc(&metrics.bad_descriptors);
                    log::debug!("console tx: chain {}: {e:?}", bufs.head);
                }
            }
            complete(&mut tx.queue, mem, metrics, bufs.head, 0);
            done += 1;
            if done == BUDGET {
                let _ = tx.notify.write(1);
                break;
            }
        }
        if done > 0 {
            if let Err(e) = sink.flush() {
                DeviceMetrics::inc(&metrics.io_errors);
                log::debug!("console tx: sink: {e}");
            }
            drop(sink);
            notify_used(&mut tx.queue, tx.index, mem, interrupt.as_ref(), metrics);
        }
    }

    /// Reads one chunk of host input, if nothing is waiting already.
    fn read_input(&mut self) {
        if self.pending_at < self.pending.len() || self.input_done {
            return;
        }
        let Some(input) = self.input.as_mut() else {
            return;
        };
        self.pending.resize(INPUT_CHUNK, 0);
        self.pending_at = 0;
        match input.read(&mut self.pending) {
            Ok(0) => {
                self.pending.clear();
                self.input_done = true;
                log::debug!("console: end of input");
            }
            Ok(n) => self.pending.truncate(n),
            Err(e) => {
                self.pending.clear();
                if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    DeviceMetrics::inc(&self.metrics.io_errors);
                    log::warn!("console: input failed, no more input: {e}");
                    self.input_done = true;
                }
            }
        }
    }

    /// Writes waiting input into receive chains until either runs out.
    fn process_rx(&mut self) {
        let ConsoleWorker {
            mem,
            rx,
            pending,
            pending_at,
            interrupt,
            metrics,
            bufs,
            ..
        } = self;
        let mut used = 0;
        while *pending_at < pending.len() && used < BUDGET {
            let Some(chain) = pop_chain(&mut rx.queue, mem, metrics) else {
                break;
            };
            used += 1;
            if let Err(e) = bufs.load(chain) {
                DeviceMetrics::inc(&metrics.bad_descriptors);
                log::debug!("console rx: chain {}: {e:?}", bufs.head);
                complete(&mut rx.queue, mem, metrics, bufs.head, 0);
                continue;
            }
            if !bufs.readable.is_empty() || bufs.writable_len == 0 {
                DeviceMetrics::inc(&metrics.bad_requests);
                complete(&mut rx.queue, mem, metrics, bufs.head, 0);
                continue;
            }
            let mut w = bufs.writer();
            match w.write(mem, &pending[*pending_at..]) {
                Ok(n) => {
                    *pending_at += n;
                    complete(&mut rx.queue, mem, metrics, bufs.head, n as u32);
                    DeviceMetrics::inc(&metrics.requests);
                    DeviceMetrics::add(&metrics.bytes_written, n as u64);
                }
                Err(e) => {
                    DeviceMetrics::inc(memory_error_counter(metrics, &e));
                    log::debug!("console rx: chain {}: {e}", bufs.head);
                    complete(&mut rx.queue, mem, metrics, bufs.head, 0);
                }
            }
        }
        if used > 0 {
            notify_used(&mut rx.queue, rx.index, mem, interrupt.as_ref(), metrics);
        }
    }

    /// Watches the input exactly while nothing read is waiting for a guest
    /// buffer and the input has not ended.
    fn sync_input_watch(&mut self, ops: &mut EventOps) {
        let Some(input) = &self.input else {
            return;
        };
        let want = !self.input_done && self.pending_at >= self.pending.len();
        if want == self.input_watched {
            return;
        }
        let events = Events::with_data(input, EV_INPUT, EventSet::IN);
        let result = if want { ops.add(events) } else { ops.remove(events) };
        match result {
            Ok(()) => self.input_watched = want,
            Err(e) => {
                log::warn!("console: cannot change the input watch: {e:?}");
                self.input_done = true;
            }
        }
    }
}

/// Copies a loaded transmit chain to the sink, a chunk at a time.
fn print_chain(bufs: &Buffers, mem: &DmaMemory, metrics: &DeviceMetrics, sink: &mut dyn Write, chunk: &mut [u8]) {
    if bufs.readable_len > MAX_TX_CHAIN {
        DeviceMetrics::inc(&metrics.bad_requests);
        log::debug!("console tx: dropped a chain of {} bytes", bufs.readable_len);
        return;
    }
    let mut sink_failed = false;
    for seg in &bufs.readable {
        let mut at = 0u64;
        while at < u64::from(seg.len) {
            let n = (u64::from(seg.len) - at).min(chunk.len() as u64) as usize;
            let addr = seg.addr.0.checked_add(at).map(vm_memory::GuestAddress);
            let read = match addr {
                Some(a) => mem.read_slice(&mut chunk[..n], a),
                None => Err(vm_memory::GuestMemoryError::GuestAddressOverflow),
            };
            if let Err(e) = read {
                DeviceMetrics::inc(memory_error_counter(metrics, &e));
                log::debug!("console tx: chain {}: {e}", bufs.head);
                return;
            }
            DeviceMetrics::add(&metrics.bytes_read, n as u64);
            if !sink_failed {
                if let Err(e) = sink.write_all(&chunk[..n]) {
                    DeviceMetrics::inc(&metrics.io_errors);
                    log::debug!("console tx: sink: {e}");
                    sink_failed = true;
                }
            }
            at += n as u64;
        }
    }
    DeviceMetrics::inc(&metrics.requests);
}

impl MutEventSubscriber for ConsoleWorker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_RX => {
                let _ = self.rx.notify.read();
                self.process_rx();
            }
            EV_TX => {
                let _ = self.tx.notify.read();
                self.process_tx();
            }
            EV_INPUT => {
                if events.event_set().contains(EventSet::IN) {
                    self.read_input();
                } else {
                    // Hung up or failed with nothing to read.
                    self.input_done = true;
                }
                self.process_rx();
            }
            other => log::warn!("console: unexpected event {other}"),
        }
        self.sync_input_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [(self.rx.notify.as_raw_fd(), EV_RX), (self.tx.notify.as_raw_fd(), EV_TX)] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("console: cannot watch queue notifications: {e:?}");
            }
        }
        self.sync_input_watch(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::direct_view;
    use crate::virtio::net::testutil::{wait_for, Desc, Irq, TestQueue};
    use crate::virtio::InterruptCause;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    /// A sink the test can look into.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    struct Rig<'m> {
        mem: &'m GuestMemoryMmap,
        rx: TestQueue<'m>,
        tx: TestQueue<'m>,
        rx_notify: EventFd,
        tx_notify: EventFd,
        irq: Arc<Irq>,
        metrics: Arc<DeviceMetrics>,
        console: Console,
    }

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn start(mem: &GuestMemoryMmap, mut console: Console) -> Rig<'_> {
        let rx = TestQueue::new(mem, 0, 16);
        let tx = TestQueue::new(mem, 0x4000, 16);
        let rx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Irq::default());
        let metrics = Arc::new(DeviceMetrics::default());
        console
            .activate(Activation {
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
                interrupt: irq.clone(),
                acked_features: features::VERSION_1,
                metrics: metrics.clone(),
            })
            .unwrap();
        Rig {
            mem,
            rx,
            tx,
            rx_notify,
            tx_notify,
            irq,
            metrics,
            console,
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn output_reaches_the_sink_in_order() {
        let mem = guest();
        let out = Captured::default();
        let mut rig = start(&mem, Console::new("con0", Box::new(out.clone()), None));
        rig.mem.write_slice(b"hello, ", GuestAddress(0x10_0000)).unwrap();
        rig.mem.write_slice(b"world\n", GuestAddress(0x11_0000)).unwrap();
        rig.mem.write_slice(b"bye\n", GuestAddress(0x12_0000)).unwrap();
        let a = rig.tx.add(&[Desc::r(0x10_0000, 7), Desc::r(0x11_0000, 6)]);
        let b = rig.tx.add(&[Desc::r(0x12_0000, 4)]);
        rig.tx_notify.write(1).unwrap();
        assert_eq!(rig.tx.wait_used(2), vec![(u32::from(a), 0), (u32::from(b), 0)]);
        assert_eq!(out.text(), b"hello, world\nbye\n");
        wait_for(|| rig.irq.count(InterruptCause::Queue(1)) >= 1);
        assert_eq!(rig.metrics.requests.load(Ordering::Relaxed), 2);
        assert_eq!(rig.metrics.bytes_read.load(Ordering::Relaxed), 17);
    }

    #[test]
    fn oversized_and_broken_output_chains_are_dropped_and_counted() {
        let mem = guest();
        let out = Captured::default();
        let mut rig = start(&mem, Console::new("con0", Box::new(out.clone()), None));
        let big = rig
            .tx
            .add(&[Desc::r(0x10_0000, MAX_TX_CHAIN as u32), Desc::r(0x20_0000, 1)]);
        let outside = rig.tx.add(&[Desc::r(0x7000_0000, 4)]);
        rig.mem.write_slice(b"ok", GuestAddress(0x30_0000)).unwrap();
        let good = rig.tx.add(&[Desc::r(0x30_0000, 2)]);
        rig.tx_notify.write(1).unwrap();
        let used = rig.tx.wait_used(3);
        assert_eq!(
            used,
            vec![(u32::from(big), 0), (u32::from(outside), 0), (u32::from(good), 0)]
        );
        assert_eq!(out.text(), b"ok");
        assert_eq!(rig.metrics.bad_requests.load(Ordering::Relaxed), 1);
        assert_eq!(rig.metrics.bad_descriptors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn input_waits_for_buffers_then_reaches_them() {
        let mem = guest();
        let (host, ours) = UnixStream::pair().unwrap();
        let input = File::from(OwnedFd::from(ours));
        let mut rig = start(&mem, Console::new("con0", Box::new(io::sink()), Some(input)));
        (&host).write_all(b"typed").unwrap();
        // No receive buffer yet: nothing can be used.
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(rig.rx.used().is_empty());
        // A 3-byte buffer takes the first part, the next one the rest.
        let a = rig.rx.add(&[Desc::w(0x10_0000, 3)]);
        rig.rx_notify.write(1).unwrap();
        assert_eq!(rig.rx.wait_used(1), vec![(u32::from(a), 3)]);
        let b = rig.rx.add(&[Desc::w(0x11_0000, 64)]);
        rig.rx_notify.write(1).unwrap();
        assert_eq!(rig.rx.wait_used(1), vec![(u32::from(b), 2)]);
        assert_eq!(read(rig.mem, 0x10_0000, 3), b"typ");
        assert_eq!(read(rig.mem, 0x11_0000, 2), b"ed");
        // With a buffer already there, new input goes straight in.
        let c = rig.rx.add(&[Desc::w(0x12_0000, 64)]);
        rig.rx_notify.write(1).unwrap();
        (&host).write_all(b"more").unwrap();
        assert_eq!(rig.rx.wait_used(1), vec![(u32::from(c), 4)]);
        assert_eq!(read(rig.mem, 0x12_0000, 4), b"more");
        wait_for(|| rig.irq.count(InterruptCause::Queue(0)) >= 3);
        assert_eq!(rig.metrics.bytes_written.load(Ordering::Relaxed), 9);
        // End of input: nothing more, and no spinning on the closed fd.
        drop(host);
        let d = rig.rx.add(&[Desc::w(0x13_0000, 64)]);
        rig.rx_notify.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(rig.rx.used().is_empty(), "buffer {d} used without input");
        rig.console.reset();
    }

    #[test]
    fn config_features_and_emergency_write() {
        let out = Captured::default();
        let mut con = Console::new("con0", Box::new(out.clone()), None);
        assert_eq!(con.device_type(), 3);
        let f = con.device_features();
        assert_ne!(f & VIRTIO_CONSOLE_F_EMERG_WRITE, 0);
        assert_eq!(f & (VIRTIO_CONSOLE_F_SIZE | VIRTIO_CONSOLE_F_MULTIPORT), 0);
        con = con.with_size(132, 43);
        assert_ne!(con.device_features() & VIRTIO_CONSOLE_F_SIZE, 0);
        let mut cfg = [0u8; 12];
        con.read_config(0, &mut cfg);
        assert_eq!(&cfg[..8], &[132, 0, 43, 0, 1, 0, 0, 0]);
        assert!(con.write_config(8, &u32::from(b'!').to_le_bytes()));
        assert!(con.write_config(8, b"?"));
        assert!(!con.write_config(0, &[1, 0]), "cols is read-only");
        assert!(!con.write_config(9, b"x"));
        assert_eq!(out.text(), b"!?");
        assert_eq!(con.queue_max_sizes().len(), 2);
    }
}
