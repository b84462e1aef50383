//! What the VMM hands over: the e820 map, the command line, the RSDP
//! address and an initrd, if any. Either in `boot_params` (the Linux "zero
//! page", 64-bit entry) or in `hvm_start_info` (PVH entry, as veil, QEMU and
//! Cloud Hypervisor give it).

use crate::boot::Racy;
use core::ptr::read_unaligned;

const ACPI_RSDP_ADDR: u64 = 0x070; // u64
const RAMDISK_IMAGE: u64 = 0x218; // u32
const RAMDISK_SIZE: u64 = 0x21C; // u32
const CMD_LINE_PTR: u64 = 0x228; // u32
const E820_ENTRIES: u64 = 0x1E8; // u8
const E820_TABLE: u64 = 0x2D0; // 20-byte entries
const E820_MAX: usize = 128;
const CMDLINE_MAX: usize = 4096;

// hvm_start_info (Xen's public arch-x86/hvm/start_info.h).
const PVH_MAGIC: u32 = 0x336e_c578;
const SI_MAGIC: u64 = 0x00; // u32
const SI_VERSION: u64 = 0x04; // u32
const SI_NR_MODULES: u64 = 0x0C; // u32
const SI_MODLIST: u64 = 0x10; // u64, entries {paddr, size, cmdline, reserved}
const SI_CMDLINE: u64 = 0x18; // u64
const SI_RSDP: u64 = 0x20; // u64
const SI_MEMMAP: u64 = 0x28; // u64, entries {addr u64, size u64, type u32, reserved u32}
const SI_MEMMAP_ENTRIES: u64 = 0x30; // u32
const MEMMAP_ENTRY_SIZE: u64 = 24;

/// How the probe was entered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Linux64,
    Pvh,
}

/// Where the RSDP address came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RsdpSource {
    /// `boot_params.acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`.
    Given,
    /// Found by scanning the EBDA and the BIOS area.
    Scan,
    None,
}

/// The command line, copied: the RAM test may overwrite where it was.
static CMDLINE: Racy<[u8; CMDLINE_MAX]> = Racy::new([0; CMDLINE_MAX]);

pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

pub struct BootInfo {
    e820: [E820Entry; E820_MAX],
    e820_len: usize,
    pub cmdline: &'static [u8],
    /// 0 when neither the VMM nor the scan found one.
    pub rsdp: u64,
    pub rsdp_source: RsdpSource,
    /// [start, end) of the initrd, empty when there is none.
    pub ramdisk: (u64, u64),
    pub protocol: Protocol,
    /// Where the boot structure (boot_params or hvm_start_info) was.
    pub structure: u64,
    /// PVH only: `hvm_start_info.version` and `nr_modules`.
    pub pvh_version: u32,
    pub modules: u32,
    /// PVH only, false when the magic was wrong (nothing else was read).
    pub valid: bool,
}

/// Read a little-endian value at a guest-physical address.
///
/// # Safety
/// `addr` must be identity-mapped and readable (all of it is at CPL3 here,
/// but memory outside e820 entries may not exist).
pub unsafe fn peek<T: Copy>(addr: u64) -> T {
    read_unaligned(addr as *const T)
}

impl BootInfo {
    fn empty(protocol: Protocol, structure: u64) -> Self {
        BootInfo {
            e820: [E820Entry::default(); E820_MAX],
            e820_len: 0,
            cmdline: &[],
            rsdp: 0,
            rsdp_source: RsdpSource::None,
            ramdisk: (0, 0),
            protocol,
            structure,
            pvh_version: 0,
            modules: 0,
            valid: true,
        }
    }

    /// From the entry: `kind` 0 is the 64-bit entry (`ptr` = boot_params),
    /// 1 the PVH entry (`ptr` = hvm_start_info).
    ///
    /// # Safety
    /// `ptr` must be what the VMM passed for that entry.
    pub unsafe fn read(ptr: u64, kind: u64) -> Self {
        let mut info = if kind == 1 {
            Self::from_start_info(ptr)
        } else {
            Self::from_boot_params(ptr)
        };
        if info.rsdp != 0 {
            info.rsdp_source = RsdpSource::Given;
        } else if let Some(a) = scan_rsdp() {
            info.rsdp = a;
            info.rsdp_source = RsdpSource::Scan;
        }
        info
    }

