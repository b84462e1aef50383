//! veil's devices: the bus that routes guest exits to them, the legacy PC
//! devices, and (later) virtio devices and their DMA layer.

pub mod bus;
pub mod dma;
pub mod legacy;
pub mod pci;
pub mod stop;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use stop::{StopReason, StopSignal};
