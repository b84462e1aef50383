//! The request queue of a block device, served on the device's worker
//! thread: take a chain, parse it (`request`), execute it against the
//! backend, complete it in the used ring, interrupt when the driver asks.

use super::backend::DiskBackend;
use super::request::{Buffer, Limits, Rejection, Request, RequestType, SECTOR_SIZE};
use super::{
    DISCARD_MAX_SECTORS, DISCARD_MAX_SEG, F_DISCARD, F_WRITE_ZEROES, ID_LEN, WRITE_ZEROES_MAX_SECTORS,
    WRITE_ZEROES_MAX_SEG,
};
use crate::dma::DmaMemory;
use crate::virtio::{DeviceMetrics, InterruptCause, VirtioInterrupt};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Status values (virtio 1.2 §5.2.6).
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Largest piece of data copied between guest memory and the disk at once.
pub const COPY_CHUNK: usize = 1 << 20;

/// `flags` of a discard / write-zeroes segment.
const SEGMENT_UNMAP: u32 = 1;
const SEGMENT_LEN: usize = 16;

/// The disk as the worker sees it; fixed while the device is active.
pub struct Disk {
    pub backend: Arc<dyn DiskBackend>,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub readonly: bool,
    /// GET_ID answer: the ID string, NUL-padded.
    pub id: [u8; ID_LEN],
}

/// Why a request failed; each kind has its counter.
#[derive(Debug)]
enum Fault {
    /// The driver asked for something invalid (`bad_requests`, IOERR).
    Request(String),
    /// A buffer became unreachable while being used (`bad_descriptors`, IOERR).
    Memory(String),
    /// The DMA view refused the access (vIOMMU fault or private page).
    Denied(String),
    /// The backing storage failed (`io_errors`, IOERR).
    Host(std::io::Error),
    /// The device does not do that (`bad_requests`, UNSUPP).
    Unsupported(String),
}

/// The ring itself cannot be used: the device stops serving the queue.
#[derive(Debug)]
pub struct RingError(pub String);

/// How a chain goes back to the driver.
enum Completion {
    /// Status byte written at `status`, after `written` bytes of data.
    Answer {
        status: GuestAddress,
        value: u8,
        written: u32,
    },
    /// Nowhere to answer: returned with a used length of 0.
    Unanswered,
}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug)]
struct Range {
    sector: u64,
    sectors: u32,
    flags: u32,
}

pub struct QueueWorker {
    name: String,
    disk: Arc<Disk>,
    acked_features: u64,
    limits: Limits,
    index: u16,
    queue: Queue,
    notify: EventFd,
    mem: DmaMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    /// Set when the ring is unusable; the transport reports DEVICE_NEEDS_RESET.
    needs_reset: Arc<AtomicBool>,
    /// Bounce buffer for data, at most `COPY_CHUNK` long.
    scratch: Vec<u8>,
    /// When a host I/O error was last logged.
    last_error_log: Option<std::time::Instant>,
}

