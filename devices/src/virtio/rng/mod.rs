//! virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue
//! whose device-writable buffers the device fills with bytes from the
//! host's /dev/urandom, at most `MAX_FILL` bytes per chain.
//!
//! Counters: `requests` and `bytes_written` per chain filled;
//! `bad_requests` for chains with device-readable buffers (given back
//! empty); `io_errors` when the host source fails; `bad_descriptors` /
//! `dma_denied` for chains that cannot be walked or written.

use super::net::chain::{complete, memory_error_counter, notify_used, pop_chain, Buffers};
use super::take_queues;
use super::worker::Worker;
use super::{
    device_type, features, ActivateError, Activation, ActiveQueue, DeviceMetrics, VirtioDevice, VirtioInterrupt,
};
use crate::dma::DmaMemory;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;

/// Most bytes written into one chain; the rest of a larger chain is left
/// alone (the used length says how much was filled).
pub const MAX_FILL: usize = 64 * 1024;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Chains handled per wake-up before the loop looks at other events.
const BUDGET: usize = 256;

/// A virtio-rng device.
pub struct Rng {
    name: String,
    source: File,
    worker: Option<Worker>,
}

impl Rng {
    /// An entropy device reading the host's /dev/urandom.
    pub fn new(name: &str) -> io::Result<Rng> {
        let source = File::open("/dev/urandom")
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/urandom: {e}")))?;
        Ok(Self::with_source(name, source))
    }

