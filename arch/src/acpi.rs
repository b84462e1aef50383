//! ACPI tables for veil's x86-64 platform (see `docs/platform.md`).
//!
//! [`write_acpi_tables`] lays out, in guest memory and in this order:
//!
//! | table | what it says |
//! | --- | --- |
//! | RSDP | revision 2, points at the XSDT |
//! | XSDT | FADT, MADT and, with PCI, MCFG |
//! | FADT | revision 6.5, hardware-reduced ACPI, sleep control/status registers in I/O space, X_DSDT |
//! | MADT | revision 5: one enabled Local APIC per vCPU, the I/O APIC, the Multiprocessor Wakeup mailbox |
//! | MCFG | the PCI ECAM window (only with PCI) |
//! | DSDT | `\_S5_`, processor devices, COM1, virtio-mmio devices, the PCI host bridge |
//!
//! Every table starts on an 8-byte boundary. The whole area, from the RSDP to
//! the returned end address, must be reserved (e820 type 2) by the caller.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Physical address of every vCPU's Local APIC (the MADT header field).
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;

/// The largest `num_cpus`: the MADT uses 8-bit xAPIC IDs 0..num_cpus-1 and
/// 0xFF is the broadcast ID.
pub const MAX_CPUS: u32 = 255;

/// `SLP_TYP` that `\_S5_` announces: Linux powers off by writing
/// `(SLP_TYP << 2) | SLP_EN` = 0x34 to the sleep control register.
pub const SLP_TYP_S5: u8 = 5;

/// The most virtio-mmio devices the DSDT can name (`V000`..`VFFF`).
pub const MAX_VIRTIO_MMIO: usize = 0x1000;

/// `_HID` the Linux virtio-mmio driver binds to.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

const OEM_ID: [u8; 6] = *b"VEIL  ";
const OEM_REVISION: u32 = 1;
const HYPERVISOR_VENDOR: [u8; 8] = *b"VEIL    ";

/// Tables are placed on this boundary.
const TABLE_ALIGN: u64 = 8;
/// The RSDP must sit on a 16-byte boundary (ACPI 6.5, 5.2.5.1).
const RSDP_ALIGN: u64 = 16;
/// The wakeup mailbox must be 4 KiB aligned (ACPI 6.5, 5.2.12.19).
const MAILBOX_ALIGN: u64 = 0x1000;

const HEADER_LEN: usize = 36;
const RSDP_LEN: u64 = 36;
const MADT_REVISION: u8 = 5;
/// DSDT revision 2 and later: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

// IA-PC boot architecture flags (FADT offset 109, ACPI 6.5 table 5.10).
/// An i8042 keyboard controller is present (veil resets through it).
const IAPC_8042: u16 = 1 << 1;
/// Do not probe for VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// OSPM must not enable PCIe ASPM: there are no real links.
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// No CMOS RTC at ports 0x70/0x71 (platform.md lists none).
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
const IAPC_BOOT_ARCH: u16 =
    IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT;

// MADT.
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LOCAL_APIC: u8 = 0x00;
const MADT_TYPE_IO_APIC: u8 = 0x01;
const MADT_TYPE_MP_WAKEUP: u8 = 0x10;
const LOCAL_APIC_ENABLED: u32 = 1;
const IO_APIC_ID: u8 = 0;
/// Mailbox version 0 (ACPI 6.4): 16-byte structure, no reset vector.
const MP_WAKEUP_MAILBOX_VERSION: u16 = 0;

/// ECAM: 4 KiB of config space per function, 8 functions, 32 devices.
const ECAM_BUS_SHIFT: u32 = 20;

/// A virtio-mmio transport, described in the DSDT with `_HID` "LNRO0005".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the register window in bytes (not zero).
    pub size: u64,
    /// GSI (I/O APIC pin), announced edge-triggered, active-high.
    pub irq: u32,
}

