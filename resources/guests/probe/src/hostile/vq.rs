//! A split virtqueue driven by the probe (virtio 1.2 §2.7): descriptor
//! table, available ring and used ring in a probe-owned RAM area, chains
//! written by hand (so they can be as wrong as a case wants), and a bounded
//! poll of the used ring. No interrupts: the available ring asks for none
//! (VIRTQ_AVAIL_F_NO_INTERRUPT) and the probe runs with IF=0 anyway.
//!
//! Area layout (`AREA` bytes, 4 KiB aligned):
//!
//! | offset | what |
//! | --- | --- |
//! | `0x0000` | descriptor table (16 × size, at most 4 KiB) |
//! | `0x1000` | available ring (6 + 2 × size) |
//! | `0x2000` | used ring (6 + 8 × size) |
//! | `0x3000..AREA` | buffers, laid out by each device's cases |

use super::io::{barrier, fill, rd16, rd32, wr16, wr32, wr64, Deadline};
use super::transport::Transport;

pub const AREA: u64 = 0x2_0000;
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where a device's buffers may start in the area.
pub const BUFFERS: u64 = 0x3000;

/// Largest queue the probe drives (its bookkeeping is sized for it).
pub const MAX_SIZE: u16 = 256;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Where a descriptor's `next` goes.
#[derive(Clone, Copy)]
pub enum Next {
    /// The following descriptor of the chain; none after the last.
    Auto,
    /// NEXT to the chain's `i`-th descriptor (loops).
    To(usize),
    /// NEXT to this raw table index.
    Raw(u16),
}

#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: Next,
}

impl Desc {
    /// Device-readable.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: Next::Auto,
        }
    }
    /// Device-writable.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: Next::Auto,
        }
    }
    /// Points at an indirect table of `len` bytes.
    pub fn indirect(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_INDIRECT,
            next: Next::Auto,
        }
    }
    pub fn next(self, next: Next) -> Desc {
        Desc { next, ..self }
    }
}

/// Writes one raw 16-byte descriptor at `at` (tables and indirect tables).
pub fn put_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    wr64(at, addr);
    wr32(at + 8, len);
    wr16(at + 12, flags);
    wr16(at + 14, next);
}

pub struct Vq {
    pub index: u16,
    pub size: u16,
    pub area: u64,
    avail_idx: u16,
    used_idx: u16,
    next_desc: u16,
    seen: [bool; MAX_SIZE as usize],
    used_len: [u32; MAX_SIZE as usize],
}

impl Vq {
    pub fn new(index: u16, area: u64) -> Vq {
        Vq {
            index,
            size: 0,
            area,
            avail_idx: 0,
            used_idx: 0,
            next_desc: 0,
            seen: [false; MAX_SIZE as usize],
            used_len: [0; MAX_SIZE as usize],
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.area + DESC
    }
    pub fn avail_addr(&self) -> u64 {
        self.area + AVAIL
    }
    pub fn used_addr(&self) -> u64 {
        self.area + USED
    }
    /// An address in the buffer part of the area.
    pub fn buf(&self, off: u64) -> u64 {
        self.area + BUFFERS + off
    }

    /// Empty rings of `size` entries, as after a device reset.
    pub fn clear(&mut self, size: u16) {
        self.size = size.clamp(1, MAX_SIZE);
        self.avail_idx = 0;
        self.used_idx = 0;
        self.next_desc = 0;
        self.seen = [false; MAX_SIZE as usize];
        fill(self.area, BUFFERS, 0);
        wr16(self.avail_addr(), AVAIL_F_NO_INTERRUPT);
        barrier();
    }

    /// Writes `chain` into free table slots and makes it available; returns
    /// its head. Does not notify.
    pub fn submit(&mut self, chain: &[Desc]) -> u16 {
        let size = self.size;
        let first = self.next_desc;
        let slot = |i: usize| (first as usize + i) as u16 % size;
        self.next_desc = slot(chain.len());
        for (i, d) in chain.iter().enumerate() {
            let (flags, next) = match d.next {
                Next::Auto if i + 1 < chain.len() => (d.flags | F_NEXT, slot(i + 1)),
                Next::Auto => (d.flags, 0),
                Next::To(j) => (d.flags | F_NEXT, slot(j)),
                Next::Raw(r) => (d.flags | F_NEXT, r),
            };
            put_desc(self.desc_addr() + 16 * slot(i) as u64, d.addr, d.len, flags, next);
        }
        let head = slot(0);
        self.seen[head as usize] = false;
        // Ring entry, then (after a barrier) the index that publishes it.
        wr16(self.avail_addr() + 4 + 2 * (self.avail_idx % size) as u64, head);
        barrier();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr16(self.avail_addr() + 2, self.avail_idx);
        barrier();
        head
    }

    pub fn kick(&self, t: &mut dyn Transport) {
        barrier();
        t.notify(self.index);
    }

    /// Takes every new used entry.
    fn collect(&mut self) {
        let idx = rd16(self.used_addr() + 2);
        barrier();
        while self.used_idx != idx {
            let e = self.used_addr() + 4 + 8 * (self.used_idx % self.size) as u64;
            let (id, len) = (rd32(e), rd32(e + 4));
            if let Some(seen) = self.seen.get_mut(id as usize) {
                *seen = true;
                self.used_len[id as usize] = len;
            }
            self.used_idx = self.used_idx.wrapping_add(1);
        }
    }

    /// The used length of the chain at `head` once the device returns it;
    /// None if it does not within `ticks`.
    pub fn wait(&mut self, head: u16, ticks: u64) -> Option<u32> {
        let deadline = Deadline::after(ticks);
        loop {
            self.collect();
            if self.seen[head as usize] {
                barrier();
                return Some(self.used_len[head as usize]);
            }
            if deadline.passed() {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Programs this queue into the device: size and ring addresses given
    /// (so that a case can give wrong ones), then enable.
    pub fn program_at(&self, t: &mut dyn Transport, desc: u64, avail: u64, used: u64) {
        t.select_queue(self.index);
        t.set_queue_size(self.size);
        t.set_queue_rings(desc, avail, used);
        t.enable_queue();
    }

    pub fn program(&self, t: &mut dyn Transport) {
        self.program_at(t, self.desc_addr(), self.avail_addr(), self.used_addr());
    }
}
