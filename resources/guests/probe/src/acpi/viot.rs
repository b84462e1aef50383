//! The ACPI VIOT table (ACPI 6.5 §5.2.32): where the virtio-iommu is and
//! which endpoint ID each device behind it has. The probe reads it to find
//! endpoint IDs the way a guest OS must, so that a wrong table shows up as
//! a device that cannot be attached or faults, not as a silent match with
//! an assumed numbering.
//!
//! Layout after the 36-byte header: u16 node count, u16 offset of the first
//! node, 8 reserved bytes. Each node starts with u8 type, u8 reserved, u16
//! length; endpoint nodes name their IOMMU by its node's offset in the table.

use crate::bootinfo::peek;

const NODE_PCI_RANGE: u8 = 1;
const NODE_MMIO_ENDPOINT: u8 = 2;
const NODE_VIRTIO_PCI_IOMMU: u8 = 3;
const NODE_VIRTIO_MMIO_IOMMU: u8 = 4;
const ENDPOINT_NODE_LEN: u64 = 24;
const IOMMU_NODE_LEN: u64 = 16;

const MAX_RANGES: usize = 32;
const MAX_MMIO: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ViotIommu {
    Pci { segment: u16, bdf: u16 },
    Mmio { base: u64 },
}

#[derive(Clone, Copy, Default)]
pub struct PciRange {
    pub endpoint_start: u32,
    pub segment_start: u16,
    pub segment_end: u16,
    pub bdf_start: u16,
    pub bdf_end: u16,
}

#[derive(Clone, Copy, Default)]
pub struct MmioEndpoint {
    pub endpoint: u32,
    pub base: u64,
}

pub struct Viot {
    pub iommu: Option<ViotIommu>,
    ranges: [PciRange; MAX_RANGES],
    nranges: usize,
    mmio: [MmioEndpoint; MAX_MMIO],
    nmmio: usize,
    /// The first thing wrong with the table, if any.
    pub error: Option<&'static str>,
}

impl Viot {
    pub fn pci_ranges(&self) -> &[PciRange] {
        &self.ranges[..self.nranges]
    }

    pub fn mmio_endpoints(&self) -> &[MmioEndpoint] {
        &self.mmio[..self.nmmio]
    }

    /// The endpoint ID of PCI function `bdf` on segment 0.
    pub fn pci_endpoint(&self, bdf: u16) -> Option<u32> {
        self.pci_ranges()
            .iter()
            .find(|r| r.segment_start == 0 && (r.bdf_start..=r.bdf_end).contains(&bdf))
            .and_then(|r| r.endpoint_start.checked_add(u32::from(bdf - r.bdf_start)))
    }

    /// The endpoint ID of the virtio-mmio device whose window starts at `base`.
    pub fn mmio_endpoint(&self, base: u64) -> Option<u32> {
        self.mmio_endpoints()
            .iter()
            .find(|m| m.base == base)
            .map(|m| m.endpoint)
    }

    fn fail(&mut self, why: &'static str) {
        self.error.get_or_insert(why);
    }
}