/// A PCI segment with memory-mapped configuration space (ECAM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciEcam {
    /// ECAM base address as in MCFG: the address of bus 0's configuration
    /// space, even when `bus_start` is not 0.
    pub base: u64,
    /// PCI segment group number (`_SEG`).
    pub segment: u16,
    /// First bus number (`_BBN`).
    pub bus_start: u8,
    /// Last bus number (inclusive).
    pub bus_end: u8,
    /// 32-bit memory window for BARs: `(base, size)`, below 4 GiB.
    pub mmio32: (u64, u64),
    /// Optional I/O port window for BARs: `(base, size)`.
    pub io: Option<(u16, u16)>,
}

/// What the ACPI tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Local APIC IDs 0..num_cpus-1, all enabled; 1..=[`MAX_CPUS`].
    pub num_cpus: u32,
    /// Guest-physical address of the MADT Multiprocessor Wakeup mailbox (4 KiB aligned).
    pub wakeup_mailbox: u64,
    /// I/O APIC base address (below 4 GiB), GSI base 0.
    pub ioapic_addr: u64,
    /// FADT SLEEP_CONTROL_REG: an 8-bit I/O port.
    pub sleep_control_port: u16,
    /// FADT SLEEP_STATUS_REG: an 8-bit I/O port.
    pub sleep_status_port: u16,
    /// COM1 (PNP0501): I/O port base (8 ports) and GSI.
    pub serial: Option<(u16, u32)>,
    /// virtio-mmio transports.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
    /// PCI: MCFG table plus a PNP0A08 host bridge in the DSDT.
    pub pci_ecam: Option<PciEcam>,
}

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// `num_cpus` is 0 or above [`MAX_CPUS`].
    #[error("cannot describe {0} CPUs: the MADT takes 1 to {MAX_CPUS} xAPIC IDs")]
    CpuCount(u32),
    /// The configuration cannot be expressed in the tables.
    #[error("invalid ACPI configuration: {0}")]
    Config(String),
    /// The RSDP address is not 16-byte aligned.
    #[error("RSDP address {0:#x} is not 16-byte aligned")]
    RsdpAlignment(u64),
    /// The tables do not fit below `limit`.
    #[error("ACPI tables need {start:#x}..{end:#x}, which crosses the limit {limit:#x}")]
    NoSpace {
        /// RSDP address.
        start: u64,
        /// End (exclusive) the tables would need.
        end: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// The area is not (entirely) backed by guest memory.
    #[error("ACPI area {start:#x}..{end:#x} is not in guest memory")]
    NotInGuestMemory {
        /// RSDP address.
        start: u64,
        /// End (exclusive) of the area.
        end: u64,
    },
    /// Writing a table failed.
    #[error("writing ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
}

