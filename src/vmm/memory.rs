//! Guest RAM: one memfd, mapped twice.
//!
//! The *KVM view* is what the vCPUs use (registered as KVM memory slots) and
//! what boot-time loading writes through. The *host view* is a second
//! mapping of the same pages that devices use; it can later be narrowed
//! (page protections) without touching what the guest itself sees.

use crate::error::{Context, Error, Kind, Result};
use std::fs::File;
use std::os::fd::FromRawFd;
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
    /// Which pages of `host_view` devices may touch (all, until the guest
    /// enters secure mode).
    pub shared: Arc<SharedPages>,
}

/// Page protections of the host view: private pages become PROT_NONE, so
/// that a host-side bug faults instead of reading guest secrets.
pub struct HostViewProtection(pub GuestMemoryMmap);

impl HostProtection for HostViewProtection {
    fn set_accessible(&self, gpa: u64, len: u64, accessible: bool) -> std::io::Result<()> {
        let prot = if accessible {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        let mut at = gpa;
        let end = gpa.checked_add(len).ok_or(std::io::ErrorKind::InvalidInput)?;
        while at < end {
            let region = self
                .0
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

fn memfd(size: u64) -> Result<File> {
    let name = c"veil-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string and the flags are
    // plain constants; the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::new(
            Kind::Unavailable,
            format!("cannot create guest memory: {}", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .context(Kind::Data, || format!("cannot size guest memory to {size} bytes"))?;
    Ok(file)
}

fn map(file: &Arc<File>, size: u64) -> Result<GuestMemoryMmap> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let fo = FileOffset::from_arc(file.clone(), offset);
        let mapping = MmapRegion::from_file(fo, len as usize)
            .context(Kind::Data, || format!("cannot map {} MiB of guest memory", len >> 20))?;
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

impl GuestRam {
    pub fn new(size: u64) -> Result<Self> {
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
        let memfd = Arc::new(memfd(size)?);
        let kvm_view = map(&memfd, size)?;
        let host_view = map(&memfd, size)?;
        Ok(Self {
            kvm_view,
            host_view,
            size,
            shared: Arc::new(SharedPages::new(&ram_ranges(size))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn both_views_see_the_same_pages() {
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.kvm_view.write_obj(0xfeed_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.host_view.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xfeed);
    }

    #[test]
    fn private_pages_leave_the_host_view_only() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let protect = HostViewProtection(ram.host_view.clone());
        ram.shared.enter_secure(0x2000, 1, &protect).unwrap();
        // The shared page stays usable; the guest's own view is untouched.
        ram.host_view.write_obj(1_u8, GuestAddress(0x2000)).unwrap();
        ram.kvm_view.write_obj(2_u8, GuestAddress(0x3000)).unwrap();
        ram.shared.share(0x3000, 1, &protect).unwrap();
        assert_eq!(ram.host_view.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 2);
        assert!(protect.set_accessible(u64::MAX - 1, 4, false).is_err());
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(GuestRam::new(1 << 20).err().unwrap().kind, Kind::Data);
        assert_eq!(GuestRam::new((32 << 20) + 1).err().unwrap().kind, Kind::Data);
        let too_big = GuestRam::new(1 << 50).err().unwrap();
        assert!(too_big.message.contains("more than this host"), "{}", too_big.message);
    }
}
