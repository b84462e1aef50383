//! Initial vCPU state for the 64-bit boot protocol: registers, segments,
//! control registers, FPU, MSRs and the local APIC's LINT pins.

use crate::gdt::{segment_from_descriptor, BOOT_GDT};
use crate::layout::GDT_ADDR;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Where a CPU starts and with which arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub rip: u64,
    pub rsp: u64,
    /// `boot_params` for the boot CPU, 0 for application processors.
    pub rsi: u64,
    /// 0 for the boot CPU, the APIC ID for application processors.
    pub rdi: u64,
}

/// Writes the boot GDT into guest memory.
pub fn write_boot_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<(), GuestMemoryError> {
    let mut bytes = [0u8; BOOT_GDT.len() * 8];
    for (chunk, entry) in bytes.chunks_exact_mut(8).zip(BOOT_GDT) {
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))
}

/// General-purpose registers at entry: interrupts off, reserved bit 1 set.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.rsi,
        rdi: entry.rdi,
        ..Default::default()
    }
}

/// Loads the boot GDT, no IDT, CS from descriptor `code`, flat data in
/// every data segment and the boot TSS.
fn load_boot_gdt(sregs: &mut kvm_sregs, code: usize) {
    let data = segment_from_descriptor(&BOOT_GDT, 2);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment_from_descriptor(&BOOT_GDT, code);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_descriptor(&BOOT_GDT, 3);
}

/// Puts `sregs` (as read from a fresh vCPU) into long mode with paging on
/// and the boot GDT loaded.
pub fn set_long_mode(sregs: &mut kvm_sregs, cr3: u64) {
    load_boot_gdt(sregs, 1);
    sregs.cr3 = cr3;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG) & !(1 << 2 | 1 << 30 | 1 << 29);
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Puts `sregs` into the PVH entry state: 32-bit protected mode, paging
/// off, flat 32-bit code in CS and flat data everywhere else, the boot GDT
/// loaded (its 32-bit code descriptor is CS's).
pub fn set_pvh_mode(sregs: &mut kvm_sregs) {
    load_boot_gdt(sregs, 4);
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !(CR0_PG | 1 << 30 | 1 << 29);
    sregs.efer = 0;
}

/// FPU state after FNINIT, with the default MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

mod msr {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_TSC: u32 = 0x10;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
}

/// MSRs a kernel expects in a known state at entry.
pub fn boot_msrs() -> Msrs {
    let entries: Vec<kvm_msr_entry> = [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    Msrs::from_entries(&entries).expect("a fixed, small MSR list fits")
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = b as _;
    }
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a PC BIOS does.
pub fn set_lint_pins(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_mode_is_32_bit_protected_without_paging() {
        let mut sregs = kvm_sregs::default();
        set_long_mode(&mut sregs, 0x9000);
        set_pvh_mode(&mut sregs);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.selector), (0, 1, 0x20));
        assert_eq!((sregs.ss.db, sregs.ds.type_, sregs.ds.limit), (1, 3, 0xffff_ffff));
    }

    #[test]
    fn long_mode_bits_are_set() {
        let mut sregs = kvm_sregs::default();
        set_long_mode(&mut sregs, 0x9000);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.cr0 & CR0_PE, 0);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.gdt.limit, 39);
    }

    #[test]
    fn regs_carry_entry_point() {
        let r = boot_regs(EntryPoint {
            rip: 0x100_0000,
            rsp: 0x8ff0,
            rsi: 0x7000,
            rdi: 0,
        });
        assert_eq!((r.rip, r.rsp, r.rsi, r.rflags), (0x100_0000, 0x8ff0, 0x7000, 2));
    }

    #[test]
    fn lint_pins_routed() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0700);
        set_lint_pins(&mut state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&state, APIC_LVT1) >> 8 & 7, APIC_MODE_NMI);
    }

    #[test]
    fn msrs_are_listed() {
        assert_eq!(boot_msrs().as_slice().len(), 10);
    }
}