/// Writes the RSDP at `rsdp_addr` and the other tables right after it.
///
/// Returns the end address (exclusive) of the area used. Fails, writing
/// nothing, if the configuration is invalid, if the tables would reach past
/// `limit`, or if the area is not in guest memory.
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    rsdp_addr: GuestAddress,
    limit: GuestAddress,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    validate(cfg)?;
    let start = rsdp_addr.0;
    if start % RSDP_ALIGN != 0 {
        return Err(AcpiError::RsdpAlignment(start));
    }

    // Tables whose content does not depend on where they are placed.
    let madt = build_madt(cfg);
    let mcfg = cfg.pci_ecam.as_ref().map(build_mcfg);
    let dsdt = build_dsdt(cfg);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let xsdt_entries = 2 + u64::from(mcfg.is_some());
    let xsdt_len = HEADER_LEN as u64 + 8 * xsdt_entries;

    // Layout: RSDP, XSDT, FADT, MADT, [MCFG], DSDT.
    let no_space = |end: u64| AcpiError::NoSpace {
        start,
        end,
        limit: limit.0,
    };
    let mut cursor = start;
    let mut place = |len: u64| -> Result<u64, AcpiError> {
        let at = align_up(cursor, TABLE_ALIGN).ok_or_else(|| no_space(u64::MAX))?;
        cursor = at.checked_add(len).ok_or_else(|| no_space(u64::MAX))?;
        Ok(at)
    };
    let rsdp_at = place(RSDP_LEN)?;
    let xsdt_at = place(xsdt_len)?;
    let fadt_at = place(fadt_len)?;
    let madt_at = place(madt.len() as u64)?;
    let mcfg_at = match &mcfg {
        Some(t) => Some(place(t.len() as u64)?),
        None => None,
    };
    let dsdt_at = place(dsdt.len() as u64)?;
    let end = cursor;
    if end > limit.0 {
        return Err(no_space(end));
    }
    let len = usize::try_from(end - start).map_err(|_| no_space(end))?;
    if !mem.check_range(rsdp_addr, len) {
        return Err(AcpiError::NotInGuestMemory { start, end });
    }

    let fadt = build_fadt(cfg, dsdt_at);
    let mut xsdt_tables = vec![fadt_at, madt_at];
    xsdt_tables.extend(mcfg_at);
    let xsdt = build_xsdt(&xsdt_tables);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_at));
    debug_assert_eq!(rsdp.len() as u64, RSDP_LEN);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    debug_assert_eq!(fadt.len() as u64, fadt_len);

    // Zero the gaps between tables so the area has no stale bytes.
    mem.write_slice(&vec![0u8; len], rsdp_addr)?;
    let mut writes = vec![
        (rsdp_at, rsdp.as_slice()),
        (xsdt_at, xsdt.as_slice()),
        (fadt_at, fadt.as_slice()),
        (madt_at, madt.as_slice()),
        (dsdt_at, dsdt.as_slice()),
    ];
    if let (Some(at), Some(table)) = (mcfg_at, &mcfg) {
        writes.push((at, table.as_slice()));
    }
    for (at, bytes) in writes {
        mem.write_slice(bytes, GuestAddress(at))?;
    }
    log::debug!(
        "ACPI tables at {start:#x}..{end:#x}: XSDT {xsdt_at:#x}, FADT {fadt_at:#x}, \
         MADT {madt_at:#x}, MCFG {mcfg_at:x?}, DSDT {dsdt_at:#x}"
    );
    Ok(GuestAddress(end))
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn oem_table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"VEIL    ";
    id[4..].copy_from_slice(signature);
    id
}

fn config_error(msg: String) -> AcpiError {
    AcpiError::Config(msg)
}

/// `base..base+size` is non-empty and ends at or below `top`.
fn range_fits(base: u64, size: u64, top: u64) -> bool {
    size != 0 && base.checked_add(size).is_some_and(|end| end <= top)
}

fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    const FOUR_GIB: u64 = 1 << 32;
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cfg.num_cpus));
    }
    if cfg.wakeup_mailbox % MAILBOX_ALIGN != 0 {
        return Err(config_error(format!(
            "wakeup mailbox {:#x} is not 4 KiB aligned",
            cfg.wakeup_mailbox
        )));
    }
    if cfg.ioapic_addr >= FOUR_GIB {
        return Err(config_error(format!(
            "I/O APIC address {:#x} does not fit the MADT's 32-bit field",
            cfg.ioapic_addr
        )));
    }
    if let Some((port, _)) = cfg.serial {
        if port > u16::MAX - 7 {
            return Err(config_error(format!(
                "serial port base {port:#x} overflows"
            )));
        }
    }
    if cfg.virtio_mmio.len() > MAX_VIRTIO_MMIO {
        return Err(config_error(format!(
            "{} virtio-mmio devices: at most {MAX_VIRTIO_MMIO} have DSDT names",
            cfg.virtio_mmio.len()
        )));
    }
    for dev in &cfg.virtio_mmio {
        if !range_fits(dev.base, dev.size, u64::MAX) {
            return Err(config_error(format!(
                "virtio-mmio window {:#x}+{:#x} is empty or overflows",
                dev.base, dev.size
            )));
        }
    }
    if let Some(pci) = &cfg.pci_ecam {
        if pci.bus_start > pci.bus_end {
            return Err(config_error(format!(
                "PCI bus range {}..={} is empty",
                pci.bus_start, pci.bus_end
            )));
        }
        let ecam_end = u64::from(pci.bus_end) + 1;
        if pci.base.checked_add(ecam_end << ECAM_BUS_SHIFT).is_none() {
            return Err(config_error(format!("ECAM base {:#x} overflows", pci.base)));
        }
        let (base, size) = pci.mmio32;
        if !range_fits(base, size, FOUR_GIB) {
            return Err(config_error(format!(
                "PCI 32-bit window {base:#x}+{size:#x} is empty or not below 4 GiB"
            )));
        }
        if let Some((base, size)) = pci.io {
            if !range_fits(base.into(), size.into(), 0x1_0000) {
                return Err(config_error(format!(
                    "PCI I/O window {base:#x}+{size:#x} is empty or past 0xFFFF"
                )));
            }
        }
    }
    Ok(())
}

