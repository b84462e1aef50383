//! `Probed`: the transport every driver gets. It passes everything to
//! virtio-drivers' own MMIO or PCI transport and adds what the probe
//! wants to see or change:
//!
//! * it counts queue notifications;
//! * it records the features the device offered and the driver accepted,
//!   and whether the device kept FEATURES_OK;
//! * it accepts VIRTIO_F_ACCESS_PLATFORM when the device offers it and
//!   the DMA policy (hal.rs) can give it addresses that suit it (the
//!   drivers of virtio-drivers do not know the bit): with a policy that
//!   translates, only once the device's endpoint joined the vIOMMU domain;
//!   and it tells the Hal, for as long as the driver lives, whether the
//!   device it now drives is translated;
//! * on MMIO, it stops a queue as virtio 1.2 §4.2.2.2 says (QueueReady =
//!   0, read back until 0) but gives up after a few reads: a device that
//!   ignores the write (veil does, after DRIVER_OK) is reset instead, and
//!   the `ready_stuck` flag says so. virtio-drivers' MmioTransport would
//!   spin on the read forever;
//! * on PCI, it notifies with one write to the queue's notify address,
//!   computed once when the queue is set up. virtio-drivers' PciTransport
//!   writes queue_select and reads queue_notify_off before every notify:
//!   two trapped accesses (~60–110 µs each here) on top of the notify
//!   itself (an ioeventfd write, ~22 µs). `probe.pci_notify=crate` keeps
//!   the crate's way.
//!
//! Counters live in a shared `Stats` because the drivers own the transport
//! and do not give it back.

use alloc::rc::Rc;
use core::cell::Cell;

use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::iommu;
use super::DmaMark;
use crate::hal;

/// VIRTIO_F_ACCESS_PLATFORM (virtio 1.2 §6).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// VIRTIO_F_RING_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// Offset of queue_notify_off in `virtio_pci_common_cfg`.
const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1E;
/// Queues whose notify address is cached.
const NOTIFY_QUEUES: usize = 8;
/// virtio-mmio QueueSel, QueueNotify and QueueReady.
const MMIO_QUEUE_SEL: u64 = 0x030;
const MMIO_QUEUE_NOTIFY: u64 = 0x050;
const MMIO_QUEUE_READY: u64 = 0x044;
/// Reads of QueueReady before giving up on it turning 0.
const READY_READS: u32 = 4;

#[derive(Default)]
pub struct Stats {
    pub notifies: Cell<u64>,
    pub offered: Cell<u64>,
    pub accepted: Cell<u64>,
    /// The device cleared FEATURES_OK after the driver set it.
    pub refused: Cell<bool>,
    /// MMIO: QueueReady still read 1 after the driver wrote 0.
    pub ready_stuck: Cell<bool>,
    /// The device's vIOMMU endpoint ID, if it has one.
    pub endpoint: Cell<Option<u32>>,
    /// It accepted ACCESS_PLATFORM and joined the vIOMMU domain.
    pub translated: Cell<bool>,
    /// The DMA counters when its features were negotiated: its workload's
    /// share is what they grew by since.
    pub mark: Cell<DmaMark>,
    /// Its device status register, for checks that must reset the device
    /// behind its driver's back.
    pub status_reg: Cell<Option<StatusReg>>,
    /// While set, notifications are recorded in `held` instead of written,
    /// so that a check can put several requests in flight and let the
    /// device see them all at one moment of its choosing (`release`).
    pub hold: Cell<bool>,
    /// Queues notified while `hold` was set, one bit each.
    pub held: Cell<u32>,
    /// Per queue: the doorbell `release` writes, found in `queue_set`.
    pub doorbells: Cell<[Option<Doorbell>; NOTIFY_QUEUES]>,
}

/// Where a queue's notification is written.
#[derive(Clone, Copy)]
pub enum Doorbell {
    /// virtio-mmio QueueNotify (32 bits).
    Mmio(u64),
    /// virtio-pci: the queue's address in the notify region (16 bits).
    Pci(u64),
}

impl Doorbell {
    fn ring(self, queue: u16) {
        // SAFETY: a notify register of a device the probe found
        // (QueueNotify, or inside the function's notify region as checked
        // in queue_set), identity-mapped MMIO.
        unsafe {
            match self {
                Doorbell::Mmio(at) => (at as *mut u32).write_volatile(u32::from(queue)),
                Doorbell::Pci(at) => (at as *mut u16).write_volatile(queue),
            }
        }
    }
}

impl Stats {
    /// Stop writing notifications; `release` writes them.
    pub fn hold_notify(&self) {
        self.hold.set(true);
    }

    /// Notify every queue notified while held, once each, and stop holding.
    /// False if a queue's doorbell is unknown (virtio-pci with
    /// `probe.pci_notify=crate`): that notification is lost.
    pub fn release(&self) -> bool {
        self.hold.set(false);
        let held = self.held.replace(0);
        let doorbells = self.doorbells.get();
        let mut all = true;
        for (queue, bell) in doorbells.iter().enumerate() {
            if held & (1 << queue) == 0 {
                continue;
            }
            match bell {
                Some(b) => {
                    b.ring(queue as u16);
                    self.notifies.set(self.notifies.get() + 1);
                }
                None => all = false,
            }
        }
        all
    }
}

