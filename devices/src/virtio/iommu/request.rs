//! The bytes of virtio-iommu requests, PROBE properties and fault reports
//! (virtio 1.2 §5.13.6), all little-endian.

use super::{MSI_END, MSI_START};
use crate::dma::{Fault, FaultReason};
use vm_memory::Permissions;

pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;

/// `struct virtio_iommu_req_tail`.
pub const TAIL_LEN: usize = 4;

/// Probe property types and RESV_MEM subtypes.
pub const PROBE_T_NONE: u16 = 0;
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_RESERVED: u8 = 0;
pub const RESV_MEM_T_MSI: u8 = 1;
/// `struct virtio_iommu_probe_resv_mem` after its 4-byte header.
const RESV_MEM_LEN: u16 = 20;

/// `struct virtio_iommu_fault`.
pub const FAULT_LEN: usize = 24;
pub const FAULT_R_UNKNOWN: u8 = 0;
pub const FAULT_R_DOMAIN: u8 = 1;
pub const FAULT_R_MAPPING: u8 = 2;
pub const FAULT_F_READ: u32 = 1 << 0;
pub const FAULT_F_WRITE: u32 = 1 << 1;
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// One request, as the driver wrote its device-readable part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved: u32,
    },
    Detach {
        domain: u32,
        endpoint: u32,
    },
    Map {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    },
    Probe {
        endpoint: u32,
    },
}

/// Why a request could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// A type this device does not know.
    UnknownType(u8),
    /// Shorter than its type's structure.
    Short(u8),
}

/// Length of the device-readable part of each request type: the head and
/// the request's fields, up to the tail.
pub fn readable_len(kind: u8) -> Option<usize> {
    match kind {
        T_ATTACH => Some(4 + 16),
        T_DETACH => Some(4 + 16),
        T_MAP => Some(4 + 32),
        T_UNMAP => Some(4 + 24),
        T_PROBE => Some(4 + 4 + 64),
        _ => None,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads a request from its device-readable bytes; bytes past its
/// structure are ignored. The head's reserved bytes are ignored (§5.13.6.2).
pub fn parse(b: &[u8]) -> Result<Request, ParseError> {
    let Some(&kind) = b.first() else {
        return Err(ParseError::Short(0));
    };
    let need = readable_len(kind).ok_or(ParseError::UnknownType(kind))?;
    if b.len() < need {
        return Err(ParseError::Short(kind));
    }
    Ok(match kind {
        T_ATTACH => Request::Attach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
            flags: le32(b, 12),
            reserved: le32(b, 16),
        },
        T_DETACH => Request::Detach {
            domain: le32(b, 4),
            endpoint: le32(b, 8),
        },
        T_MAP => Request::Map {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
            phys_start: le64(b, 24),
            flags: le32(b, 32),
        },
        T_UNMAP => Request::Unmap {
            domain: le32(b, 4),
            virt_start: le64(b, 8),
            virt_end: le64(b, 16),
        },
        _ => Request::Probe { endpoint: le32(b, 4) },
    })
}

/// Writes the property list of any endpoint into `out` (already zeroed,
/// `probe_size` bytes): the x86 MSI doorbell window as a RESV_MEM MSI
/// region, then the end of the list (type NONE, all zero).
pub fn write_properties(out: &mut [u8]) {
    let mut p = [0u8; 4 + RESV_MEM_LEN as usize];
    p[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    p[2..4].copy_from_slice(&RESV_MEM_LEN.to_le_bytes());
    p[4] = RESV_MEM_T_MSI;
    p[8..16].copy_from_slice(&MSI_START.to_le_bytes());
    p[16..24].copy_from_slice(&MSI_END.to_le_bytes());
    let n = p.len().min(out.len());
    out[..n].copy_from_slice(&p[..n]);
    // What follows is already zero: a NONE property ends the list.
}

/// `struct virtio_iommu_fault` for `f`.
pub fn encode_fault(f: &Fault) -> [u8; FAULT_LEN] {
    let reason = match f.reason {
        FaultReason::Domain => FAULT_R_DOMAIN,
        FaultReason::Unmapped | FaultReason::Permission => FAULT_R_MAPPING,
    };
    let access = match f.access {
        Permissions::No => 0,
        Permissions::Read => FAULT_F_READ,
        Permissions::Write => FAULT_F_WRITE,
        Permissions::ReadWrite => FAULT_F_READ | FAULT_F_WRITE,
    };
    let mut b = [0u8; FAULT_LEN];
    b[0] = reason;
    b[4..8].copy_from_slice(&(access | FAULT_F_ADDRESS).to_le_bytes());
    b[8..12].copy_from_slice(&f.endpoint.to_le_bytes());
    b[16..24].copy_from_slice(&f.iova.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_field_by_field() {
        let mut b = vec![T_MAP, 9, 9, 9];
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&0x1fffu64.to_le_bytes());
        b.extend_from_slice(&0xa000u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            parse(&b),
            Ok(Request::Map {
                domain: 7,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0xa000,
                flags: 3
            })
        );
        assert_eq!(parse(&b[..35]), Err(ParseError::Short(T_MAP)));
        let mut attach = vec![T_ATTACH, 0, 0, 0];
        for v in [1u32, 2, 3, 4] {
            attach.extend_from_slice(&v.to_le_bytes());
        }
        attach.extend_from_slice(&[0xff; 8]);
        assert_eq!(
            parse(&attach),
            Ok(Request::Attach {
                domain: 1,
                endpoint: 2,
                flags: 3,
                reserved: 4
            })
        );
        assert_eq!(parse(&[T_PROBE, 0, 0, 0, 5, 0, 0, 0]), Err(ParseError::Short(T_PROBE)));
        let mut probe = vec![0u8; 72];
        probe[0] = T_PROBE;
        probe[4] = 5;
        assert_eq!(parse(&probe), Ok(Request::Probe { endpoint: 5 }));
        assert_eq!(parse(&[6, 0, 0, 0]), Err(ParseError::UnknownType(6)));
        assert_eq!(parse(&[0, 0, 0, 0]), Err(ParseError::UnknownType(0)));
        assert_eq!(parse(&[]), Err(ParseError::Short(0)));
    }

    #[test]
    fn probe_properties_bytes() {
        let mut out = vec![0u8; 64];
        write_properties(&mut out);
        let expect: [u8; 24] = [
            1, 0, 20, 0, // RESV_MEM, 20 bytes
            1, 0, 0, 0, // subtype MSI
            0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0, // start
            0xff, 0xff, 0xef, 0xfe, 0, 0, 0, 0, // end
        ];
        assert_eq!(&out[..24], &expect);
        assert!(out[24..].iter().all(|&b| b == 0), "then NONE");
    }

    #[test]
    fn fault_bytes() {
        let f = Fault {
            endpoint: 0x0108,
            iova: 0x1234_5000,
            reason: FaultReason::Permission,
            access: Permissions::Write,
        };
        let b = encode_fault(&f);
        assert_eq!(b[0], FAULT_R_MAPPING);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(&b[4..8], &(0x102u32).to_le_bytes());
        assert_eq!(&b[8..12], &(0x108u32).to_le_bytes());
        assert_eq!(&b[12..16], &[0; 4]);
        assert_eq!(&b[16..24], &0x1234_5000u64.to_le_bytes());
        let d = encode_fault(&Fault {
            reason: FaultReason::Domain,
            access: Permissions::Read,
            ..f
        });
        assert_eq!((d[0], d[4]), (FAULT_R_DOMAIN, 1));
    }
}
