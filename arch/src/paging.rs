//! Identity page tables for the first `IDENTITY_MAPPED_GIB` GiB, with
//! 2 MiB pages, as the 64-bit boot protocol requires.

use crate::layout::{IDENTITY_MAPPED_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;

/// Writes PML4, PDPT and PDs; returns the value for CR3.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPT_ADDR | PRESENT | WRITABLE, GuestAddress(PML4_ADDR))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | PRESENT | WRITABLE, GuestAddress(PDPT_ADDR + gib * 8))?;
        let mut entries = [0u8; 4096];
        for (i, entry) in entries.chunks_exact_mut(8).enumerate() {
            let phys = (gib << 30) | ((i as u64) << 21);
            entry.copy_from_slice(&(phys | PRESENT | WRITABLE | HUGE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Walks the tables the way the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let mask = 0x000f_ffff_ffff_f000u64;
        let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8)).ok()?;
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & mask) + ((va >> 30) & 511) * 8))
            .ok()?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & mask) + ((va >> 21) & 511) * 8))
            .ok()?;
        if pde & PRESENT == 0 || pde & HUGE == 0 {
            return None;
        }
        Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
    }

    #[test]
    fn identity_maps_the_first_gibs_only() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        for va in [
            0u64,
            0x1234,
            0x20_0000,
            0x3fff_ffff,
            0xc000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
    }
}
