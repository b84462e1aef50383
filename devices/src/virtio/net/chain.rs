//! What every device here does with a descriptor chain before it looks at
//! the bytes: walk it once, check it, split it into device-readable and
//! device-writable buffers, then copy through the DMA view.
//!
//! It lives with virtio-net, the largest user; virtio-rng and virtio-console
//! use it too. Nothing in it is specific to networking.

use crate::dma::DmaMemory;
use crate::virtio::{DeviceMetrics, InterruptCause, VirtioInterrupt};
use std::ops::Deref;
use std::sync::atomic::AtomicU64;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Most descriptors one chain may have. The descriptor walk already stops
/// at the table size; this bounds what a single chain makes us collect.
pub(crate) const MAX_SEGMENTS: usize = 1024;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain could not be used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// The walk ended on a descriptor that still says NEXT: a next index
    /// outside the table, a loop, a bad indirect table, an unreadable
    /// descriptor; or the chain yielded nothing (bad head index).
    Broken,
    /// More than `MAX_SEGMENTS` descriptors.
    TooLong,
    /// A device-readable descriptor after a device-writable one (§2.7.4.2).
    Order,
}

/// The buffers of one chain, split by direction. Kept by a worker and
/// refilled for every chain, so walking allocates nothing in steady state.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub readable_len: u64,
    pub writable_len: u64,
}

impl Buffers {
    /// Walks `chain` (consuming it) into `self`. On error `head` is still
    /// set, so the chain can be given back on the used ring.
    pub fn load<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.head = chain.head_index();
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        // The iterator simply stops on anything wrong; a chain that really
        // ended has a last descriptor without NEXT.
        let mut ended = false;
        let mut saw_writable = false;
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            if count > MAX_SEGMENTS {
                return Err(ChainError::TooLong);
            }
            ended = !desc.has_next();
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                saw_writable = true;
                self.writable_len += u64::from(seg.len);
                if seg.len > 0 {
                    self.writable.push(seg);
                }
            } else {
                if saw_writable {
                    return Err(ChainError::Order);
                }
                self.readable_len += u64::from(seg.len);
                if seg.len > 0 {
                    self.readable.push(seg);
                }
            }
        }
        if ended {
            Ok(())
        } else {
            Err(ChainError::Broken)
        }
    }

    /// Reads every readable buffer, in order, into `out` (replacing its
    /// contents). The caller bounds `readable_len` first.
    pub fn read_all(&self, mem: &DmaMemory, out: &mut Vec<u8>) -> Result<(), GuestMemoryError> {
        let total = usize::try_from(self.readable_len).map_err(|_| GuestMemoryError::GuestAddressOverflow)?;
        out.clear();
        out.resize(total, 0);
        let mut at = 0usize;
        for seg in &self.readable {
            let len = seg.len as usize;
            mem.read_slice(&mut out[at..at + len], seg.addr)?;
            at += len;
        }
        Ok(())
    }

    /// A cursor that writes into the writable buffers from their start.
    pub fn writer(&self) -> WriteCursor<'_> {
        WriteCursor {
            segs: &self.writable,
            index: 0,
            offset: 0,
            written: 0,
        }
    }
}

/// Writes consecutive bytes across a chain's writable buffers.
pub(crate) struct WriteCursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u32,
    written: usize,
}

impl WriteCursor<'_> {
    /// Writes as much of `data` as there is room for; returns how much.
    pub fn write(&mut self, mem: &DmaMemory, mut data: &[u8]) -> Result<usize, GuestMemoryError> {
        let mut done = 0;
        while !data.is_empty() {
            let Some(seg) = self.segs.get(self.index) else {
                break;
            };
            let room = (seg.len - self.offset) as usize;
            let n = room.min(data.len());
            let addr = seg
                .addr
                .checked_add(u64::from(self.offset))
                .ok_or(GuestMemoryError::GuestAddressOverflow)?;
            mem.write_slice(&data[..n], addr)?;
            data = &data[n..];
            done += n;
            self.written += n;
            self.offset += n as u32;
            if self.offset == seg.len {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(done)
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.written
    }
}

/// Which counter a failed guest-memory access goes to: the IOMMU said no
/// (`dma_denied`), or the address is simply not guest memory
/// (`bad_descriptors`).
pub(crate) fn memory_error_counter<'m>(metrics: &'m DeviceMetrics, err: &GuestMemoryError) -> &'m AtomicU64 {
    if crate::dma::refused_by_view(err) {
        &metrics.dma_denied
    } else {
        &metrics.bad_descriptors
    }
}

/// Pops the next available chain. When the ring looks empty, notifications
/// are re-enabled first (with EVENT_IDX that publishes `avail_event`) and
/// the ring is looked at once more, so a buffer the driver added in
/// between is not missed.
pub(crate) fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m DmaMemory,
    metrics: &DeviceMetrics,
) -> Option<DescriptorChain<&'m DmaMemory>> {
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => {
            let chain = queue.pop_descriptor_chain(mem);
            if chain.is_none() {
                // The driver's available index is more than a ring ahead,
                // or the ring cannot be read.
                DeviceMetrics::inc(&metrics.bad_descriptors);
            }
            chain
        }
        Ok(false) => None,
        Err(e) => {
            log::debug!("cannot re-enable queue notifications: {e}");
            DeviceMetrics::inc(&metrics.bad_descriptors);
            None
        }
    }
}

