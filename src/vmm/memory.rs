//! Guest RAM: one shared file, mapped twice.
//!
//! The *KVM view* is what the vCPUs use (registered as KVM memory slots) and
//! what boot-time loading writes through. The *host view* is a second
//! mapping of the same pages that devices use; it can later be narrowed
//! (page protections) without touching what the guest itself sees.
//!
//! Which file, and so which page size, is `backing`'s choice. Both views of
//! a huge-page backing sit at 2 MiB-aligned addresses (the kernel aligns a
//! mapping of a huge shmem or hugetlbfs file), so the guest's first touch of
//! each 2 MiB takes one fault, and KVM can map it with one large page.

mod backing;
mod private_tmpfs;

pub use backing::Backing;

use crate::config::MemoryConfig;
use crate::error::{Context, Error, Kind, Result};
use backing::HUGE_PAGE;
use std::fs::File;
use std::sync::Arc;
use veil_arch::layout::ram_ranges;
use veil_devices::dma::{HostProtection, SharedPages};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

pub struct GuestRam {
    pub kvm_view: GuestMemoryMmap,
    pub host_view: GuestMemoryMmap,
    pub size: u64,
    pub backing: Backing,
    /// Which pages of `host_view` devices may touch (all, until the guest
    /// enters secure mode).
    pub shared: Arc<SharedPages>,
}

/// Page protections of the host view: private pages become PROT_NONE, so
/// that a host-side bug faults instead of reading guest secrets.
///
/// Protections change `granule` bytes at a time: a range made inaccessible
/// shrinks to the granules inside it, one made accessible grows to the
/// granules it touches. With 4 KiB that is exact; with hugetlbfs (2 MiB, its
/// pages cannot be split) a private page that shares its 2 MiB with a shared
/// one stays mapped in the host view, and only the `SharedPages` gate every
/// device access goes through keeps devices off it.
pub struct HostViewProtection {
    view: GuestMemoryMmap,
    granule: u64,
}

impl HostViewProtection {
    pub fn new(view: GuestMemoryMmap) -> Self {
        Self { view, granule: 4096 }
    }
}

impl HostProtection for HostViewProtection {
    fn set_accessible(&self, gpa: u64, len: u64, accessible: bool) -> std::io::Result<()> {
        let prot = if accessible {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        let end = gpa.checked_add(len).ok_or(std::io::ErrorKind::InvalidInput)?;
        let g = self.granule;
        let (mut at, end) = if accessible {
            (gpa / g * g, end.div_ceil(g) * g)
        } else {
            (gpa.div_ceil(g) * g, end / g * g)
        };
        while at < end {
            let region = self
                .view
                .find_region(GuestAddress(at))
                .ok_or(std::io::ErrorKind::InvalidInput)?;
            let offset = at - region.start_addr().0;
            let here = (end - at).min(region.len() - offset);
            let host = region.as_ptr() as usize + offset as usize;
            // SAFETY: `host..host + here` lies inside this region's mapping,
            // which the GuestMemoryMmap owns for as long as it lives; only its
            // protection changes, and every device access checks the
            // SharedPages gate before touching a page, so a PROT_NONE page is
            // never dereferenced.
            let rc = unsafe { libc::mprotect(host as *mut libc::c_void, here as usize, prot) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            at += here;
        }
        Ok(())
    }
}

/// Maps `file` as guest RAM; with a huge-page backing, at 2 MiB-aligned
/// addresses and with MADV_HUGEPAGE (which a tmpfs mounted `huge=advise` or
/// shmem_enabled `advise` need).
fn map(file: &Arc<File>, size: u64, backing: Backing) -> Result<GuestMemoryMmap> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let fo = FileOffset::from_arc(file.clone(), offset);
        let mapping = MmapRegion::from_file(fo, len as usize)
            .context(Kind::Data, || format!("cannot map {} MiB of guest memory", len >> 20))?;
        if backing.wants_huge() {
            let at = mapping.as_ptr() as usize;
            if !(at as u64).is_multiple_of(HUGE_PAGE) {
                log::warn!("guest RAM mapped at {at:#x}, not 2 MiB-aligned: the host will use 4 KiB pages for it");
            }
            // SAFETY: advice on a mapping this region owns; it changes
            // only which page size the kernel prefers, never the contents.
            unsafe { libc::madvise(at as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
        }
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(start))
                .ok_or_else(|| Error::new(Kind::Data, "guest memory region overflows"))?,
        );
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).context(Kind::Data, || "cannot build guest memory".to_string())
}

/// Physical RAM of this host, from /proc/meminfo.
fn host_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How guest RAM is backed, for `--metrics`.
#[derive(Debug, Default, serde::Serialize)]
pub struct MemoryReport {
    /// hugetlbfs, shmem-thp, private-huge-tmpfs, file or memfd-4k.
    pub backing: String,
    /// Whether every region of both views starts 2 MiB-aligned.
    pub aligned_2m: bool,
    /// Guest RAM the vCPUs' view holds on 2 MiB pages.
    pub huge_resident_kib: u64,
}