/// Where a device's status register is.
#[derive(Clone, Copy)]
pub enum StatusReg {
    /// virtio-mmio Status (32 bits).
    Mmio(u64),
    /// virtio-pci `device_status` in the common configuration (8 bits).
    Pci(u64),
}

/// virtio-mmio Status and virtio-pci device_status.
const MMIO_STATUS: u64 = 0x070;
const COMMON_DEVICE_STATUS: u64 = 0x14;

impl StatusReg {
    pub fn read(self) -> u32 {
        // SAFETY: the status register of a device the probe found,
        // identity-mapped MMIO.
        unsafe {
            match self {
                StatusReg::Mmio(at) => (at as *const u32).read_volatile(),
                StatusReg::Pci(at) => u32::from((at as *const u8).read_volatile()),
            }
        }
    }

    /// Writes 0: the device resets and forgets its queues.
    pub fn reset(self) {
        // SAFETY: as in `read`.
        unsafe {
            match self {
                StatusReg::Mmio(at) => (at as *mut u32).write_volatile(0),
                StatusReg::Pci(at) => (at as *mut u8).write_volatile(0),
            }
        }
    }
}

/// Where a virtio-pci function's notifications go: found by `discover`
/// from its capabilities and BARs.
#[derive(Clone, Copy)]
pub struct PciNotify {
    /// `virtio_pci_common_cfg` (MMIO).
    pub common: u64,
    /// Start and length of the notify region, and notify_off_multiplier.
    pub base: u64,
    pub len: u64,
    pub multiplier: u32,
}

/// virtio-drivers' transports that the probe uses. (Not the crate's
/// `SomeTransport`: that one also holds the pKVM transport, whose
/// `vmcall`s would then be linked in.)
pub enum Inner {
    Mmio(MmioTransport<'static>),
    Pci(PciTransport),
}

/// `$t.<call>` on whichever transport `$inner` holds.
macro_rules! each {
    ($inner:expr, $t:ident => $call:expr) => {
        match $inner {
            Inner::Mmio($t) => $call,
            Inner::Pci($t) => $call,
        }
    };
}

impl Inner {
    pub fn device_type(&self) -> DeviceType {
        each!(self, t => t.device_type())
    }
}

pub struct Probed {
    inner: Inner,
    stats: Rc<Stats>,
    pci: Option<PciNotify>,
    /// Per queue: the notify address (0 = not known, use the crate's).
    notify_at: [u64; NOTIFY_QUEUES],
    /// virtio-mmio: the register window.
    mmio: Option<u64>,
    /// Its features were negotiated: the Hal serves this device now.
    serving: bool,
}

impl Probed {
    /// `pci`: where the function's notifications go; they are written
    /// there directly if `cache_notify`. `endpoint`: its vIOMMU endpoint ID.
    pub fn new(
        inner: Inner,
        pci: Option<PciNotify>,
        cache_notify: bool,
        mmio: Option<u64>,
        endpoint: Option<u32>,
    ) -> Probed {
        let stats = Rc::new(Stats::default());
        stats.endpoint.set(endpoint);
        let status = match (mmio, pci) {
            (Some(base), _) => Some(StatusReg::Mmio(base + MMIO_STATUS)),
            (None, Some(p)) => Some(StatusReg::Pci(p.common + COMMON_DEVICE_STATUS)),
            (None, None) => None,
        };
        stats.status_reg.set(status);
        Probed {
            inner,
            stats,
            pci: pci.filter(|_| cache_notify),
            notify_at: [0; NOTIFY_QUEUES],
            mmio,
            serving: false,
        }
    }

    /// The counters, which stay readable after a driver took the transport.
    pub fn stats(&self) -> Rc<Stats> {
        self.stats.clone()
    }

    fn set_doorbell(&self, queue: u16, bell: Doorbell) {
        let mut bells = self.stats.doorbells.get();
        if let Some(slot) = bells.get_mut(queue as usize) {
            *slot = Some(bell);
            self.stats.doorbells.set(bells);
        }
    }
}

impl Transport for Probed {
    fn device_type(&self) -> DeviceType {
        each!(&self.inner, t => t.device_type())
    }

