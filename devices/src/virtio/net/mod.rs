//! virtio-net (virtio 1.2 §5.1): one receive queue (0) and one transmit
//! queue (1), no control queue, no offloads.
//!
//! Features offered: VERSION_1, MAC, STATUS (the link is always up) and
//! RING_EVENT_IDX. Without MRG_RXBUF, CSUM or GSO every frame is preceded by
//! the 12-byte `virtio_net_hdr` (with `num_buffers`) and fits in one chain.
//! On transmit the device reads the chain, skips the header (it carries
//! nothing that was negotiated) and hands the Ethernet frame to the backend;
//! on receive it writes an all-zero header with `num_buffers` = 1 and the
//! frame into one receive chain.
//!
//! Counters (`DeviceMetrics`):
//! - `requests`: frames handed to the backend plus frames delivered to the
//!   guest; `bytes_read`/`bytes_written`: transmit/receive chain bytes,
//!   header included.
//! - `bad_requests`: frames dropped because of what the guest gave: a
//!   transmit chain of no more than a header or longer than header + 64 KiB,
//!   a frame larger than the receive chain it would go to (the frame is
//!   dropped, the chain stays for the next one), and receive chains with
//!   device-readable buffers or no room for a header (given back empty).
//! - `io_errors`: frames dropped on the host side: the backend failed or had
//!   no room (a full loopback), or a host frame larger than 64 KiB.
//! - `bad_descriptors` / `dma_denied`: chains that could not be walked or
//!   whose buffers are not guest memory / not mapped; given back empty.
//!
//! The queues are served on a worker thread. Receive is driven by the
//! backend's fd: while the guest has no receive buffer for the frame in
//! hand, the fd is not watched, and the next receive-queue notification
//! re-arms it.

mod backend;
pub(crate) mod chain;
mod tap;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use backend::{Backend, Loopback, NetBackend};
pub use tap::Tap;

use super::take_queues;
use super::worker::Worker;
use super::{
    device_type, features, ActivateError, Activation, ActiveQueue, DeviceMetrics, VirtioDevice, VirtioInterrupt,
};
use crate::dma::DmaMemory;
use chain::{complete, memory_error_counter, notify_used, pop_chain, unpop, Buffers};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

/// The device provides the MAC address in its configuration.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The configuration has a link status field.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Link status bit of the `status` field.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `struct virtio_net_hdr` with `num_buffers`, as VERSION_1 has it.
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame the device carries, either way.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Queue 0 receives, queue 1 transmits.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Chains handled per wake-up before other events get a turn.
const BUDGET: usize = 256;

const EV_RX: u32 = 0;
const EV_TX: u32 = 1;
const EV_BACKEND: u32 = 2;

/// The worker of `Net::sync_worker`.
#[doc(hidden)]
pub struct SyncWorker(NetWorker);

impl SyncWorker {
    /// What a notification of the transmit queue does.
    pub fn process_tx(&mut self) {
        self.0.process_tx();
    }

    /// What a notification of the receive queue (or a frame from the
    /// backend) does.
    pub fn process_rx(&mut self) {
        self.0.process_rx();
    }
}

/// A virtio-net device.
pub struct Net {
    name: String,
    mac: [u8; 6],
    backend: NetBackend,
    worker: Option<Worker>,
}

