//! The probe's `virtio_drivers::Hal`: where DMA memory comes from and what
//! address a device is given for a buffer.
//!
//! Two parts:
//!
//! * the **DMA pool** (hal/pool.rs): `dma_alloc` hands out zeroed,
//!   physically contiguous pages from it, `dma_dealloc` gives them back.
//!   Virtqueues live here.
//! * the **DMA policy**: how a buffer the driver owns (anywhere in RAM: the
//!   heap, a stack, the pool) is made visible to the device (`share`) and
//!   taken back (`unshare`). Every policy decision is in `DmaPolicy`'s
//!   methods below.
//!
//! virtio-drivers calls the Hal through static methods, so which device a
//! buffer is for is not passed in. The probe drives one device at a time:
//! the transport wrapper (virtio/transport.rs) says, when the device's
//! features are negotiated, whether it goes through the vIOMMU
//! (`enter_device`), and forgets it when the driver is dropped. All
//! translated devices share one vIOMMU domain (virtio/iommu), so the
//! endpoint does not matter to `share` beyond that.
//!
//! The probe's page tables identity-map all RAM (boot.rs), so a virtual
//! address is its guest-physical address, and MMIO (BARs, virtio-mmio
//! windows, ECAM) is reached at its physical address too.

mod pool;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::virtio::iommu;

pub use pool::{alloc as pool_alloc, free as pool_free, init as init_pool, range as pool_range};

const PAGE: u64 = PAGE_SIZE as u64;

/// How devices reach driver memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DmaPolicy {
    /// A device is given the buffer's guest-physical address. Right for
    /// devices without ACCESS_PLATFORM, for ACCESS_PLATFORM without a
    /// vIOMMU, and for endpoints the vIOMMU lets bypass.
    Identity = 0,
    /// The whole DMA pool is mapped once at IOVA = guest-physical address;
    /// buffers in the pool are given as they are, others are bounced
    /// through pool pages. No vIOMMU request per I/O.
    Lazy = 1,
    /// Each buffer is mapped at a fresh IOVA for one request and unmapped
    /// when it completes; only the pool (virtqueues) stays mapped.
    Strict = 2,
    /// Guest-physical addresses, but every buffer outside the pool is
    /// bounced through pool pages (swiotlb-style): devices need reach
    /// nothing but the pool, which is what a guest that shares only its
    /// pool after ESM needs without a vIOMMU.
    Bounce = 3,
}

/// Every policy, by its `repr(u8)` value.
const POLICIES: [DmaPolicy; 4] = [
    DmaPolicy::Identity,
    DmaPolicy::Lazy,
    DmaPolicy::Strict,
    DmaPolicy::Bounce,
];

