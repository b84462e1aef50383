//! Which file holds guest RAM, and so which page size backs it.
//!
//! In `auto`, the first of these the host allows, with no configuration:
//! a hugetlbfs pool large enough; a memfd when `shmem_enabled` lets shmem
//! use huge pages; a file on a private `huge=always` tmpfs
//! (`private_tmpfs`); and last a memfd on 4 KiB pages, with one warning
//! saying why each of the others was not possible.

use super::private_tmpfs;
use crate::config::{HugePages, MemoryConfig};
use crate::error::{Context, Error, Kind, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

/// One way of making a huge-page RAM file: the file, or why it could not be made.
type Attempt = fn(u64) -> std::result::Result<File, String>;

pub const HUGE_PAGE: u64 = 2 << 20;
const SMALL_PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A hugetlbfs pool: 2 MiB pages reserved by the host's administrator.
    Hugetlbfs,
    /// A memfd on a host whose shmem may use transparent huge pages.
    ShmemThp,
    /// A file on a private `huge=always` tmpfs made by a helper process.
    PrivateHugeTmpfs,
    /// The user's `file=PATH` (not on hugetlbfs).
    File,
    /// A memfd on 4 KiB pages.
    Memfd,
}

impl Backing {
    pub fn name(self) -> &'static str {
        match self {
            Backing::Hugetlbfs => "hugetlbfs",
            Backing::ShmemThp => "shmem-thp",
            Backing::PrivateHugeTmpfs => "private-huge-tmpfs",
            Backing::File => "file",
            Backing::Memfd => "memfd-4k",
        }
    }

    /// Whether the mappings should sit at 2 MiB-aligned addresses (and get
    /// MADV_HUGEPAGE) for the host to use huge pages.
    pub fn wants_huge(self) -> bool {
        !matches!(self, Backing::Memfd)
    }

    /// The smallest range whose host-view protection can change: hugetlbfs
    /// pages cannot be split, so its protections change 2 MiB at a time.
    pub fn protection_granule(self) -> u64 {
        match self {
            Backing::Hugetlbfs => HUGE_PAGE,
            _ => SMALL_PAGE,
        }
    }
}

/// The file of guest RAM, sized, and how it is backed.
pub struct RamFile {
    pub file: File,
    pub backing: Backing,
}

/// Makes the file that holds `config.size` bytes of guest RAM.
pub fn open(config: &MemoryConfig) -> Result<RamFile> {
    let size = config.size;
    if let Some(path) = &config.file {
        return user_file(path, size, config.hugepages);
    }
    if config.hugepages == HugePages::Off {
        return Ok(RamFile {
            file: memfd(size, 0)?,
            backing: Backing::Memfd,
        });
    }
    let mut why = Vec::new();
    let attempts: [(Backing, Attempt); 3] = [
        (Backing::Hugetlbfs, hugetlbfs_pool),
        (Backing::ShmemThp, shmem_thp),
        (Backing::PrivateHugeTmpfs, private_tmpfs::create),
    ];
    for (backing, attempt) in attempts {
        match attempt(size) {
            Ok(file) => return Ok(RamFile { file, backing }),
            Err(e) => why.push(e),
        }
    }
    let why = why.join("; ");
    if config.hugepages == HugePages::On {
        return Err(Error::new(
            Kind::Unavailable,
            format!("--memory hugepages=on: this host gives guest RAM no 2 MiB pages: {why}"),
        ));
    }
    log::warn!("guest RAM on 4 KiB pages (first touch is several times slower): {why}");
    Ok(RamFile {
        file: memfd(size, 0)?,
        backing: Backing::Memfd,
    })
}

