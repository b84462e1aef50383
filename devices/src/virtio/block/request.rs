//! From a descriptor chain to a block request (virtio 1.2 §2.7.5, §5.2.6).
//!
//! The chain is walked here rather than with virtio-queue's iterator, which
//! ends a chain silently at a loop, a bad index or a bad indirect table: the
//! device has to tell those apart from a chain that simply ended.
//!
//! The driver may frame a request any way it likes (§2.6.4): the 16-byte
//! header is the first 16 device-readable bytes, the status is the last
//! device-writable byte, and whatever lies between is data, in as many
//! pieces as the descriptors cut it into.

use crate::dma::DmaMemory;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

pub const SECTOR_SIZE: u64 = 512;
pub const HEADER_LEN: usize = 16;
const DESCRIPTOR_LEN: u64 = 16;

/// Request types (virtio 1.2 §5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            T_IN => RequestType::In,
            T_OUT => RequestType::Out,
            T_FLUSH => RequestType::Flush,
            T_GET_ID => RequestType::GetId,
            T_DISCARD => RequestType::Discard,
            T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A run of guest memory named by a descriptor (or part of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// The driver marked it device-writable.
    pub writable: bool,
}

/// What the device accepts in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most descriptors in a chain, and in an indirect table.
    pub max_descriptors: u16,
    /// Whether VIRTIO_F_RING_INDIRECT_DESC was negotiated.
    pub indirect: bool,
    /// Most data pieces in a request (`seg_max`).
    pub seg_max: usize,
    /// Longest data piece (`size_max`).
    pub size_max: u32,
}

/// Why a chain could not be walked.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {index} is outside a table of {len}")]
    BadIndex { index: u16, len: u16 },
    #[error("chain longer than {0} descriptors (a loop?)")]
    TooLong(u16),
    #[error("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")]
    IndirectNotNegotiated,
    #[error("indirect table inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor that also has NEXT set")]
    IndirectWithNext,
    #[error("indirect table of {0} bytes: empty, not a multiple of 16 or too large")]
    BadIndirectTable(u32),
    #[error("cannot read a descriptor at {0:#x}")]
    Unreadable(u64),
}

/// Follows the chain starting at `head` in the descriptor table at `table`
/// of `queue_size` entries, through at most one indirect table.
pub fn walk_chain(
    mem: &DmaMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    limits: &Limits,
) -> Result<Vec<Buffer>, ChainError> {
    let mut buffers = Vec::new();
    let (mut table, mut table_len, mut index) = (table, queue_size, head);
    let mut in_indirect = false;
    loop {
        if index >= table_len {
            return Err(ChainError::BadIndex { index, len: table_len });
        }
        let at = table
            .0
            .checked_add(u64::from(index) * DESCRIPTOR_LEN)
            .ok_or(ChainError::Unreadable(table.0))?;
        let desc: Descriptor = mem.read_obj(GuestAddress(at)).map_err(|_| ChainError::Unreadable(at))?;
        if desc.refers_to_indirect_table() {
            if !limits.indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if desc.has_next() {
                return Err(ChainError::IndirectWithNext);
            }
            let len = desc.len();
            let entries = u64::from(len) / DESCRIPTOR_LEN;
            if len == 0 || !u64::from(len).is_multiple_of(DESCRIPTOR_LEN) || entries > u64::from(limits.max_descriptors)
            {
                return Err(ChainError::BadIndirectTable(len));
            }
            (table, table_len, index) = (desc.addr(), entries as u16, 0);
            in_indirect = true;
            continue;
        }
        if buffers.len() == usize::from(limits.max_descriptors) {
            return Err(ChainError::TooLong(limits.max_descriptors));
        }
        buffers.push(Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(buffers);
        }
        index = desc.next();
    }
}

/// A request, framed and checked against the device's limits, not yet
/// against the disk.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// The data between header and status, in order, without empty pieces.
    pub data: Vec<Buffer>,
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain does not make a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// There is no status byte to answer in: the chain goes back unanswered.
    Malformed(String),
    /// The chain's descriptors cannot be used; the status byte can.
    BadDescriptors { status: GuestAddress, why: String },
    /// The request breaks a limit of the device; the status byte is usable.
    BadRequest { status: GuestAddress, why: String },
    /// The DMA view refused a data buffer (vIOMMU fault, private page).
    Denied { status: GuestAddress, why: String },
}

