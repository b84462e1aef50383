//! What veil hands over in `boot_params` (the Linux "zero page"): the e820
//! map, the command line, the RSDP address and an initrd, if any.

use core::ptr::read_unaligned;

const ACPI_RSDP_ADDR: u64 = 0x070; // u64
const RAMDISK_IMAGE: u64 = 0x218; // u32
const RAMDISK_SIZE: u64 = 0x21C; // u32
const CMD_LINE_PTR: u64 = 0x228; // u32
const E820_ENTRIES: u64 = 0x1E8; // u8
const E820_TABLE: u64 = 0x2D0; // 20-byte entries
const E820_MAX: usize = 128;
const CMDLINE_MAX: usize = 4096;

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
    /// 0 when veil did not say.
    pub rsdp: u64,
    /// [start, end) of the initrd, empty when there is none.
    pub ramdisk: (u64, u64),
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
    /// # Safety
    /// `bp` must be the `boot_params` address veil passed in RSI.
    pub unsafe fn read(bp: u64) -> Self {
        let mut info = BootInfo {
            e820: [E820Entry::default(); E820_MAX],
            e820_len: 0,
            cmdline: &[],
            rsdp: peek::<u64>(bp + ACPI_RSDP_ADDR),
            ramdisk: (0, 0),
        };
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

        let cmd = peek::<u32>(bp + CMD_LINE_PTR) as u64;
        if cmd != 0 {
            let p = cmd as *const u8;
            let mut len = 0;
            while len < CMDLINE_MAX && *p.add(len) != 0 {
                len += 1;
            }
            info.cmdline = core::slice::from_raw_parts(p, len);
        }
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
