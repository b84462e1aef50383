//! ACPI, as far as the probe needs it: RSDP -> XSDT (or RSDT) -> MADT, to
//! count the enabled Local APICs and find the Multiprocessor Wakeup
//! mailbox, MCFG, for the PCI ECAM window, and VIOT (viot.rs), for the
//! virtio-iommu's endpoints. Every table checksum is checked, and every
//! table must lie in memory the e820 map describes.

pub mod viot;

use crate::boot::MAX_CPUS;
use crate::bootinfo::{peek, BootInfo};

const HEADER_LEN: u64 = 36;
/// Tables longer than this are taken as garbage.
const TABLE_MAX: u64 = 1 << 20;
const MAX_REGIONS: usize = 8;

const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;
const MADT_MP_WAKEUP: u8 = 0x10;

pub struct Mailbox {
    pub addr: u64,
    pub version: u16,
}

pub struct Acpi {
    pub rsdp: u64,
    /// XSDT, or RSDT for an ACPI 1.0 RSDP.
    pub root: u64,
    pub madt: u64,
    /// Enabled Local APIC (and x2APIC) entries.
    pub cpus: usize,
    /// The first MAX_CPUS of their APIC IDs.
    pub apic_ids: [u32; MAX_CPUS],
    pub mailbox: Option<Mailbox>,
    /// ECAM base of PCI segment 0, bus 0 (MCFG), if there is one.
    pub ecam: Option<u64>,
    /// The virtio-iommu's table, if there is one.
    pub viot: Option<viot::Viot>,
    /// The first problem found, if any.
    pub error: Option<&'static str>,
    /// Where the tables are: the RAM test stays away from these.
    pub regions: [(u64, u64); MAX_REGIONS],
    pub nregions: usize,
}

impl Acpi {
    fn fail(&mut self, what: &'static str) {
        self.error.get_or_insert(what);
    }

    fn note_region(&mut self, start: u64, len: u64) {
        if self.nregions < MAX_REGIONS {
            self.regions[self.nregions] = (start, start + len);
            self.nregions += 1;
        }
    }

    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions[..self.nregions]
    }

    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.cpus.min(MAX_CPUS)]
    }
}

/// Byte sum of [addr, addr + len): 0 for a valid ACPI checksum.
fn sum(addr: u64, len: u64) -> u8 {
    // SAFETY: callers only pass ranges they checked with `BootInfo::covers`.
    (addr..addr + len).fold(0u8, |s, a| s.wrapping_add(unsafe { peek::<u8>(a) }))
}

fn find_rsdp(info: &BootInfo) -> Option<u64> {
    // BootInfo scanned the EBDA and BIOS area when the VMM named none.
    (info.rsdp != 0).then_some(info.rsdp)
}

/// Check the table at `addr`: in known memory, sane length, checksum 0.
/// Returns its length.
fn check_table(acpi: &mut Acpi, info: &BootInfo, addr: u64) -> Option<u64> {
    if !info.covers(addr, HEADER_LEN) {
        acpi.fail("table_outside_e820");
        return None;
    }
    // SAFETY: the header is in e820-described memory.
    let len = unsafe { peek::<u32>(addr + 4) } as u64;
    if !(HEADER_LEN..=TABLE_MAX).contains(&len) || !info.covers(addr, len) {
        acpi.fail("table_length");
        return None;
    }
    if sum(addr, len) != 0 {
        acpi.fail("table_checksum");
    }
    acpi.note_region(addr, len);
    Some(len)
}

