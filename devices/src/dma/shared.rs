//! Which guest pages the host may touch: everything while the guest is an
//! ordinary VM, only what it shared once it has entered secure mode.
//!
//! `SharedPages` is the one gate every device access passes, after any
//! IOMMU translation: a `DmaTranslation` built with a gate checks every
//! guest-physical range it hands out against it, under the endpoint's read
//! lock. The read side is lock-free (one bit per 4 KiB page, in atomics),
//! so device threads never wait on each other.
//!
//! Changes go through one `&self` method each, serialised by a mutex, in the
//! order that keeps a device from ever touching a page the host has made
//! inaccessible:
//!
//! * pages that become **shared** are made accessible in the host view
//!   *before* their bits are set;
//! * pages that become **private** have their bits cleared first, then every
//!   registered endpoint's lock is taken and released once (so no access
//!   that passed the gate before the change is still copying), and only then
//!   are they made inaccessible in the host view.
//!
//! A device that loses a race with UNSHARE therefore gets a failed lookup,
//! never a fault on a protected page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, Weak};

use super::EndpointState;

pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// Makes ranges of the host's view of guest RAM accessible or not
/// (`mprotect` in the VMM; a recorder in tests).
pub trait HostProtection: Send + Sync {
    fn set_accessible(&self, gpa: u64, len: u64, accessible: bool) -> std::io::Result<()>;
}

/// Why a change of page state was refused; nothing changed.
#[derive(Debug, PartialEq, Eq)]
pub enum ShareError {
    /// Not inside guest RAM, or wrapping around.
    OutOfRange,
    /// The guest is not in secure mode yet.
    NotSecure,
    /// The guest is in secure mode already.
    AlreadySecure,
    /// The host view could not be changed (`mprotect` failed).
    Host(String),
}

/// What the guest's memory looks like to the host right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PageCounts {
    pub secure: bool,
    pub private_pages: u64,
    pub shared_pages: u64,
}

pub struct SharedPages {
    /// Guest RAM as `(start, length)`, page-aligned, sorted.
    ram: Vec<(u64, u64)>,
    ram_pages: u64,
    secure: AtomicBool,
    /// One bit per page below the end of RAM: set = shared with the host.
    bits: Box<[AtomicU64]>,
    shared_pages: AtomicU64,
    /// Endpoints whose in-flight accesses a revocation waits for.
    endpoints: Mutex<Vec<Weak<EndpointState>>>,
    /// Serialises changes (ultracalls may come from several vCPUs).
    change: Mutex<()>,
    /// Run once the guest is secure (devices that must renegotiate).
    on_secure: Mutex<Vec<SecureCallback>>,
}

