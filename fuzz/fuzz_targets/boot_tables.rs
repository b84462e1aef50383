//! ACPI tables and boot_params/e820 for arbitrary RAM sizes, vCPU counts
//! and device sets: every table's checksum holds, every table parses back
//! and lies inside the area the layout gives ACPI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_arch::acpi::*;
use veil_arch::boot_params::{e820_map, write_boot_params, BootInfo, E820_RAM};
use veil_arch::layout::*;
use veil_fuzz::Input;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

thread_local! {
    // One 2 MiB mapping for every input, not one each.
    static MEM: GuestMemoryMmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
}

static ZEROS: [u8; (ACPI_END - ACPI_START) as usize] = [0; (ACPI_END - ACPI_START) as usize];

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

/// Checks the table at `at` against the area and returns its bytes.
fn table(mem: &GuestMemoryMmap, at: u64, end: u64) -> Vec<u8> {
    assert!(
        at >= ACPI_START && at + 36 <= end,
        "table at {at:#x} outside {ACPI_START:#x}..{end:#x}"
    );
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
    assert!(
        len >= 36 && at + u64::from(len) <= end,
        "table at {at:#x} of {len} bytes"
    );
    let mut b = vec![0u8; len as usize];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    assert_eq!(sum(&b), 0, "checksum of {:?}", String::from_utf8_lossy(&b[..4]));
    b
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cpus = u32::from(input.u8());
    let ndev = usize::from(input.u8() % 24);
    let flags = input.u8();
    let virtio_mmio: Vec<_> = (0..ndev)
        .map(|i| VirtioMmioDevice {
            base: VIRTIO_MMIO_START + 0x1000 * i as u64,
            size: 0x1000,
            irq: DEVICE_GSIS[i % DEVICE_GSIS.len()],
        })
        .collect();
    let pci_ecam = (flags & 1 != 0).then_some(PciEcam {
        base: PCI_ECAM_START,
        segment: 0,
        bus_start: 0,
        bus_end: input.u8(),
        mmio32: (PCI_BAR_START, PCI_BAR_END - PCI_BAR_START),
        io: None,
    });
    let viot = (flags & 2 != 0).then(|| Viot {
        iommu: if flags & 4 != 0 && ndev > 0 {
            ViotIommu::Mmio {
                base: VIRTIO_MMIO_START,
            }
        } else {
            ViotIommu::Pci { segment: 0, bdf: 0x08 }
        },
        pci_ranges: (0..input.u8() % 4)
            .map(|i| ViotPciRange {
                segment: 0,
                bdf_start: u16::from(i) * 0x100,
                bdf_end: u16::from(i) * 0x100 + 0xff,
                endpoint_start: u32::from(i) * 0x100,
            })
            .collect(),
        mmio_endpoints: (1..ndev)
            .map(|i| ViotMmioEndpoint {
                base: VIRTIO_MMIO_START + 0x1000 * i as u64,
                endpoint: 0x10000 + i as u32,
            })
            .collect(),
    });
    let cfg = AcpiConfig {
        num_cpus: cpus,
        wakeup_mailbox: WAKEUP_MAILBOX_ADDR,
        ioapic_addr: IOAPIC_ADDR,
        sleep_control_port: 0x600,
        sleep_status_port: 0x601,
        serial: (flags & 8 != 0).then_some((COM1_PORT, 4)),
        virtio_mmio,
        pci_ecam,
        viot,
    };
    let mem = MEM.with(GuestMemoryMmap::clone);
    // Only the zero page and the ACPI area are written; clear them as a
    // fresh mapping would have them.
    mem.write_slice(&ZEROS[..0x1000], GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    mem.write_slice(&ZEROS, GuestAddress(ACPI_START)).unwrap();
    match write_acpi_tables(&mem, GuestAddress(ACPI_START), GuestAddress(ACPI_END), &cfg) {
        Err(_) => {
            // Refused: nothing was written.
            let mut b = vec![0u8; (ACPI_END - ACPI_START) as usize];
            mem.read_slice(&mut b, GuestAddress(ACPI_START)).unwrap();
            assert!(b.iter().all(|&x| x == 0), "a refused configuration left bytes behind");
            assert!(cpus == 0 || cpus > MAX_CPUS || ndev > 0 || cfg.viot.is_some() || cfg.pci_ecam.is_some());
        }
        Ok(end) => {
            assert!(cpus >= 1 && cpus <= MAX_CPUS);
            let end = end.0;
            assert!(end <= ACPI_END);
            let mut rsdp = [0u8; 36];
            mem.read_slice(&mut rsdp, GuestAddress(ACPI_START)).unwrap();
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(&rsdp), 0);
            let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
            let xsdt = table(&mem, xsdt_at, end);
            assert_eq!(&xsdt[..4], b"XSDT");
            let mut seen = Vec::new();
            for e in xsdt[36..].chunks(8) {
                let at = u64::from_le_bytes(e.try_into().unwrap());
                let t = table(&mem, at, end);
                seen.push(t[..4].to_vec());
                if &t[..4] == b"FACP" {
                    let dsdt_at = u64::from_le_bytes(t[140..148].try_into().unwrap());
                    assert_eq!(&table(&mem, dsdt_at, end)[..4], b"DSDT");
                }
                if &t[..4] == b"APIC" {
                    // One Local APIC (type 0) entry per vCPU.
                    let mut at = 44;
                    let mut lapics = 0;
                    while at + 2 <= t.len() {
                        let (kind, len) = (t[at], usize::from(t[at + 1]));
                        assert!(len >= 2 && at + len <= t.len(), "MADT entry at {at}");
                        lapics += u32::from(kind == 0);
                        at += len;
                    }
                    assert_eq!(lapics, cpus);
                }
            }
            assert!(seen.contains(&b"FACP".to_vec()) && seen.contains(&b"APIC".to_vec()));
            assert_eq!(seen.contains(&b"MCFG".to_vec()), cfg.pci_ecam.is_some());
            assert_eq!(seen.contains(&b"VIOT".to_vec()), cfg.viot.is_some());
        }
    }
    // e820 for an arbitrary RAM size from 16 MiB up.
    let ram = (16 << 20) + (input.u64() % (1 << 40)) / 4096 * 4096;
    let map = e820_map(ram);
    let mut last_end = 0;
    let mut ram_bytes = 0;
    for e in &map {
        assert!(e.size > 0 && e.addr >= last_end, "e820 {e:?} overlaps or is empty");
        let end = e.addr + e.size;
        assert!(
            end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END,
            "e820 {e:?} in the MMIO gap"
        );
        last_end = end;
        if e.kind == E820_RAM {
            ram_bytes += e.size;
        }
    }
    assert!(
        ram_bytes <= ram && ram - ram_bytes < 1 << 20,
        "{ram_bytes} of {ram} bytes of RAM in e820"
    );
    let info = BootInfo {
        ram_size: ram,
        rsdp_addr: ACPI_START,
        ..Default::default()
    };
    write_boot_params(&mem, &info).unwrap();
    // e820_entries is at 0x1e8 of the zero page; the table at 0x2d0.
    let n: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8)).unwrap();
    assert_eq!(usize::from(n), map.len());
    for (i, e) in map.iter().enumerate() {
        let at = ZERO_PAGE_ADDR + 0x2d0 + 20 * i as u64;
        let addr: u64 = mem.read_obj(GuestAddress(at)).unwrap();
        let size: u64 = mem.read_obj(GuestAddress(at + 8)).unwrap();
        let kind: u32 = mem.read_obj(GuestAddress(at + 16)).unwrap();
        assert_eq!((addr, size, kind), (e.addr, e.size, e.kind));
    }
});