fn memfd(size: u64, flags: libc::c_uint) -> Result<File> {
    // SAFETY: the name is NUL-terminated and the flags are plain constants;
    // the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(c"veil-guest-ram".as_ptr(), libc::MFD_CLOEXEC | flags) };
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

fn read_sys(path: &str) -> std::result::Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// A hugetlbfs memfd, when the pool has room for all of guest RAM (its
/// pages are reserved at mmap time, so a short pool fails early, not at a
/// guest's fault).
fn hugetlbfs_pool(size: u64) -> std::result::Result<File, String> {
    const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let count = |name: &str| -> std::result::Result<u64, String> {
        read_sys(&format!("{POOL}/{name}"))?
            .parse()
            .map_err(|e| format!("{POOL}/{name}: {e}"))
    };
    let available = count("free_hugepages")?.saturating_sub(count("resv_hugepages")?);
    let needed = size.div_ceil(HUGE_PAGE);
    if available < needed {
        return Err(format!(
            "the hugetlbfs pool has {available} free 2 MiB pages, {needed} needed"
        ));
    }
    if !size.is_multiple_of(HUGE_PAGE) {
        return Err("the size is not a multiple of 2 MiB, as hugetlbfs needs".into());
    }
    memfd(size, libc::MFD_HUGETLB | libc::MFD_HUGE_2MB).map_err(|e| e.message)
}

/// A plain memfd, when the host lets shmem use transparent huge pages.
fn shmem_thp(size: u64) -> std::result::Result<File, String> {
    const KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let text = read_sys(KNOB)?;
    let chosen = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or(&text);
    match chosen {
        "always" | "within_size" | "advise" | "force" => memfd(size, 0).map_err(|e| e.message),
        other => Err(format!("{KNOB} is '{other}'")),
    }
}

fn filesystem_magic(file: &File) -> Option<libc::c_long> {
    // SAFETY: an all-zero statfs is valid; fstatfs fills it for this fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid statfs to write into and the fd is open.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    (rc == 0).then_some(st.f_type)
}

/// The user's `file=PATH`: created if missing, grown to the size if shorter.
fn user_file(path: &Path, size: u64, hugepages: HugePages) -> Result<RamFile> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .context(Kind::NoInput, || {
            format!("--memory file={}: cannot open", path.display())
        })?;
    let magic = filesystem_magic(&file);
    let backing = if magic == Some(libc::HUGETLBFS_MAGIC) {
        Backing::Hugetlbfs
    } else {
        Backing::File
    };
    let bad = |why: &str| Error::new(Kind::Usage, format!("--memory file={}: {why}", path.display()));
    match (backing, hugepages) {
        (Backing::Hugetlbfs, HugePages::Off) => return Err(bad("is on hugetlbfs, which has only huge pages")),
        (Backing::Hugetlbfs, _) if !size.is_multiple_of(HUGE_PAGE) => {
            return Err(bad("the size must be a multiple of 2 MiB on hugetlbfs"))
        }
        (Backing::File, HugePages::On) if magic != Some(libc::TMPFS_MAGIC) => {
            return Err(bad(
                "hugepages=on needs a file on hugetlbfs or on a tmpfs mounted huge=",
            ))
        }
        _ => {}
    }
    let len = file
        .metadata()
        .context(Kind::NoInput, || {
            format!("--memory file={}: cannot stat", path.display())
        })?
        .len();
    if len < size {
        file.set_len(size).context(Kind::Data, || {
            format!("--memory file={}: cannot grow to {size} bytes", path.display())
        })?;
    }
    Ok(RamFile { file, backing })
}

/// Resident guest RAM on huge pages (KiB), over the mappings that start in
/// `ranges` (host address, length), from /proc/self/smaps.
pub fn huge_resident_kib(ranges: &[(usize, usize)]) -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut inside = false;
    let mut total = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, _)) = first.split_once('-') {
            if let Ok(start) = usize::from_str_radix(start, 16) {
                inside = ranges.iter().any(|&(at, len)| (at..at + len).contains(&start));
                continue;
            }
        }
        if inside
            && matches!(
                first,
                "ShmemPmdMapped:" | "FilePmdMapped:" | "Shared_Hugetlb:" | "Private_Hugetlb:"
            )
        {
            total += words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_is_a_small_page_memfd() {
        let config = MemoryConfig {
            size: 8 << 20,
            hugepages: HugePages::Off,
            file: None,
        };
        let ram = open(&config).unwrap();
        assert_eq!(ram.backing, Backing::Memfd);
        assert_eq!(ram.file.metadata().unwrap().len(), 8 << 20);
    }

    #[test]
    fn a_user_file_is_grown_to_the_size() {
        let path = std::env::temp_dir().join(format!("veil-ram-test-{}", std::process::id()));
        let config = MemoryConfig {
            size: 4 << 20,
            hugepages: HugePages::Auto,
            file: Some(path.clone()),
        };
        let ram = open(&config).unwrap();
        assert_eq!(ram.file.metadata().unwrap().len(), 4 << 20);
        let on = MemoryConfig {
            hugepages: HugePages::On,
            ..config
        };
        let magic = magic_of(&path);
        let on_disk = magic != Some(libc::TMPFS_MAGIC) && magic != Some(libc::HUGETLBFS_MAGIC);
        if on_disk {
            let err = open(&on).err().unwrap();
            assert_eq!(err.kind, Kind::Usage);
            assert!(err.message.contains("hugepages=on"), "{}", err.message);
        }
        std::fs::remove_file(&path).unwrap();
    }

    fn magic_of(path: &Path) -> Option<libc::c_long> {
        filesystem_magic(&File::open(path).ok()?)
    }

    #[test]
    fn smaps_counts_only_the_named_mappings() {
        // No mapping starts at address 0.
        assert_eq!(huge_resident_kib(&[(0, 4096)]), 0);
    }
}