/// Starts a table with the standard header; its length grows as bytes are appended.
fn new_sdt(signature: [u8; 4], revision: u8) -> Sdt {
    Sdt::new(
        signature,
        HEADER_LEN as u32,
        revision,
        OEM_ID,
        oem_table_id(&signature),
        OEM_REVISION,
    )
}

fn build_xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, oem_table_id(b"XSDT"), OEM_REVISION);
    for &table in tables {
        xsdt.add_entry(table);
    }
    to_bytes(&xsdt)
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, oem_table_id(b"FACP"), OEM_REVISION)
        // No PM1 blocks, PM timer, GPEs or SCI: sleep/power-off go through
        // the sleep control/status registers below.
        .flag(FadtFlags::HwReducedAcpi)
        // No fixed-feature power or sleep button.
        .flag(FadtFlags::PwrButton)
        .flag(FadtFlags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.sleep_control_reg = io_register(cfg.sleep_control_port);
    fadt.sleep_status_reg = io_register(cfg.sleep_status_port);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    to_bytes(&fadt.finalize())
}

fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = new_sdt(*b"APIC", MADT_REVISION);
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());

    for cpu in 0..cfg.num_cpus {
        // Checked by validate(): num_cpus <= 255.
        let id = cpu as u8;
        body.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, id, id]);
        body.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }

    body.extend_from_slice(&[MADT_TYPE_IO_APIC, 12, IO_APIC_ID, 0]);
    // Checked by validate(): below 4 GiB.
    body.extend_from_slice(&(cfg.ioapic_addr as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base

    // No Interrupt Source Overrides: ISA IRQ n is GSI n, edge/active-high,
    // which is exactly KVM's default routing (the in-kernel PIT raises GSI 0,
    // i.e. I/O APIC pin 0). An IRQ0->GSI2 override, as on real PCs and in
    // QEMU, would only be true if the VMM rerouted GSI 0 to pin 2. Linux on a
    // hardware-reduced platform uses neither the PIT nor the SCI (IRQ 9).

    body.extend_from_slice(&[MADT_TYPE_MP_WAKEUP, 16]);
    body.extend_from_slice(&MP_WAKEUP_MAILBOX_VERSION.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // reserved
    body.extend_from_slice(&cfg.wakeup_mailbox.to_le_bytes());

    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

fn build_mcfg(pci: &PciEcam) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, oem_table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(pci.base, pci.segment, pci.bus_start, pci.bus_end);
    to_bytes(&mcfg)
}

/// AML that has already been serialized.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn serialize(aml: &dyn Aml) -> RawAml {
    RawAml(to_bytes(aml))
}

/// `Name(name, value)`.
fn name(name: &str, value: &dyn Aml) -> RawAml {
    serialize(&aml::Name::new(name.into(), value))
}

/// `Name(_CRS, ResourceTemplate() { resources })`.
fn crs(resources: &[RawAml]) -> RawAml {
    let children: Vec<&dyn Aml> = resources.iter().map(|r| r as &dyn Aml).collect();
    name("_CRS", &aml::ResourceTemplate::new(children))
}

/// `Device(path) { children }`.
fn device(path: &str, children: &[RawAml]) -> RawAml {
    let children: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    serialize(&aml::Device::new(path.into(), children))
}

/// A read-write memory range a device decodes: Memory32Fixed below 4 GiB,
/// QWordMemory above.
fn memory_resource(base: u64, size: u64) -> RawAml {
    match (u32::try_from(base), u32::try_from(size)) {
        (Ok(base32), Ok(size32)) if base + size <= 1 << 32 => {
            serialize(&aml::Memory32Fixed::new(true, base32, size32))
        }
        _ => serialize(&aml::AddressSpace::<u64>::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            base,
            base + size - 1,
            None,
        )),
    }
}