pub fn parse(info: &BootInfo) -> Acpi {
    let mut acpi = Acpi {
        rsdp: 0,
        root: 0,
        madt: 0,
        cpus: 0,
        apic_ids: [0; MAX_CPUS],
        mailbox: None,
        ecam: None,
        viot: None,
        error: None,
        regions: [(0, 0); MAX_REGIONS],
        nregions: 0,
    };
    let Some(rsdp) = find_rsdp(info) else {
        acpi.fail("no_rsdp");
        return acpi;
    };
    acpi.rsdp = rsdp;
    if !info.covers(rsdp, 20) {
        acpi.fail("rsdp_outside_e820");
        return acpi;
    }
    // SAFETY (all peeks below): each range was checked with `covers` first.
    let (sig, revision) = unsafe { (peek::<[u8; 8]>(rsdp), peek::<u8>(rsdp + 15)) };
    if sig != *b"RSD PTR " || sum(rsdp, 20) != 0 {
        acpi.fail("rsdp_checksum");
        return acpi;
    }
    // ACPI 2.0+: a 36-byte RSDP with an extended checksum and the XSDT.
    let mut xsdt = 0;
    if revision >= 2 && info.covers(rsdp, 36) {
        let len = unsafe { peek::<u32>(rsdp + 20) } as u64;
        if len < 36 || !info.covers(rsdp, len) || sum(rsdp, len) != 0 {
            acpi.fail("rsdp_ext_checksum");
            return acpi;
        }
        xsdt = unsafe { peek::<u64>(rsdp + 24) };
    }
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (unsafe { peek::<u32>(rsdp + 16) } as u64, 4)
    };
    acpi.root = root;
    acpi.note_region(rsdp, 36);
    let Some(root_len) = check_table(&mut acpi, info, root) else {
        return acpi;
    };

    let entries = (root_len - HEADER_LEN) / entry_size;
    for i in 0..entries {
        let at = root + HEADER_LEN + i * entry_size;
        let table = unsafe {
            if entry_size == 8 {
                peek::<u64>(at)
            } else {
                peek::<u32>(at) as u64
            }
        };
        if !info.covers(table, HEADER_LEN) {
            acpi.fail("table_outside_e820");
            continue;
        }
        if unsafe { peek::<[u8; 4]>(table) } == *b"APIC" && acpi.madt == 0 {
            if let Some(len) = check_table(&mut acpi, info, table) {
                acpi.madt = table;
                parse_madt(&mut acpi, table, len);
            }
        }
        if unsafe { peek::<[u8; 4]>(table) } == *b"MCFG" && acpi.ecam.is_none() {
            if let Some(len) = check_table(&mut acpi, info, table) {
                parse_mcfg(&mut acpi, table, len);
            }
        }
        if unsafe { peek::<[u8; 4]>(table) } == *b"VIOT" && acpi.viot.is_none() {
            if let Some(len) = check_table(&mut acpi, info, table) {
                acpi.viot = Some(viot::parse(table, len));
            }
        }
    }
    if acpi.madt == 0 {
        acpi.fail("no_madt");
    }
    acpi
}

/// MADT entries start after the header, the Local APIC address and flags.
fn parse_madt(acpi: &mut Acpi, madt: u64, len: u64) {
    let end = madt + len;
    let mut at = madt + HEADER_LEN + 8;
    // SAFETY: [madt, end) was checked; each entry is checked against `end`.
    while at + 2 <= end {
        let (kind, elen) = unsafe { (peek::<u8>(at), peek::<u8>(at + 1) as u64) };
        if elen < 2 || at + elen > end {
            acpi.fail("madt_entry_length");
            return;
        }
        match kind {
            // Processor Local APIC: u8 UID, u8 APIC ID, u32 flags (bit 0
            // enabled).
            MADT_LOCAL_APIC if elen >= 8 => {
                let (id, flags) = unsafe { (peek::<u8>(at + 3) as u32, peek::<u32>(at + 4)) };
                if flags & 1 != 0 {
                    add_cpu(acpi, id);
                }
            }
            // Processor Local x2APIC: u16 reserved, u32 APIC ID, u32 flags.
            MADT_LOCAL_X2APIC if elen >= 16 => {
                let (id, flags) = unsafe { (peek::<u32>(at + 4), peek::<u32>(at + 8)) };
                if flags & 1 != 0 {
                    add_cpu(acpi, id);
                }
            }
            // Multiprocessor Wakeup (ACPI 6.4 5.2.12.19): u16 mailbox
            // version, u32 reserved, u64 mailbox address.
            MADT_MP_WAKEUP if elen >= 16 => {
                let (version, addr) = unsafe { (peek::<u16>(at + 2), peek::<u64>(at + 8)) };
                acpi.mailbox = Some(Mailbox { addr, version });
            }
            _ => {}
        }
        at += elen;
    }
}

/// MCFG (PCI Firmware spec 4.1.2): after the header, 8 reserved bytes, then
/// 16-byte entries: u64 base, u16 segment, u8 start bus, u8 end bus, u32
/// reserved. The base is where bus 0 would be, whatever the start bus.
fn parse_mcfg(acpi: &mut Acpi, mcfg: u64, len: u64) {
    let mut at = mcfg + HEADER_LEN + 8;
    // SAFETY: [mcfg, mcfg + len) was checked; each entry lies inside it.
    while at + 16 <= mcfg + len {
        let (base, segment, start) = unsafe { (peek::<u64>(at), peek::<u16>(at + 8), peek::<u8>(at + 10)) };
        if segment == 0 && start == 0 {
            acpi.ecam = Some(base);
            return;
        }
        at += 16;
    }
}

fn add_cpu(acpi: &mut Acpi, id: u32) {
    if acpi.cpus < MAX_CPUS {
        acpi.apic_ids[acpi.cpus] = id;
    }
    acpi.cpus += 1;
}