    /// # Safety
    /// `bp` must be the `boot_params` address veil passed in RSI.
    unsafe fn from_boot_params(bp: u64) -> Self {
        let mut info = Self::empty(Protocol::Linux64, bp);
        info.rsdp = peek::<u64>(bp + ACPI_RSDP_ADDR);
        let n = (peek::<u8>(bp + E820_ENTRIES) as usize).min(E820_MAX);
        for i in 0..n {
            let e = bp + E820_TABLE + 20 * i as u64;
            info.e820[i] = E820Entry {
                addr: peek(e),
                size: peek(e + 8),
                kind: peek(e + 16),
            };
        }
        info.e820_len = n;

        let image = peek::<u32>(bp + RAMDISK_IMAGE) as u64;
        let size = peek::<u32>(bp + RAMDISK_SIZE) as u64;
        if size != 0 {
            info.ramdisk = (image, image + size);
        }
        info.cmdline = copy_cmdline(peek::<u32>(bp + CMD_LINE_PTR) as u64);
        info
    }

    /// # Safety
    /// `si` must be the `hvm_start_info` address the VMM passed in EBX.
    unsafe fn from_start_info(si: u64) -> Self {
        let mut info = Self::empty(Protocol::Pvh, si);
        if peek::<u32>(si + SI_MAGIC) != PVH_MAGIC {
            info.valid = false;
            return info;
        }
        info.pvh_version = peek::<u32>(si + SI_VERSION);
        info.rsdp = peek::<u64>(si + SI_RSDP);
        if info.pvh_version >= 1 {
            let table = peek::<u64>(si + SI_MEMMAP);
            let n = (peek::<u32>(si + SI_MEMMAP_ENTRIES) as usize).min(E820_MAX);
            for i in 0..n {
                let e = table + MEMMAP_ENTRY_SIZE * i as u64;
                info.e820[i] = E820Entry {
                    addr: peek(e),
                    size: peek(e + 8),
                    kind: peek(e + 16),
                };
            }
            info.e820_len = n;
        }
        info.modules = peek::<u32>(si + SI_NR_MODULES);
        let list = peek::<u64>(si + SI_MODLIST);
        if info.modules != 0 && list != 0 {
            let (addr, size) = (peek::<u64>(list), peek::<u64>(list + 8));
            if size != 0 {
                info.ramdisk = (addr, addr + size);
            }
        }
        info.cmdline = copy_cmdline(peek::<u64>(si + SI_CMDLINE));
        info
    }

    pub fn e820(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    /// Whether [addr, addr + len) lies inside one e820 entry of any type:
    /// memory that exists, so the probe may read it.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.e820().iter().any(|e| e.addr <= addr && end <= e.end())
    }
}

/// Copies the NUL-terminated command line at `addr` (0: none) into
/// `CMDLINE`.
///
/// # Safety
/// `addr` must be 0 or readable up to its NUL or `CMDLINE_MAX` bytes; only
/// the BSP calls this, once, before anything reads `CMDLINE`.
unsafe fn copy_cmdline(addr: u64) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    let src = addr as *const u8;
    let dst = CMDLINE.get() as *mut u8;
    let mut len = 0;
    while len < CMDLINE_MAX - 1 && *src.add(len) != 0 {
        *dst.add(len) = *src.add(len);
        len += 1;
    }
    core::slice::from_raw_parts(dst, len)
}

/// The RSDP where a PC BIOS leaves it (ACPI 6.5, 5.2.5.1), searched the way
/// Linux does when no boot structure names it: on 16-byte boundaries, in
/// the first KiB of the EBDA (its segment at 0x40E), then in
/// 0xE0000–0xFFFFF; "RSD PTR " with a valid checksum over its first 20
/// bytes.
fn scan_rsdp() -> Option<u64> {
    let valid = |a: u64| {
        // SAFETY: all below 1 MiB, identity-mapped; the ISA holes read as
        // all-ones at worst.
        unsafe {
            peek::<[u8; 8]>(a) == *b"RSD PTR " && (0..20).fold(0u8, |s, i| s.wrapping_add(peek::<u8>(a + i))) == 0
        }
    };
    // SAFETY: the BIOS data area at 0x40E, below 1 MiB.
    let ebda = (unsafe { peek::<u16>(0x40E) } as u64) << 4;
    let ebda_range = if (0x400..0xA_0000).contains(&ebda) {
        ebda..ebda + 1024
    } else {
        0..0
    };
    ebda_range
        .step_by(16)
        .chain((0xE_0000u64..0x10_0000).step_by(16))
        .find(|&a| valid(a))
}

/// The value of `key=value` on the command line (the last one wins).
pub fn param<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let mut found = None;
    for word in cmdline.split(|b| b.is_ascii_whitespace()) {
        if let Some(eq) = word.iter().position(|&b| b == b'=') {
            if &word[..eq] == key.as_bytes() {
                found = Some(&word[eq + 1..]);
            }
        }
    }
    found
}
