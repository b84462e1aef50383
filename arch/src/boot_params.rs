//! The e820 memory map and the Linux `boot_params` ("zero page").

use crate::layout::*;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `loadflags` bit: the kernel was loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// `loadflags` bit: the boot loader did not set up a heap; unset is fine.
const KEEP_SEGMENTS: u8 = 0x40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

fn entry(addr: u64, end: u64, kind: u32) -> E820Entry {
    E820Entry {
        addr,
        size: end - addr,
        kind,
    }
}

/// The e820 map for `ram_size` bytes of RAM laid out by `ram_ranges`.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let ranges = ram_ranges(ram_size);
    let low_end = ranges[0].1;
    let mut map = vec![
        entry(0, PML4_ADDR, E820_RAM),
        entry(PML4_ADDR, PAGE_TABLES_END, E820_RESERVED),
        entry(PAGE_TABLES_END, EBDA_START, E820_RAM),
        entry(ACPI_START, ACPI_END, E820_RESERVED),
        entry(HIMEM_START, low_end, E820_RAM),
    ];
    map.extend(
        ranges
            .iter()
            .skip(1)
            .map(|&(start, size)| entry(start, start + size, E820_RAM)),
    );
    map
}

/// What the zero page says besides the memory map.
#[derive(Clone, Debug, Default)]
pub struct BootInfo {
    /// The bzImage's own setup header, if the kernel is one.
    pub setup_header: Option<setup_header>,
    pub cmdline_size: u32,
    pub initrd: Option<(u64, u32)>,
    pub rsdp_addr: u64,
    pub ram_size: u64,
}

/// Builds `boot_params` and writes it at `ZERO_PAGE_ADDR`.
pub fn write_boot_params<M: GuestMemoryBackend>(mem: &M, info: &BootInfo) -> Result<(), GuestMemoryError> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH | KEEP_SEGMENTS;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = info.cmdline_size;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }
    params.acpi_rsdp_addr = info.rsdp_addr;
    let map = e820_map(info.ram_size);
    params.e820_entries = map.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
}

/// Highest address (exclusive) an initrd may end at: below the MMIO gap, in
/// low RAM, and below what the kernel header says it can reach.
pub fn initrd_limit(ram_size: u64, hdr: Option<&setup_header>) -> u64 {
    let low_end = ram_ranges(ram_size)[0].1;
    let kernel_max = hdr
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|&m| m > 1)
        .unwrap_or(u64::MAX);
    low_end.min(kernel_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn e820_covers_all_ram_without_overlap() {
        for size in [64u64 << 20, 1 << 30, 3 << 30, 6 << 30] {
            let map = e820_map(size);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{map:?}");
            }
            let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
            let holes = (PAGE_TABLES_END - PML4_ADDR) + (HIMEM_START - EBDA_START);
            assert_eq!(ram, size - holes, "size {size:#x}");
        }
    }

    #[test]
    fn e820_puts_ram_above_4g_when_large() {
        let map = e820_map(6 << 30);
        let last = map.last().unwrap();
        assert_eq!(last.addr, MMIO_GAP_END);
        assert_eq!(last.size, (6 << 30) - MMIO_GAP_START);
    }

    #[test]
    fn zero_page_holds_map_cmdline_and_initrd() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let info = BootInfo {
            cmdline_size: 12,
            initrd: Some((0x80_0000, 4096)),
            rsdp_addr: ACPI_START,
            ram_size: 64 << 20,
            ..Default::default()
        };
        write_boot_params(&mem, &info).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(p.e820_entries as usize, e820_map(64 << 20).len());
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        // Raw offsets that guests rely on (docs/platform.md).
        let e820_count: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8)).unwrap();
        let first_size: u64 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x2d0 + 8)).unwrap();
        assert_eq!(e820_count, p.e820_entries);
        assert_eq!(first_size, PML4_ADDR);
    }

    #[test]
    fn initrd_limit_respects_header_and_gap() {
        let hdr = setup_header {
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        assert_eq!(initrd_limit(4 << 30, Some(&hdr)), 0x8000_0000);
        assert_eq!(initrd_limit(4 << 30, None), MMIO_GAP_START);
        assert_eq!(initrd_limit(64 << 20, Some(&hdr)), 64 << 20);
    }
}
