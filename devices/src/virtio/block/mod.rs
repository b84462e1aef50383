//! virtio-blk (virtio 1.2 §5.2): one request queue over a raw disk image.
//!
//! `Block` is the device the transport sees: features, configuration space,
//! activation. The queue is served on a worker thread by `handler`, which
//! parses each chain with `request` and reaches the image through
//! `backend`.
//!
//! When the queue's rings cannot be read, the worker stops serving it, sets
//! the flag returned by `Block::needs_reset_flag` and raises a configuration
//! interrupt; the transport is expected to show the flag as
//! DEVICE_NEEDS_RESET in the device status.

pub mod backend;
#[doc(hidden)]
pub mod handler;
#[doc(hidden)]
pub mod request;

#[cfg(test)]
mod tests;

use super::worker::Worker;
use super::{device_type, features, take_queues, ActivateError, Activation, VirtioDevice};
use backend::DiskBackend;
use handler::{Disk, QueueWorker, COPY_CHUNK};
use request::{Limits, SECTOR_SIZE};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Block feature bits (virtio 1.2 §5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: a chain as long as the queue, less the
/// header and the status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest data segment.
pub const SIZE_MAX: u32 = COPY_CHUNK as u32;
/// Logical block size the driver is told to use.
pub const BLK_SIZE: u32 = 512;
/// Limits of discard and write-zeroes requests.
pub const DISCARD_MAX_SECTORS: u32 = 1 << 21;
pub const DISCARD_MAX_SEG: u32 = 32;
pub const WRITE_ZEROES_MAX_SECTORS: u32 = 1 << 21;
pub const WRITE_ZEROES_MAX_SEG: u32 = 32;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;

/// Offsets in the configuration space.
mod config {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

pub struct Block {
    name: String,
    disk: Arc<Disk>,
    features: u64,
    config: [u8; CONFIG_LEN],
    needs_reset: Arc<AtomicBool>,
    worker: Option<Worker>,
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

fn put(config: &mut [u8], offset: usize, bytes: &[u8]) {
    config[offset..offset + bytes.len()].copy_from_slice(bytes);
}

impl Block {
    /// A disk backed by `file`, a raw image opened by the caller (read-write
    /// unless `readonly`). `id` is what GET_ID answers: ASCII, at most 20
    /// bytes.
    pub fn new(name: String, file: File, readonly: bool, id: String) -> io::Result<Block> {
        Self::with_backend(name, Arc::new(file), readonly, id)
    }

    /// A disk over any backend.
    pub fn with_backend(name: String, backend: Arc<dyn DiskBackend>, readonly: bool, id: String) -> io::Result<Block> {
        let size = backend.size()?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(invalid(format!(
                "{name}: disk image of {size} bytes is not a whole number of 512-byte sectors"
            )));
        }
        if id.len() > ID_LEN || !id.is_ascii() {
            return Err(invalid(format!(
                "{name}: disk id {id:?} is not ASCII of at most {ID_LEN} bytes"
            )));
        }
        let mut id_bytes = [0u8; ID_LEN];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        let capacity = size / SECTOR_SIZE;

        let mut features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | F_SEG_MAX
            | F_SIZE_MAX
            | F_BLK_SIZE
            | F_FLUSH;
        let mut config = [0u8; CONFIG_LEN];
        put(&mut config, config::CAPACITY, &capacity.to_le_bytes());
        put(&mut config, config::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(&mut config, config::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(&mut config, config::BLK_SIZE, &BLK_SIZE.to_le_bytes());
        if readonly {
            features |= F_RO;
        } else {
            features |= F_DISCARD | F_WRITE_ZEROES;
            let c = &mut config;
            put(c, config::MAX_DISCARD_SECTORS, &DISCARD_MAX_SECTORS.to_le_bytes());
            put(c, config::MAX_DISCARD_SEG, &DISCARD_MAX_SEG.to_le_bytes());
            put(c, config::DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
            put(
                c,
                config::MAX_WRITE_ZEROES_SECTORS,
                &WRITE_ZEROES_MAX_SECTORS.to_le_bytes(),
            );
            put(c, config::MAX_WRITE_ZEROES_SEG, &WRITE_ZEROES_MAX_SEG.to_le_bytes());
            // Write zeroes with UNMAP punches a hole, which reads back as zeros.
            c[config::WRITE_ZEROES_MAY_UNMAP] = 1;
        }
        Ok(Block {
            name,
            disk: Arc::new(Disk {
                backend,
                capacity,
                readonly,
                id: id_bytes,
            }),
            features,
            config,
            needs_reset: Arc::new(AtomicBool::new(false)),
            worker: None,
        })
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn is_readonly(&self) -> bool {
        self.disk.readonly
    }

    /// The flag behind `needs_reset`, for a transport to poll from its own
    /// thread (the device itself is boxed inside the transport).
    pub fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.needs_reset.clone()
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(avail) = self.config.get(start..) {
            let n = avail.len().min(data.len());
            data[..n].copy_from_slice(&avail[..n]);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        self.needs_reset.store(false, Ordering::Release);
        let Activation {
            mem,
            queues,
            interrupt,
            acked_features,
            metrics,
        } = activation;
        let [q] = take_queues(queues, &self.name)?;
        let limits = Limits {
            max_descriptors: QUEUE_SIZE,
            indirect: acked_features & features::RING_INDIRECT_DESC != 0,
            seg_max: SEG_MAX as usize,
            size_max: SIZE_MAX,
        };
        let handler = QueueWorker::new(
            self.name.clone(),
            self.disk.clone(),
            acked_features,
            limits,
            q.index,
            q.queue,
            q.notify,
            mem,
            interrupt,
            metrics,
            self.needs_reset.clone(),
        );
        self.worker = Some(Worker::spawn(&self.name, handler)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.needs_reset.store(false, Ordering::Release);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }
}
