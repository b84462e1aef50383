//! ACPI tables for veil's x86-64 platform (see `docs/platform.md`).
//!
//! [`write_acpi_tables`] lays out, in guest memory and in this order:
//!
//! | table | what it says |
//! | --- | --- |
//! | RSDP | revision 2, points at the XSDT |
//! | XSDT | FADT, MADT, MCFG (with PCI), VIOT (with a virtio-iommu) |
//! | FADT | revision 6.5, hardware-reduced ACPI, sleep control/status registers in I/O space, X_DSDT |
//! | MADT | revision 5: one enabled Local APIC per vCPU, the I/O APIC, the Multiprocessor Wakeup mailbox |
//! | MCFG | the PCI ECAM window (only with PCI) |
//! | VIOT | revision 0: the virtio-iommu and the PCI ranges and virtio-mmio devices behind it (only with [`Viot`]) |
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
const IAPC_BOOT_ARCH: u16 = IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT;

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

// VIOT (ACPI 6.5, "Virtual I/O Translation (VIOT) Table"; Linux: drivers/acpi/viot.c).
/// VIOT revision 0, as ACPI 6.5 gives it. (acpi_tables' own VIOT builder
/// writes 1; Linux does not look at the revision.)
const VIOT_REVISION: u8 = 0;
/// The standard header, Node Count (u16), Node Offset (u16), 8 reserved bytes.
const VIOT_HEADER_LEN: usize = HEADER_LEN + 12;
/// Where the first node, the virtio-iommu, starts; every endpoint node's
/// Output Node field holds this offset.
const VIOT_IOMMU_NODE_OFFSET: u16 = VIOT_HEADER_LEN as u16;
const VIOT_NODE_PCI_RANGE: u8 = 1;
const VIOT_NODE_MMIO_ENDPOINT: u8 = 2;
const VIOT_NODE_VIRTIO_PCI_IOMMU: u8 = 3;
const VIOT_NODE_VIRTIO_MMIO_IOMMU: u8 = 4;
/// Length of both virtio-iommu node types.
const VIOT_IOMMU_NODE_LEN: u16 = 16;
/// Length of both endpoint node types.
const VIOT_ENDPOINT_NODE_LEN: u16 = 24;
/// Node Count is 16 bits; the virtio-iommu node is one of them.
pub const VIOT_MAX_NODES: usize = u16::MAX as usize;

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

/// Where the virtio-iommu described by the VIOT is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViotIommu {
    /// A virtio-pci function (VIOT node type 3). `bdf` is
    /// `bus << 8 | device << 3 | function`; the function must be on the
    /// [`PciEcam`] host bridge, because Linux looks it up among the PCI
    /// devices it has enumerated.
    Pci {
        /// PCI segment group.
        segment: u16,
        /// Bus, device and function.
        bdf: u16,
    },
    /// A virtio-mmio transport (VIOT node type 4), by the base of its
    /// register window: one of [`AcpiConfig::virtio_mmio`], because Linux
    /// looks for the DSDT device whose `_CRS` holds this address.
    Mmio {
        /// Base of the register window.
        base: u64,
    },
}

/// PCI functions behind the virtio-iommu (VIOT node type 1): BDFs
/// `bdf_start..=bdf_end` on `segment` get endpoint IDs from `endpoint_start`
/// up, one per BDF (see [`ViotPciRange::endpoint_id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViotPciRange {
    /// PCI segment group (the node's Segment Start and Segment End).
    pub segment: u16,
    /// First BDF (`bus << 8 | device << 3 | function`).
    pub bdf_start: u16,
    /// Last BDF, inclusive.
    pub bdf_end: u16,
    /// Endpoint ID of `bdf_start`.
    pub endpoint_start: u32,
}

impl ViotPciRange {
    /// The endpoint ID a guest gives the PCI function (or DMA alias)
    /// `segment:bdf` if this range covers it: `endpoint_start + (bdf -
    /// bdf_start)`, as Linux's `viot_pci_dev_iommu_init` computes it. The
    /// virtio-iommu device must recognize requests for this ID as that function's.
    pub fn endpoint_id(&self, segment: u16, bdf: u16) -> Option<u32> {
        if segment != self.segment || bdf < self.bdf_start || bdf > self.bdf_end {
            return None;
        }
        self.endpoint_start.checked_add(u32::from(bdf - self.bdf_start))
    }
}

/// A virtio-mmio device behind the virtio-iommu (VIOT node type 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViotMmioEndpoint {
    /// Base of the device's register window: one of
    /// [`AcpiConfig::virtio_mmio`]. Linux matches it exactly against the
    /// start of the device's first memory resource.
    pub base: u64,
    /// The device's endpoint ID.
    pub endpoint: u32,
}