impl DmaPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DmaPolicy::Identity => "identity",
            DmaPolicy::Lazy => "lazy",
            DmaPolicy::Strict => "strict",
            DmaPolicy::Bounce => "bounce",
        }
    }

    /// From `probe.dma=<name>`.
    pub fn parse(s: &[u8]) -> Option<DmaPolicy> {
        POLICIES.iter().copied().find(|p| p.name().as_bytes() == s)
    }

    /// Whether devices under this policy are attached to the vIOMMU and
    /// given IOVAs.
    pub fn translates(self) -> bool {
        matches!(self, DmaPolicy::Lazy | DmaPolicy::Strict)
    }

    /// Whether devices reach nothing but the pool: what lets the probe
    /// share only its pool after ESM.
    pub fn pool_only(self) -> bool {
        matches!(self, DmaPolicy::Lazy | DmaPolicy::Bounce)
    }

    /// Whether the workloads' buffers should be taken from the pool (where
    /// sharing them costs nothing) rather than the heap.
    pub fn buffers_in_pool(self) -> bool {
        self == DmaPolicy::Lazy
    }

    /// The device address of `buffer`.
    fn share(self, buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let addr = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len();
        match self {
            DmaPolicy::Identity => addr,
            DmaPolicy::Lazy | DmaPolicy::Bounce if pool::contains(addr, len) => addr,
            DmaPolicy::Bounce if in_direct_range(addr, len) => addr,
            DmaPolicy::Lazy | DmaPolicy::Bounce => bounce_in(addr, len, direction),
            DmaPolicy::Strict => {
                let first = addr & !(PAGE - 1);
                let span = (addr + len as u64).next_multiple_of(PAGE) - first;
                let iova = fresh_iova(span / PAGE);
                if !iommu::map(iova, first, span, map_flags(direction)) {
                    MAP_FAILURES.fetch_add(1, Ordering::Relaxed);
                }
                iova + (addr - first)
            }
        }
    }

    /// The device is done with `buffer`, which it knew as `paddr`.
    fn unshare(self, paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let addr = buffer.as_ptr() as *mut u8 as u64;
        let len = buffer.len();
        match self {
            DmaPolicy::Identity => {}
            DmaPolicy::Lazy | DmaPolicy::Bounce if paddr == addr => {}
            DmaPolicy::Lazy | DmaPolicy::Bounce => bounce_out(paddr, addr, len, direction),
            DmaPolicy::Strict => {
                let first = paddr & !(PAGE - 1);
                let span = (paddr + len as u64).next_multiple_of(PAGE) - first;
                if !iommu::unmap(first, span) {
                    MAP_FAILURES.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A range outside the pool whose buffers the bounce policy gives to
/// devices as they are (base, length; length 0 = none). The `unshare`
/// check (virtio/secure_checks.rs) SHAREs such a range after ESM and
/// needs the device to use it directly, so that taking it back (UNSHARE)
/// races requests that are really using it, not bounce copies in the pool.
static DIRECT_BASE: AtomicU64 = AtomicU64::new(0);
static DIRECT_LEN: AtomicU64 = AtomicU64::new(0);

pub fn set_direct_range(base: u64, len: u64) {
    DIRECT_BASE.store(base, Ordering::Relaxed);
    DIRECT_LEN.store(len, Ordering::Relaxed);
}

fn in_direct_range(addr: u64, len: usize) -> bool {
    let base = DIRECT_BASE.load(Ordering::Relaxed);
    let end = base + DIRECT_LEN.load(Ordering::Relaxed);
    addr >= base && addr.saturating_add(len as u64) <= end && end > base
}

/// What the device may do with a buffer it is given this way.
fn map_flags(direction: BufferDirection) -> u32 {
    match direction {
        BufferDirection::DriverToDevice => iommu::MAP_READ,
        BufferDirection::DeviceToDriver => iommu::MAP_WRITE,
        BufferDirection::Both => iommu::MAP_READ | iommu::MAP_WRITE,
    }
}

fn bounce_in(addr: u64, len: usize, direction: BufferDirection) -> u64 {
    let pages = len.div_ceil(PAGE_SIZE);
    // share() cannot fail in virtio-drivers' Hal: running out of pool is a
    // sizing bug, and the panic line says where.
    let b = pool::alloc(pages).expect("lazy DMA: the pool has no room to bounce through");
    if direction != BufferDirection::DeviceToDriver {
        // SAFETY: the Hal's caller gives a valid buffer of `len` bytes; the
        // bounce pages are ours and at least as long.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, b as *mut u8, len) };
    }
    BOUNCES.fetch_add(1, Ordering::Relaxed);
    b
}

fn bounce_out(bounce: u64, addr: u64, len: usize, direction: BufferDirection) {
    if direction != BufferDirection::DriverToDevice {
        // SAFETY: as in bounce_in; the device is done with the bounce pages.
        unsafe { core::ptr::copy_nonoverlapping(bounce as *const u8, addr as *mut u8, len) };
    }
    if !pool::free(bounce, len.div_ceil(PAGE_SIZE)) {
        panic!("lazy DMA: unshare of an address that was not bounced");
    }
}

/// The policy chosen for translated devices (`probe.dma=`, or the default).
static CHOSEN: AtomicU8 = AtomicU8::new(DmaPolicy::Identity as u8);
/// The device being driven now negotiated ACCESS_PLATFORM and is attached
/// to the vIOMMU.
static TRANSLATED: AtomicBool = AtomicBool::new(false);

pub fn set_policy(p: DmaPolicy) {
    CHOSEN.store(p as u8, Ordering::Relaxed);
}

pub fn chosen() -> DmaPolicy {
    POLICIES
        .get(CHOSEN.load(Ordering::Relaxed) as usize)
        .copied()
        .unwrap_or(DmaPolicy::Identity)
}

/// The policy for the device being driven: a translating one only if it
/// goes through the vIOMMU (else identity); the others as chosen.
pub fn policy() -> DmaPolicy {
    match chosen() {
        p if p.translates() && !TRANSLATED.load(Ordering::Relaxed) => DmaPolicy::Identity,
        p => p,
    }
}

/// From now until `leave_device`, buffers are for a device that does (or
/// does not) go through the vIOMMU.
pub fn enter_device(translated: bool) {
    TRANSLATED.store(translated, Ordering::Relaxed);
}

pub fn leave_device() {
    TRANSLATED.store(false, Ordering::Relaxed);
}

static BOUNCES: AtomicU64 = AtomicU64::new(0);
static MAP_FAILURES: AtomicU64 = AtomicU64::new(0);

/// What the policies did so far.
#[derive(Clone, Copy, Default)]
pub struct DmaCounts {
    pub bounces: u64,
    /// MAP or UNMAP requests of `share`/`unshare` that the vIOMMU refused.
    pub map_failures: u64,
}

pub fn counts() -> DmaCounts {
    DmaCounts {
        bounces: BOUNCES.load(Ordering::Relaxed),
        map_failures: MAP_FAILURES.load(Ordering::Relaxed),
    }
}

/// Strict IOVAs start far above any guest-physical address, so that they
/// never meet the pool's identity mapping.
const STRICT_IOVA_BASE: u64 = 1 << 40;
static NEXT_IOVA: AtomicU64 = AtomicU64::new(STRICT_IOVA_BASE);

/// `pages` pages of IOVA space never handed out before, followed by an
/// unmapped guard page. Never reused: a device that keeps an IOVA past its
/// UNMAP finds nothing there.
pub fn fresh_iova(pages: u64) -> u64 {
    NEXT_IOVA.fetch_add((pages + 1) * PAGE, Ordering::Relaxed)
}

/// A test hook of the fault checks (virtio/faults.rs): the next buffers
/// starting at `addr` are given to the device as `iova`, whatever the
/// policy, and nothing is mapped or unmapped for them.
static PIN_ADDR: AtomicU64 = AtomicU64::new(0);
static PIN_IOVA: AtomicU64 = AtomicU64::new(0);

pub fn pin(addr: u64, iova: u64) {
    PIN_IOVA.store(iova, Ordering::Relaxed);
    PIN_ADDR.store(addr, Ordering::Relaxed);
}

pub fn unpin() {
    PIN_ADDR.store(0, Ordering::Relaxed);
}

fn pinned(addr: u64) -> Option<u64> {
    let pin = PIN_ADDR.load(Ordering::Relaxed);
    (pin != 0 && pin == addr).then(|| PIN_IOVA.load(Ordering::Relaxed))
}

fn dma_alloc(pages: usize) -> (PhysAddr, NonNull<u8>) {
    match pool::alloc(pages) {
        Some(addr) => (addr, NonNull::new(addr as *mut u8).unwrap()),
        // The driver sees paddr 0 as failure (Error::DmaError).
        None => (0, NonNull::dangling()),
    }
}

fn dma_dealloc(paddr: PhysAddr, pages: usize) -> i32 {
    if pool::free(paddr, pages) {
        0
    } else {
        -1
    }
}

/// The Hal of every device the workloads drive.
pub struct ProbeHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pool pages that no one
// else uses until dma_dealloc, at addresses that are the same for driver
// and device (identity, or the pool's IOVA = physical mapping); share
// returns an address that reaches exactly the buffer (or its bounce copy)
// until unshare; mmio_phys_to_virt is the identity, which is how the probe
// maps MMIO.
unsafe impl Hal for ProbeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        dma_alloc(pages)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        dma_dealloc(paddr, pages)
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        match pinned(buffer.as_ptr() as *mut u8 as u64) {
            Some(iova) => iova,
            None => policy().share(buffer, direction),
        }
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        if pinned(buffer.as_ptr() as *mut u8 as u64) != Some(paddr) {
            policy().unshare(paddr, buffer, direction)
        }
    }
}

/// The Hal of the vIOMMU itself: its own DMA is never translated, and
/// sharing a buffer with it must not send it requests.
pub struct Untranslated;

// SAFETY: as for ProbeHal, with identity addresses only.
unsafe impl Hal for Untranslated {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        dma_alloc(pages)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        dma_dealloc(paddr, pages)
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