    fn read_device_features(&mut self) -> u64 {
        let mut f = each!(&mut self.inner, t => t.read_device_features());
        // virtio-drivers puts indirect tables on the heap; checks that keep
        // the heap private must keep whole chains in the shared ring.
        if crate::secure::direct_only() {
            f &= !F_INDIRECT_DESC;
        }
        self.stats.offered.set(f);
        f
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        let mut f = driver_features;
        self.stats.mark.set(DmaMark::now());
        let offered = self.stats.offered.get() & F_ACCESS_PLATFORM != 0;
        let chosen = hal::chosen();
        // Joining the domain also maps the pool, before any queue exists.
        let translated =
            offered && chosen.translates() && self.stats.endpoint.get().is_some_and(iommu::attach_endpoint);
        // Identity addresses suit ACCESS_PLATFORM only without a vIOMMU
        // (or with its bypass on), which is when identity is chosen.
        if translated || (offered && !chosen.translates()) {
            f |= F_ACCESS_PLATFORM;
        }
        self.stats.translated.set(translated);
        hal::enter_device(translated);
        self.serving = true;
        self.stats.accepted.set(f);
        each!(&mut self.inner, t => t.write_driver_features(f))
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        each!(&mut self.inner, t => t.max_queue_size(queue))
    }

    fn notify(&mut self, queue: u16) {
        if self.stats.hold.get() && (queue as usize) < NOTIFY_QUEUES {
            self.stats.held.set(self.stats.held.get() | 1 << queue);
            return;
        }
        self.stats.notifies.set(self.stats.notifies.get() + 1);
        match self.notify_at.get(queue as usize) {
            // SAFETY: an address inside the notify region of this function's
            // BAR (checked in queue_set), identity-mapped MMIO.
            Some(&at) if at != 0 => unsafe { (at as *mut u16).write_volatile(queue) },
            _ => each!(&mut self.inner, t => t.notify(queue)),
        }
    }

    fn get_status(&self) -> DeviceStatus {
        each!(&self.inner, t => t.get_status())
    }

    fn set_status(&mut self, status: DeviceStatus) {
        each!(&mut self.inner, t => t.set_status(status));
        if status.contains(DeviceStatus::FEATURES_OK)
            && !status.contains(DeviceStatus::DRIVER_OK)
            && !self.get_status().contains(DeviceStatus::FEATURES_OK)
        {
            self.stats.refused.set(true);
        }
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        each!(&mut self.inner, t => t.set_guest_page_size(guest_page_size))
    }

    fn requires_legacy_layout(&self) -> bool {
        each!(&self.inner, t => t.requires_legacy_layout())
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        each!(&mut self.inner, t => t.queue_set(queue, size, descriptors, driver_area, device_area));
        if let Some(base) = self.mmio {
            self.set_doorbell(queue, Doorbell::Mmio(base + MMIO_QUEUE_NOTIFY));
        }
        let (Some(pci), Some(slot)) = (self.pci, self.notify_at.get_mut(queue as usize)) else {
            return;
        };
        // queue_set left queue_select at `queue`: read its notify offset.
        // SAFETY: common_cfg of this function, identity-mapped MMIO.
        let off = unsafe { ((pci.common + COMMON_QUEUE_NOTIFY_OFF) as *const u16).read_volatile() };
        let at = off as u64 * pci.multiplier as u64;
        *slot = if at + 2 <= pci.len { pci.base + at } else { 0 };
        let at = *slot;
        if at != 0 {
            self.set_doorbell(queue, Doorbell::Pci(at));
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Some(slot) = self.notify_at.get_mut(queue as usize) {
            *slot = 0;
        }
        let mut bells = self.stats.doorbells.get();
        if let Some(slot) = bells.get_mut(queue as usize) {
            *slot = None;
            self.stats.doorbells.set(bells);
        }
        if let Some(base) = self.mmio {
            let sel = (base + MMIO_QUEUE_SEL) as *mut u32;
            let ready = (base + MMIO_QUEUE_READY) as *mut u32;
            // SAFETY: this device's virtio-mmio registers, identity-mapped.
            let stopped = unsafe {
                sel.write_volatile(queue as u32);
                ready.write_volatile(0);
                (0..READY_READS).any(|_| ready.read_volatile() == 0)
            };
            if !stopped {
                self.stats.ready_stuck.set(true);
                // The driver is going away: a reset stops every queue.
                each!(&mut self.inner, t => t.set_status(DeviceStatus::empty()));
            }
            // Not the crate's queue_unset: it would spin on QueueReady, and
            // it also writes QueueNum = 0, which the spec does not ask for
            // (and veil logs as a refused queue size).
            return;
        }
        each!(&mut self.inner, t => t.queue_unset(queue))
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        each!(&mut self.inner, t => t.queue_used(queue))
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        each!(&mut self.inner, t => t.ack_interrupt())
    }

    fn read_config_generation(&self) -> u32 {
        each!(&self.inner, t => t.read_config_generation())
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T> {
        each!(&self.inner, t => t.read_config_space(offset))
    }

    fn write_config_space<T: IntoBytes + Immutable>(&mut self, offset: usize, value: T) -> Result<()> {
        each!(&mut self.inner, t => t.write_config_space(offset, value))
    }
}

impl Drop for Probed {
    /// The driver is gone: whatever the Hal shares next is not for it.
    /// (A transport no driver used says nothing: another device may be
    /// the one being served.)
    fn drop(&mut self) {
        if self.serving {
            hal::leave_device();
        }
    }
}
