//! The PVH boot protocol: `hvm_start_info`, its memory map and its module
//! list, for kernels whose ELF carries a XEN_ELFNOTE_PHYS32_ENTRY note.
//!
//! The memory map is the e820 map that `boot_params` carries, entry for
//! entry; the initrd, if any, is module 0.

use crate::boot_params::e820_map;
use crate::layout::*;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// `hvm_start_info.version`: 1 has the memory map.
pub const START_INFO_VERSION: u32 = 1;

/// What the start info points at.
#[derive(Clone, Copy, Debug, Default)]
pub struct PvhInfo {
    /// Where the NUL-terminated command line is (0: none).
    pub cmdline_addr: u64,
    pub initrd: Option<(u64, u32)>,
    pub rsdp_addr: u64,
    pub ram_size: u64,
}

/// The structures veil writes, before they go to guest memory.
pub struct StartInfo {
    pub info: hvm_start_info,
    pub memmap: Vec<hvm_memmap_table_entry>,
    pub modules: Vec<hvm_modlist_entry>,
}

/// Builds the start info for `info` at the addresses of `layout`.
pub fn build_start_info(info: &PvhInfo) -> StartInfo {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(info.ram_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            // The e820 types (1 RAM, 2 reserved, ...) are PVH's too.
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    assert!(memmap.len() <= PVH_MEMMAP_MAX, "the e820 map has a fixed, small size");
    let modules: Vec<hvm_modlist_entry> = info
        .initrd
        .iter()
        .map(|&(addr, size)| hvm_modlist_entry {
            paddr: addr,
            size: u64::from(size),
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST_ADDR },
        cmdline_paddr: info.cmdline_addr,
        rsdp_paddr: info.rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    StartInfo {
        info: start,
        memmap,
        modules,
    }
}

/// Writes the start info at `PVH_START_INFO_ADDR` (the value for EBX), its
/// memory map and module list after it.
pub fn write_start_info<M: GuestMemoryBackend>(mem: &M, info: &PvhInfo) -> Result<u64, String> {
    let built = build_start_info(info);
    let mut params = BootParams::new(&built.info, GuestAddress(PVH_START_INFO_ADDR));
    params.set_sections(&built.memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !built.modules.is_empty() {
        params.set_modules(&built.modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(|e| e.to_string())?;
    Ok(PVH_START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_params::{E820_RAM, E820_RESERVED};
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn layout_matches_the_abi() {
        // The ABI's offsets (xen/include/public/arch-x86/hvm/start_info.h).
        assert_eq!(std::mem::size_of::<hvm_start_info>(), 0x38);
        assert_eq!(std::mem::offset_of!(hvm_start_info, modlist_paddr), 0x10);
        assert_eq!(std::mem::offset_of!(hvm_start_info, cmdline_paddr), 0x18);
        assert_eq!(std::mem::offset_of!(hvm_start_info, rsdp_paddr), 0x20);
        assert_eq!(std::mem::offset_of!(hvm_start_info, memmap_paddr), 0x28);
        assert_eq!(std::mem::offset_of!(hvm_start_info, memmap_entries), 0x30);
        assert_eq!(std::mem::size_of::<hvm_memmap_table_entry>(), 24);
        assert_eq!(std::mem::size_of::<hvm_modlist_entry>(), 32);
    }

    #[test]
    fn memmap_is_the_e820_map() {
        let ram = 6u64 << 30;
        let built = build_start_info(&PvhInfo {
            cmdline_addr: CMDLINE_ADDR,
            initrd: None,
            rsdp_addr: ACPI_START,
            ram_size: ram,
        });
        let e820 = e820_map(ram);
        assert_eq!(built.memmap.len(), e820.len());
        for (m, e) in built.memmap.iter().zip(&e820) {
            assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind));
        }
        assert!(built.memmap.iter().any(|m| m.type_ == E820_RESERVED));
        assert_eq!(
            built
                .memmap
                .iter()
                .filter(|m| m.type_ == E820_RAM)
                .map(|m| m.size)
                .sum::<u64>(),
            ram - (PAGE_TABLES_END - PML4_ADDR) - (HIMEM_START - EBDA_START)
        );
        assert_eq!(built.info.nr_modules, 0);
        assert_eq!(built.info.modlist_paddr, 0);
    }

    #[test]
    fn written_start_info_has_magic_cmdline_rsdp_and_initrd_module() {
        let m = mem();
        let info = PvhInfo {
            cmdline_addr: CMDLINE_ADDR,
            initrd: Some((0x80_0000, 0x1234)),
            rsdp_addr: ACPI_START,
            ram_size: 16 << 20,
        };
        assert_eq!(write_start_info(&m, &info).unwrap(), PVH_START_INFO_ADDR);
        let s: hvm_start_info = m.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!(s.magic, 0x336e_c578);
        assert_eq!(s.version, 1);
        assert_eq!(s.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(s.rsdp_paddr, ACPI_START);
        assert_eq!((s.nr_modules, s.modlist_paddr), (1, PVH_MODLIST_ADDR));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!(
            (module.paddr, module.size, module.cmdline_paddr),
            (0x80_0000, 0x1234, 0)
        );
        assert_eq!(s.memmap_paddr, PVH_MEMMAP_ADDR);
        assert_eq!(s.memmap_entries as usize, e820_map(16 << 20).len());
        for (i, e) in e820_map(16 << 20).iter().enumerate() {
            let got: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 24 * i as u64)).unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_, got.reserved),
                (e.addr, e.size, e.kind, 0)
            );
        }
    }
}