/// Gives the last popped chain back to the available ring, unused.
pub(crate) fn unpop(queue: &mut Queue) {
    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
}

/// Puts a chain on the used ring with `len` bytes written by the device.
/// A head outside the table was already counted when its walk failed.
pub(crate) fn complete(queue: &mut Queue, mem: &DmaMemory, metrics: &DeviceMetrics, head: u16, len: u32) {
    match queue.add_used(mem, head, len) {
        Ok(()) => {}
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
        Err(virtio_queue::Error::GuestMemory(e)) => {
            DeviceMetrics::inc(memory_error_counter(metrics, &e));
            log::debug!("cannot write the used ring: {e}");
        }
        Err(e) => {
            DeviceMetrics::inc(&metrics.bad_descriptors);
            log::debug!("cannot complete chain {head}: {e}");
        }
    }
}

/// Interrupts the driver for queue `index` if it wants to hear about used
/// buffers (flags or `used_event`).
pub(crate) fn notify_used(
    queue: &mut Queue,
    index: u16,
    mem: &DmaMemory,
    interrupt: &dyn VirtioInterrupt,
    metrics: &DeviceMetrics,
) {
    match queue.needs_notification(mem) {
        Ok(true) => match interrupt.trigger(InterruptCause::Queue(index)) {
            Ok(()) => DeviceMetrics::inc(&metrics.interrupts),
            Err(e) => log::warn!("queue {index}: cannot raise interrupt: {e}"),
        },
        Ok(false) => {}
        Err(e) => {
            // Without used_event we cannot tell: interrupt anyway.
            log::debug!("queue {index}: cannot read used_event: {e}");
            if interrupt.trigger(InterruptCause::Queue(index)).is_ok() {
                DeviceMetrics::inc(&metrics.interrupts);
            }
        }
    }
}

/// Copies the part of `config` that `offset..offset + data.len()` covers;
/// bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::direct_view;
    use crate::virtio::net::testutil::{Desc, TestQueue};
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn walk_splits_by_direction_and_finds_broken_chains() {
        let m = mem();
        let dma = direct_view(m.clone());
        let mut tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.queue();
        let metrics = DeviceMetrics::default();
        let mut b = Buffers::default();

        tq.add(&[Desc::r(0x8000, 10), Desc::r(0x9000, 0), Desc::w(0xa000, 20)]);
        b.load(pop_chain(&mut q, &dma, &metrics).unwrap()).unwrap();
        assert_eq!((b.readable_len, b.writable_len), (10, 20));
        assert_eq!(b.readable.len(), 1, "empty buffers are skipped");

        // Writable before readable.
        tq.add(&[Desc::w(0x8000, 10), Desc::r(0x9000, 10)]);
        let r = b.load(pop_chain(&mut q, &dma, &metrics).unwrap());
        assert_eq!(r, Err(ChainError::Order));

        // A loop: 2 -> 3 -> 2.
        let head = tq.add_raw(&[(0x8000, 8, 1, 1), (0x9000, 8, 1, 0)]);
        let r = b.load(pop_chain(&mut q, &dma, &metrics).unwrap());
        assert_eq!(r, Err(ChainError::Broken));
        assert_eq!(b.head, head);

        // A next index outside the table.
        tq.add_raw(&[(0x8000, 8, 1, 200)]);
        let r = b.load(pop_chain(&mut q, &dma, &metrics).unwrap());
        assert_eq!(r, Err(ChainError::Broken));

        assert!(pop_chain(&mut q, &dma, &metrics).is_none());
        assert_eq!(metrics.bad_descriptors.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn cursor_writes_across_buffers_and_stops_at_the_end() {
        let m = mem();
        let dma = direct_view(m.clone());
        let mut tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.queue();
        let metrics = DeviceMetrics::default();
        let mut b = Buffers::default();
        tq.add(&[Desc::w(0x8000, 3), Desc::w(0x9000, 4)]);
        b.load(pop_chain(&mut q, &dma, &metrics).unwrap()).unwrap();
        let mut w = b.writer();
        assert_eq!(w.write(&dma, b"ab").unwrap(), 2);
        assert_eq!(w.write(&dma, b"cdefgh").unwrap(), 5);
        assert_eq!(w.written(), 7);
        let mut got = [0u8; 4];
        m.read_slice(&mut got[..3], GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[..3], b"abc");
        m.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(&got, b"defg");
    }

    #[test]
    fn ring_too_far_ahead_is_counted_not_looped_on() {
        let m = mem();
        let dma = direct_view(m.clone());
        let tq = TestQueue::new(&m, 0, 16);
        let mut q = tq.queue();
        let metrics = DeviceMetrics::default();
        tq.set_avail_idx(100);
        assert!(pop_chain(&mut q, &dma, &metrics).is_none());
        assert_eq!(metrics.bad_descriptors.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let cfg = [1u8, 2, 3];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        read_config_bytes(&cfg, 10, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