/// A virtio-iommu and the endpoints it translates for: the VIOT table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viot {
    /// Where the virtio-iommu itself is.
    pub iommu: ViotIommu,
    /// PCI endpoints behind it. Ranges on a segment must not overlap; a
    /// range may include the virtio-iommu's own BDF (Linux skips it).
    pub pci_ranges: Vec<ViotPciRange>,
    /// virtio-mmio endpoints behind it, one per device.
    pub mmio_endpoints: Vec<ViotMmioEndpoint>,
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
    /// A virtio-iommu: the VIOT table. All endpoint IDs (of every PCI range
    /// and MMIO endpoint) must be distinct.
    pub viot: Option<Viot>,
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
    if !start.is_multiple_of(RSDP_ALIGN) {
        return Err(AcpiError::RsdpAlignment(start));
    }

    // Tables whose content does not depend on where they are placed.
    let madt = build_madt(cfg);
    let mcfg = cfg.pci_ecam.as_ref().map(build_mcfg);
    let viot = cfg.viot.as_ref().map(build_viot);
    let dsdt = build_dsdt(cfg);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let xsdt_entries = 2 + u64::from(mcfg.is_some()) + u64::from(viot.is_some());
    let xsdt_len = HEADER_LEN as u64 + 8 * xsdt_entries;

    // Layout: RSDP, XSDT, FADT, MADT, [MCFG], [VIOT], DSDT.
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
    let viot_at = match &viot {
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
    xsdt_tables.extend(viot_at);
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
    if let (Some(at), Some(table)) = (viot_at, &viot) {
        writes.push((at, table.as_slice()));
    }
    for (at, bytes) in writes {
        mem.write_slice(bytes, GuestAddress(at))?;
    }
    log::debug!(
        "ACPI tables at {start:#x}..{end:#x}: XSDT {xsdt_at:#x}, FADT {fadt_at:#x}, \
         MADT {madt_at:#x}, MCFG {mcfg_at:x?}, VIOT {viot_at:x?}, DSDT {dsdt_at:#x}"
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
    if !cfg.wakeup_mailbox.is_multiple_of(MAILBOX_ALIGN) {
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
            return Err(config_error(format!("serial port base {port:#x} overflows")));
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
    if let Some(viot) = &cfg.viot {
        validate_viot(cfg, viot)?;
    }
    Ok(())
}

fn viot_error(msg: String) -> AcpiError {
    AcpiError::Config(format!("VIOT: {msg}"))
}

/// Bus number of a BDF.
fn bdf_bus(bdf: u16) -> u8 {
    bdf.to_be_bytes()[0]
}

/// `seg:bb:dd.f`.
fn bdf_name(segment: u16, bdf: u16) -> String {
    format!(
        "{segment:04x}:{:02x}:{:02x}.{}",
        bdf_bus(bdf),
        (bdf >> 3) & 0x1F,
        bdf & 7
    )
}

/// Everything Linux needs to find the virtio-iommu and match every endpoint
/// to exactly one node and one endpoint ID.
fn validate_viot(cfg: &AcpiConfig, viot: &Viot) -> Result<(), AcpiError> {
    let nodes = 1 + viot.pci_ranges.len() + viot.mmio_endpoints.len();
    if nodes > VIOT_MAX_NODES {
        return Err(viot_error(format!(
            "{nodes} nodes (the virtio-iommu, {} PCI ranges, {} MMIO endpoints): \
             the node count is 16 bits, at most {VIOT_MAX_NODES}",
            viot.pci_ranges.len(),
            viot.mmio_endpoints.len()
        )));
    }
    // The host bridge that `segment` names.
    let host_bridge = |what: &str, segment: u16| -> Result<&PciEcam, AcpiError> {
        match &cfg.pci_ecam {
            Some(pci) if pci.segment == segment => Ok(pci),
            Some(pci) => Err(viot_error(format!(
                "{what} is on PCI segment {segment}, but the only segment is {}",
                pci.segment
            ))),
            None => Err(viot_error(format!(
                "{what} is on PCI segment {segment}, but there is no PCI"
            ))),
        }
    };
    let is_mmio_device = |base: u64| cfg.virtio_mmio.iter().any(|dev| dev.base == base);

    match viot.iommu {
        ViotIommu::Pci { segment, bdf } => {
            let what = format!("the virtio-iommu {}", bdf_name(segment, bdf));
            let pci = host_bridge(&what, segment)?;
            if !(pci.bus_start..=pci.bus_end).contains(&bdf_bus(bdf)) {
                return Err(viot_error(format!(
                    "{what} is outside the host bridge's buses {}..={}",
                    pci.bus_start, pci.bus_end
                )));
            }
        }
        ViotIommu::Mmio { base } => {
            if !is_mmio_device(base) {
                return Err(viot_error(format!(
                    "the virtio-iommu at {base:#x} is not the base of a virtio-mmio device"
                )));
            }
        }
    }

    // Endpoint IDs each node hands out: (first, last, node).
    let mut ids: Vec<(u32, u32, String)> = Vec::with_capacity(nodes - 1);
    // PCI ranges by (segment, first BDF): (segment, first, last, node).
    let mut bdfs: Vec<(u16, u16, u16, String)> = Vec::with_capacity(viot.pci_ranges.len());
    for (index, range) in viot.pci_ranges.iter().enumerate() {
        let what = format!(
            "PCI range {index} ({}..={})",
            bdf_name(range.segment, range.bdf_start),
            bdf_name(range.segment, range.bdf_end)
        );
        if range.bdf_start > range.bdf_end {
            return Err(viot_error(format!(
                "{what}: bdf_start {:#06x} is above bdf_end {:#06x}",
                range.bdf_start, range.bdf_end
            )));
        }
        let pci = host_bridge(&what, range.segment)?;
        if bdf_bus(range.bdf_start) < pci.bus_start || bdf_bus(range.bdf_end) > pci.bus_end {
            return Err(viot_error(format!(
                "{what} reaches past the host bridge's buses {}..={}",
                pci.bus_start, pci.bus_end
            )));
        }
        let Some(last_id) = range.endpoint_id(range.segment, range.bdf_end) else {
            return Err(viot_error(format!(
                "{what}: endpoint IDs from {:#x} overflow 32 bits",
                range.endpoint_start
            )));
        };
        ids.push((range.endpoint_start, last_id, what.clone()));
        bdfs.push((range.segment, range.bdf_start, range.bdf_end, what));
    }
    // Linux uses the first range in its list that matches, and its list is
    // in reverse table order: overlapping ranges would silently shadow each other.
    bdfs.sort_by_key(|(segment, first, ..)| (*segment, *first));
    for pair in bdfs.windows(2) {
        let ((seg_a, _, last_a, a), (seg_b, first_b, _, b)) = (&pair[0], &pair[1]);
        if seg_a == seg_b && first_b <= last_a {
            return Err(viot_error(format!("{a} and {b} overlap")));
        }
    }

    let mut bases: Vec<(u64, String)> = Vec::with_capacity(viot.mmio_endpoints.len());
    for (index, ep) in viot.mmio_endpoints.iter().enumerate() {
        let what = format!("MMIO endpoint {index} ({:#x})", ep.base);
        if !is_mmio_device(ep.base) {
            return Err(viot_error(format!("{what} is not the base of a virtio-mmio device")));
        }
        if viot.iommu == (ViotIommu::Mmio { base: ep.base }) {
            return Err(viot_error(format!("{what} is the virtio-iommu itself")));
        }
        ids.push((ep.endpoint, ep.endpoint, what.clone()));
        bases.push((ep.base, what));
    }
    bases.sort_by_key(|(base, _)| *base);
    for pair in bases.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(viot_error(format!(
                "{} and {} are the same device",
                pair[0].1, pair[1].1
            )));
        }
    }

    // Sorted by first ID, two sets of IDs overlap only if neighbours do.
    ids.sort_by_key(|(first, ..)| *first);
    for pair in ids.windows(2) {
        let ((_, last_a, a), (first_b, _, b)) = (&pair[0], &pair[1]);
        if first_b <= last_a {
            return Err(viot_error(format!("{a} and {b} share endpoint ID {first_b:#x}")));
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
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port.into())
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

/// Appends a VIOT node: Type, Reserved, Length, then `fields`, which must
/// fill the rest of the node exactly (reserved bytes included).
fn push_viot_node(body: &mut Vec<u8>, node_type: u8, len: u16, fields: &[&[u8]]) {
    let start = body.len();
    body.extend_from_slice(&[node_type, 0]);
    body.extend_from_slice(&len.to_le_bytes());
    for field in fields {
        body.extend_from_slice(field);
    }
    debug_assert_eq!(body.len() - start, usize::from(len), "VIOT node type {node_type}");
}

/// The VIOT: header, then the virtio-iommu node at [`VIOT_IOMMU_NODE_OFFSET`],
/// then one node per PCI range and per MMIO endpoint, each naming the
/// virtio-iommu node as its Output Node. Every node is 16 or 24 bytes, so
/// all of them stay 8-byte aligned.
fn build_viot(viot: &Viot) -> Vec<u8> {
    // Checked by validate(): at most VIOT_MAX_NODES nodes.
    let node_count = (1 + viot.pci_ranges.len() + viot.mmio_endpoints.len()) as u16;
    let output_node = VIOT_IOMMU_NODE_OFFSET.to_le_bytes();
    let reserved = [0u8; 8];

    let mut body = Vec::new();
    body.extend_from_slice(&node_count.to_le_bytes());
    body.extend_from_slice(&VIOT_IOMMU_NODE_OFFSET.to_le_bytes());
    body.extend_from_slice(&reserved);
    debug_assert_eq!(HEADER_LEN + body.len(), usize::from(VIOT_IOMMU_NODE_OFFSET));

    match viot.iommu {
        ViotIommu::Pci { segment, bdf } => push_viot_node(
            &mut body,
            VIOT_NODE_VIRTIO_PCI_IOMMU,
            VIOT_IOMMU_NODE_LEN,
            &[&segment.to_le_bytes(), &bdf.to_le_bytes(), &reserved],
        ),
        ViotIommu::Mmio { base } => push_viot_node(
            &mut body,
            VIOT_NODE_VIRTIO_MMIO_IOMMU,
            VIOT_IOMMU_NODE_LEN,
            &[&reserved[..4], &base.to_le_bytes()],
        ),
    }
    for range in &viot.pci_ranges {
        push_viot_node(
            &mut body,
            VIOT_NODE_PCI_RANGE,
            VIOT_ENDPOINT_NODE_LEN,
            &[
                &range.endpoint_start.to_le_bytes(),
                &range.segment.to_le_bytes(), // Segment Start
                &range.segment.to_le_bytes(), // Segment End
                &range.bdf_start.to_le_bytes(),
                &range.bdf_end.to_le_bytes(),
                &output_node,
                &reserved[..6],
            ],
        );
    }
    for ep in &viot.mmio_endpoints {
        push_viot_node(
            &mut body,
            VIOT_NODE_MMIO_ENDPOINT,
            VIOT_ENDPOINT_NODE_LEN,
            &[
                &ep.endpoint.to_le_bytes(),
                &ep.base.to_le_bytes(),
                &output_node,
                &reserved[..6],
            ],
        );
    }

    let mut table = new_sdt(*b"VIOT", VIOT_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
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
        (Ok(base32), Ok(size32)) if base + size <= 1 << 32 => serialize(&aml::Memory32Fixed::new(true, base32, size32)),
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
    device(&format!("C{cpu:03X}"), &[name("_HID", &"ACPI0007"), name("_UID", &cpu)])
}

fn serial_device(port: u16, gsi: u32) -> RawAml {
    device(
        "COM1",
        &[
            name("_HID", &aml::EISAName::new("PNP0501")),
            name("_UID", &1u8),
            crs(&[serialize(&aml::IO::new(port, port, 1, 8)), edge_interrupt(gsi)]),
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
        resources.push(serialize(&aml::AddressSpace::<u16>::new_io(io_base, io_last, None)));
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
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&SLP_TYP_S5, &0u8, &0u8, &0u8])).to_aml_bytes(&mut body);

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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const RSDP_ADDR: u64 = 0xE_0000;
    const LIMIT: u64 = 0x10_0000;
    const MAILBOX: u64 = 0xFEB0_0000;
    const ECAM_BASE: u64 = 0xE000_0000;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// The platform of docs/platform.md, without PCI.
    fn platform(num_cpus: u32) -> AcpiConfig {
        AcpiConfig {
            num_cpus,
            wakeup_mailbox: MAILBOX,
            ioapic_addr: 0xFEC0_0000,
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            serial: Some((0x3F8, 4)),
            virtio_mmio: vec![
                VirtioMmioDevice {
                    base: 0xD000_0000,
                    size: 0x1000,
                    irq: 5,
                },
                VirtioMmioDevice {
                    base: 0xD000_1000,
                    size: 0x1000,
                    irq: 6,
                },
            ],
            pci_ecam: None,
            viot: None,
        }
    }

    fn with_pci(mut cfg: AcpiConfig) -> AcpiConfig {
        cfg.pci_ecam = Some(PciEcam {
            base: ECAM_BASE,
            segment: 0,
            bus_start: 0,
            bus_end: 255,
            mmio32: (0xC000_0000, 0x1000_0000),
            io: Some((0x1000, 0xF000)),
        });
        cfg
    }

    /// PCI endpoints 00:02.0-00:02.7 (IDs 0x100..) and 00:03.0-00:1f.7 (IDs
    /// 0x18..) plus the second virtio-mmio device (ID 0x1000) behind a
    /// virtio-pci IOMMU at 00:01.0.
    fn with_pci_iommu(cfg: AcpiConfig) -> AcpiConfig {
        let mut cfg = with_pci(cfg);
        cfg.viot = Some(Viot {
            iommu: ViotIommu::Pci {
                segment: 0,
                bdf: 0x0008,
            },
            pci_ranges: vec![
                ViotPciRange {
                    segment: 0,
                    bdf_start: 0x0010,
                    bdf_end: 0x0017,
                    endpoint_start: 0x100,
                },
                ViotPciRange {
                    segment: 0,
                    bdf_start: 0x0018,
                    bdf_end: 0x00FF,
                    endpoint_start: 0x18,
                },
            ],
            mmio_endpoints: vec![ViotMmioEndpoint {
                base: 0xD000_1000,
                endpoint: 0x1000,
            }],
        });
        cfg
    }

    /// The first virtio-mmio device is the IOMMU; behind it are the second
    /// virtio-mmio device (ID 7) and every PCI function of bus 0 but 00:00.0
    /// (IDs 0x1_0001..).
    fn with_mmio_iommu(cfg: AcpiConfig) -> AcpiConfig {
        let mut cfg = with_pci(cfg);
        cfg.viot = Some(Viot {
            iommu: ViotIommu::Mmio { base: 0xD000_0000 },
            pci_ranges: vec![ViotPciRange {
                segment: 0,
                bdf_start: 0x0001,
                bdf_end: 0x00FF,
                endpoint_start: 0x1_0001,
            }],
            mmio_endpoints: vec![ViotMmioEndpoint {
                base: 0xD000_1000,
                endpoint: 7,
            }],
        });
        cfg
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    // ---- A table walker: everything below is found from the RSDP. ----

    struct Table {
        addr: u64,
        bytes: Vec<u8>,
    }

    impl Table {
        fn read(mem: &GuestMemoryMmap, addr: u64) -> Table {
            let header = read(mem, addr, HEADER_LEN);
            let len = u32_at(&header, 4) as usize;
            assert!(len >= HEADER_LEN, "table at {addr:#x} is {len} bytes");
            Table {
                addr,
                bytes: read(mem, addr, len),
            }
        }

        fn signature(&self) -> &[u8] {
            &self.bytes[0..4]
        }

        fn revision(&self) -> u8 {
            self.bytes[8]
        }

        fn end(&self) -> u64 {
            self.addr + self.bytes.len() as u64
        }
    }

    struct Tables {
        rsdp: Vec<u8>,
        xsdt: Table,
        /// What the XSDT lists, in its order.
        listed: Vec<Table>,
        dsdt: Table,
    }

    impl Tables {
        fn walk(mem: &GuestMemoryMmap, rsdp_addr: u64) -> Tables {
            let rsdp = read(mem, rsdp_addr, 36);
            assert_eq!(&rsdp[0..8], b"RSD PTR ");
            let xsdt = Table::read(mem, u64_at(&rsdp, 24));
            assert_eq!(xsdt.signature(), b"XSDT");
            let listed: Vec<Table> = (HEADER_LEN..xsdt.bytes.len())
                .step_by(8)
                .map(|off| Table::read(mem, u64_at(&xsdt.bytes, off)))
                .collect();
            let fadt = listed
                .iter()
                .find(|t| t.signature() == b"FACP")
                .expect("XSDT lists no FADT");
            let dsdt = Table::read(mem, u64_at(&fadt.bytes, 140));
            Tables {
                rsdp,
                xsdt,
                listed,
                dsdt,
            }
        }

        fn get(&self, signature: &[u8; 4]) -> &Table {
            self.listed
                .iter()
                .find(|t| t.signature() == signature)
                .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
        }

        fn signatures(&self) -> Vec<String> {
            self.listed
                .iter()
                .map(|t| String::from_utf8_lossy(t.signature()).into_owned())
                .collect()
        }

        fn all(&self) -> Vec<&Table> {
            let mut all = vec![&self.xsdt, &self.dsdt];
            all.extend(self.listed.iter());
            all
        }
    }

    fn write_and_walk(cfg: &AcpiConfig) -> (GuestMemoryMmap, Tables, u64) {
        let mem = memory(LIMIT as usize);
        let end =
            write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), cfg).expect("writing ACPI tables");
        let tables = Tables::walk(&mem, RSDP_ADDR);
        (mem, tables, end.0)
    }

    /// MADT interrupt controller structures: (type, whole structure).
    fn madt_entries(madt: &Table) -> Vec<(u8, &[u8])> {
        let b = &madt.bytes;
        let mut entries = Vec::new();
        let mut off = 44;
        while off < b.len() {
            let len = b[off + 1] as usize;
            assert!(len >= 2 && off + len <= b.len(), "bad MADT entry at {off}");
            entries.push((b[off], &b[off..off + len]));
            off += len;
        }
        entries
    }

    // ---- A VIOT reader, written from the ACPI 6.5 layout. ----

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum ViotNode {
        PciRange {
            endpoint_start: u32,
            segment_start: u16,
            segment_end: u16,
            bdf_start: u16,
            bdf_end: u16,
            output_node: u16,
        },
        MmioEndpoint {
            endpoint: u32,
            base: u64,
            output_node: u16,
        },
        VirtioPciIommu {
            segment: u16,
            bdf: u16,
        },
        VirtioMmioIommu {
            base: u64,
        },
    }

    /// Walks the VIOT as Linux's viot.c does (Node Count nodes from Node
    /// Offset, each Length bytes long), checking that every node is in
    /// bounds, 8-byte aligned, as long as its type says, with zero reserved
    /// bytes, and that the nodes end the table. Returns (offset, node).
    fn viot_nodes(viot: &Table) -> Vec<(usize, ViotNode)> {
        let b = &viot.bytes;
        assert_eq!(viot.signature(), b"VIOT");
        assert_eq!(viot.revision(), 0);
        assert!(b.len() >= 48, "VIOT header is {} bytes", b.len());
        let count = u16_at(b, 36);
        let mut off = usize::from(u16_at(b, 38));
        assert_eq!(&b[40..48], &[0; 8], "header reserved bytes");
        assert!(off >= 48, "first node at {off} overlaps the header");
        let mut nodes = Vec::new();
        for _ in 0..count {
            assert!(off + 4 <= b.len(), "node header at {off} past the end");
            assert_eq!(off % 8, 0, "node at {off} is not 8-byte aligned");
            let (kind, len) = (b[off], usize::from(u16_at(b, off + 2)));
            assert_eq!(b[off + 1], 0, "reserved byte of node at {off}");
            assert!(off + len <= b.len(), "node at {off} ({len} bytes) past the end");
            let n = &b[off..off + len];
            let reserved = |range: std::ops::Range<usize>| {
                assert!(
                    n[range.clone()].iter().all(|&x| x == 0),
                    "reserved {range:?} of node at {off}"
                );
            };
            let node = match kind {
                1 => {
                    assert_eq!(len, 24, "PCI range node length");
                    reserved(18..24);
                    ViotNode::PciRange {
                        endpoint_start: u32_at(n, 4),
                        segment_start: u16_at(n, 8),
                        segment_end: u16_at(n, 10),
                        bdf_start: u16_at(n, 12),
                        bdf_end: u16_at(n, 14),
                        output_node: u16_at(n, 16),
                    }
                }
                2 => {
                    assert_eq!(len, 24, "MMIO endpoint node length");
                    reserved(18..24);
                    ViotNode::MmioEndpoint {
                        endpoint: u32_at(n, 4),
                        base: u64_at(n, 8),
                        output_node: u16_at(n, 16),
                    }
                }
                3 => {
                    assert_eq!(len, 16, "virtio-pci IOMMU node length");
                    reserved(8..16);
                    ViotNode::VirtioPciIommu {
                        segment: u16_at(n, 4),
                        bdf: u16_at(n, 6),
                    }
                }
                4 => {
                    assert_eq!(len, 16, "virtio-mmio IOMMU node length");
                    reserved(4..8);
                    ViotNode::VirtioMmioIommu { base: u64_at(n, 8) }
                }
                t => panic!("unknown VIOT node type {t} at {off}"),
            };
            nodes.push((off, node));
            off += len;
        }
        assert_eq!(off, b.len(), "bytes after the last node");
        nodes
    }

    /// The node at `offset`, which an Output Node field names.
    fn viot_node_at(nodes: &[(usize, ViotNode)], offset: u16) -> ViotNode {
        nodes
            .iter()
            .find(|(off, _)| *off == usize::from(offset))
            .unwrap_or_else(|| panic!("no VIOT node at {offset}"))
            .1
    }

    /// Turns the nodes back into the configuration that describes them,
    /// checking that there is one IOMMU node and that every endpoint node's
    /// Output Node is it.
    fn viot_config(nodes: &[(usize, ViotNode)]) -> Viot {
        let iommus: Vec<(usize, ViotIommu)> = nodes
            .iter()
            .filter_map(|(off, node)| match *node {
                ViotNode::VirtioPciIommu { segment, bdf } => Some((*off, ViotIommu::Pci { segment, bdf })),
                ViotNode::VirtioMmioIommu { base } => Some((*off, ViotIommu::Mmio { base })),
                _ => None,
            })
            .collect();
        assert_eq!(iommus.len(), 1, "one virtio-iommu node");
        let (iommu_at, iommu) = iommus[0];
        let mut viot = Viot {
            iommu,
            pci_ranges: Vec::new(),
            mmio_endpoints: Vec::new(),
        };
        for (_, node) in nodes {
            match *node {
                ViotNode::PciRange {
                    endpoint_start,
                    segment_start,
                    segment_end,
                    bdf_start,
                    bdf_end,
                    output_node,
                } => {
                    assert_eq!(usize::from(output_node), iommu_at, "PCI range output node");
                    assert_eq!(segment_start, segment_end, "one segment per range");
                    viot.pci_ranges.push(ViotPciRange {
                        segment: segment_start,
                        bdf_start,
                        bdf_end,
                        endpoint_start,
                    });
                }
                ViotNode::MmioEndpoint {
                    endpoint,
                    base,
                    output_node,
                } => {
                    assert_eq!(usize::from(output_node), iommu_at, "MMIO endpoint output node");
                    viot.mmio_endpoints.push(ViotMmioEndpoint { base, endpoint });
                }
                _ => {}
            }
        }
        viot
    }

    /// What Linux 6.1's viot_pci_dev_iommu_init finds for the PCI function
    /// `segment:bdf`: (endpoint ID, IOMMU node). Linux keeps PCI ranges in a
    /// list it adds to at the head, so the last matching node wins.
    fn linux_pci_endpoint(nodes: &[(usize, ViotNode)], segment: u16, bdf: u16) -> Option<(u32, ViotNode)> {
        nodes.iter().rev().find_map(|(_, node)| match *node {
            ViotNode::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
                output_node,
            } if (segment_start..=segment_end).contains(&segment) && (bdf_start..=bdf_end).contains(&bdf) => {
                let id = (u32::from(segment - segment_start) << 16)
                    .wrapping_add(u32::from(bdf - bdf_start))
                    .wrapping_add(endpoint_start);
                Some((id, viot_node_at(nodes, output_node)))
            }
            _ => None,
        })
    }

    /// What Linux 6.1's viot_mmio_dev_iommu_init finds for the platform
    /// device whose first memory resource starts at `base`.
    fn linux_mmio_endpoint(nodes: &[(usize, ViotNode)], base: u64) -> Option<(u32, ViotNode)> {
        nodes.iter().rev().find_map(|(_, node)| match *node {
            ViotNode::MmioEndpoint {
                endpoint,
                base: b,
                output_node,
            } if b == base => Some((endpoint, viot_node_at(nodes, output_node))),
            _ => None,
        })
    }

    // ---- A small AML reader for what build_dsdt emits. ----

    /// Decodes a PkgLength: (length including its own bytes, bytes it takes).
    fn pkg_length(b: &[u8]) -> (usize, usize) {
        let lead = b[0];
        let follow = usize::from(lead >> 6);
        if follow == 0 {
            return (usize::from(lead & 0x3F), 1);
        }
        let mut len = usize::from(lead & 0x0F);
        for i in 0..follow {
            len |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (len, 1 + follow)
    }

    #[derive(Debug, PartialEq)]
    enum Value {
        Int(u64),
        Str(String),
        Buffer(Vec<u8>),
        Package(Vec<Value>),
    }

    /// Parses one data object; returns it and the bytes it took.
    fn data_object(b: &[u8]) -> (Value, usize) {
        match b[0] {
            0x00 => (Value::Int(0), 1),
            0x01 => (Value::Int(1), 1),
            0x0A => (Value::Int(b[1].into()), 2),
            0x0B => (Value::Int(u16_at(b, 1).into()), 3),
            0x0C => (Value::Int(u32_at(b, 1).into()), 5),
            0x0E => (Value::Int(u64_at(b, 1)), 9),
            0x0D => {
                let nul = b[1..].iter().position(|&c| c == 0).unwrap();
                let s = String::from_utf8(b[1..1 + nul].to_vec()).unwrap();
                (Value::Str(s), nul + 2)
            }
            0x11 => {
                let (len, n) = pkg_length(&b[1..]);
                let (size, m) = data_object(&b[1 + n..]);
                let Value::Int(size) = size else {
                    panic!("buffer size is not an integer")
                };
                let data = &b[1 + n + m..1 + len];
                assert_eq!(data.len() as u64, size, "buffer size disagrees");
                (Value::Buffer(data.to_vec()), 1 + len)
            }
            0x12 => {
                let (len, n) = pkg_length(&b[1..]);
                let count = b[1 + n];
                let mut elements = Vec::new();
                let mut off = 2 + n;
                while off < 1 + len {
                    let (v, used) = data_object(&b[off..]);
                    elements.push(v);
                    off += used;
                }
                assert_eq!(off, 1 + len, "package overruns its length");
                assert_eq!(elements.len(), usize::from(count));
                (Value::Package(elements), 1 + len)
            }
            op => panic!("unexpected AML opcode {op:#x}"),
        }
    }

    /// `Name(NNNN, data)`: (name, value, bytes taken).
    fn name_object(b: &[u8]) -> (String, Value, usize) {
        assert_eq!(b[0], 0x08, "expected NameOp");
        let name = String::from_utf8(b[1..5].to_vec()).unwrap();
        let (value, used) = data_object(&b[5..]);
        (name, value, 5 + used)
    }

    struct AmlDevice {
        name: String,
        objects: Vec<(String, Value)>,
    }

    impl AmlDevice {
        fn get(&self, name: &str) -> &Value {
            &self
                .objects
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{} has no {name}", self.name))
                .1
        }

        fn int(&self, name: &str) -> u64 {
            match self.get(name) {
                Value::Int(v) => *v,
                v => panic!("{}.{name} is {v:?}", self.name),
            }
        }

        fn resources(&self) -> Vec<(u8, Vec<u8>)> {
            match self.get("_CRS") {
                Value::Buffer(b) => resource_descriptors(b),
                v => panic!("{}._CRS is {v:?}", self.name),
            }
        }
    }

    /// Resource descriptors up to the end tag: (large item name or small
    /// item tag, payload).
    fn resource_descriptors(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let tag = b[off];
            if tag & 0x80 != 0 {
                let len = usize::from(u16_at(b, off + 1));
                out.push((tag, b[off + 3..off + 3 + len].to_vec()));
                off += 3 + len;
            } else {
                let kind = (tag >> 3) & 0x0F;
                let len = usize::from(tag & 0x07);
                if kind == 0x0F {
                    assert_eq!(off + 2, b.len(), "bytes after the end tag");
                    return out;
                }
                out.push((tag, b[off + 1..off + 1 + len].to_vec()));
                off += 1 + len;
            }
        }
    }

    /// The DSDT: top-level names, then `Scope(\_SB_) { Device ... }`.
    fn parse_dsdt(dsdt: &Table) -> (Vec<(String, Value)>, Vec<AmlDevice>) {
        let b = &dsdt.bytes[HEADER_LEN..];
        let mut names = Vec::new();
        let mut off = 0;
        while b[off] == 0x08 {
            let (name, value, used) = name_object(&b[off..]);
            names.push((name, value));
            off += used;
        }
        assert_eq!(b[off], 0x10, "expected ScopeOp");
        let (len, n) = pkg_length(&b[off + 1..]);
        let scope_end = off + 1 + len;
        assert_eq!(scope_end, b.len(), "\\_SB_ must end the DSDT exactly");
        assert_eq!(&b[off + 1 + n..off + 1 + n + 5], b"\\_SB_");
        let mut devices = Vec::new();
        let mut off = off + 1 + n + 5;
        while off < scope_end {
            assert_eq!(&b[off..off + 2], &[0x5B, 0x82], "expected DeviceOp");
            let (len, n) = pkg_length(&b[off + 2..]);
            let dev_end = off + 2 + len;
            let name = String::from_utf8(b[off + 2 + n..off + 2 + n + 4].to_vec()).unwrap();
            let mut objects = Vec::new();
            let mut inner = off + 2 + n + 4;
            while inner < dev_end {
                let (obj, value, used) = name_object(&b[inner..]);
                objects.push((obj, value));
                inner += used;
            }
            assert_eq!(inner, dev_end, "{name} overruns its length");
            devices.push(AmlDevice { name, objects });
            off = dev_end;
        }
        assert_eq!(off, scope_end);
        (names, devices)
    }

    /// EISA ID compression, written independently of acpi_tables.
    fn eisa_id(id: &str) -> u64 {
        let b = id.as_bytes();
        let letter = |c: u8| u32::from(c - b'@');
        let raw = (letter(b[0]) << 26)
            | (letter(b[1]) << 21)
            | (letter(b[2]) << 16)
            | u32::from_str_radix(&id[3..], 16).unwrap();
        raw.swap_bytes().into()
    }

    fn find<'a>(devices: &'a [AmlDevice], name: &str) -> &'a AmlDevice {
        devices
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no device {name}"))
    }

    // ---- Tests ----

    #[test]
    fn eisa_id_helper_matches_known_value() {
        assert_eq!(eisa_id("PNP0A03"), 0x030A_D041);
    }

    #[test]
    fn every_checksum_sums_to_zero() {
        for cfg in [
            platform(1),
            with_pci(platform(8)),
            platform(MAX_CPUS),
            with_pci_iommu(platform(2)),
            with_mmio_iommu(platform(2)),
        ] {
            let (_, tables, _) = write_and_walk(&cfg);
            assert_eq!(sum(&tables.rsdp[..20]), 0, "RSDP checksum");
            assert_eq!(sum(&tables.rsdp), 0, "RSDP extended checksum");
            for table in tables.all() {
                assert_eq!(
                    sum(&table.bytes),
                    0,
                    "{} checksum",
                    String::from_utf8_lossy(table.signature())
                );
            }
        }
    }

    #[test]
    fn rsdp_is_revision_2_and_points_at_the_xsdt() {
        let (_, tables, end) = write_and_walk(&platform(2));
        let rsdp = &tables.rsdp;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(&rsdp[9..15], b"VEIL  ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        let xsdt = u64_at(rsdp, 24);
        assert_eq!(xsdt, tables.xsdt.addr);
        assert!(xsdt >= RSDP_ADDR + 36 && xsdt < end);
        assert_eq!(tables.xsdt.signature(), b"XSDT");
    }

    #[test]
    fn xsdt_lists_mcfg_only_with_pci_and_viot_only_with_an_iommu() {
        let (_, tables, _) = write_and_walk(&platform(1));
        assert_eq!(tables.signatures(), ["FACP", "APIC"]);
        let (_, tables, _) = write_and_walk(&with_pci(platform(1)));
        assert_eq!(tables.signatures(), ["FACP", "APIC", "MCFG"]);
        let (_, tables, _) = write_and_walk(&with_pci_iommu(platform(1)));
        assert_eq!(tables.signatures(), ["FACP", "APIC", "MCFG", "VIOT"]);
        let mut cfg = platform(1);
        cfg.viot = Some(Viot {
            iommu: ViotIommu::Mmio { base: 0xD000_0000 },
            pci_ranges: vec![],
            mmio_endpoints: vec![ViotMmioEndpoint {
                base: 0xD000_1000,
                endpoint: 0,
            }],
        });
        let (_, tables, _) = write_and_walk(&cfg);
        assert_eq!(tables.signatures(), ["FACP", "APIC", "VIOT"]);
    }

    #[test]
    fn tables_are_aligned_disjoint_and_inside_the_area() {
        for cfg in [with_pci(platform(8)), with_pci_iommu(platform(8))] {
            tables_fit(&cfg);
        }
    }

    fn tables_fit(cfg: &AcpiConfig) {
        let (_, tables, end) = write_and_walk(cfg);
        let mut spans: Vec<(u64, u64)> = tables.all().iter().map(|t| (t.addr, t.end())).collect();
        spans.push((RSDP_ADDR, RSDP_ADDR + 36));
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "tables overlap: {pair:x?}");
        }
        for (start, stop) in &spans {
            assert_eq!(start % TABLE_ALIGN, 0);
            assert!(*start >= RSDP_ADDR && *stop <= end);
        }
        assert_eq!(spans.last().unwrap().1, end, "end is the last table's end");
    }

    #[test]
    fn madt_has_one_local_apic_per_cpu_and_the_wakeup_mailbox() {
        for num_cpus in [1u32, 8] {
            let (_, tables, _) = write_and_walk(&platform(num_cpus));
            let madt = tables.get(b"APIC");
            assert!(madt.revision() >= 5, "MP wakeup needs MADT revision 5");
            assert_eq!(u32_at(&madt.bytes, 36), 0xFEE0_0000, "LAPIC address");
            assert_eq!(u32_at(&madt.bytes, 40) & 1, 1, "PCAT_COMPAT");
            let entries = madt_entries(madt);

            let lapics: Vec<&[u8]> = entries.iter().filter(|(t, _)| *t == 0).map(|(_, e)| *e).collect();
            assert_eq!(lapics.len(), num_cpus as usize);
            for (cpu, lapic) in lapics.iter().enumerate() {
                assert_eq!(lapic.len(), 8);
                assert_eq!(usize::from(lapic[2]), cpu, "processor UID");
                assert_eq!(usize::from(lapic[3]), cpu, "APIC ID");
                assert_eq!(u32_at(lapic, 4), 1, "enabled");
            }

            let ioapics: Vec<&[u8]> = entries.iter().filter(|(t, _)| *t == 1).map(|(_, e)| *e).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0].len(), 12);
            assert_eq!(u32_at(ioapics[0], 4), 0xFEC0_0000);
            assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

            let wakeups: Vec<&[u8]> = entries.iter().filter(|(t, _)| *t == 0x10).map(|(_, e)| *e).collect();
            assert_eq!(wakeups.len(), 1);
            let wakeup = wakeups[0];
            assert_eq!(wakeup.len(), 16);
            assert_eq!(u16_at(wakeup, 2), 0, "mailbox version");
            assert_eq!(u32_at(wakeup, 4), 0, "reserved");
            assert_eq!(u64_at(wakeup, 8), MAILBOX);

            assert!(
                entries.iter().all(|(t, _)| [0, 1, 0x10].contains(t)),
                "unexpected MADT entry types: {:?}",
                entries.iter().map(|(t, _)| t).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_at_the_dsdt() {
        let (_, tables, _) = write_and_walk(&platform(1));
        let fadt = tables.get(b"FACP");
        let b = &fadt.bytes;
        assert_eq!(b.len(), 276, "ACPI 6 FADT length");
        assert_eq!(fadt.revision(), 6);
        assert_eq!(b[131], 5, "FADT minor version");
        let flags = u32_at(b, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u32_at(b, 40), 0, "32-bit DSDT pointer unused");
        assert_eq!(u64_at(b, 140), tables.dsdt.addr);
        assert_eq!(tables.dsdt.signature(), b"DSDT");

        let boot_arch = u16_at(b, 109);
        assert_ne!(boot_arch & (1 << 1), 0, "8042 present");
        assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
        assert_eq!(boot_arch & (1 << 3), 0, "MSI must stay allowed");

        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG: SystemIO, 8 bits, byte access.
        for (off, port) in [(244, 0x600u64), (256, 0x601)] {
            assert_eq!(&b[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(b, off + 4), port);
        }
        // No PM1 blocks or PM timer.
        assert_eq!(u32_at(b, 56), 0);
        assert_eq!(u32_at(b, 64), 0);
        assert_eq!(u32_at(b, 76), 0);
        assert_eq!(&b[268..276], b"VEIL    ", "hypervisor vendor identity");
    }

    #[test]
    fn dsdt_has_s5_and_describes_the_devices() {
        let cfg = platform(4);
        let (_, tables, _) = write_and_walk(&cfg);
        let dsdt = &tables.dsdt;
        assert!(dsdt.bytes.windows(4).any(|w| w == b"_S5_"));
        assert_eq!(dsdt.revision(), 2);

        let (names, devices) = parse_dsdt(dsdt);
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].0, "_S5_");
        let Value::Package(s5) = &names[0].1 else {
            panic!("_S5_ is not a package")
        };
        assert_eq!(s5[0], Value::Int(5), "SLP_TYPa");

        let cpus: Vec<&AmlDevice> = devices
            .iter()
            .filter(|d| d.get("_HID") == &Value::Str("ACPI0007".into()))
            .collect();
        assert_eq!(cpus.len(), 4);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu.int("_UID"), i as u64, "{}", cpu.name);
        }

        let com1 = find(&devices, "COM1");
        assert_eq!(com1.int("_HID"), eisa_id("PNP0501"));
        let crs = com1.resources();
        assert_eq!(crs.len(), 2);
        assert_eq!(crs[0].0, 0x47, "I/O port descriptor");
        assert_eq!(u16_at(&crs[0].1, 1), 0x3F8, "min");
        assert_eq!(u16_at(&crs[0].1, 3), 0x3F8, "max");
        assert_eq!(crs[0].1[6], 8, "length");
        assert_eq!(crs[1].0, 0x89, "extended interrupt descriptor");
        assert_eq!(crs[1].1[0] & 0b110, 0b010, "edge, active-high");
        assert_eq!(u32_at(&crs[1].1, 2), 4);

        for (i, dev) in cfg.virtio_mmio.iter().enumerate() {
            let v = find(&devices, &format!("V{i:03X}"));
            assert_eq!(v.get("_HID"), &Value::Str("LNRO0005".into()));
            assert_eq!(v.int("_UID"), i as u64);
            let crs = v.resources();
            assert_eq!(crs[0].0, 0x86, "32-bit fixed memory descriptor");
            assert_eq!(u64::from(u32_at(&crs[0].1, 1)), dev.base);
            assert_eq!(u64::from(u32_at(&crs[0].1, 5)), dev.size);
            assert_eq!(crs[1].0, 0x89);
            assert_eq!(u32_at(&crs[1].1, 2), dev.irq);
        }
        assert!(devices.iter().all(|d| d.name != "PCI0"));
    }

    #[test]
    fn pci_gets_an_mcfg_entry_and_a_host_bridge() {
        let cfg = with_pci(platform(1));
        let (_, tables, _) = write_and_walk(&cfg);
        let mcfg = tables.get(b"MCFG");
        assert_eq!(mcfg.bytes.len(), 44 + 16);
        let entry = &mcfg.bytes[44..];
        assert_eq!(u64_at(entry, 0), ECAM_BASE);
        assert_eq!(u16_at(entry, 8), 0, "segment");
        assert_eq!((entry[10], entry[11]), (0, 255), "bus range");

        let (_, devices) = parse_dsdt(&tables.dsdt);
        let pci = find(&devices, "PCI0");
        assert_eq!(pci.int("_HID"), eisa_id("PNP0A08"));
        assert_eq!(pci.int("_CID"), eisa_id("PNP0A03"));
        assert_eq!(pci.int("_SEG"), 0);
        assert_eq!(pci.int("_BBN"), 0);
        let crs = pci.resources();
        // Word bus number, DWord memory, Word I/O; all produced by the bridge.
        assert_eq!(crs.len(), 3);
        assert_eq!((crs[0].0, crs[0].1[0]), (0x88, 2), "bus numbers");
        assert_eq!((u16_at(&crs[0].1, 5), u16_at(&crs[0].1, 7)), (0, 255));
        assert_eq!((crs[1].0, crs[1].1[0]), (0x87, 0), "memory");
        assert_eq!(u32_at(&crs[1].1, 7), 0xC000_0000, "min");
        assert_eq!(u32_at(&crs[1].1, 11), 0xCFFF_FFFF, "max");
        assert_eq!(u32_at(&crs[1].1, 19), 0x1000_0000, "length");
        assert_eq!((crs[2].0, crs[2].1[0]), (0x88, 1), "I/O");
        assert_eq!((u16_at(&crs[2].1, 5), u16_at(&crs[2].1, 7)), (0x1000, 0xFFFF));
        for (_, desc) in &crs {
            assert_eq!(desc[1] & 1, 0, "bridge windows are producers");
        }

        let mbrd = find(&devices, "MBRD");
        assert_eq!(mbrd.int("_HID"), eisa_id("PNP0C02"));
        let crs = mbrd.resources();
        assert_eq!(crs[0].0, 0x86);
        assert_eq!(u64::from(u32_at(&crs[0].1, 1)), ECAM_BASE);
        assert_eq!(u32_at(&crs[0].1, 5), 256 << 20);
    }

    #[test]
    fn ecam_reservation_covers_only_the_configured_buses() {
        let mut cfg = with_pci(platform(1));
        let pci = cfg.pci_ecam.as_mut().unwrap();
        pci.bus_start = 1;
        pci.bus_end = 4;
        pci.io = None;
        let (_, tables, _) = write_and_walk(&cfg);
        let (_, devices) = parse_dsdt(&tables.dsdt);
        let crs = find(&devices, "MBRD").resources();
        assert_eq!(u64::from(u32_at(&crs[0].1, 1)), ECAM_BASE + (1 << 20));
        assert_eq!(u32_at(&crs[0].1, 5), 4 << 20);
        let pci = find(&devices, "PCI0");
        assert_eq!(pci.int("_BBN"), 1);
        assert_eq!(pci.resources().len(), 2, "no I/O window");
    }

    #[test]
    fn virtio_mmio_above_4gib_uses_a_qword_descriptor() {
        let mut cfg = platform(1);
        cfg.virtio_mmio = vec![VirtioMmioDevice {
            base: 0x1_0000_0000,
            size: 0x200,
            irq: 7,
        }];
        let (_, tables, _) = write_and_walk(&cfg);
        let (_, devices) = parse_dsdt(&tables.dsdt);
        let crs = find(&devices, "V000").resources();
        assert_eq!(crs[0].0, 0x8A);
        assert_eq!(u64_at(&crs[0].1, 11), 0x1_0000_0000, "min");
        assert_eq!(u64_at(&crs[0].1, 35), 0x200, "length");
    }

    #[test]
    fn no_devices_still_gives_a_valid_dsdt() {
        let mut cfg = platform(1);
        cfg.serial = None;
        cfg.virtio_mmio.clear();
        let (_, tables, _) = write_and_walk(&cfg);
        let (names, devices) = parse_dsdt(&tables.dsdt);
        assert_eq!(names[0].0, "_S5_");
        assert_eq!(devices.len(), 1, "only the CPU");
    }

    #[test]
    fn the_limit_is_exclusive_and_enforced_without_writing() {
        let cfg = with_pci(platform(8));
        let (_, _, end) = write_and_walk(&cfg);

        // Exactly enough room.
        let mem = memory(LIMIT as usize);
        let got = write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(end), &cfg);
        assert_eq!(got.unwrap().0, end);

        // One byte short, or far too little: an error, and memory untouched.
        for limit in [end - 1, RSDP_ADDR + 64, RSDP_ADDR] {
            let mem = memory(LIMIT as usize);
            let err = write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(limit), &cfg).unwrap_err();
            match err {
                AcpiError::NoSpace { end: need, .. } => assert_eq!(need, end),
                e => panic!("unexpected error {e}"),
            }
            assert!(read(&mem, RSDP_ADDR, 0x1000).iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn many_cpus_and_devices_overflow_a_small_area() {
        let mut cfg = platform(MAX_CPUS);
        cfg.virtio_mmio = (0..0x800)
            .map(|i| VirtioMmioDevice {
                base: 0xD000_0000 + i * 0x200,
                size: 0x200,
                irq: 5,
            })
            .collect();
        let mem = memory(LIMIT as usize);
        let err = write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), &cfg);
        assert!(matches!(err, Err(AcpiError::NoSpace { .. })), "{err:?}");
    }

    #[test]
    fn an_area_outside_guest_memory_is_an_error() {
        let mem = memory(0xE_0100);
        let err = write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), &platform(1));
        assert!(matches!(err, Err(AcpiError::NotInGuestMemory { .. })), "{err:?}");
        let err = write_acpi_tables(&mem, GuestAddress(u64::MAX - 15), GuestAddress(u64::MAX), &platform(1));
        assert!(matches!(err, Err(AcpiError::NoSpace { .. })), "{err:?}");
    }

    #[test]
    fn viot_with_a_pci_iommu_decodes_to_its_configuration() {
        let cfg = with_pci_iommu(platform(2));
        let (_, tables, _) = write_and_walk(&cfg);
        let viot = tables.get(b"VIOT");
        let b = &viot.bytes;
        assert_eq!(&b[10..16], b"VEIL  ", "OEM ID");
        assert_eq!(u16_at(b, 36), 4, "node count: IOMMU, 2 PCI ranges, 1 MMIO endpoint");
        assert_eq!(u16_at(b, 38), 48, "node offset");
        assert_eq!(b.len(), 48 + 16 + 3 * 24);

        let nodes = viot_nodes(viot);
        let offsets: Vec<usize> = nodes.iter().map(|(off, _)| *off).collect();
        assert_eq!(offsets, [48, 64, 88, 112]);
        assert_eq!(
            nodes[0].1,
            ViotNode::VirtioPciIommu {
                segment: 0,
                bdf: 0x0008
            }
        );
        assert_eq!(viot_config(&nodes), *cfg.viot.as_ref().unwrap());
    }

    #[test]
    fn viot_with_an_mmio_iommu_decodes_to_its_configuration() {
        let cfg = with_mmio_iommu(platform(2));
        let (_, tables, _) = write_and_walk(&cfg);
        let nodes = viot_nodes(tables.get(b"VIOT"));
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0], (48, ViotNode::VirtioMmioIommu { base: 0xD000_0000 }));
        assert_eq!(viot_config(&nodes), *cfg.viot.as_ref().unwrap());
    }

    #[test]
    fn a_pci_range_and_an_mmio_endpoint_both_lead_to_the_iommu() {
        for cfg in [with_pci_iommu(platform(1)), with_mmio_iommu(platform(1))] {
            let (_, tables, _) = write_and_walk(&cfg);
            let nodes = viot_nodes(tables.get(b"VIOT"));
            let iommu = nodes[0].1;
            let pci_output = nodes.iter().find_map(|(_, n)| match n {
                ViotNode::PciRange { output_node, .. } => Some(*output_node),
                _ => None,
            });
            let mmio_output = nodes.iter().find_map(|(_, n)| match n {
                ViotNode::MmioEndpoint { output_node, .. } => Some(*output_node),
                _ => None,
            });
            assert_eq!(pci_output, Some(48));
            assert_eq!(mmio_output, Some(48));
            assert_eq!(nodes[0].0, 48, "the IOMMU node comes first");

            let viot = cfg.viot.as_ref().unwrap();
            // Linux's endpoint IDs agree with the configuration's and with
            // ViotPciRange::endpoint_id, for every BDF of bus 0.
            for bdf in 0..=0x00FFu16 {
                let expected = viot.pci_ranges.iter().find_map(|r| r.endpoint_id(0, bdf));
                let linux = linux_pci_endpoint(&nodes, 0, bdf);
                assert_eq!(linux.map(|(id, _)| id), expected, "BDF {bdf:#06x}");
                if let Some((_, node)) = linux {
                    assert_eq!(node, iommu);
                }
            }
            assert_eq!(linux_pci_endpoint(&nodes, 1, 0x0010), None, "another segment");
            let ep = viot.mmio_endpoints[0];
            assert_eq!(linux_mmio_endpoint(&nodes, ep.base), Some((ep.endpoint, iommu)));
            assert_eq!(
                linux_mmio_endpoint(&nodes, ep.base + 0x100),
                None,
                "only the exact base"
            );
        }
        let nodes = {
            let (_, tables, _) = write_and_walk(&with_pci_iommu(platform(1)));
            viot_nodes(tables.get(b"VIOT"))
        };
        // 00:02.3 is the 4th BDF of the range starting at ID 0x100.
        assert_eq!(linux_pci_endpoint(&nodes, 0, 0x0013).unwrap().0, 0x103);
        assert_eq!(linux_pci_endpoint(&nodes, 0, 0x00FF).unwrap().0, 0xFF);
        assert_eq!(
            linux_pci_endpoint(&nodes, 0, 0x0008),
            None,
            "the IOMMU itself is in no range"
        );
    }

    #[test]
    fn endpoint_id_follows_the_linux_convention() {
        let range = ViotPciRange {
            segment: 2,
            bdf_start: 0x0108,
            bdf_end: 0x0117,
            endpoint_start: 40,
        };
        assert_eq!(range.endpoint_id(2, 0x0108), Some(40));
        assert_eq!(range.endpoint_id(2, 0x0117), Some(40 + 0xF));
        assert_eq!(range.endpoint_id(2, 0x0107), None);
        assert_eq!(range.endpoint_id(2, 0x0118), None);
        assert_eq!(range.endpoint_id(0, 0x0108), None);
        let top = ViotPciRange {
            endpoint_start: u32::MAX,
            ..range
        };
        assert_eq!(top.endpoint_id(2, 0x0108), Some(u32::MAX));
        assert_eq!(top.endpoint_id(2, 0x0109), None, "overflow");
    }

    #[test]
    fn a_viot_with_no_endpoints_has_only_the_iommu_node() {
        let mut cfg = with_pci(platform(1));
        cfg.viot = Some(Viot {
            iommu: ViotIommu::Pci {
                segment: 0,
                bdf: 0x00F8,
            },
            pci_ranges: vec![],
            mmio_endpoints: vec![],
        });
        let (_, tables, _) = write_and_walk(&cfg);
        let viot = tables.get(b"VIOT");
        assert_eq!(viot.bytes.len(), 64);
        assert_eq!(
            viot_nodes(viot),
            [(
                48,
                ViotNode::VirtioPciIommu {
                    segment: 0,
                    bdf: 0x00F8
                }
            )]
        );
    }

    /// One single-BDF PCI range per endpoint, on buses 0..=255.
    fn many_pci_ranges(count: u32) -> AcpiConfig {
        let mut cfg = with_pci(platform(1));
        cfg.viot = Some(Viot {
            iommu: ViotIommu::Pci { segment: 0, bdf: 0 },
            pci_ranges: (1..=count)
                .map(|bdf| ViotPciRange {
                    segment: 0,
                    bdf_start: bdf as u16,
                    bdf_end: bdf as u16,
                    endpoint_start: bdf,
                })
                .collect(),
            mmio_endpoints: vec![],
        });
        cfg
    }

    #[test]
    fn the_largest_viot_is_written_and_one_more_node_is_an_error() {
        // 65535 nodes: about 1.5 MiB, so give the tables room.
        let limit = 0x40_0000;
        let mem = memory(limit as usize);
        let cfg = many_pci_ranges(VIOT_MAX_NODES as u32 - 1);
        write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(limit), &cfg).unwrap();
        let tables = Tables::walk(&mem, RSDP_ADDR);
        let viot = tables.get(b"VIOT");
        assert_eq!(sum(&viot.bytes), 0);
        let nodes = viot_nodes(viot);
        assert_eq!(nodes.len(), VIOT_MAX_NODES);
        assert_eq!(viot_config(&nodes), *cfg.viot.as_ref().unwrap());

        let cfg = many_pci_ranges(VIOT_MAX_NODES as u32);
        let err = write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(limit), &cfg).unwrap_err();
        assert!(
            matches!(&err, AcpiError::Config(msg) if msg.contains("node count")),
            "{err}"
        );

        // In veil's 128 KiB ACPI area, the largest VIOT is only a lack of space.
        let cfg = many_pci_ranges(VIOT_MAX_NODES as u32 - 1);
        let err = write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), &cfg).unwrap_err();
        assert!(matches!(err, AcpiError::NoSpace { .. }), "{err}");
    }

    #[test]
    fn invalid_viot_configurations_are_rejected_with_a_reason() {
        let mem = memory(LIMIT as usize);
        let check = |cfg: &AcpiConfig, why: &str| {
            match write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), cfg) {
                Err(AcpiError::Config(msg)) => {
                    assert!(msg.starts_with("VIOT: "), "{msg}");
                    assert!(msg.contains(why), "expected {why:?} in {msg:?}");
                }
                other => panic!("expected a VIOT error about {why:?}, got {other:?}"),
            }
            assert!(read(&mem, RSDP_ADDR, 0x1000).iter().all(|&b| b == 0), "memory written");
        };
        type Break = fn(&mut AcpiConfig, &mut Viot);
        let cases: [(Break, &str); 15] = [
            (|_, v| v.pci_ranges[0].bdf_start = 0x0018, "is above bdf_end"),
            (|c, _| c.pci_ecam = None, "there is no PCI"),
            (
                |_, v| v.iommu = ViotIommu::Pci { segment: 1, bdf: 8 },
                "the only segment is 0",
            ),
            (|_, v| v.pci_ranges[1].segment = 3, "the only segment is 0"),
            (
                |c, _| c.pci_ecam.as_mut().unwrap().bus_start = 1,
                "outside the host bridge's buses 1..=255",
            ),
            (
                |c, v| {
                    c.pci_ecam.as_mut().unwrap().bus_end = 0;
                    v.pci_ranges[1].bdf_end = 0x0100;
                },
                "reaches past the host bridge's buses",
            ),
            (|_, v| v.pci_ranges[1].bdf_start = 0x0017, "overlap"),
            (|_, v| v.pci_ranges[0].endpoint_start = u32::MAX - 6, "overflow 32 bits"),
            (|_, v| v.pci_ranges[0].endpoint_start = 0xF8, "share endpoint ID 0xf8"),
            (|_, v| v.mmio_endpoints[0].endpoint = 0x107, "share endpoint ID 0x107"),
            (
                |_, v| v.mmio_endpoints[0].base = 0xD000_2000,
                "not the base of a virtio-mmio device",
            ),
            (
                |_, v| v.iommu = ViotIommu::Mmio { base: 0xD000_0800 },
                "not the base of a virtio-mmio device",
            ),
            (
                |_, v| v.iommu = ViotIommu::Mmio { base: 0xD000_1000 },
                "is the virtio-iommu itself",
            ),
            (
                |_, v| {
                    v.mmio_endpoints.push(ViotMmioEndpoint {
                        base: 0xD000_1000,
                        endpoint: 5,
                    })
                },
                "are the same device",
            ),
            (
                |_, v| {
                    v.mmio_endpoints = vec![
                        ViotMmioEndpoint {
                            base: 0xD000_1000,
                            endpoint: 0,
                        };
                        VIOT_MAX_NODES - 2
                    ]
                },
                "the node count is 16 bits",
            ),
        ];
        for (break_it, why) in cases {
            let mut cfg = with_pci_iommu(platform(1));
            let mut viot = cfg.viot.take().unwrap();
            break_it(&mut cfg, &mut viot);
            cfg.viot = Some(viot);
            check(&cfg, why);
        }
        // The same configuration, unbroken, is fine.
        let cfg = with_pci_iommu(platform(1));
        assert!(write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), &cfg).is_ok());
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        let mem = memory(LIMIT as usize);
        let write = |cfg: &AcpiConfig| write_acpi_tables(&mem, GuestAddress(RSDP_ADDR), GuestAddress(LIMIT), cfg);
        assert!(matches!(write(&platform(0)), Err(AcpiError::CpuCount(0))));
        assert!(matches!(write(&platform(MAX_CPUS + 1)), Err(AcpiError::CpuCount(256))));
        assert!(write(&platform(MAX_CPUS)).is_ok());

        let mut cfg = platform(1);
        cfg.wakeup_mailbox = MAILBOX + 8;
        assert!(matches!(write(&cfg), Err(AcpiError::Config(_))));

        let mut cfg = platform(1);
        cfg.ioapic_addr = 1 << 32;
        assert!(matches!(write(&cfg), Err(AcpiError::Config(_))));

        let mut cfg = platform(1);
        cfg.virtio_mmio[0].size = 0;
        assert!(matches!(write(&cfg), Err(AcpiError::Config(_))));

        let bad_pci: [fn(&mut PciEcam); 4] = [
            |p| (p.bus_start, p.bus_end) = (5, 4),
            |p| p.mmio32 = (0xF000_0000, 0x2000_0000),
            |p| p.io = Some((0xF000, 0x2000)),
            |p| p.base = u64::MAX - 0xFFFF,
        ];
        for break_it in bad_pci {
            let mut cfg = with_pci(platform(1));
            break_it(cfg.pci_ecam.as_mut().unwrap());
            assert!(matches!(write(&cfg), Err(AcpiError::Config(_))));
        }

        let fresh = memory(LIMIT as usize);
        let err = write_acpi_tables(&fresh, GuestAddress(RSDP_ADDR + 8), GuestAddress(LIMIT), &platform(1));
        assert!(matches!(err, Err(AcpiError::RsdpAlignment(_))));
        assert!(read(&fresh, RSDP_ADDR, 0x100).iter().all(|&b| b == 0));
    }
}
