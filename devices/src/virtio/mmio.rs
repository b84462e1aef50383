//! The virtio-mmio transport, version 2 register layout (virtio 1.2 §4.2.2).

use super::transport::{Half, QueueAddress, VirtioState};
use super::{DeviceMetrics, InterruptCause, VirtioInterrupt};
use crate::bus::BusDevice;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c49_4556; // "VEIL"
/// Registers end and device configuration starts here.
const CONFIG_OFFSET: u64 = 0x100;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// The QueueNotify register, for ioeventfd registration.
pub const QUEUE_NOTIFY: u64 = 0x050;

const INT_USED_BUFFER: u32 = 1;
const INT_CONFIG_CHANGE: u32 = 2;

/// The interrupt line of one virtio-mmio device: the InterruptStatus bits
/// and the irqfd that raises its GSI.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// `irq` must already be registered with KVM as an irqfd.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        let bit = match cause {
            InterruptCause::Queue(_) => INT_USED_BUFFER,
            InterruptCause::Config => INT_CONFIG_CHANGE,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

pub struct MmioTransport {
    state: VirtioState,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// `state` must have been created with `interrupt` as its interrupt.
    pub fn new(state: VirtioState, interrupt: Arc<MmioInterrupt>) -> Self {
        Self { state, interrupt }
    }

    pub fn state(&self) -> &VirtioState {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut VirtioState {
        &mut self.state
    }

    fn read_register(&self, offset: u64) -> u32 {
        let s = &self.state;
        let queue = s.queue();
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => s.device().device_type(),
            0x00c => VENDOR_ID,
            0x010 => s.device_features_word(),
            0x034 => queue.map_or(0, |q| u32::from(q.max_size)),
            0x044 => queue.map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt.status.load(Ordering::SeqCst),
            0x070 => u32::from(s.status()),
            0x080 => queue.map_or(0, |q| q.desc as u32),
            0x084 => queue.map_or(0, |q| (q.desc >> 32) as u32),
            0x090 => queue.map_or(0, |q| q.avail as u32),
            0x094 => queue.map_or(0, |q| (q.avail >> 32) as u32),
            0x0a0 => queue.map_or(0, |q| q.used as u32),
            0x0a4 => queue.map_or(0, |q| (q.used >> 32) as u32),
            // No shared memory regions: their length reads as -1.
            0x0b0 | 0x0b4 => u32::MAX,
            0x0fc => s.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let s = &mut self.state;
        match offset {
            0x014 => s.select_device_features(v),
            0x020 => s.write_driver_features(v),
            0x024 => s.select_driver_features(v),
            0x030 => s.select_queue(v),
            0x038 => s.set_queue_size(v),
            0x044 => s.set_queue_ready(v == 1),
            QUEUE_NOTIFY => s.notify(v),
            0x064 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x070 => {
                s.set_status(v as u8);
                if v == 0 {
                    self.interrupt.status.store(0, Ordering::SeqCst);
                }
            }
            0x080 => s.set_queue_address(QueueAddress::Desc, Half::Low, v),
            0x084 => s.set_queue_address(QueueAddress::Desc, Half::High, v),
            0x090 => s.set_queue_address(QueueAddress::Avail, Half::Low, v),
            0x094 => s.set_queue_address(QueueAddress::Avail, Half::High, v),
            0x0a0 => s.set_queue_address(QueueAddress::Used, Half::Low, v),
            0x0a4 => s.set_queue_address(QueueAddress::Used, Half::High, v),
            _ => {
                DeviceMetrics::inc(&s.metrics().bad_register_writes);
                log::debug!("{}: write {v:#x} to unknown register {offset:#x}", s.device().name());
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            return self.state.read_config(offset - CONFIG_OFFSET, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // Registers are 32 bits wide and must be read as such.
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return self.state.write_config(offset - CONFIG_OFFSET, data);
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => DeviceMetrics::inc(&self.state.metrics().bad_register_writes),
        }
    }
}
