//! virtio 1.x devices and their two transports.
//!
//! A device (`VirtioDevice`) knows its features, its config space and how
//! to serve its queues; a transport (`mmio::MmioTransport`, the PCI
//! function in `pci`) knows registers. Both transports drive the same
//! state machine (`transport::VirtioState`): feature negotiation, queue set-up,
//! status, reset. Once the driver says DRIVER_OK, the device gets its queues
//! and a DMA view and serves them on its own worker thread, woken by
//! ioeventfds and answering through irqfds, never through the vCPU thread.

pub mod block;
pub mod console;
pub mod iommu;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod transport;
pub mod worker;

use crate::dma::DmaMemory;
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use metrics::DeviceMetrics;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// Feature bits shared by every device (virtio 1.2 §6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
}

/// Device IDs (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const IOMMU: u32 = 23;
}

/// Why a device raises its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptCause {
    /// Buffers were used in this queue.
    Queue(u16),
    /// The configuration (or device status) changed.
    Config,
}

/// How a device interrupts its driver; each transport has its own.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()>;
}

/// A queue the driver set up, handed to the device at activation.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Becomes readable when the driver notifies this queue.
    pub notify: EventFd,
}

/// The queues of an activation as an array in index order: exactly queues
/// `0..N`, each ready, or an error naming what is missing or extra.
pub fn take_queues<const N: usize>(queues: Vec<ActiveQueue>, device: &str) -> Result<[ActiveQueue; N], ActivateError> {
    let mut slots: [Option<ActiveQueue>; N] = std::array::from_fn(|_| None);
    for q in queues {
        let index = usize::from(q.index);
        match slots.get_mut(index) {
            Some(slot) if slot.is_none() => *slot = Some(q),
            _ => return Err(ActivateError::Invalid(format!("{device} has no queue {index}"))),
        }
    }
    let missing: Vec<usize> = (0..N).filter(|&i| slots[i].is_none()).collect();
    if !missing.is_empty() {
        return Err(ActivateError::Invalid(format!(
            "{device}: the driver did not set up queue(s) {missing:?}"
        )));
    }
    Ok(slots.map(|q| q.expect("checked above")))
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: DmaMemory,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub acked_features: u64,
    pub metrics: Arc<DeviceMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device cannot start its worker: {0}")]
    Worker(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// One virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Short name for logs and metrics, e.g. "blk0".
    fn name(&self) -> &str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Everything the device offers, VERSION_1 included.
    fn device_features(&self) -> u64;
    /// Device-specific refusal of a feature set at FEATURES_OK.
    fn accept_features(&self, _acked: u64) -> Result<(), String> {
        Ok(())
    }
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Config writes are read-only for most devices: ignored, counted.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let _ = (offset, data);
        false
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving queues; the device may be activated again afterwards.
    fn reset(&mut self);
    /// True once the device's worker found its rings unusable; the
    /// transport then shows DEVICE_NEEDS_RESET until the driver resets it.
    fn needs_reset(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    fn q(index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: Queue::new(16).unwrap(),
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn error_of<const N: usize>(queues: Vec<ActiveQueue>) -> String {
        match take_queues::<N>(queues, "dev") {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn take_queues_orders_and_checks() {
        let Ok([a, b]) = take_queues::<2>(vec![q(1), q(0)], "dev") else {
            panic!("two queues")
        };
        assert_eq!((a.index, b.index), (0, 1));
        assert!(error_of::<2>(vec![q(0)]).contains("[1]"));
        assert!(error_of::<1>(vec![q(0), q(1)]).contains("no queue 1"));
        assert!(error_of::<2>(vec![q(0), q(0)]).contains("no queue 0"));
    }
}