/// Called on the vCPU thread that entered secure mode.
pub type SecureCallback = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for SharedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPages")
            .field("ram", &self.ram)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SharedPages {
    /// `ram`: the guest's RAM regions as `(start, length)`; both are rounded
    /// to whole pages inwards.
    pub fn new(ram: &[(u64, u64)]) -> SharedPages {
        let mut regions: Vec<(u64, u64)> = ram
            .iter()
            .filter_map(|&(start, len)| {
                let first = start.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
                let end = start.checked_add(len)? & !(PAGE_SIZE - 1);
                (end > first).then_some((first, end - first))
            })
            .collect();
        regions.sort_unstable();
        let end = regions.last().map_or(0, |&(s, l)| s + l);
        let words = (end >> PAGE_SHIFT).div_ceil(64) as usize;
        SharedPages {
            ram_pages: regions.iter().map(|&(_, l)| l >> PAGE_SHIFT).sum(),
            ram: regions,
            secure: AtomicBool::new(false),
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            shared_pages: AtomicU64::new(0),
            endpoints: Mutex::new(Vec::new()),
            change: Mutex::new(()),
            on_secure: Mutex::new(Vec::new()),
        }
    }

    /// Runs `callback` when the guest enters secure mode.
    pub fn on_secure(&self, callback: SecureCallback) {
        lock(&self.on_secure).push(callback);
    }

    pub fn is_secure(&self) -> bool {
        self.secure.load(Ordering::Acquire)
    }

    pub fn counts(&self) -> PageCounts {
        let secure = self.is_secure();
        let shared = if secure {
            self.shared_pages.load(Ordering::Relaxed)
        } else {
            self.ram_pages
        };
        PageCounts {
            secure,
            private_pages: self.ram_pages - shared,
            shared_pages: shared,
        }
    }

    /// Whether the host may touch `gpa..gpa + len`. Callers hold their
    /// endpoint's read lock across the check and the access.
    pub fn allows(&self, gpa: u64, len: u64) -> bool {
        if !self.is_secure() || len == 0 {
            return true;
        }
        let Some(last) = gpa.checked_add(len - 1) else {
            return false;
        };
        let (first, last) = (gpa >> PAGE_SHIFT, last >> PAGE_SHIFT);
        if (last >> 6) as usize >= self.bits.len() {
            return false;
        }
        let mut page = first;
        while page <= last {
            let word = self.bits[(page >> 6) as usize].load(Ordering::Acquire);
            let from = page & 63;
            let to = if (page | 63) <= last { 63 } else { last & 63 };
            let need = (u64::MAX >> (63 - (to - from))) << from;
            if word & need != need {
                return false;
            }
            page = (page | 63) + 1;
        }
        true
    }

    /// Whether `npages` pages from `gpa` lie inside one RAM region, without
    /// wrapping; `gpa` must be page-aligned.
    pub fn in_ram(&self, gpa: u64, npages: u64) -> bool {
        let Some(len) = npages.checked_mul(PAGE_SIZE) else {
            return false;
        };
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.ram.iter().any(|&(s, l)| gpa >= s && end <= s + l)
    }

    /// Makes the endpoint's accesses subject to this gate's revocations.
    pub(super) fn register(&self, endpoint: Weak<EndpointState>) {
        let mut eps = lock(&self.endpoints);
        eps.retain(|w| w.strong_count() > 0);
        eps.push(endpoint);
    }

    /// Returns once no access that passed the gate before this call is
    /// still in progress: every endpoint's lock is taken once.
    fn drain_accesses(&self) {
        let eps: Vec<_> = lock(&self.endpoints).iter().filter_map(Weak::upgrade).collect();
        for ep in eps {
            drop(ep.tlb.write().unwrap_or_else(PoisonError::into_inner));
        }
    }

    fn set_bits(&self, first: u64, npages: u64, shared: bool) -> u64 {
        let mut changed = 0;
        for page in first..first + npages {
            let bit = 1u64 << (page & 63);
            let word = &self.bits[(page >> 6) as usize];
            let old = if shared {
                word.fetch_or(bit, Ordering::AcqRel)
            } else {
                word.fetch_and(!bit, Ordering::AcqRel)
            };
            if (old & bit != 0) != shared {
                changed += 1;
            }
        }
        if shared {
            self.shared_pages.fetch_add(changed, Ordering::Relaxed);
        } else {
            self.shared_pages.fetch_sub(changed, Ordering::Relaxed);
        }
        changed
    }

    fn check_range(&self, gpa: u64, npages: u64) -> Result<(), ShareError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !self.in_ram(gpa, npages) {
            return Err(ShareError::OutOfRange);
        }
        Ok(())
    }

    /// Enters secure mode: every RAM page becomes private except
    /// `npages` pages from `keep_gpa` (none if `npages` is 0).
    pub fn enter_secure(&self, keep_gpa: u64, npages: u64, host: &dyn HostProtection) -> Result<(), ShareError> {
        let _change = lock(&self.change);
        if self.is_secure() {
            return Err(ShareError::AlreadySecure);
        }
        if npages > 0 {
            self.check_range(keep_gpa, npages)?;
            self.set_bits(keep_gpa >> PAGE_SHIFT, npages, true);
        }
        self.secure.store(true, Ordering::Release);
        self.drain_accesses();
        let kept = keep_gpa..keep_gpa + npages * PAGE_SIZE;
        let mut result = Ok(());
        for &(start, len) in &self.ram {
            // The region minus the kept range: at most two pieces.
            let end = start + len;
            let pieces = if npages == 0 || kept.end <= start || kept.start >= end {
                [(start, end), (end, end)]
            } else {
                [(start, kept.start.max(start)), (kept.end.min(end), end)]
            };
            for (s, e) in pieces.into_iter().filter(|(s, e)| e > s) {
                if let Err(err) = host.set_accessible(s, e - s, false) {
                    result = Err(ShareError::Host(err.to_string()));
                }
            }
        }
        for callback in lock(&self.on_secure).iter() {
            callback();
        }
        // A host view that could not be protected is still gated: the
        // bits are what devices check. Report it, keep going secure.
        result
    }

    /// Shares `npages` pages from `gpa` with the host.
    pub fn share(&self, gpa: u64, npages: u64, host: &dyn HostProtection) -> Result<u64, ShareError> {
        let _change = lock(&self.change);
        if !self.is_secure() {
            return Err(ShareError::NotSecure);
        }
        self.check_range(gpa, npages)?;
        host.set_accessible(gpa, npages * PAGE_SIZE, true)
            .map_err(|e| ShareError::Host(e.to_string()))?;
        Ok(self.set_bits(gpa >> PAGE_SHIFT, npages, true))
    }

    /// Takes `npages` pages from `gpa` back from the host. When this
    /// returns, no device access to them is in progress or can start.
    pub fn unshare(&self, gpa: u64, npages: u64, host: &dyn HostProtection) -> Result<u64, ShareError> {
        let _change = lock(&self.change);
        if !self.is_secure() {
            return Err(ShareError::NotSecure);
        }
        self.check_range(gpa, npages)?;
        let changed = self.set_bits(gpa >> PAGE_SHIFT, npages, false);
        self.drain_accesses();
        host.set_accessible(gpa, npages * PAGE_SIZE, false)
            .map_err(|e| ShareError::Host(e.to_string()))?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records what the host view was asked to do.
    #[derive(Default)]
    pub struct Recorder(pub Mutex<Vec<(u64, u64, bool)>>);

    impl HostProtection for Recorder {
        fn set_accessible(&self, gpa: u64, len: u64, accessible: bool) -> std::io::Result<()> {
            lock(&self.0).push((gpa, len, accessible));
            Ok(())
        }
    }

    const MIB: u64 = 1 << 20;

    fn pages() -> SharedPages {
        // Two regions with a hole, as above and below 4 GiB.
        SharedPages::new(&[(0, 16 * MIB), (32 * MIB, 16 * MIB)])
    }

    #[test]
    fn an_ordinary_vm_shares_everything() {
        let p = pages();
        assert!(p.allows(0x1234, 100));
        assert!(p.allows(40 * MIB, 4096));
        let c = p.counts();
        assert_eq!((c.secure, c.private_pages, c.shared_pages), (false, 0, 8192));
        let host = Recorder::default();
        assert_eq!(p.share(0, 1, &host), Err(ShareError::NotSecure));
        assert_eq!(p.unshare(0, 1, &host), Err(ShareError::NotSecure));
        assert!(lock(&host.0).is_empty());
    }

    #[test]
    fn secure_mode_keeps_only_the_given_range() {
        let p = pages();
        let host = Recorder::default();
        p.enter_secure(0x10_0000, 16, &host).unwrap();
        assert!(p.allows(0x10_0000, 16 * 4096));
        assert!(!p.allows(0x10_0000, 16 * 4096 + 1), "one byte past the range");
        assert!(!p.allows(0x0f_ffff, 2), "one byte before it");
        assert!(!p.allows(33 * MIB, 1));
        assert!(!p.allows(u64::MAX, 1), "past the end of RAM");
        assert!(!p.allows(u64::MAX - 3, 8), "wrapping");
        assert_eq!(
            p.counts(),
            PageCounts {
                secure: true,
                private_pages: 8192 - 16,
                shared_pages: 16
            }
        );
        assert_eq!(
            *lock(&host.0),
            vec![
                (0, 0x10_0000, false),
                (0x11_0000, 16 * MIB - 0x11_0000, false),
                (32 * MIB, 16 * MIB, false)
            ]
        );
        assert_eq!(p.enter_secure(0, 0, &host), Err(ShareError::AlreadySecure));
    }

    #[test]
    fn share_and_unshare_change_single_pages_and_count_once() {
        let p = pages();
        let host = Recorder::default();
        p.enter_secure(0, 0, &host).unwrap();
        assert_eq!(p.counts().shared_pages, 0);
        // 130 pages across two bitmap words and more.
        let base = 32 * MIB + 60 * 4096;
        assert_eq!(p.share(base, 130, &host), Ok(130));
        assert_eq!(p.share(base, 130, &host), Ok(0), "sharing twice changes nothing");
        assert!(p.allows(base, 130 * 4096));
        assert!(!p.allows(base - 1, 2));
        assert_eq!(p.unshare(base + 4096, 1, &host), Ok(1));
        assert!(!p.allows(base, 130 * 4096));
        assert!(p.allows(base, 4096));
        assert!(p.allows(base + 2 * 4096, 128 * 4096));
        assert_eq!(p.counts().shared_pages, 129);
        assert_eq!(lock(&host.0).last(), Some(&(base + 4096, 4096, false)));
    }

    #[test]
    fn bad_ranges_change_nothing() {
        let p = pages();
        let host = Recorder::default();
        assert_eq!(p.enter_secure(15 * MIB, 512, &host), Err(ShareError::OutOfRange));
        assert!(!p.is_secure(), "a refused ESM leaves the VM ordinary");
        assert_eq!(p.enter_secure(0x1001, 1, &host), Err(ShareError::OutOfRange));
        p.enter_secure(0, 0, &host).unwrap();
        let calls = lock(&host.0).len();
        for (gpa, n) in [
            (16 * MIB, 1),            // in the hole
            (16 * MIB - 4096, 2),     // across the hole
            (48 * MIB, 1),            // past the end
            (!0xfff, 2),              // wrapping
            (0, u64::MAX / 4096 + 2), // length overflows
            (0x800, 1),               // unaligned
        ] {
            assert_eq!(p.share(gpa, n, &host), Err(ShareError::OutOfRange), "{gpa:#x}+{n}");
            assert_eq!(p.unshare(gpa, n, &host), Err(ShareError::OutOfRange), "{gpa:#x}+{n}");
        }
        assert_eq!(lock(&host.0).len(), calls);
        assert_eq!(p.counts().shared_pages, 0);
    }

    #[test]
    fn a_region_not_page_aligned_is_rounded_inwards() {
        let p = SharedPages::new(&[(0x800, 0x3000)]);
        assert_eq!(p.counts().shared_pages, 2);
        assert!(p.in_ram(0x1000, 2));
        assert!(!p.in_ram(0, 1));
    }

    #[test]
    fn unshare_waits_for_accesses_in_progress() {
        use super::super::DmaTranslation;
        let p = Arc::new(pages());
        let host = Arc::new(Recorder::default());
        let t = DmaTranslation::identity(&p, "test");
        p.enter_secure(0x20_0000, 1, host.as_ref()).unwrap();
        let guard = t.begin_access_for_test();
        let (p2, h2) = (p.clone(), host.clone());
        let unshare = std::thread::spawn(move || p2.unshare(0x20_0000, 1, h2.as_ref()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!p.allows(0x20_0000, 1), "the bit goes first");
        assert!(
            !lock(&host.0).contains(&(0x20_0000, 4096, false)),
            "the host view waits for the access in progress"
        );
        drop(guard);
        assert_eq!(unshare.join().unwrap(), Ok(1));
        assert!(lock(&host.0).contains(&(0x20_0000, 4096, false)));
    }
}