/// An exclusive, edge-triggered, active-high interrupt the device consumes.
fn edge_interrupt(gsi: u32) -> RawAml {
    serialize(&aml::Interrupt::new(true, true, false, false, gsi))
}

fn cpu_device(cpu: u32) -> RawAml {
    device(
        &format!("C{cpu:03X}"),
        &[name("_HID", &"ACPI0007"), name("_UID", &cpu)],
    )
}

fn serial_device(port: u16, gsi: u32) -> RawAml {
    device(
        "COM1",
        &[
            name("_HID", &aml::EISAName::new("PNP0501")),
            name("_UID", &1u8),
            crs(&[
                serialize(&aml::IO::new(port, port, 1, 8)),
                edge_interrupt(gsi),
            ]),
        ],
    )
}

fn virtio_mmio_device(index: usize, dev: &VirtioMmioDevice) -> RawAml {
    device(
        &format!("V{index:03X}"),
        &[
            name("_HID", &VIRTIO_MMIO_HID),
            name("_UID", &(index as u64)),
            crs(&[memory_resource(dev.base, dev.size), edge_interrupt(dev.irq)]),
        ],
    )
}

/// ECAM window of the configured buses: `(base, size)`.
fn ecam_window(pci: &PciEcam) -> (u64, u64) {
    let buses = u64::from(pci.bus_end) - u64::from(pci.bus_start) + 1;
    (
        pci.base + (u64::from(pci.bus_start) << ECAM_BUS_SHIFT),
        buses << ECAM_BUS_SHIFT,
    )
}

fn pci_host_bridge(pci: &PciEcam) -> RawAml {
    let (mmio_base, mmio_size) = pci.mmio32;
    // Checked by validate(): the window ends at or below 4 GiB.
    let mmio_last = (mmio_base + mmio_size - 1) as u32;
    let mut resources = vec![
        serialize(&aml::AddressSpace::<u16>::new_bus_number(
            pci.bus_start.into(),
            pci.bus_end.into(),
        )),
        serialize(&aml::AddressSpace::<u32>::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            mmio_base as u32,
            mmio_last,
            None,
        )),
    ];
    if let Some((io_base, io_size)) = pci.io {
        // Checked by validate(): the window ends at or below 0x10000.
        let io_last = (u32::from(io_base) + u32::from(io_size) - 1) as u16;
        resources.push(serialize(&aml::AddressSpace::<u16>::new_io(
            io_base, io_last, None,
        )));
    }
    device(
        "PCI0",
        &[
            name("_HID", &aml::EISAName::new("PNP0A08")),
            name("_CID", &aml::EISAName::new("PNP0A03")),
            name("_SEG", &pci.segment),
            name("_UID", &pci.segment),
            name("_BBN", &pci.bus_start),
            crs(&resources),
        ],
    )
}

/// Motherboard resources: Linux only trusts an MCFG region that is reserved
/// here (or in the e820 map).
fn ecam_reservation(pci: &PciEcam) -> RawAml {
    let (base, size) = ecam_window(pci);
    device(
        "MBRD",
        &[
            name("_HID", &aml::EISAName::new("PNP0C02")),
            name("_UID", &0u8),
            crs(&[memory_resource(base, size)]),
        ],
    )
}

fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLP_TYP_S5, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let mut sb = Vec::new();
    for cpu in 0..cfg.num_cpus {
        cpu_device(cpu).to_aml_bytes(&mut sb);
    }
    if let Some((port, gsi)) = cfg.serial {
        serial_device(port, gsi).to_aml_bytes(&mut sb);
    }
    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        virtio_mmio_device(index, dev).to_aml_bytes(&mut sb);
    }
    if let Some(pci) = &cfg.pci_ecam {
        pci_host_bridge(pci).to_aml_bytes(&mut sb);
        ecam_reservation(pci).to_aml_bytes(&mut sb);
    }
    body.extend(aml::Scope::raw("\\_SB_".into(), sb));

    let mut dsdt = new_sdt(*b"DSDT", DSDT_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}