impl GuestRam {
    pub fn new(config: &MemoryConfig) -> Result<Self> {
        let size = config.size;
        let min = veil_arch::layout::MIN_RAM_SIZE;
        if size < min {
            return Err(Error::new(
                Kind::Data,
                format!(
                    "--memory {} MiB is too small: veil needs at least {} MiB",
                    size >> 20,
                    min >> 20
                ),
            ));
        }
        if !size.is_multiple_of(4096) {
            return Err(Error::new(
                Kind::Data,
                format!("--memory {size} is not a multiple of 4 KiB"),
            ));
        }
        if let Some(host) = host_ram_bytes() {
            if size > host {
                return Err(Error::new(
                    Kind::Data,
                    format!(
                        "--memory {} MiB is more than this host's {} MiB of RAM",
                        size >> 20,
                        host >> 20
                    ),
                ));
            }
        }
        let ram_file = backing::open(config)?;
        let file = Arc::new(ram_file.file);
        let kvm_view = map(&file, size, ram_file.backing)?;
        let host_view = map(&file, size, ram_file.backing)?;
        Ok(Self {
            kvm_view,
            host_view,
            size,
            backing: ram_file.backing,
            shared: Arc::new(SharedPages::new(&ram_ranges(size))),
        })
    }

    /// Page protections of the host view, at the backing's granule.
    pub fn host_protection(&self) -> HostViewProtection {
        HostViewProtection {
            view: self.host_view.clone(),
            granule: self.backing.protection_granule(),
        }
    }

    fn regions(view: &GuestMemoryMmap) -> Vec<(usize, usize)> {
        view.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)).collect()
    }

    /// What `--metrics` needs to describe guest RAM later, from any thread.
    pub fn reporter(&self) -> MemoryReporter {
        let kvm_regions = Self::regions(&self.kvm_view);
        let host_regions = Self::regions(&self.host_view);
        MemoryReporter {
            backing: self.backing,
            aligned_2m: kvm_regions
                .iter()
                .chain(&host_regions)
                .all(|&(at, _)| (at as u64).is_multiple_of(HUGE_PAGE)),
            kvm_regions,
        }
    }
}

pub struct MemoryReporter {
    backing: Backing,
    aligned_2m: bool,
    kvm_regions: Vec<(usize, usize)>,
}

impl MemoryReporter {
    pub fn report(&self) -> MemoryReport {
        MemoryReport {
            backing: self.backing.name().to_string(),
            aligned_2m: self.aligned_2m,
            huge_resident_kib: backing::huge_resident_kib(&self.kvm_regions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mib(n: u64) -> MemoryConfig {
        MemoryConfig {
            size: n << 20,
            ..Default::default()
        }
    }

    #[test]
    fn both_views_see_the_same_pages() {
        let ram = GuestRam::new(&mib(32)).unwrap();
        ram.kvm_view.write_obj(0xfeed_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.host_view.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xfeed);
    }

    #[test]
    fn private_pages_leave_the_host_view_only() {
        let ram = GuestRam::new(&mib(32)).unwrap();
        let protect = ram.host_protection();
        ram.shared.enter_secure(0x2000, 1, &protect).unwrap();
        // The shared page stays usable; the guest's own view is untouched.
        ram.host_view.write_obj(1_u8, GuestAddress(0x2000)).unwrap();
        ram.kvm_view.write_obj(2_u8, GuestAddress(0x3000)).unwrap();
        ram.shared.share(0x3000, 1, &protect).unwrap();
        assert_eq!(ram.host_view.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 2);
        assert!(protect.set_accessible(u64::MAX - 1, 4, false).is_err());
    }

    /// Whether this process can read `len` bytes at `addr` (false for a
    /// PROT_NONE page), without faulting.
    fn readable(addr: usize, len: usize) -> bool {
        let mut buf = vec![0u8; len];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: reads our own memory into `buf`; an inaccessible page
        // makes the call fail with EFAULT instead of faulting.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        n == len as isize
    }

    #[test]
    fn huge_backings_are_aligned_and_touched_2m_at_a_time() {
        let ram = GuestRam::new(&mib(64)).unwrap();
        if !ram.backing.wants_huge() {
            eprintln!("skipped: this host gives guest RAM no 2 MiB pages");
            return;
        }
        let reporter = ram.reporter();
        assert!(reporter.aligned_2m);
        for at in (0..(8 << 20)).step_by(4096) {
            ram.kvm_view.write_obj(1_u8, GuestAddress(at)).unwrap();
        }
        let report = reporter.report();
        assert!(report.huge_resident_kib >= 4096, "{report:?}");
    }

    #[test]
    fn a_2m_granule_protects_only_whole_huge_pages() {
        let ram = GuestRam::new(&MemoryConfig {
            size: 32 << 20,
            hugepages: crate::config::HugePages::Off,
            file: None,
        })
        .unwrap();
        let protect = HostViewProtection {
            view: ram.host_view.clone(),
            granule: HUGE_PAGE,
        };
        let base = ram.host_view.get_host_address(GuestAddress(0)).unwrap() as usize;
        let m = HUGE_PAGE as usize;
        // 1 MiB to 5 MiB: only the 2 MiB page at 2 MiB lies inside.
        protect.set_accessible(1 << 20, 4 << 20, false).unwrap();
        assert!(readable(base + m - 4096, 4096));
        assert!(!readable(base + m, 4096) && !readable(base + 2 * m - 4096, 4096));
        assert!(readable(base + 2 * m, 4096));
        // Sharing one page opens its whole 2 MiB.
        protect.set_accessible(m as u64 + 8192, 4096, true).unwrap();
        assert!(readable(base + m, m));
    }

    #[test]
    fn sizes_are_checked() {
        let bytes = |size| MemoryConfig {
            size,
            ..Default::default()
        };
        assert_eq!(GuestRam::new(&mib(1)).err().unwrap().kind, Kind::Data);
        assert_eq!(GuestRam::new(&bytes((32 << 20) + 1)).err().unwrap().kind, Kind::Data);
        let too_big = GuestRam::new(&bytes(1 << 50)).err().unwrap();
        assert!(too_big.message.contains("more than this host"), "{}", too_big.message);
    }
}
