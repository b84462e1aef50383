//! The bytes of virtio-iommu requests, PROBE properties and fault reports
//! (virtio 1.2 §5.13.6), little-endian. Each request is its device-readable
//! part (head and fields); the device-writable part is a 4-byte tail (status
//! first), after `probe_size` bytes of properties for PROBE.

const T_ATTACH: u8 = 1;
const T_DETACH: u8 = 2;
const T_MAP: u8 = 3;
const T_UNMAP: u8 = 4;
const T_PROBE: u8 = 5;

pub const TAIL_LEN: usize = 4;
pub const FAULT_LEN: usize = 24;

/// Statuses (§5.13.6.1).
pub const S_OK: u8 = 0;

/// Short name of a status byte, for output.
pub fn status_name(s: u8) -> &'static str {
    match s {
        0 => "ok",
        1 => "ioerr",
        2 => "unsupp",
        3 => "deverr",
        4 => "inval",
        5 => "range",
        6 => "noent",
        7 => "fault",
        8 => "nomem",
        _ => "unknown",
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// ATTACH: domain, endpoint, flags, 4 reserved bytes.
pub fn attach(domain: u32, endpoint: u32, flags: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0] = T_ATTACH;
    put32(&mut b, 4, domain);
    put32(&mut b, 8, endpoint);
    put32(&mut b, 12, flags);
    b
}

/// DETACH: domain, endpoint, 8 reserved bytes.
pub fn detach(domain: u32, endpoint: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0] = T_DETACH;
    put32(&mut b, 4, domain);
    put32(&mut b, 8, endpoint);
    b
}

/// MAP `virt_start..=virt_end` to `phys_start..`.
pub fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> [u8; 36] {
    let mut b = [0u8; 36];
    b[0] = T_MAP;
    put32(&mut b, 4, domain);
    put64(&mut b, 8, virt_start);
    put64(&mut b, 16, virt_end);
    put64(&mut b, 24, phys_start);
    put32(&mut b, 32, flags);
    b
}

/// UNMAP every mapping inside `virt_start..=virt_end`.
pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0] = T_UNMAP;
    put32(&mut b, 4, domain);
    put64(&mut b, 8, virt_start);
    put64(&mut b, 16, virt_end);
    b
}

/// PROBE: endpoint, 64 reserved bytes.
pub fn probe(endpoint: u32) -> [u8; 72] {
    let mut b = [0u8; 72];
    b[0] = T_PROBE;
    put32(&mut b, 4, endpoint);
    b
}

/// Property types, and RESV_MEM subtypes (§5.13.6.8).
const PROP_NONE: u16 = 0;
const PROP_RESV_MEM: u16 = 1;
pub const RESV_MSI: u8 = 1;

#[derive(Clone, Copy, Default)]
pub struct ResvMem {
    pub subtype: u8,
    pub start: u64,
    pub end: u64,
}

/// The RESV_MEM properties in a PROBE answer, into `out`; returns how many.
/// Each property is a u16 type (low 12 bits), a u16 length of what follows
/// the 4-byte header, then that many bytes; type NONE or the end of the
/// buffer ends the list. Unknown types are skipped.
pub fn resv_mem(props: &[u8], out: &mut [ResvMem]) -> Result<usize, &'static str> {
    let mut at = 0;
    let mut n = 0;
    while at + 4 <= props.len() {
        let kind = get16(props, at) & 0xfff;
        let len = get16(props, at + 2) as usize;
        if kind == PROP_NONE {
            return Ok(n);
        }
        let value = at + 4;
        if value + len > props.len() {
            return Err("property_overruns");
        }
        if kind == PROP_RESV_MEM {
            if len < 20 {
                return Err("resv_mem_short");
            }
            let r = ResvMem {
                subtype: props[value],
                start: get64(props, value + 4),
                end: get64(props, value + 12),
            };
            if r.end < r.start {
                return Err("resv_mem_backwards");
            }
            if let Some(slot) = out.get_mut(n) {
                *slot = r;
                n += 1;
            }
        }
        at = value + len;
    }
    Ok(n)
}

/// Fault reasons and flags (§5.13.6.9).
pub const REASON_DOMAIN: u8 = 1;
pub const REASON_MAPPING: u8 = 2;
pub const FAULT_READ: u32 = 1 << 0;
pub const FAULT_WRITE: u32 = 1 << 1;
pub const FAULT_ADDRESS: u32 = 1 << 8;

/// One fault report from the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub reason: u8,
    pub flags: u32,
    pub endpoint: u32,
    /// Valid when `flags` has FAULT_ADDRESS.
    pub address: u64,
}

pub fn parse_fault(b: &[u8; FAULT_LEN]) -> Fault {
    Fault {
        reason: b[0],
        flags: get32(b, 4),
        endpoint: get32(b, 8),
        address: get64(b, 16),
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        0 => "unknown",
        REASON_DOMAIN => "domain",
        REASON_MAPPING => "mapping",
        _ => "other",
    }
}