impl Net {
    /// A network device called `name` (for logs and its worker thread),
    /// with the given backend and MAC address.
    pub fn new(name: &str, backend: NetBackend, mac: [u8; 6]) -> Net {
        Net {
            name: name.to_string(),
            mac,
            backend,
            worker: None,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn backend(&self) -> &NetBackend {
        &self.backend
    }

    /// The worker of an activation, before it gets a thread: `activate`
    /// spawns one for it; fuzzing and tests serve it on their own thread,
    /// step by step.
    #[doc(hidden)]
    pub fn sync_worker(&mut self, activation: Activation) -> Result<SyncWorker, ActivateError> {
        self.reset();
        let Activation {
            mem,
            queues,
            interrupt,
            metrics,
            ..
        } = activation;
        let [rx, tx] = take_queues(queues, &self.name)?;
        let backend = self.backend.connect()?;
        Ok(SyncWorker(NetWorker::new(mem, rx, tx, backend, interrupt, metrics)))
    }

    /// `struct virtio_net_config` up to `status` (no MQ, MTU, speed...).
    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        chain::read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let SyncWorker(handler) = self.sync_worker(activation)?;
        self.worker = Some(Worker::spawn(&self.name, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

/// What became of a frame offered to a receive chain.
enum Delivery {
    /// Written; the chain is used with this length.
    Done(u32),
    /// The frame does not fit: drop it, keep the chain.
    TooBig,
    /// The chain is unusable; it goes back empty and the frame waits for
    /// the next one.
    BadChain,
}

/// Serves both queues on the worker thread.
struct NetWorker {
    mem: DmaMemory,
    rx: ActiveQueue,
    tx: ActiveQueue,
    backend: Box<dyn Backend>,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    bufs: Buffers,
    tx_frame: Vec<u8>,
    /// One byte longer than the largest frame, to tell truncated ones.
    rx_frame: Vec<u8>,
    /// Length of the frame in `rx_frame` still waiting for a guest buffer.
    pending: Option<usize>,
    backend_watched: bool,
    backend_failed: bool,
}

impl NetWorker {
    fn new(
        mem: DmaMemory,
        rx: ActiveQueue,
        tx: ActiveQueue,
        backend: Box<dyn Backend>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
    ) -> Self {
        NetWorker {
            mem,
            rx,
            tx,
            backend,
            interrupt,
            metrics,
            bufs: Buffers::default(),
            tx_frame: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME_LEN),
            rx_frame: vec![0; MAX_FRAME_LEN + 1],
            pending: None,
            backend_watched: false,
            backend_failed: false,
        }
    }

    /// Sends every available transmit chain (up to the budget).
    fn process_tx(&mut self) {
        let NetWorker {
            mem,
            tx,
            backend,
            interrupt,
            metrics,
            bufs,
            tx_frame,
            ..
        } = self;
        if let Err(e) = tx.queue.disable_notification(mem) {
            log::debug!("tx: cannot disable notifications: {e}");
        }
        let mut done = 0;
        while let Some(chain) = pop_chain(&mut tx.queue, mem, metrics) {
            match bufs.load(chain) {
                Ok(()) => transmit(bufs, mem, metrics, tx_frame, backend.as_mut()),
                Err(e) => {
                    DeviceMetrics::inc(&metrics.bad_descriptors);
                    log::debug!("tx: chain {}: {e:?}", bufs.head);
                }
            }
            complete(&mut tx.queue, mem, metrics, bufs.head, 0);
            done += 1;
            if done == BUDGET {
                // More may be waiting with notifications off: come back
                // after the other events.
                let _ = tx.notify.write(1);
                break;
            }
        }
        if done > 0 {
            notify_used(&mut tx.queue, tx.index, mem, interrupt.as_ref(), metrics);
        }
    }

    /// Moves frames from the backend into receive chains until the backend
    /// has none, the guest has no chain for the frame in hand (it stays
    /// pending), or the budget is spent.
    fn process_rx(&mut self) {
        let NetWorker {
            mem,
            rx,
            backend,
            interrupt,
            metrics,
            bufs,
            rx_frame,
            pending,
            backend_failed,
            ..
        } = self;
        let mut used = 0;
        for _ in 0..BUDGET {
            let len = match *pending {
                Some(len) => len,
                None if *backend_failed => break,
                None => match backend.recv(rx_frame) {
                    Ok(Some(len)) if len > MAX_FRAME_LEN => {
                        DeviceMetrics::inc(&metrics.io_errors);
                        log::debug!("rx: dropped a host frame over {MAX_FRAME_LEN} bytes");
                        continue;
                    }
                    Ok(Some(len)) => {
                        *pending = Some(len);
                        len
                    }
                    Ok(None) => break,
                    Err(e) => {
                        DeviceMetrics::inc(&metrics.io_errors);
                        log::warn!("rx: backend failed, no more frames for the guest: {e}");
                        *backend_failed = true;
                        break;
                    }
                },
            };
            let Some(chain) = pop_chain(&mut rx.queue, mem, metrics) else {
                break;
            };
            let delivery = match bufs.load(chain) {
                Ok(()) => deliver(bufs, mem, metrics, &rx_frame[..len]),
                Err(e) => {
                    DeviceMetrics::inc(&metrics.bad_descriptors);
                    log::debug!("rx: chain {}: {e:?}", bufs.head);
                    Delivery::BadChain
                }
            };
            match delivery {
                Delivery::Done(n) => {
                    complete(&mut rx.queue, mem, metrics, bufs.head, n);
                    DeviceMetrics::inc(&metrics.requests);
                    DeviceMetrics::add(&metrics.bytes_written, u64::from(n));
                    *pending = None;
                    used += 1;
                }
                Delivery::TooBig => {
                    unpop(&mut rx.queue);
                    DeviceMetrics::inc(&metrics.bad_requests);
                    *pending = None;
                }
                Delivery::BadChain => {
                    complete(&mut rx.queue, mem, metrics, bufs.head, 0);
                    used += 1;
                }
            }
        }
        if used > 0 {
            notify_used(&mut rx.queue, rx.index, mem, interrupt.as_ref(), metrics);
        }
    }

    /// Watches the backend exactly while there is no frame waiting for a
    /// guest buffer (and the backend works).
    fn sync_backend_watch(&mut self, ops: &mut EventOps) {
        let want = self.pending.is_none() && !self.backend_failed;
        if want == self.backend_watched {
            return;
        }
        let events = Events::with_data_raw(self.backend.as_raw_fd(), EV_BACKEND, EventSet::IN);
        let result = if want { ops.add(events) } else { ops.remove(events) };
        match result {
            Ok(()) => self.backend_watched = want,
            Err(e) => log::warn!("net: cannot change the backend watch: {e:?}"),
        }
    }
}

/// Hands the frame of a loaded transmit chain to the backend.
fn transmit(bufs: &Buffers, mem: &DmaMemory, metrics: &DeviceMetrics, frame: &mut Vec<u8>, backend: &mut dyn Backend) {
    let len = bufs.readable_len;
    if len <= NET_HDR_LEN as u64 || len > (NET_HDR_LEN + MAX_FRAME_LEN) as u64 {
        DeviceMetrics::inc(&metrics.bad_requests);
        log::debug!("tx: dropped a chain of {len} bytes");
        return;
    }
    if let Err(e) = bufs.read_all(mem, frame) {
        DeviceMetrics::inc(memory_error_counter(metrics, &e));
        log::debug!("tx: chain {}: {e}", bufs.head);
        return;
    }
    DeviceMetrics::add(&metrics.bytes_read, len);
    match backend.send(&frame[NET_HDR_LEN..]) {
        Ok(true) => DeviceMetrics::inc(&metrics.requests),
        Ok(false) => DeviceMetrics::inc(&metrics.io_errors),
        Err(e) => {
            // The first host-side failure is news (a TAP deleted under us);
            // the frames after it are only counted.
            if metrics.io_errors.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                log::warn!("tx: backend failed, dropping frames (counted in io_errors): {e}");
            } else {
                log::debug!("tx: backend: {e}");
            }
            DeviceMetrics::inc(&metrics.io_errors);
        }
    }
}

/// Writes the header and `frame` into a loaded receive chain.
fn deliver(bufs: &Buffers, mem: &DmaMemory, metrics: &DeviceMetrics, frame: &[u8]) -> Delivery {
    if !bufs.readable.is_empty() || bufs.writable_len < NET_HDR_LEN as u64 {
        DeviceMetrics::inc(&metrics.bad_requests);
        log::debug!("rx: chain {} is not a receive buffer", bufs.head);
        return Delivery::BadChain;
    }
    let total = NET_HDR_LEN + frame.len();
    if bufs.writable_len < total as u64 {
        log::debug!(
            "rx: dropped a {}-byte frame for a {}-byte buffer",
            frame.len(),
            bufs.writable_len
        );
        return Delivery::TooBig;
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    // num_buffers: always one chain without MRG_RXBUF.
    hdr[10..].copy_from_slice(&1u16.to_le_bytes());
    let mut w = bufs.writer();
    let written = w
        .write(mem, &hdr)
        .and_then(|_| w.write(mem, frame))
        .map(|_| w.written());
    match written {
        Ok(n) => Delivery::Done(n as u32),
        Err(e) => {
            DeviceMetrics::inc(memory_error_counter(metrics, &e));
            log::debug!("rx: chain {}: {e}", bufs.head);
            Delivery::BadChain
        }
    }
}

impl MutEventSubscriber for NetWorker {
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
            EV_BACKEND => {
                self.process_rx();
                if events.event_set().intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    log::warn!("net: backend hung up or failed");
                    self.backend_failed = true;
                }
            }
            other => log::warn!("net: unexpected event {other}"),
        }
        self.sync_backend_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [(self.rx.notify.as_raw_fd(), EV_RX), (self.tx.notify.as_raw_fd(), EV_TX)] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("net: cannot watch queue notifications: {e:?}");
            }
        }
        self.sync_backend_watch(ops);
    }
}