    /// An entropy device reading `source` (a file that never runs dry, such
    /// as /dev/urandom).
    pub fn with_source(name: &str, source: File) -> Rng {
        Rng {
            name: name.to_string(),
            source,
            worker: None,
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    /// No configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
        let [queue] = take_queues(queues, &self.name)?;
        let handler = RngWorker {
            mem,
            queue,
            source: self.source.try_clone()?,
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

struct RngWorker {
    mem: DmaMemory,
    queue: ActiveQueue,
    source: File,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    bufs: Buffers,
    chunk: Vec<u8>,
}

impl RngWorker {
    fn process(&mut self) {
        let RngWorker {
            mem,
            queue,
            source,
            interrupt,
            metrics,
            bufs,
            chunk,
        } = self;
        if let Err(e) = queue.queue.disable_notification(mem) {
            log::debug!("rng: cannot disable notifications: {e}");
        }
        let mut done = 0;
        while let Some(chain) = pop_chain(&mut queue.queue, mem, metrics) {
            let len = match bufs.load(chain) {
                Ok(()) => fill(bufs, mem, metrics, source, chunk),
                Err(e) => {
                    DeviceMetrics::inc(&metrics.bad_descriptors);
                    log::debug!("rng: chain {}: {e:?}", bufs.head);
                    0
                }
            };
            complete(&mut queue.queue, mem, metrics, bufs.head, len);
            done += 1;
            if done == BUDGET {
                let _ = queue.notify.write(1);
                break;
            }
        }
        if done > 0 {
            notify_used(&mut queue.queue, queue.index, mem, interrupt.as_ref(), metrics);
        }
    }
}

/// Fills a loaded chain with random bytes; returns how many were written.
fn fill(bufs: &Buffers, mem: &DmaMemory, metrics: &DeviceMetrics, source: &mut File, chunk: &mut [u8]) -> u32 {
    if !bufs.readable.is_empty() {
        DeviceMetrics::inc(&metrics.bad_requests);
        log::debug!("rng: chain {} has device-readable buffers", bufs.head);
        return 0;
    }
    let want = usize::try_from(bufs.writable_len).unwrap_or(MAX_FILL).min(MAX_FILL);
    let mut w = bufs.writer();
    while w.written() < want {
        let n = (want - w.written()).min(chunk.len());
        if let Err(e) = source.read_exact(&mut chunk[..n]) {
            DeviceMetrics::inc(&metrics.io_errors);
            log::warn!("rng: host entropy source failed: {e}");
            break;
        }
        if let Err(e) = w.write(mem, &chunk[..n]) {
            DeviceMetrics::inc(memory_error_counter(metrics, &e));
            log::debug!("rng: chain {}: {e}", bufs.head);
            return 0;
        }
    }
    if w.written() > 0 {
        DeviceMetrics::inc(&metrics.requests);
        DeviceMetrics::add(&metrics.bytes_written, w.written() as u64);
    }
    w.written() as u32
}

impl MutEventSubscriber for RngWorker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.queue.notify.read();
        RngWorker::process(self);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue.notify, EventSet::IN)) {
            log::error!("rng: cannot watch queue notifications: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::direct_view;
    use crate::virtio::net::testutil::{wait_for, Desc, Irq, TestQueue};
    use crate::virtio::InterruptCause;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn start(mem: &GuestMemoryMmap, tq: &TestQueue) -> (Rng, EventFd, Arc<Irq>, Arc<DeviceMetrics>) {
        let irq = Arc::new(Irq::default());
        let metrics = Arc::new(DeviceMetrics::default());
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut rng = Rng::new("rng0").unwrap();
        rng.activate(Activation {
            mem: direct_view(mem.clone()),
            queues: vec![ActiveQueue {
                index: 0,
                queue: tq.queue(),
                notify: notify.try_clone().unwrap(),
            }],
            interrupt: irq.clone(),
            acked_features: features::VERSION_1,
            metrics: metrics.clone(),
        })
        .unwrap();
        (rng, notify, irq, metrics)
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_buffers_reports_lengths_and_interrupts() {
        let mem = guest();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let (mut rng, notify, irq, metrics) = start(&mem, &tq);
        let a = tq.add(&[Desc::w(0x10_0000, 64)]);
        let b = tq.add(&[Desc::w(0x11_0000, 40), Desc::w(0x12_0000, 24)]);
        notify.write(1).unwrap();
        let used = tq.wait_used(2);
        assert_eq!(used, vec![(u32::from(a), 64), (u32::from(b), 64)]);
        let first = read(&mem, 0x10_0000, 64);
        let mut second = read(&mem, 0x11_0000, 40);
        second.extend(read(&mem, 0x12_0000, 24));
        assert_ne!(first, vec![0; 64], "buffer left unfilled");
        assert_ne!(second, vec![0; 64], "buffer left unfilled");
        assert_ne!(first, second, "two requests got the same bytes");
        wait_for(|| irq.count(InterruptCause::Queue(0)) >= 1);
        assert_eq!(metrics.requests.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.bytes_written.load(Ordering::Relaxed), 128);
        rng.reset();
    }

    #[test]
    fn large_chains_are_filled_up_to_the_cap_only() {
        let mem = guest();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let (_rng, notify, _irq, _) = start(&mem, &tq);
        let len = 2 * MAX_FILL as u32;
        let head = tq.add(&[Desc::w(0x10_0000, len)]);
        notify.write(1).unwrap();
        assert_eq!(tq.wait_used(1), vec![(u32::from(head), MAX_FILL as u32)]);
        let past = read(&mem, 0x10_0000 + MAX_FILL as u64, MAX_FILL);
        assert!(past.iter().all(|&b| b == 0), "wrote past the cap");
        let filled = read(&mem, 0x10_0000 + MAX_FILL as u64 - 64, 64);
        assert_ne!(filled, vec![0; 64]);
    }

    #[test]
    fn bad_chains_are_given_back_empty_and_counted() {
        let mem = guest();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let (_rng, notify, _irq, metrics) = start(&mem, &tq);
        let readable = tq.add(&[Desc::r(0x10_0000, 16), Desc::w(0x11_0000, 16)]);
        let outside = tq.add(&[Desc::w(0x7fff_0000, 16)]);
        let looped = tq.add_raw(&[(0x10_0000, 8, 3, 1), (0x11_0000, 8, 3, 0)]);
        let good = tq.add(&[Desc::w(0x12_0000, 8)]);
        notify.write(1).unwrap();
        let used = tq.wait_used(4);
        assert_eq!(
            used,
            vec![
                (u32::from(readable), 0),
                (u32::from(outside), 0),
                (u32::from(looped), 0),
                (u32::from(good), 8)
            ]
        );
        assert!(read(&mem, 0x11_0000, 16).iter().all(|&b| b == 0));
        assert_eq!(metrics.bad_requests.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.bad_descriptors.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn stops_serving_after_reset() {
        let mem = guest();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let (mut rng, notify, _irq, _) = start(&mem, &tq);
        rng.reset();
        tq.add(&[Desc::w(0x10_0000, 8)]);
        notify.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(tq.used().is_empty());
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
    }
}
