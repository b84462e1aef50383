//! The probe's `virtio_drivers::Hal`: where DMA memory comes from and what
//! address a device is given for a buffer.
//!
//! Two parts:
//!
//! * the **DMA pool**: a page range of RAM reserved at run time
//!   (`virtio::reserve` carves it out of e820 after the RAM test, outside
//!   the probe image, ACPI tables and initrd). `dma_alloc` hands out zeroed,
//!   physically contiguous pages from it (first fit over a bitmap),
//!   `dma_dealloc` gives them back. Virtqueues live here.
//! * the **DMA policy**: how a buffer the driver owns (anywhere in RAM: the
//!   heap, a stack) is made visible to the device (`share`) and taken back
//!   (`unshare`). Every policy decision is in `DmaPolicy`'s methods below,
//!   so that an IOMMU mapping or bounce buffering fits in one place.
//!
//! The probe's page tables identity-map all RAM (boot.rs), so a virtual
//! address is its guest-physical address, and MMIO (BARs, virtio-mmio
//! windows, ECAM) is reached at its physical address too.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use core::cell::UnsafeCell;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// How devices reach driver memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DmaPolicy {
    /// A device is given the buffer's guest-physical address (which is its
    /// address here). Right for devices without ACCESS_PLATFORM, and for
    /// ACCESS_PLATFORM while veil has no vIOMMU (addresses still go
    /// straight to guest memory then).
    Identity = 0,
    // Later:
    // * `Iommu`: `share` maps the buffer's pages in the vIOMMU and returns
    //   the IOVA, `unshare` unmaps it;
    // * `Bounce`: `share` copies the buffer into DMA-pool pages (for
    //   DriverToDevice/Both) and returns their address, `unshare` copies
    //   back (DeviceToDriver/Both) and frees them.
}

impl DmaPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DmaPolicy::Identity => "identity",
        }
    }

    /// From `probe.dma=<name>`.
    pub fn parse(s: &[u8]) -> Option<DmaPolicy> {
        match s {
            b"identity" => Some(DmaPolicy::Identity),
            _ => None,
        }
    }

    /// Whether the driver may accept VIRTIO_F_ACCESS_PLATFORM: whether the
    /// addresses `share` returns are right for a device that goes through
    /// the platform's DMA translation. With no vIOMMU in veil, the
    /// translation is the identity, so yes.
    pub fn accepts_access_platform(self) -> bool {
        match self {
            DmaPolicy::Identity => true,
        }
    }

    /// The device address of `buffer`.
    fn share(self, buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        match self {
            DmaPolicy::Identity => buffer.as_ptr() as *mut u8 as PhysAddr,
        }
    }

    /// The device is done with `buffer`, which it knew as `paddr`.
    fn unshare(self, _paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        match self {
            DmaPolicy::Identity => {}
        }
    }
}

static POLICY: AtomicU8 = AtomicU8::new(DmaPolicy::Identity as u8);

pub fn set_policy(p: DmaPolicy) {
    POLICY.store(p as u8, Ordering::Relaxed);
}

/// Every policy, by its `repr(u8)` value.
const POLICIES: [DmaPolicy; 1] = [DmaPolicy::Identity];

pub fn policy() -> DmaPolicy {
    POLICIES
        .get(POLICY.load(Ordering::Relaxed) as usize)
        .copied()
        .unwrap_or(DmaPolicy::Identity)
}

/// Pages the pool can hold: 16 MiB.
const POOL_MAX_PAGES: usize = 4096;

struct Pool {
    base: u64,
    pages: usize,
    /// Bit set = page in use.
    used: [u64; POOL_MAX_PAGES / 64],
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

    /// First fit: the lowest run of `n` free pages.
    fn find(&self, n: usize) -> Option<usize> {
        let mut run = 0;
        for p in 0..self.pages {
            if self.is_used(p) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(p + 1 - n);
                }
            }
        }
        None
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
        used: [0; POOL_MAX_PAGES / 64],
    }),
};

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
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
/// (at most POOL_MAX_PAGES pages).
pub fn init_pool(base: u64, len: u64) -> u64 {
    with_pool(|p| {
        p.base = base;
        p.pages = ((len / PAGE_SIZE as u64) as usize).min(POOL_MAX_PAGES);
        p.used = [0; POOL_MAX_PAGES / 64];
        (p.pages * PAGE_SIZE) as u64
    })
}

pub struct ProbeHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pages of the pool that no
// one else uses until dma_dealloc; share returns an address that reaches
// exactly the buffer (identity map); mmio_phys_to_virt is the identity,
// which is how the probe maps MMIO.
unsafe impl Hal for ProbeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let found = with_pool(|p| {
            let first = p.find(pages)?;
            p.mark(first, pages, true);
            Some(p.base + (first * PAGE_SIZE) as u64)
        });
        match found {
            Some(addr) => {
                // SAFETY: these pool pages are now ours alone.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * PAGE_SIZE) };
                (addr, NonNull::new(addr as *mut u8).unwrap())
            }
            // The driver sees paddr 0 as failure (Error::DmaError).
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        with_pool(|p| {
            let end = p.base + (p.pages * PAGE_SIZE) as u64;
            let len = (pages * PAGE_SIZE) as u64;
            if paddr < p.base || paddr + len > end || !paddr.is_multiple_of(PAGE_SIZE as u64) {
                return -1;
            }
            let first = ((paddr - p.base) / PAGE_SIZE as u64) as usize;
            if (first..first + pages).any(|pg| !p.is_used(pg)) {
                return -1;
            }
            p.mark(first, pages, false);
            0
        })
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        policy().share(buffer, direction)
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        policy().unshare(paddr, buffer, direction)
    }
}
