//! The driver side of a split virtqueue, for the device tests here, built
//! from virtio-queue's mock pieces (`DescriptorTable`, `AvailRing`,
//! `UsedRing`). Not `MockSplitQueue` itself: in 0.18 it places the used ring
//! `size` bytes (not `2 * size + 6`) after the available ring's start, so
//! the two overlap and `used_event` is overwritten by used entries; its
//! `add_desc_chains` also does not wrap the ring index. Here the layout is
//! the spec's and indexes wrap.

use crate::virtio::{InterruptCause, VirtioInterrupt};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One buffer of a chain to add.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Desc {
    /// Device-readable (driver-written).
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            writable: false,
        }
    }

    /// Device-writable.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            writable: true,
        }
    }
}

pub(crate) struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    desc: DescriptorTable<'a, GuestMemoryMmap>,
    desc_addr: GuestAddress,
    avail_addr: GuestAddress,
    used_addr: GuestAddress,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> TestQueue<'a> {
    /// Rings of `size` entries starting at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc_addr = GuestAddress(base);
        let avail_addr = desc_addr.unchecked_add(16 * u64::from(size));
        // flags, idx, ring[size], used_event; the used ring is 4-aligned.
        let avail_end = avail_addr.raw_value() + 6 + 2 * u64::from(size);
        let used_addr = GuestAddress((avail_end + 3) & !3);
        // These zero the flags, indexes and event fields.
        AvailRing::new(mem, avail_addr, size);
        UsedRing::new(mem, used_addr, size);
        TestQueue {
            mem,
            desc: DescriptorTable::new(mem, desc_addr, size),
            desc_addr,
            avail_addr,
            used_addr,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device's view of this queue, ready to serve.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(self.desc_addr);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail_addr);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_addr);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    pub fn desc_table_addr(&self) -> u64 {
        self.desc_addr.raw_value()
    }

    pub fn avail_addr(&self) -> u64 {
        self.avail_addr.raw_value()
    }

    pub fn used_addr(&self) -> u64 {
        self.used_addr.raw_value()
    }

    /// Adds a well-formed chain; returns its head index.
    pub fn add(&mut self, descs: &[Desc]) -> u16 {
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let flags = if d.writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                (d.addr, d.len, flags, i as u16 + 1)
            })
            .collect();
        self.add_raw(&raw)
    }

    /// Adds descriptors exactly as given: (addr, len, flags, next), where
    /// `next` counts from the first descriptor of this call (so loops and
    /// out-of-table indexes can be built). Returns the head index.
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        assert!(descs.len() <= usize::from(self.size), "chain longer than the table");
        // Wrap around to the start of the table when the chain does not fit.
        let first = if usize::from(self.next_desc) + descs.len() > usize::from(self.size) {
            0
        } else {
            self.next_desc
        };
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, first.wrapping_add(next));
            self.desc.store(first + i as u16, RawDescriptor::from(d)).unwrap();
        }
        self.next_desc = (first + descs.len() as u16) % self.size;
        self.publish(first);
        first
    }

    /// Makes `head` available to the device.
    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let avail = self.avail_addr;
        self.mem
            .write_obj(head.to_le(), avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the available index as is (for broken-driver tests).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .store(idx.to_le(), self.avail_addr.unchecked_add(2), Ordering::Release)
            .unwrap();
    }

    /// The driver's `used_event` (EVENT_IDX): interrupt me once the used
    /// index passes this.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail_addr.unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.store(idx.to_le(), at, Ordering::Release).unwrap();
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.used_addr.unchecked_add(4 + 8 * u64::from(self.size));
        u16::from_le(self.mem.load(at, Ordering::Acquire).unwrap())
    }

    pub fn used_idx(&self) -> u16 {
        let at = self.used_addr.unchecked_add(2);
        u16::from_le(self.mem.load(at, Ordering::Acquire).unwrap())
    }

    /// Used entries (id, len) the device added since the last call.
    pub fn used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used_addr.unchecked_add(4 + 8 * slot);
            let e: VirtqUsedElem = self.mem.read_obj(at).unwrap();
            out.push((e.id(), e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits (up to five seconds) until at least `n` new used entries.
    pub fn wait_used(&mut self, n: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        wait_for(|| {
            got.extend(self.used());
            got.len() >= n
        });
        got
    }
}

/// Polls `cond` until it holds; panics after five seconds.
pub(crate) fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An interrupt line that remembers what it was raised for.
#[derive(Default)]
pub(crate) struct Irq(pub Mutex<Vec<InterruptCause>>);

impl Irq {
    pub fn count(&self, cause: InterruptCause) -> usize {
        self.0.lock().unwrap().iter().filter(|&&c| c == cause).count()
    }
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        self.0.lock().unwrap().push(cause);
        Ok(())
    }
}
