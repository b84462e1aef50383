//! Guest-physical addresses and I/O ports of the veil platform.
//!
//! docs/platform.md is the prose version of this file; keep them in step.

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// PVH boot: `hvm_start_info` (handed over in EBX), the module list (the
/// initrd) and the memory map, one after the other below the zero page.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Room for this many memory-map entries (24 bytes each) before the zero page.
pub const PVH_MEMMAP_MAX: usize = ((ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) / 24) as usize;
/// `boot_params` (the "zero page"), handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, then one PD per GiB identity-mapped.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// GiBs identity-mapped by the boot page tables.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// End of the page-table area; kept out of usable RAM in e820 so that
/// application processors woken late still find valid page tables.
pub const PAGE_TABLES_END: u64 = PD_ADDR + IDENTITY_MAPPED_GIB * 0x1000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: the end of usable low RAM.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first) live in the legacy BIOS area.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where high RAM, and kernels, start.
pub const HIMEM_START: u64 = 0x10_0000;

/// RAM below 4 GiB ends here at the latest; the rest starts at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// 32-bit window for PCI BARs and virtio-mmio devices.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_END: u64 = 0xe000_0000;
/// virtio-mmio devices, one 4 KiB window each, at the top of the 32-bit
/// window; PCI BARs get the rest.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_END: u64 = 0xe000_0000;
pub const PCI_BAR_START: u64 = MMIO32_START;
pub const PCI_BAR_END: u64 = VIRTIO_MMIO_START;
/// Interrupt lines free for devices: the ISA IRQs nothing else uses, then
/// the IOAPIC's upper pins.
pub const DEVICE_GSIS: &[u32] = &[5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];
/// PCI ECAM (enhanced configuration access).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// ACPI Multiprocessor Wakeup mailbox: trapped MMIO, one page.
pub const WAKEUP_MAILBOX_ADDR: u64 = 0xfeb0_0000;
pub const WAKEUP_MAILBOX_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
/// PCI configuration mechanism #1 (address at 0xCF8, data at 0xCFC).
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ultracalls (`in eax, 0xF5`): docs/ultracall.md.
pub const ULTRACALL_PORT: u16 = 0xf5;
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;

/// Smallest guest RAM veil accepts: room for the boot structures, a kernel
/// and its working memory.
pub const MIN_RAM_SIZE: u64 = 16 << 20;

// The boot structures must not overlap; checked when veil is compiled.
const _: () = {
    assert!(GDT_ADDR + 0x100 <= PVH_START_INFO_ADDR);
    assert!(PVH_START_INFO_ADDR + 0x38 <= PVH_MODLIST_ADDR);
    assert!(PVH_MODLIST_ADDR + 0x20 <= PVH_MEMMAP_ADDR);
    assert!(PVH_MEMMAP_ADDR < ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_TOP);
    assert!(BOOT_STACK_TOP <= PML4_ADDR);
    assert!(PAGE_TABLES_END <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START <= ACPI_START && ACPI_END == HIMEM_START);
};

/// The guest-physical RAM ranges for `size` bytes of RAM: low RAM up to the
/// MMIO gap, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_GAP_END, size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
    }

    #[test]
    fn ram_above_the_gap_moves_to_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }
}
