//! The DMA pool: a page range of RAM reserved at run time
//! (`virtio::reserve` carves it out of e820 after the RAM test, outside the
//! probe image, ACPI tables and initrd), handed out in zeroed, physically
//! contiguous runs of pages (first fit over a bitmap).
//!
//! Virtqueues always live here. With the lazy DMA policy the workloads'
//! buffers and the bounce buffers do too, and the whole pool is mapped once
//! in the vIOMMU at IOVA = guest-physical address, so an address in the
//! pool means the same to the driver and to every translated device.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use virtio_drivers::PAGE_SIZE;

/// Pages the pool can hold: 32 MiB.
pub const MAX_PAGES: usize = 8192;
const WORDS: usize = MAX_PAGES / 64;

struct Pool {
    base: u64,
    pages: usize,
    /// Bit set = page in use.
    used: [u64; WORDS],
}

impl Pool {
    fn is_used(&self, page: usize) -> bool {
        self.used[page / 64] & (1 << (page % 64)) != 0
    }

    fn mark(&mut self, first: usize, n: usize, used: bool) {
        for p in first..first + n {
            if used {
                self.used[p / 64] |= 1 << (p % 64);
            } else {
                self.used[p / 64] &= !(1 << (p % 64));
            }
        }
    }

    /// First fit: the lowest run of `n` free pages. Whole words in use are
    /// stepped over at once: small bounce buffers are taken and given back
    /// per request, behind long-lived data buffers.
    fn find(&self, n: usize) -> Option<usize> {
        let mut run = 0;
        let mut p = 0;
        while p < self.pages {
            if p % 64 == 0 && self.used[p / 64] == u64::MAX {
                run = 0;
                p += 64;
                continue;
            }
            if self.is_used(p) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(p + 1 - n);
                }
            }
            p += 1;
        }
        None
    }

    fn end(&self) -> u64 {
        self.base + (self.pages * PAGE_SIZE) as u64
    }
}

struct Locked {
    lock: AtomicBool,
    pool: UnsafeCell<Pool>,
}

// SAFETY: `pool` is only touched with `lock` held.
unsafe impl Sync for Locked {}

static POOL: Locked = Locked {
    lock: AtomicBool::new(false),
    pool: UnsafeCell::new(Pool {
        base: 0,
        pages: 0,
        used: [0; WORDS],
    }),
};

fn with<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    while POOL
        .lock
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: the lock is held, so this is the only reference.
    let r = f(unsafe { &mut *POOL.pool.get() });
    POOL.lock.store(false, Ordering::Release);
    r
}

/// Give the pool its pages: [base, base + len), page-aligned,
/// identity-mapped RAM that nothing else uses. Returns the bytes taken
/// (at most MAX_PAGES pages).
pub fn init(base: u64, len: u64) -> u64 {
    with(|p| {
        p.base = base;
        p.pages = ((len / PAGE_SIZE as u64) as usize).min(MAX_PAGES);
        p.used = [0; WORDS];
        (p.pages * PAGE_SIZE) as u64
    })
}

/// `pages` zeroed pages, or None when no run that long is free.
pub fn alloc(pages: usize) -> Option<u64> {
    let addr = with(|p| {
        let first = p.find(pages)?;
        p.mark(first, pages, true);
        Some(p.base + (first * PAGE_SIZE) as u64)
    })?;
    // SAFETY: these pool pages are now ours alone.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * PAGE_SIZE) };
    Some(addr)
}

/// Gives back what `alloc` returned; false if that is not what it is.
pub fn free(addr: u64, pages: usize) -> bool {
    with(|p| {
        let len = (pages * PAGE_SIZE) as u64;
        if addr < p.base || addr + len > p.end() || !addr.is_multiple_of(PAGE_SIZE as u64) {
            return false;
        }
        let first = ((addr - p.base) / PAGE_SIZE as u64) as usize;
        if (first..first + pages).any(|pg| !p.is_used(pg)) {
            return false;
        }
        p.mark(first, pages, false);
        true
    })
}

/// Whether [addr, addr + len) lies inside the pool.
pub fn contains(addr: u64, len: usize) -> bool {
    with(|p| addr >= p.base && addr.saturating_add(len as u64) <= p.end())
}

/// Where the pool is: (base, bytes).
pub fn range() -> (u64, u64) {
    with(|p| (p.base, (p.pages * PAGE_SIZE) as u64))
}