/// Host I/O errors are logged at most once per this long.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl QueueWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        disk: Arc<Disk>,
        acked_features: u64,
        limits: Limits,
        index: u16,
        queue: Queue,
        notify: EventFd,
        mem: DmaMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
        needs_reset: Arc<AtomicBool>,
    ) -> Self {
        Self {
            name,
            disk,
            acked_features,
            limits,
            index,
            queue,
            notify,
            mem,
            interrupt,
            metrics,
            needs_reset,
            scratch: Vec::new(),
            last_error_log: None,
        }
    }

    /// Serves the queue after a notification; on a broken ring, stops
    /// serving it and asks the driver for a reset.
    pub fn serve(&mut self) {
        if self.needs_reset.load(Ordering::Acquire) {
            return;
        }
        if let Err(RingError(why)) = self.process_queue() {
            log::warn!(
                "{}: queue {} is broken, device needs reset: {why}",
                self.name,
                self.index
            );
            self.needs_reset.store(true, Ordering::Release);
            DeviceMetrics::inc(&self.metrics.needs_reset);
            self.signal(InterruptCause::Config);
        }
    }

    fn signal(&self, cause: InterruptCause) {
        match self.interrupt.trigger(cause) {
            Ok(()) => DeviceMetrics::inc(&self.metrics.interrupts),
            Err(e) => log::warn!("{}: cannot raise interrupt: {e}", self.name),
        }
    }

    /// Completes every available chain, interrupting as the driver asks,
    /// until the ring stays empty with notifications enabled. Returns the
    /// number of chains returned to the used ring.
    pub fn process_queue(&mut self) -> Result<usize, RingError> {
        let ring = |what: &str, e: virtio_queue::Error| RingError(format!("{what}: {e}"));
        let mut total = 0;
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(|e| ring("cannot disable notifications", e))?;
            let done = self.drain()?;
            total += done;
            if done > 0
                && self
                    .queue
                    .needs_notification(&self.mem)
                    .map_err(|e| ring("cannot read used_event", e))?
            {
                self.signal(InterruptCause::Queue(self.index));
            }
            // With notifications back on, look again: the driver may have
            // added chains before it could see them on.
            if !self
                .queue
                .enable_notification(&self.mem)
                .map_err(|e| ring("cannot enable notifications", e))?
            {
                return Ok(total);
            }
        }
    }

    /// Handles the chains available now.
    fn drain(&mut self) -> Result<usize, RingError> {
        let mut done = 0;
        loop {
            let avail = self
                .queue
                .avail_idx(&self.mem, Ordering::Acquire)
                .map_err(|e| RingError(format!("cannot read the available index: {e}")))?;
            let next = Wrapping(self.queue.next_avail());
            if avail == next {
                return Ok(done);
            }
            if (avail - next).0 > self.queue.size() {
                return Err(RingError(format!(
                    "available index {} is more than {} ahead of {}",
                    avail.0,
                    self.queue.size(),
                    next.0
                )));
            }
            let head = self
                .queue
                .pop_descriptor_chain(&self.mem)
                .ok_or_else(|| RingError("cannot read the available ring".into()))?
                .head_index();
            if self.handle_chain(head)? {
                done += 1;
            }
        }
    }

    /// Parses, executes and completes the chain at `head`; false if it
    /// could not be returned at all.
    fn handle_chain(&mut self, head: u16) -> Result<bool, RingError> {
        let table = GuestAddress(self.queue.desc_table());
        let completion = match Request::parse(&self.mem, table, self.queue.size(), head, &self.limits) {
            Ok(req) => {
                let mut written = 0;
                let value = match self.execute(&req, &mut written) {
                    Ok(()) => S_OK,
                    Err(fault) => self.count_fault(fault),
                };
                Completion::Answer {
                    status: req.status,
                    value,
                    written,
                }
            }
            Err(Rejection::Malformed(why)) => {
                DeviceMetrics::inc(&self.metrics.bad_descriptors);
                log::debug!("{}: malformed chain at {head}: {why}", self.name);
                Completion::Unanswered
            }
            Err(Rejection::BadDescriptors { status, why }) => {
                DeviceMetrics::inc(&self.metrics.bad_descriptors);
                log::debug!("{}: bad descriptors in chain at {head}: {why}", self.name);
                Completion::Answer {
                    status,
                    value: S_IOERR,
                    written: 0,
                }
            }
            Err(Rejection::Denied { status, why }) => {
                DeviceMetrics::inc(&self.metrics.dma_denied);
                log::debug!("{}: DMA refused in chain at {head}: {why}", self.name);
                Completion::Answer {
                    status,
                    value: S_IOERR,
                    written: 0,
                }
            }
            Err(Rejection::BadRequest { status, why }) => {
                DeviceMetrics::inc(&self.metrics.bad_requests);
                log::debug!("{}: bad request at {head}: {why}", self.name);
                Completion::Answer {
                    status,
                    value: S_IOERR,
                    written: 0,
                }
            }
        };
        self.complete(head, completion)
    }

    fn count_fault(&mut self, fault: Fault) -> u8 {
        let m = &self.metrics;
        match fault {
            Fault::Request(why) => {
                DeviceMetrics::inc(&m.bad_requests);
                log::debug!("{}: bad request: {why}", self.name);
                S_IOERR
            }
            Fault::Memory(why) => {
                DeviceMetrics::inc(&m.bad_descriptors);
                log::debug!("{}: {why}", self.name);
                S_IOERR
            }
            Fault::Denied(why) => {
                DeviceMetrics::inc(&m.dma_denied);
                log::debug!("{}: {why}", self.name);
                S_IOERR
            }
            Fault::Host(e) => {
                let before = m.io_errors.fetch_add(1, Ordering::Relaxed);
                // The first error, then at most one line per LOG_EVERY:
                // a failing disk must not flood the log.
                let now = std::time::Instant::now();
                if self.last_error_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                    self.last_error_log = Some(now);
                    log::warn!(
                        "{}: I/O error on the disk: {e} ({} so far; the guest gets IOERR)",
                        self.name,
                        before + 1
                    );
                }
                S_IOERR
            }
            Fault::Unsupported(why) => {
                DeviceMetrics::inc(&m.bad_requests);
                log::debug!("{}: unsupported request: {why}", self.name);
                S_UNSUPP
            }
        }
    }

    /// Returns the chain to the driver with its status byte.
    fn complete(&mut self, head: u16, completion: Completion) -> Result<bool, RingError> {
        let used_len = match completion {
            Completion::Answer { status, value, written } => match self.mem.write_obj(value, status) {
                Ok(()) => written.saturating_add(1),
                Err(e) => {
                    DeviceMetrics::inc(&self.metrics.bad_descriptors);
                    log::debug!("{}: cannot write the status of {head}: {e}", self.name);
                    written
                }
            },
            Completion::Unanswered => 0,
        };
        if head >= self.queue.size() {
            // Not a descriptor: there is no used entry to give back.
            log::debug!("{}: dropped chain with head {head}", self.name);
            return Ok(false);
        }
        self.queue
            .add_used(&self.mem, head, used_len)
            .map_err(|e| RingError(format!("cannot write the used ring: {e}")))?;
        DeviceMetrics::inc(&self.metrics.requests);
        Ok(true)
    }

    /// Carries out a parsed request; `written` counts the data bytes put in
    /// guest memory, even when it fails halfway.
    fn execute(&mut self, req: &Request, written: &mut u32) -> Result<(), Fault> {
        let writes = matches!(
            req.kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.disk.readonly {
            return Err(Fault::Request("write to a read-only disk".into()));
        }
        match req.kind {
            RequestType::In => {
                let offset = self.check_io(req, true)?;
                self.read_disk(&req.data, offset, written)
            }
            RequestType::Out => {
                let offset = self.check_io(req, false)?;
                self.write_disk(&req.data, offset)
            }
            RequestType::Flush => self.disk.backend.flush().map_err(Fault::Host),
            RequestType::GetId => {
                Self::check_direction(&req.data, true)?;
                if (req.data_len as usize) < ID_LEN {
                    return Err(Fault::Request(format!("GET_ID buffer of {} bytes", req.data_len)));
                }
                let id = self.disk.id;
                self.to_guest(&req.data, &id, written)
            }
            RequestType::Discard | RequestType::WriteZeroes => self.discard_or_zero(req),
            RequestType::Unsupported(t) => Err(Fault::Unsupported(format!("request type {t}"))),
        }
    }

    fn check_direction(data: &[Buffer], writable: bool) -> Result<(), Fault> {
        match data.iter().find(|b| b.writable != writable) {
            Some(b) => Err(Fault::Request(format!(
                "data buffer at {:#x} is device-{} but the request {} it",
                b.addr.0,
                if b.writable { "writable" } else { "readable" },
                if writable { "fills" } else { "reads" },
            ))),
            None => Ok(()),
        }
    }

    /// Checks a read or write against the disk; returns its byte offset.
    fn check_io(&self, req: &Request, to_guest: bool) -> Result<u64, Fault> {
        Self::check_direction(&req.data, to_guest)?;
        if !u64::from(req.data_len).is_multiple_of(SECTOR_SIZE) {
            return Err(Fault::Request(format!(
                "data length {} is not a multiple of 512",
                req.data_len
            )));
        }
        self.check_range(req.sector, u64::from(req.data_len))
    }

    /// Checks that `len` bytes from `sector` lie within the disk; returns
    /// the byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Fault> {
        let beyond = || {
            Fault::Request(format!(
                "{len} bytes at sector {sector} go past the end ({} sectors)",
                self.disk.capacity
            ))
        };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(beyond)?;
        let end = offset.checked_add(len).ok_or_else(beyond)?;
        if end > self.disk.capacity * SECTOR_SIZE {
            return Err(beyond());
        }
        Ok(offset)
    }

    /// The first `len` bytes of the scratch buffer, at most `COPY_CHUNK`.
    fn chunk(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
        let len = len.min(COPY_CHUNK);
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        &mut scratch[..len]
    }

    /// Disk to guest, piece by piece, through the bounded scratch buffer.
    fn read_disk(&mut self, data: &[Buffer], mut offset: u64, written: &mut u32) -> Result<(), Fault> {
        let backend = self.disk.backend.clone();
        for b in data {
            let mut done = 0u32;
            while done < b.len {
                let buf = Self::chunk(&mut self.scratch, (b.len - done) as usize);
                let n = buf.len() as u32;
                backend.read_exact_at(buf, offset).map_err(Fault::Host)?;
                let at = GuestAddress(b.addr.0 + u64::from(done));
                self.mem
                    .write_slice(buf, at)
                    .map_err(|e| memory_fault(&e, "cannot fill", at.0))?;
                DeviceMetrics::add(&self.metrics.bytes_written, u64::from(n));
                *written += n;
                done += n;
                offset += u64::from(n);
            }
        }
        Ok(())
    }

    /// Guest to disk, piece by piece, through the bounded scratch buffer.
    fn write_disk(&mut self, data: &[Buffer], mut offset: u64) -> Result<(), Fault> {
        let backend = self.disk.backend.clone();
        for b in data {
            let mut done = 0u32;
            while done < b.len {
                let at = GuestAddress(b.addr.0 + u64::from(done));
                let buf = Self::chunk(&mut self.scratch, (b.len - done) as usize);
                let n = buf.len() as u32;
                self.mem
                    .read_slice(buf, at)
                    .map_err(|e| memory_fault(&e, "cannot read", at.0))?;
                DeviceMetrics::add(&self.metrics.bytes_read, u64::from(n));
                backend.write_all_at(buf, offset).map_err(Fault::Host)?;
                done += n;
                offset += u64::from(n);
            }
        }
        Ok(())
    }

    /// Copies `bytes` into the data buffers, as far as they go.
    fn to_guest(&self, data: &[Buffer], bytes: &[u8], written: &mut u32) -> Result<(), Fault> {
        let mut rest = bytes;
        for b in data {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(b.len as usize);
            self.mem
                .write_slice(&rest[..n], b.addr)
                .map_err(|e| memory_fault(&e, "cannot fill", b.addr.0))?;
            DeviceMetrics::add(&self.metrics.bytes_written, n as u64);
            *written += n as u32;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Reads the segments of a discard or write-zeroes request.
    fn read_ranges(&self, req: &Request, max_seg: u32) -> Result<Vec<Range>, Fault> {
        Self::check_direction(&req.data, false)?;
        let len = req.data_len as usize;
        if len == 0 || !len.is_multiple_of(SEGMENT_LEN) || len / SEGMENT_LEN > max_seg as usize {
            return Err(Fault::Request(format!(
                "{len} bytes of segments: not 1 to {max_seg} segments of 16 bytes"
            )));
        }
        // Small: at most `max_seg` segments of 16 bytes.
        let mut bytes = vec![0u8; len];
        let mut filled = 0;
        for b in &req.data {
            let end = filled + b.len as usize;
            self.mem
                .read_slice(&mut bytes[filled..end], b.addr)
                .map_err(|e| memory_fault(&e, "cannot read", b.addr.0))?;
            filled = end;
        }
        DeviceMetrics::add(&self.metrics.bytes_read, len as u64);
        Ok(bytes
            .chunks_exact(SEGMENT_LEN)
            .map(|s| {
                let mut sector = [0u8; 8];
                sector.copy_from_slice(&s[0..8]);
                Range {
                    sector: u64::from_le_bytes(sector),
                    sectors: u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
                    flags: u32::from_le_bytes([s[12], s[13], s[14], s[15]]),
                }
            })
            .collect())
    }

    fn discard_or_zero(&mut self, req: &Request) -> Result<(), Fault> {
        let discard = req.kind == RequestType::Discard;
        let (feature, max_seg, max_sectors, allowed_flags) = if discard {
            (F_DISCARD, DISCARD_MAX_SEG, DISCARD_MAX_SECTORS, 0)
        } else {
            (
                F_WRITE_ZEROES,
                WRITE_ZEROES_MAX_SEG,
                WRITE_ZEROES_MAX_SECTORS,
                SEGMENT_UNMAP,
            )
        };
        if self.acked_features & feature == 0 {
            return Err(Fault::Unsupported(format!("{:?} without its feature", req.kind)));
        }
        let ranges = self.read_ranges(req, max_seg)?;
        // Check every segment before touching the disk.
        let mut spans = Vec::with_capacity(ranges.len());
        for r in &ranges {
            if r.flags & !allowed_flags != 0 {
                return Err(Fault::Unsupported(format!(
                    "{:?} segment flags {:#x}",
                    req.kind, r.flags
                )));
            }
            if r.sectors > max_sectors {
                return Err(Fault::Request(format!(
                    "{:?} segment of {} sectors, more than {max_sectors}",
                    req.kind, r.sectors
                )));
            }
            let len = u64::from(r.sectors) * SECTOR_SIZE;
            spans.push((self.check_range(r.sector, len)?, len, r.flags & SEGMENT_UNMAP != 0));
        }
        let backend = &self.disk.backend;
        for (offset, len, unmap) in spans {
            if len == 0 {
                continue;
            }
            let done = if discard || unmap {
                backend.punch_hole(offset, len)
            } else {
                backend.write_zeroes(offset, len)
            };
            done.map_err(Fault::Host)?;
        }
        Ok(())
    }
}

impl MutEventSubscriber for QueueWorker {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            // A failed read only means there was nothing to read.
            let _ = self.notify.read();
            self.serve();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.notify, EventSet::IN)) {
            log::error!("{}: cannot watch queue {}: {e:?}", self.name, self.index);
        }
    }
}

/// A failed guest-memory access: refused by the DMA view, or an address no
/// memory has.
fn memory_fault(e: &vm_memory::GuestMemoryError, what: &str, at: u64) -> Fault {
    let why = format!("{what} {at:#x}: {e}");
    if crate::dma::refused_by_view(e) {
        Fault::Denied(why)
    } else {
        Fault::Memory(why)
    }
}