/// Whether the device may reach all of `b`, and if not, why.
fn reach(mem: &DmaMemory, b: &Buffer) -> Result<(), vm_memory::GuestMemoryError> {
    for slice in mem.get_slices(b.addr, b.len as usize, access(b))? {
        slice?;
    }
    Ok(())
}

fn piece(b: &Buffer, skip: u32, drop_tail: u32) -> Option<Buffer> {
    let len = b.len.checked_sub(skip)?.checked_sub(drop_tail)?;
    let addr = b.addr.0.checked_add(u64::from(skip))?;
    Some(Buffer {
        addr: GuestAddress(addr),
        len,
        writable: b.writable,
    })
}

fn access(b: &Buffer) -> Permissions {
    if b.writable {
        Permissions::Write
    } else {
        Permissions::Read
    }
}

impl Request {
    /// Walks the chain at `head` and frames the request in it.
    pub fn parse(
        mem: &DmaMemory,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
        limits: &Limits,
    ) -> Result<Request, Rejection> {
        let buffers =
            walk_chain(mem, table, queue_size, head, limits).map_err(|e| Rejection::Malformed(e.to_string()))?;
        Self::frame(mem, &buffers, limits)
    }

    /// Frames a request in a chain's buffers.
    pub fn frame(mem: &DmaMemory, buffers: &[Buffer], limits: &Limits) -> Result<Request, Rejection> {
        let malformed = |why: &str| Rejection::Malformed(why.to_string());
        let last = match buffers.last() {
            Some(b) if b.writable && b.len > 0 => b,
            _ => return Err(malformed("no device-writable status byte at the end")),
        };
        let status = last
            .addr
            .0
            .checked_add(u64::from(last.len) - 1)
            .map(GuestAddress)
            .filter(|&a| mem.check_range(a, 1, Permissions::Write))
            .ok_or_else(|| malformed("status byte outside guest memory"))?;
        let bad_descriptors = |why: &str| Rejection::BadDescriptors {
            status,
            why: why.to_string(),
        };
        let bad_request = |why: String| Rejection::BadRequest { status, why };

        let readable = buffers.iter().take_while(|b| !b.writable).count();
        let (out, inp) = buffers.split_at(readable);
        let out_len: u64 = out.iter().map(|b| u64::from(b.len)).sum();
        if out_len < HEADER_LEN as u64 {
            return Err(malformed("header shorter than 16 bytes"));
        }
        if inp.iter().any(|b| !b.writable) {
            return Err(bad_descriptors(
                "device-readable descriptor after a device-writable one",
            ));
        }

        // The header, and the readable data after it.
        let mut header = [0u8; HEADER_LEN];
        let mut filled = 0;
        let mut data = Vec::new();
        for b in out {
            let take = (HEADER_LEN - filled).min(b.len as usize);
            if take > 0 {
                mem.read_slice(&mut header[filled..filled + take], b.addr)
                    .map_err(|_| bad_descriptors("header outside guest memory"))?;
                filled += take;
            }
            data.extend(piece(b, take as u32, 0).filter(|p| p.len > 0));
        }
        // The writable data before the status byte.
        for (i, b) in inp.iter().enumerate() {
            let tail = u32::from(i + 1 == inp.len());
            data.extend(piece(b, 0, tail).filter(|p| p.len > 0));
        }

        let kind = RequestType::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        if data.len() > limits.seg_max {
            return Err(bad_request(format!(
                "{} data segments, more than seg_max {}",
                data.len(),
                limits.seg_max
            )));
        }
        if let Some(b) = data.iter().find(|b| b.len > limits.size_max) {
            return Err(bad_request(format!(
                "data segment of {} bytes, more than size_max {}",
                b.len, limits.size_max
            )));
        }
        let data_len = data
            .iter()
            .try_fold(0u32, |sum, b| sum.checked_add(b.len))
            .ok_or_else(|| bad_request("data longer than 4 GiB".to_string()))?;
        for b in &data {
            match reach(mem, b) {
                Ok(()) => {}
                Err(e) if crate::dma::refused_by_view(&e) => {
                    return Err(Rejection::Denied {
                        status,
                        why: format!("data buffer at {:#x}: {e}", b.addr.0),
                    })
                }
                Err(_) => return Err(bad_descriptors("data buffer outside guest memory")),
            }
        }
        Ok(Request {
            kind,
            sector,
            data,
            data_len,
            status,
        })
    }
}