/// Reads the VIOT at `table`, `len` bytes long (already checked to lie in
/// memory, with a valid checksum).
pub fn parse(table: u64, len: u64) -> Viot {
    let mut v = Viot {
        iommu: None,
        ranges: [PciRange::default(); MAX_RANGES],
        nranges: 0,
        mmio: [MmioEndpoint::default(); MAX_MMIO],
        nmmio: 0,
        error: None,
    };
    if len < 48 {
        v.fail("viot_short");
        return v;
    }
    // SAFETY (every peek): the caller checked [table, table + len), and each
    // node is checked against that end before its fields are read.
    let (count, first) = unsafe { (peek::<u16>(table + 36), peek::<u16>(table + 38) as u64) };
    if first < 48 {
        v.fail("viot_node_offset");
        return v;
    }
    let end = table + len;
    let mut at = table + first;
    // Endpoint nodes name their IOMMU by offset; which offset that is is
    // only known once the IOMMU node is found, so check afterwards.
    let mut iommu_offset = None;
    let mut outputs = [0u16; MAX_RANGES + MAX_MMIO];
    let mut noutputs = 0;
    for _ in 0..count {
        if at + 4 > end {
            v.fail("viot_node_outside");
            return v;
        }
        let (kind, nlen) = unsafe { (peek::<u8>(at), peek::<u16>(at + 2) as u64) };
        if nlen < 4 || at + nlen > end {
            v.fail("viot_node_length");
            return v;
        }
        match kind {
            NODE_PCI_RANGE | NODE_MMIO_ENDPOINT if nlen < ENDPOINT_NODE_LEN => v.fail("viot_endpoint_node_short"),
            NODE_VIRTIO_PCI_IOMMU | NODE_VIRTIO_MMIO_IOMMU if nlen < IOMMU_NODE_LEN => v.fail("viot_iommu_node_short"),
            NODE_PCI_RANGE if v.nranges < MAX_RANGES => {
                let r = unsafe {
                    PciRange {
                        endpoint_start: peek(at + 4),
                        segment_start: peek(at + 8),
                        segment_end: peek(at + 10),
                        bdf_start: peek(at + 12),
                        bdf_end: peek(at + 14),
                    }
                };
                if r.bdf_end < r.bdf_start || r.segment_end < r.segment_start {
                    v.fail("viot_pci_range_backwards");
                }
                v.ranges[v.nranges] = r;
                v.nranges += 1;
                outputs[noutputs] = unsafe { peek(at + 16) };
                noutputs += 1;
            }
            NODE_MMIO_ENDPOINT if v.nmmio < MAX_MMIO => {
                v.mmio[v.nmmio] = unsafe {
                    MmioEndpoint {
                        endpoint: peek(at + 4),
                        base: peek(at + 8),
                    }
                };
                v.nmmio += 1;
                outputs[noutputs] = unsafe { peek(at + 16) };
                noutputs += 1;
            }
            NODE_PCI_RANGE | NODE_MMIO_ENDPOINT => v.fail("viot_too_many_endpoints"),
            NODE_VIRTIO_PCI_IOMMU | NODE_VIRTIO_MMIO_IOMMU if v.iommu.is_some() => v.fail("viot_two_iommus"),
            NODE_VIRTIO_PCI_IOMMU => {
                v.iommu = Some(unsafe {
                    ViotIommu::Pci {
                        segment: peek(at + 4),
                        bdf: peek(at + 6),
                    }
                });
                iommu_offset = Some(at - table);
            }
            NODE_VIRTIO_MMIO_IOMMU => {
                v.iommu = Some(ViotIommu::Mmio {
                    base: unsafe { peek(at + 8) },
                });
                iommu_offset = Some(at - table);
            }
            _ => {} // node types this probe does not know: skipped, as ACPI allows
        }
        at += nlen;
    }
    match iommu_offset {
        None => v.fail("viot_no_iommu"),
        Some(off) => {
            if outputs[..noutputs].iter().any(|&o| u64::from(o) != off) {
                v.fail("viot_output_node");
            }
        }
    }
    if has_overlap(&v) {
        v.fail("viot_endpoint_ids_overlap");
    }
    v
}

/// Whether two endpoint nodes give out the same endpoint ID.
fn has_overlap(v: &Viot) -> bool {
    let span = |r: &PciRange| {
        let n = u64::from(r.bdf_end.saturating_sub(r.bdf_start)) + 1;
        (u64::from(r.endpoint_start), u64::from(r.endpoint_start) + n)
    };
    let mut spans = [(0u64, 0u64); MAX_RANGES + MAX_MMIO];
    let mut n = 0;
    for r in v.pci_ranges() {
        spans[n] = span(r);
        n += 1;
    }
    for m in v.mmio_endpoints() {
        spans[n] = (u64::from(m.endpoint), u64::from(m.endpoint) + 1);
        n += 1;
    }
    let spans = &spans[..n];
    spans
        .iter()
        .enumerate()
        .any(|(i, a)| spans[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1))
}
