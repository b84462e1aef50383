//! The boot GDT and the segment registers that describe it to KVM.

use kvm_bindings::kvm_segment;

/// Selectors of the boot GDT (index * 8).
pub const CODE64_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;
/// Flat 32-bit code, the CS of a PVH entry.
pub const CODE32_SELECTOR: u16 = 0x20;

/// The boot GDT: null, 64-bit code, data, a TSS descriptor that KVM
/// needs in TR (its base is never used, the guest loads its own), and flat
/// 32-bit code for kernels entered through their PVH note.
pub const BOOT_GDT: [u64; 5] = [
    0,
    descriptor(0xa09b, 0, 0xfffff),
    descriptor(0xc093, 0, 0xfffff),
    descriptor(0x808b, 0, 0xfffff),
    descriptor(0xc09b, 0, 0xfffff),
];

/// Builds a segment descriptor from its flags (access byte in bits 0-7,
/// G/D/L/AVL in bits 12-15), base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `kvm_segment` that a CPU holds after loading descriptor `index`.
pub fn segment_from_descriptor(gdt: &[u64], index: usize) -> kvm_segment {
    let entry = gdt[index];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    if granular {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0() {
        let cs = segment_from_descriptor(&BOOT_GDT, 1);
        assert_eq!(cs.selector, CODE64_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn data_segment_is_writable_flat() {
        let ds = segment_from_descriptor(&BOOT_GDT, 2);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.g, ds.base), (3, 1, 1, 0));
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let gdt = [0, descriptor(0x0093, 0x1234_5678, 0xabcde)];
        let s = segment_from_descriptor(&gdt, 1);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
    }

    #[test]
    fn pvh_code_segment_is_flat_32_bit() {
        let cs = segment_from_descriptor(&BOOT_GDT, 4);
        assert_eq!(cs.selector, CODE32_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.base, cs.limit, cs.type_),
            (0, 1, 1, 0, 0xffff_ffff, 0xb)
        );
    }

    #[test]
    fn tss_descriptor_is_busy_tss() {
        let tr = segment_from_descriptor(&BOOT_GDT, 3);
        assert_eq!((tr.type_, tr.s, tr.selector), (0xb, 0, TSS_SELECTOR));
    }
}
