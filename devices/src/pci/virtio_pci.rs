//! The virtio-pci transport, modern devices only (virtio 1.2 §4.1).
//!
//! A `VirtioPciDevice` is a PCI function (vendor 1af4, device 1040 + the
//! virtio device type, revision 1) with one 32-bit memory BAR (BAR 0):
//!
//! | BAR offset | region | length |
//! | --- | --- | --- |
//! | `0x0000` | common configuration (`virtio_pci_common_cfg`, through `queue_reset`) | `0x3c` |
//! | `0x1000` | ISR status, read-to-clear | 1 |
//! | `0x2000` | device-specific configuration | `0x1000` |
//! | `0x3000` | notifications: queue *q* at `0x3000 + 4q` | 4 × queues |
//! | next page | MSI-X table | 16 × vectors |
//! | next page | MSI-X pending-bit array | 8 × ⌈vectors / 64⌉ |
//!
//! and the BAR's size is the end of that rounded up to a power of two
//! (32 KiB for up to 1024 queues and 256 vectors).
//!
//! Why 32-bit: the BAR goes in the 32-bit window the DSDT describes (there
//! is no 64-bit window), one register is simpler to size and move than a
//! pair, and a 64-bit non-prefetchable BAR would gain nothing: bridges
//! forward non-prefetchable memory below 4 GiB only.
//!
//! The capability list holds one vendor-specific capability (ID 0x09) for
//! each region (common, notify with `notify_off_multiplier` 4, ISR,
//! device), the `VIRTIO_PCI_CAP_PCI_CFG` window the spec requires (§4.1.4.9,
//! BAR access through configuration space), and MSI-X (0x11) when the VMM
//! provides vectors.
//!
//! Interrupts (`VirtioPciInterrupt`): with MSI-X enabled, a queue
//! interrupt goes to the queue's vector and a configuration interrupt to
//! the config vector; `NO_VECTOR` sends nothing. With MSI-X disabled, the
//! ISR bits are set and the INTx irqfd is written (unless the command
//! register disables INTx).
//!
//! Bad guest accesses (wrong widths, offsets outside every region, writes
//! to read-only registers, vectors out of range) are ignored and counted in
//! the device's `bad_register_writes`, reads included: bad reads return 0.

use super::bus::PciDevice;
use super::config::{self, reg, ConfigError, ConfigSpace, PciIds, INTERRUPT_PIN_A};
use super::msix::{self, MsiRouter, MsiVector, MsixTable, CAP_ID_MSIX};
use crate::virtio::transport::{Half, QueueAddress, VirtioState};
use crate::virtio::{device_type, DeviceMetrics, InterruptCause, VirtioInterrupt};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::eventfd::EventFd;

/// PCI vendor ID of every virtio device.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio devices are 0x1040 + device type (up to 0x107f).
pub const VIRTIO_DEVICE_ID_BASE: u16 = 0x1040;
/// Revision 1: a modern, non-transitional device.
pub const VIRTIO_REVISION: u8 = 1;
/// "No MSI-X vector" in `config_msix_vector` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// Queue *q*'s notification address is `q * NOTIFY_OFF_MULTIPLIER` into
/// the notify region.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// The one BAR.
pub const VIRTIO_BAR: usize = 0;

const CAP_ID_VENDOR: u8 = 0x09;

/// `cfg_type` of the vendor-specific capabilities.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// ISR status bits.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// `virtio_pci_common_cfg` field offsets.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    pub const QUEUE_RESET: u64 = 0x3a;
    /// Length of the structure as virtio 1.2 defines it.
    pub const LEN: u64 = 0x3c;
}

const PAGE: u64 = 0x1000;
/// Device configuration the driver may map: Linux maps up to a page.
const DEVICE_CONFIG_LEN: u64 = PAGE;

/// A region of the BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

impl Region {
    /// Offset into the region of an access of `len` bytes at BAR offset
    /// `offset`, if the access lies wholly inside.
    fn offset_of(&self, offset: u64, len: usize) -> Option<u64> {
        let rel = offset.checked_sub(self.offset)?;
        (rel + len as u64 <= self.len).then_some(rel)
    }
}

/// Where everything is in the BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarLayout {
    pub common: Region,
    pub isr: Region,
    pub device: Region,
    pub notify: Region,
    pub msix_table: Option<Region>,
    pub msix_pba: Option<Region>,
    /// BAR size: a power of two.
    pub size: u64,
}

impl BarLayout {
    /// Each region on its own page(s), so a VMM could map or trap them
    /// separately; the MSI-X table and PBA only with vectors.
    pub fn new(queues: usize, vectors: usize) -> Self {
        let notify_len = queues.max(1) as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        let notify = Region {
            offset: 3 * PAGE,
            len: notify_len,
        };
        let mut end = notify.offset + notify_len.next_multiple_of(PAGE);
        let (msix_table, msix_pba) = if vectors == 0 {
            (None, None)
        } else {
            let table = Region {
                offset: end,
                len: vectors as u64 * msix::ENTRY_SIZE,
            };
            end += table.len.next_multiple_of(PAGE);
            let pba = Region {
                offset: end,
                len: msix::pba_size(vectors),
            };
            end += pba.len.next_multiple_of(PAGE);
            (Some(table), Some(pba))
        };
        Self {
            common: Region {
                offset: 0,
                len: common::LEN,
            },
            isr: Region { offset: PAGE, len: 1 },
            device: Region {
                offset: 2 * PAGE,
                len: DEVICE_CONFIG_LEN,
            },
            notify,
            msix_table,
            msix_pba,
            size: end.next_power_of_two(),
        }
    }
}

/// Class code by virtio device type: what the device is, so that lspci
/// and the like say something sensible. Drivers match on the device ID.
pub fn class_code(virtio_type: u32) -> u32 {
    match virtio_type {
        device_type::NET => 0x02_00_00,     // network, Ethernet
        device_type::BLOCK => 0x01_80_00,   // mass storage, other
        device_type::CONSOLE => 0x07_80_00, // communication, other
        8 => 0x01_00_00,                    // SCSI host: mass storage, SCSI
        16 => 0x03_80_00,                   // GPU: display, other
        18 => 0x09_80_00,                   // input: input device, other
        device_type::IOMMU => 0x08_06_00,   // system peripheral, IOMMU
        _ => 0xff_00_00,                    // RNG and the rest: unassigned
    }
}

/// The VMM's side of ioeventfds: where a queue's notifications must wake
/// its eventfd without a vCPU exit. Called on the vCPU thread whenever the
/// BAR starts, stops or moves decoding; `addr` is a guest-physical MMIO
/// address to match for writes of any length, no datamatch (KVM:
/// `KVM_IOEVENTFD` with `len = 0`).
pub trait IoEventRegistry: Send + Sync {
    fn register(&self, addr: u64, evt: &EventFd) -> io::Result<()>;
    fn unregister(&self, addr: u64, evt: &EventFd) -> io::Result<()>;
}

/// Which vectors the driver chose, next to the MSI-X table they index.
struct Vectors {
    msix: MsixTable,
    config: u16,
    queues: Vec<u16>,
}

/// The interrupts of one virtio-pci function; the device's workers raise
/// them through `VirtioInterrupt`.
pub struct VirtioPciInterrupt {
    isr: AtomicU8,
    intx: EventFd,
    intx_disabled: AtomicBool,
    vectors: Mutex<Vectors>,
}

impl VirtioPciInterrupt {
    /// `msix`: the vectors the function offers (none: no MSI-X capability;
    /// Linux wants queues + 1 for one vector per queue, else makes do with
    /// 2, else uses INTx). `router` learns the message of each vector.
    /// `intx`: the irqfd of the function's INTx GSI (see
    /// [`intx_resample`](Self::intx_resample)).
    pub fn new(msix: Vec<MsiVector>, router: Arc<dyn MsiRouter>, intx: EventFd) -> Self {
        Self {
            isr: AtomicU8::new(0),
            intx,
            intx_disabled: AtomicBool::new(false),
            vectors: Mutex::new(Vectors {
                msix: MsixTable::new(msix, router),
                config: NO_VECTOR,
                queues: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vectors> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> usize {
        self.lock().msix.len()
    }

    /// Whether INTx is asserted: MSI-X off and an ISR bit set.
    fn intx_pending(&self) -> bool {
        !self.lock().msix.enabled() && self.isr.load(Ordering::SeqCst) != 0
    }

    /// For an INTx irqfd registered with a resample eventfd (level
    /// semantics, KVM_IRQFD_FLAG_RESAMPLE): call this when the resample
    /// eventfd fires, i.e. when the guest EOIs the line. The line is raised
    /// again while the driver has not read the ISR, so no event is lost
    /// between its ISR read and its EOI.
    pub fn intx_resample(&self) -> io::Result<()> {
        if self.intx_pending() && !self.intx_disabled.load(Ordering::SeqCst) {
            self.intx.write(1)?;
        }
        Ok(())
    }

    fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::SeqCst)
    }

    fn set_intx_disabled(&self, disabled: bool) {
        let was = self.intx_disabled.swap(disabled, Ordering::SeqCst);
        if was && !disabled && self.intx_pending() {
            let _ = self.intx.write(1);
        }
    }

    fn set_msix_control(&self, control: u16) {
        self.lock().msix.set_control(control);
    }

    fn valid_vector(v: &Vectors, vector: u16) -> bool {
        vector == NO_VECTOR || usize::from(vector) < v.msix.len()
    }

    /// Sets the config vector; an out-of-range vector becomes NO_VECTOR
    /// (as the spec says the driver must see) and false is returned.
    fn set_config_vector(&self, vector: u16) -> bool {
        let mut v = self.lock();
        let ok = Self::valid_vector(&v, vector);
        v.config = if ok { vector } else { NO_VECTOR };
        ok
    }

    fn config_vector(&self) -> u16 {
        self.lock().config
    }

    fn set_queue_vector(&self, queue: u16, vector: u16) -> bool {
        let mut v = self.lock();
        let ok = Self::valid_vector(&v, vector);
        match v.queues.get_mut(usize::from(queue)) {
            Some(slot) => {
                *slot = if ok { vector } else { NO_VECTOR };
                ok
            }
            None => false,
        }
    }

    fn queue_vector(&self, queue: u16) -> u16 {
        self.lock().queues.get(usize::from(queue)).copied().unwrap_or(NO_VECTOR)
    }

    fn set_queue_count(&self, queues: usize) {
        self.lock().queues = vec![NO_VECTOR; queues];
    }

    /// The device was reset: vectors unassigned, ISR and pending bits clear.
    fn reset(&self) {
        let mut v = self.lock();
        v.config = NO_VECTOR;
        v.queues.fill(NO_VECTOR);
        v.msix.clear_pending();
        self.isr.store(0, Ordering::SeqCst);
    }

    /// Pending bit of `vector` (for tests and debugging).
    pub fn msix_pending(&self, vector: usize) -> bool {
        self.lock().msix.is_pending(vector)
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, cause: InterruptCause) -> io::Result<()> {
        if cause == InterruptCause::Config {
            // Set whatever the interrupt mechanism (§4.1.4.5.1).
            self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        }
        {
            let mut v = self.lock();
            if v.msix.enabled() {
                let vector = match cause {
                    InterruptCause::Queue(q) => v.queues.get(usize::from(q)).copied().unwrap_or(NO_VECTOR),
                    InterruptCause::Config => v.config,
                };
                if vector == NO_VECTOR {
                    return Ok(());
                }
                return v.msix.signal(usize::from(vector));
            }
        }
        if let InterruptCause::Queue(_) = cause {
            self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        }
        if self.intx_disabled.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.intx.write(1)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioPciError {
    #[error("virtio device type {0} has no modern PCI device ID (0x1040 + type, type <= 0x3f)")]
    DeviceType(u32),
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    state: VirtioState,
    interrupt: Arc<VirtioPciInterrupt>,
    layout: BarLayout,
    msix_cap: Option<usize>,
    pci_cfg_cap: usize,
    /// Where the BAR decodes, as the PCI root last said.
    bar_base: Option<u64>,
    ioevents: Option<Arc<dyn IoEventRegistry>>,
    device_feature_select: u32,
    driver_feature_select: u32,
}

/// A vendor-specific capability body (after ID and next pointer): `cap_len`,
/// `cfg_type`, `bar`, `id`, padding, `offset`, `length`, then `extra`.
fn virtio_cap(kind: u8, region: Region, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![16 + extra.len() as u8, kind, VIRTIO_BAR as u8, 0, 0, 0];
    body.extend_from_slice(&(region.offset as u32).to_le_bytes());
    body.extend_from_slice(&(region.len as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// Offsets into the PCI_CFG capability.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

fn overlaps(offset: usize, len: usize, field: usize, field_len: usize) -> bool {
    offset < field + field_len && field < offset + len
}

impl VirtioPciDevice {
    /// `state` must have been created with `interrupt` as its interrupt.
    /// `intx_line` goes in the interrupt line register (pin A); use the
    /// GSI the DSDT's `_PRT` gives this slot. `ioevents`, if given, gets
    /// the notification addresses registered and moved with the BAR.
    pub fn new(
        state: VirtioState,
        interrupt: Arc<VirtioPciInterrupt>,
        intx_line: u8,
        ioevents: Option<Arc<dyn IoEventRegistry>>,
    ) -> Result<Self, VirtioPciError> {
        let virtio_type = state.device().device_type();
        let device_id = u16::try_from(virtio_type)
            .ok()
            .filter(|&t| t <= 0x3f)
            .map(|t| VIRTIO_DEVICE_ID_BASE + t)
            .ok_or(VirtioPciError::DeviceType(virtio_type))?;
        let queues = state.num_queues();
        let vectors = interrupt.msix_vectors();
        interrupt.set_queue_count(queues);
        let layout = BarLayout::new(queues, vectors);

        let mut config = ConfigSpace::new(PciIds {
            vendor: VIRTIO_VENDOR_ID,
            device: device_id,
            revision: VIRTIO_REVISION,
            class: class_code(virtio_type),
            // No board vendor of our own: the subsystem says "virtio" too.
            subsystem_vendor: VIRTIO_VENDOR_ID,
            subsystem: device_id,
        });
        config.set_interrupt(INTERRUPT_PIN_A, intx_line);
        config.add_memory_bar(VIRTIO_BAR, layout.size)?;
        let add_vendor = |config: &mut ConfigSpace, body: Vec<u8>, writable: &[u8]| {
            config.add_capability(CAP_ID_VENDOR, &body, writable)
        };
        add_vendor(&mut config, virtio_cap(cfg_type::COMMON, layout.common, &[]), &[])?;
        add_vendor(
            &mut config,
            virtio_cap(cfg_type::NOTIFY, layout.notify, &NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
            &[],
        )?;
        add_vendor(&mut config, virtio_cap(cfg_type::ISR, layout.isr, &[]), &[])?;
        add_vendor(&mut config, virtio_cap(cfg_type::DEVICE, layout.device, &[]), &[])?;
        // PCI_CFG: the driver writes bar, offset, length and data.
        let mut writable = [0u8; 18];
        writable[PCI_CFG_BAR - 2] = 0xff;
        writable[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_cap = add_vendor(
            &mut config,
            virtio_cap(cfg_type::PCI, Region { offset: 0, len: 0 }, &[0; 4]),
            &writable,
        )?;
        let msix_cap = match (layout.msix_table, layout.msix_pba) {
            (Some(table), Some(pba)) => {
                let (body, writable) =
                    msix::capability(vectors, VIRTIO_BAR as u8, table.offset as u32, pba.offset as u32);
                Some(config.add_capability(CAP_ID_MSIX, &body, &writable)?)
            }
            _ => None,
        };
        Ok(Self {
            config,
            state,
            interrupt,
            layout,
            msix_cap,
            pci_cfg_cap,
            bar_base: None,
            ioevents,
            device_feature_select: 0,
            driver_feature_select: 0,
        })
    }

    pub fn state(&self) -> &VirtioState {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut VirtioState {
        &mut self.state
    }

    pub fn interrupt(&self) -> &Arc<VirtioPciInterrupt> {
        &self.interrupt
    }

    pub fn layout(&self) -> &BarLayout {
        &self.layout
    }

    /// Where the BAR decodes now, if it does.
    pub fn bar_address(&self) -> Option<u64> {
        self.bar_base
    }

    /// `(guest-physical address, queue index)` of each queue's notify
    /// address while the BAR decodes; empty while it does not. The eventfd
    /// of queue *q* is `state().notify_events()[q]`.
    pub fn notify_addresses(&self) -> Vec<(u64, u16)> {
        let Some(base) = self.bar_base else {
            return Vec::new();
        };
        (0..self.state.num_queues())
            .map(|q| {
                let at = base + self.layout.notify.offset + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                (at, q as u16)
            })
            .collect()
    }

    fn bad_access(&self, what: &str, offset: u64, len: usize) {
        DeviceMetrics::inc(&self.state.metrics().bad_register_writes);
        log::debug!(
            "{}: ignored {len}-byte {what} at BAR offset {offset:#x}",
            self.state.device().name()
        );
    }

    fn move_ioevents(&self, old: Option<u64>, new: Option<u64>) {
        let Some(registry) = &self.ioevents else {
            return;
        };
        let name = self.state.device().name();
        for (q, evt) in self.state.notify_events().iter().enumerate() {
            let offset = self.layout.notify.offset + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Some(base) = old {
                if let Err(e) = registry.unregister(base + offset, evt) {
                    log::warn!("{name}: cannot unregister the ioeventfd of queue {q}: {e}");
                }
            }
            if let Some(base) = new {
                // Without it notifications still work, through a vCPU exit.
                if let Err(e) = registry.register(base + offset, evt) {
                    log::warn!("{name}: cannot register the ioeventfd of queue {q}: {e}");
                }
            }
        }
    }

    fn common_read(&self, rel: u64, len: usize) -> Option<u64> {
        use common::*;
        let s = &self.state;
        let queue = s.queue();
        let sel = s.selected_queue();
        let value = match (rel, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => u64::from(s.device_features_word()),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => u64::from(s.driver_features_word()),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.interrupt.config_vector()),
            (NUM_QUEUES, 2) => s.num_queues().min(usize::from(u16::MAX)) as u64,
            (DEVICE_STATUS, 1) => u64::from(s.status()),
            (CONFIG_GENERATION, 1) => u64::from(s.config_generation() as u8),
            (QUEUE_SELECT, 2) => u64::from(sel),
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(self.interrupt.queue_vector(sel)),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready)),
            (QUEUE_NOTIFY_OFF, 2) | (QUEUE_NOTIFY_DATA, 2) => queue.map_or(0, |_| u64::from(sel)),
            (QUEUE_RESET, 2) => 0,
            (r, 4 | 8) if (QUEUE_DESC..QUEUE_NOTIFY_DATA).contains(&r) && r.is_multiple_of(len as u64) => {
                let field = queue.map_or(0, |q| match (r - QUEUE_DESC) / 8 {
                    0 => q.desc,
                    1 => q.avail,
                    _ => q.used,
                });
                match (len, r % 8) {
                    (8, _) => field,
                    (_, 0) => field & 0xffff_ffff,
                    _ => field >> 32,
                }
            }
            _ => return None,
        };
        Some(value)
    }

    /// A write to common configuration; false if it was not a register
    /// write this transport accepts (the state counts its own refusals).
    fn common_write(&mut self, rel: u64, data: &[u8]) -> bool {
        use common::*;
        let mut bytes = [0; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let word = value as u32;
        let s = &mut self.state;
        match (rel, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => {
                self.device_feature_select = word;
                s.select_device_features(word);
            }
            (DRIVER_FEATURE_SELECT, 4) => {
                self.driver_feature_select = word;
                s.select_driver_features(word);
            }
            (DRIVER_FEATURE, 4) => s.write_driver_features(word),
            (CONFIG_MSIX_VECTOR, 2) => return self.interrupt.set_config_vector(word as u16),
            (DEVICE_STATUS, 1) => {
                s.set_status(word as u8);
                if word == 0 {
                    self.device_feature_select = 0;
                    self.driver_feature_select = 0;
                    self.interrupt.reset();
                }
            }
            (QUEUE_SELECT, 2) => s.select_queue(word),
            (QUEUE_SIZE, 2) => s.set_queue_size(word),
            (QUEUE_MSIX_VECTOR, 2) => return self.interrupt.set_queue_vector(s.selected_queue(), word as u16),
            // Writing 0 is not allowed (§4.1.4.3.2); queue reset is not offered.
            (QUEUE_ENABLE, 2) if word == 1 => s.set_queue_ready(true),
            (r, 4 | 8) if (QUEUE_DESC..QUEUE_NOTIFY_DATA).contains(&r) && r.is_multiple_of(data.len() as u64) => {
                let which = match (r - QUEUE_DESC) / 8 {
                    0 => QueueAddress::Desc,
                    1 => QueueAddress::Avail,
                    _ => QueueAddress::Used,
                };
                if data.len() == 8 {
                    s.set_queue_address(which, Half::Low, word);
                    s.set_queue_address(which, Half::High, (value >> 32) as u32);
                } else if r % 8 == 0 {
                    s.set_queue_address(which, Half::Low, word);
                } else {
                    s.set_queue_address(which, Half::High, word);
                }
            }
            _ => return false,
        }
        true
    }

    /// A read at `offset` into the BAR.
    fn read_region(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        let l = self.layout;
        let ok = if let Some(rel) = l.common.offset_of(offset, len) {
            match self.common_read(rel, len) {
                Some(value) => {
                    data.copy_from_slice(&value.to_le_bytes()[..len]);
                    true
                }
                None => false,
            }
        } else if l.isr.offset_of(offset, len).is_some() {
            if len == 1 {
                data[0] = self.interrupt.take_isr();
            }
            len == 1
        } else if let Some(rel) = l.device.offset_of(offset, len) {
            self.state.read_config(rel, data);
            true
        } else if let Some(rel) = l.msix_table.and_then(|r| r.offset_of(offset, len)) {
            self.interrupt.lock().msix.read_table(rel, data)
        } else if let Some(rel) = l.msix_pba.and_then(|r| r.offset_of(offset, len)) {
            self.interrupt.lock().msix.read_pba(rel, data)
        } else {
            // Notifications are write-only; the rest is a gap.
            false
        };
        if !ok {
            data.fill(0);
            self.bad_access("read", offset, len);
        }
    }

    /// A write at `offset` into the BAR.
    fn write_region(&mut self, offset: u64, data: &[u8]) {
        let len = data.len();
        let l = self.layout;
        let ok = if let Some(rel) = l.common.offset_of(offset, len) {
            self.common_write(rel, data)
        } else if let Some(rel) = l.device.offset_of(offset, len) {
            // The state counts refused config writes itself.
            self.state.write_config(rel, data);
            true
        } else if let Some(rel) = l.notify.offset_of(offset, len) {
            // 16 bits (the queue index), or 32 with notification data.
            let q = rel / u64::from(NOTIFY_OFF_MULTIPLIER);
            let aligned = rel.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER));
            if aligned && matches!(len, 2 | 4) {
                self.state.notify(q as u32);
            }
            aligned && matches!(len, 2 | 4)
        } else if let Some(rel) = l.msix_table.and_then(|r| r.offset_of(offset, len)) {
            self.interrupt.lock().msix.write_table(rel, data)
        } else {
            // ISR and PBA are read-only; the rest is a gap.
            false
        };
        if !ok {
            self.bad_access("write", offset, len);
        }
    }

    /// Where the PCI_CFG capability points: `(BAR offset, length)`.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = usize::from(self.config.u8_at(cap + PCI_CFG_BAR));
        let offset = u64::from(self.config.u32_at(cap + PCI_CFG_OFFSET));
        let len = self.config.u32_at(cap + PCI_CFG_LENGTH) as usize;
        (bar == VIRTIO_BAR && matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64)).then_some((offset, len))
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let len = data.len();
        let cfg_data = self.pci_cfg_cap + PCI_CFG_DATA;
        if overlaps(offset, len, cfg_data, 4) {
            // A read of pci_cfg_data reads the BAR where the capability
            // points. Unset (length 0) it reads nothing: lspci dumping the
            // space is not a bad access.
            if let Some((bar_offset, n)) = self.pci_cfg_target() {
                let mut bytes = [0; 4];
                self.read_region(bar_offset, &mut bytes[..n]);
                self.config.set_bytes(cfg_data, &bytes);
            }
        }
        self.config.read(offset, data);
        if overlaps(offset, len, reg::STATUS, 1) && self.interrupt.intx_pending() {
            data[reg::STATUS - offset] |= config::status::INTERRUPT as u8;
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let len = data.len();
        self.config.write(offset, data);
        let cfg_data = self.pci_cfg_cap + PCI_CFG_DATA;
        if overlaps(offset, len, cfg_data, 4) {
            match self.pci_cfg_target() {
                Some((bar_offset, n)) => {
                    let bytes = self.config.u32_at(cfg_data).to_le_bytes();
                    self.write_region(bar_offset, &bytes[..n]);
                }
                None => self.bad_access("PCI_CFG write", 0, len),
            }
            return;
        }
        if overlaps(offset, len, reg::COMMAND, 2) {
            self.interrupt.set_intx_disabled(self.config.intx_disabled());
        }
        if let Some(cap) = self.msix_cap {
            if overlaps(offset, len, cap + 2, 2) {
                self.interrupt.set_msix_control(self.config.u16_at(cap + 2));
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_BAR {
            self.read_region(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == VIRTIO_BAR {
            self.write_region(offset, data);
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar == VIRTIO_BAR {
            self.bar_base = new;
            self.move_ioevents(old, new);
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.move_ioevents(self.bar_base, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::dma::{direct_view, DmaMode};
    use crate::pci::bus::{PciBarWindow, PciConfigMmio, PciRoot};
    use crate::pci::config::command;
    use crate::pci::msix::{MsiMessage, CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
    use crate::pci::testing::{MockIoEvents, MockRouter};
    use crate::virtio::{features, status, ActivateError, Activation, VirtioDevice};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);
    const GSI_BASE: u32 = 24;
    const INTX_LINE: u8 = 11;
    const QUEUES: usize = 2;

    type Activations = Arc<Mutex<Vec<(usize, u64)>>>;

    struct Dummy {
        kind: u32,
        activations: Activations,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            self.kind
        }
        fn name(&self) -> &str {
            "dummy0"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16; QUEUES]
        }
        fn device_features(&self) -> u64 {
            features::VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0x80 + offset as u8 + i as u8;
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.activations
                .lock()
                .unwrap()
                .push((a.queues.len(), a.acked_features));
            Ok(())
        }
        fn reset(&mut self) {}
    }

    /// Everything the VMM would keep of one device.
    struct Handles {
        interrupt: Arc<VirtioPciInterrupt>,
        router: Arc<MockRouter>,
        ioevents: Arc<MockIoEvents>,
        irqfds: Vec<EventFd>,
        intx: EventFd,
        notify: Vec<EventFd>,
        activations: Activations,
        metrics: Arc<DeviceMetrics>,
    }

    fn device_of_type(kind: u32, vectors: usize) -> Result<(VirtioPciDevice, Handles), VirtioPciError> {
        let router = Arc::new(MockRouter::default());
        let ioevents = Arc::new(MockIoEvents::default());
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut irqfds = Vec::new();
        let msix = (0..vectors)
            .map(|i| {
                let irqfd = evt();
                irqfds.push(irqfd.try_clone().unwrap());
                MsiVector {
                    gsi: GSI_BASE + i as u32,
                    irqfd,
                }
            })
            .collect();
        let intx = evt();
        let interrupt = Arc::new(VirtioPciInterrupt::new(msix, router.clone(), intx.try_clone().unwrap()));
        let activations = Activations::default();
        let metrics = Arc::new(DeviceMetrics::default());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let state = VirtioState::new(
            Box::new(Dummy {
                kind,
                activations: activations.clone(),
            }),
            DmaMode::Bypass,
            false,
            direct_view(mem),
            interrupt.clone(),
            metrics.clone(),
        )
        .unwrap();
        let notify = state.notify_events().iter().map(|e| e.try_clone().unwrap()).collect();
        let dev = VirtioPciDevice::new(state, interrupt.clone(), INTX_LINE, Some(ioevents.clone()))?;
        Ok((
            dev,
            Handles {
                interrupt,
                router,
                ioevents,
                irqfds,
                intx,
                notify,
                activations,
                metrics,
            },
        ))
    }

    /// Drives the device as a guest does: configuration space through
    /// ECAM, registers through the BAR window.
    struct Guest {
        root: Arc<Mutex<PciRoot>>,
        ecam: PciConfigMmio,
        window: PciBarWindow,
        slot: u64,
        h: Handles,
    }

    impl Guest {
        fn new(vectors: usize) -> Self {
            let (dev, h) = device_of_type(device_type::BLOCK, vectors).unwrap();
            let root = Arc::new(Mutex::new(PciRoot::new(WINDOW).unwrap()));
            let slot = u64::from(root.lock().unwrap().add_device(Box::new(dev)).unwrap());
            Guest {
                ecam: PciConfigMmio::new(root.clone()),
                window: PciBarWindow::new(root.clone()),
                root,
                slot,
                h,
            }
        }

        fn cfg_read(&mut self, reg: usize, len: usize) -> u32 {
            let mut d = [0; 4];
            self.ecam.read(self.slot << 15 | reg as u64, &mut d[..len]);
            u32::from_le_bytes(d)
        }

        fn cfg_write(&mut self, reg: usize, len: usize, value: u32) {
            self.ecam
                .write(self.slot << 15 | reg as u64, &value.to_le_bytes()[..len]);
        }

        /// `(offset, id)` of each capability, walked through config reads.
        fn caps(&mut self) -> Vec<(usize, u8)> {
            let mut caps = Vec::new();
            assert_ne!(self.cfg_read(reg::STATUS, 2) & 0x10, 0, "capability list bit");
            let mut at = self.cfg_read(reg::CAPABILITIES_POINTER, 1) as usize;
            while at != 0 {
                assert!(caps.len() < 48, "capability loop");
                caps.push((at, self.cfg_read(at, 1) as u8));
                at = self.cfg_read(at + 1, 1) as usize;
            }
            caps
        }

        /// `(cap offset, bar, offset, length)` of the virtio capability of `kind`.
        fn virtio_cap(&mut self, kind: u8) -> (usize, u8, u64, u64) {
            let caps = self.caps();
            let (at, _) = *caps
                .iter()
                .find(|&&(at, id)| id == CAP_ID_VENDOR && self.cfg_read(at + 3, 1) == u32::from(kind))
                .expect("virtio capability");
            (
                at,
                self.cfg_read(at + 4, 1) as u8,
                u64::from(self.cfg_read(at + 8, 4)),
                u64::from(self.cfg_read(at + 12, 4)),
            )
        }

        fn msix_cap(&mut self) -> Option<usize> {
            self.caps()
                .into_iter()
                .find(|&(_, id)| id == CAP_ID_MSIX)
                .map(|(at, _)| at)
        }

        fn enable_memory(&mut self) {
            self.cfg_write(reg::COMMAND, 2, u32::from(command::MEMORY_SPACE | command::BUS_MASTER));
        }

        fn bar(&mut self) -> u64 {
            u64::from(self.cfg_read(reg::BAR0, 4) & !0xf)
        }

        fn read(&mut self, bar_offset: u64, len: usize) -> u64 {
            let mut d = [0; 8];
            let at = self.bar() + bar_offset - WINDOW.0;
            self.window.read(at, &mut d[..len]);
            u64::from_le_bytes(d)
        }

        fn write(&mut self, bar_offset: u64, len: usize, value: u64) {
            let at = self.bar() + bar_offset - WINDOW.0;
            self.window.write(at, &value.to_le_bytes()[..len]);
        }

        fn common(&mut self, field: u64, len: usize) -> u64 {
            let (_, _, base, _) = self.virtio_cap(cfg_type::COMMON);
            self.read(base + field, len)
        }

        fn set_common(&mut self, field: u64, len: usize, value: u64) {
            let (_, _, base, _) = self.virtio_cap(cfg_type::COMMON);
            self.write(base + field, len, value);
        }

        fn isr(&mut self) -> u8 {
            let (_, _, base, _) = self.virtio_cap(cfg_type::ISR);
            self.read(base, 1) as u8
        }

        fn bad(&self) -> u64 {
            self.h.metrics.bad_register_writes.load(Ordering::Relaxed)
        }

        /// Enables MSI-X (function mask first, as Linux does), programs
        /// `vector` and unmasks it.
        fn program_vector(&mut self, vector: u64, message: MsiMessage) {
            let cap = self.msix_cap().unwrap();
            let table = u64::from(self.cfg_read(cap + 4, 4));
            self.cfg_write(cap + 2, 2, u32::from(CONTROL_ENABLE | CONTROL_FUNCTION_MASK));
            let entry = (table & !7) + vector * msix::ENTRY_SIZE;
            self.write(entry, 4, message.address & 0xffff_ffff);
            self.write(entry + 4, 4, message.address >> 32);
            self.write(entry + 8, 4, u64::from(message.data));
            self.write(entry + 12, 4, 0);
            self.cfg_write(cap + 2, 2, u32::from(CONTROL_ENABLE));
        }

        fn mask_vector(&mut self, vector: u64, masked: bool) {
            let cap = self.msix_cap().unwrap();
            let table = u64::from(self.cfg_read(cap + 4, 4)) & !7;
            self.write(table + vector * msix::ENTRY_SIZE + 12, 4, u64::from(masked));
        }
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x4023,
    };

    #[test]
    fn ids_class_and_interrupt_pin() {
        let mut g = Guest::new(3);
        assert_eq!(g.cfg_read(reg::VENDOR_ID, 2), 0x1af4);
        assert_eq!(g.cfg_read(reg::DEVICE_ID, 2), 0x1042, "0x1040 + block");
        assert_eq!(g.cfg_read(reg::REVISION_ID, 1), 1);
        assert_eq!(g.cfg_read(reg::REVISION_ID, 4) >> 8, 0x01_80_00);
        assert_eq!(g.cfg_read(reg::SUBSYSTEM_VENDOR_ID, 4), 0x1042_1af4);
        assert_eq!(g.cfg_read(reg::INTERRUPT_PIN, 1), 1, "INTA#");
        assert_eq!(g.cfg_read(reg::INTERRUPT_LINE, 1), u32::from(INTX_LINE));
        assert_eq!(class_code(device_type::NET), 0x02_00_00);
        assert_eq!(class_code(device_type::RNG), 0xff_00_00);
        assert!(matches!(device_of_type(0x40, 1), Err(VirtioPciError::DeviceType(0x40))));
    }

    #[test]
    fn capability_walk_finds_every_region_inside_the_bar() {
        let mut g = Guest::new(3);
        // BAR size by the sizing protocol.
        let saved = g.cfg_read(reg::BAR0, 4);
        g.cfg_write(reg::BAR0, 4, u32::MAX);
        let bar_size = u64::from(!(g.cfg_read(reg::BAR0, 4) & !0xf)) + 1;
        g.cfg_write(reg::BAR0, 4, saved);
        assert_eq!(bar_size, 0x8000);
        assert_eq!(g.cfg_read(reg::BAR0, 4) & 0xf, 0, "32-bit memory BAR");

        let expect = [
            (cfg_type::COMMON, 0x0000, common::LEN),
            (cfg_type::NOTIFY, 0x3000, (QUEUES * 4) as u64),
            (cfg_type::ISR, 0x1000, 1),
            (cfg_type::DEVICE, 0x2000, 0x1000),
        ];
        for (kind, offset, len) in expect {
            let (at, bar, off, length) = g.virtio_cap(kind);
            assert_eq!((bar, off, length), (0, offset, len), "cfg_type {kind}");
            assert!(off + length <= bar_size);
            let cap_len = g.cfg_read(at + 2, 1);
            assert_eq!(cap_len, if kind == cfg_type::NOTIFY { 20 } else { 16 });
        }
        let (notify, ..) = g.virtio_cap(cfg_type::NOTIFY);
        assert_eq!(g.cfg_read(notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
        let (pci_cfg, ..) = g.virtio_cap(cfg_type::PCI);
        assert_eq!(g.cfg_read(pci_cfg + 2, 1), 20);

        let cap = g.msix_cap().expect("MSI-X capability");
        assert_eq!(g.cfg_read(cap + 2, 2) & 0x7ff, 2, "3 vectors");
        let table = g.cfg_read(cap + 4, 4);
        let pba = g.cfg_read(cap + 8, 4);
        assert_eq!((table & 7, pba & 7), (0, 0), "both in BAR 0");
        assert_eq!(u64::from(table), 0x4000);
        assert_eq!(u64::from(pba), 0x5000);
        assert!(u64::from(pba) + 8 <= bar_size && u64::from(table) + 3 * 16 <= bar_size);

        // No vectors: no MSI-X capability, the rest unchanged.
        let mut g = Guest::new(0);
        assert!(g.msix_cap().is_none());
        assert_eq!(g.caps().len(), 5);
        let (_, _, off, _) = g.virtio_cap(cfg_type::NOTIFY);
        assert_eq!(off, 0x3000);
    }

    #[test]
    fn init_sequence_through_common_config_activates_the_device() {
        use common::*;
        let mut g = Guest::new(QUEUES + 1);
        g.enable_memory();
        g.set_common(DEVICE_STATUS, 1, 0);
        assert_eq!(g.common(DEVICE_STATUS, 1), 0);
        g.set_common(DEVICE_STATUS, 1, u64::from(status::ACKNOWLEDGE));
        g.set_common(DEVICE_STATUS, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        let mut offered = 0;
        for sel in 0..2 {
            g.set_common(DEVICE_FEATURE_SELECT, 4, sel);
            assert_eq!(g.common(DEVICE_FEATURE_SELECT, 4), sel);
            offered |= g.common(DEVICE_FEATURE, 4) << (32 * sel);
        }
        assert_eq!(offered, features::VERSION_1 | 1);
        for sel in 0..2 {
            g.set_common(DRIVER_FEATURE_SELECT, 4, sel);
            g.set_common(DRIVER_FEATURE, 4, (offered >> (32 * sel)) & 0xffff_ffff);
        }
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        g.set_common(DEVICE_STATUS, 1, u64::from(features_ok));
        assert_eq!(g.common(DEVICE_STATUS, 1), u64::from(features_ok));
        g.set_common(CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(g.common(CONFIG_MSIX_VECTOR, 2), 0);

        assert_eq!(g.common(NUM_QUEUES, 2), QUEUES as u64);
        for q in 0..QUEUES as u64 {
            g.set_common(QUEUE_SELECT, 2, q);
            assert_eq!(g.common(QUEUE_SIZE, 2), 16, "max size until changed");
            assert_eq!(g.common(QUEUE_ENABLE, 2), 0);
            g.set_common(QUEUE_SIZE, 2, 8);
            g.set_common(QUEUE_MSIX_VECTOR, 2, q + 1);
            assert_eq!(g.common(QUEUE_MSIX_VECTOR, 2), q + 1);
            let base = 0x1_0000 + q * 0x1000;
            // Two 32-bit halves as Linux writes them, and one 64-bit write.
            g.set_common(QUEUE_DESC, 4, base);
            g.set_common(QUEUE_DESC + 4, 4, 0);
            g.set_common(QUEUE_DRIVER, 8, base + 0x400);
            g.set_common(QUEUE_DEVICE, 4, base + 0x800);
            g.set_common(QUEUE_DEVICE + 4, 4, 0);
            assert_eq!(g.common(QUEUE_DESC, 8), base);
            assert_eq!(g.common(QUEUE_DRIVER, 4), base + 0x400);
            assert_eq!(g.common(QUEUE_DEVICE + 4, 4), 0);
            assert_eq!(g.common(QUEUE_NOTIFY_OFF, 2), q);
            g.set_common(QUEUE_ENABLE, 2, 1);
            assert_eq!(g.common(QUEUE_ENABLE, 2), 1);
            assert_eq!(g.common(QUEUE_SIZE, 2), 8);
        }
        let ok = features_ok | status::DRIVER_OK;
        g.set_common(DEVICE_STATUS, 1, u64::from(ok));
        assert_eq!(g.common(DEVICE_STATUS, 1), u64::from(ok));
        assert_eq!(*g.h.activations.lock().unwrap(), vec![(QUEUES, offered)]);
        assert_eq!(g.bad(), 0, "a correct driver makes no bad accesses");
        // The device configuration region reaches the device.
        let (_, _, device, _) = g.virtio_cap(cfg_type::DEVICE);
        assert_eq!(g.read(device + 4, 4), 0x8786_8584);
        // Reset through the status register.
        g.set_common(DEVICE_STATUS, 1, 0);
        assert_eq!(g.common(DEVICE_STATUS, 1), 0);
        assert_eq!(g.h.metrics.resets.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn notify_addresses_are_distinct_and_follow_the_bar() {
        let mut g = Guest::new(0);
        let (_, _, notify, notify_len) = g.virtio_cap(cfg_type::NOTIFY);
        assert!(g.h.ioevents.registered.lock().unwrap().is_empty(), "not decoding yet");
        g.enable_memory();
        let bar = g.bar();
        let mut addrs = Vec::new();
        for q in 0..QUEUES as u64 {
            g.set_common(common::QUEUE_SELECT, 2, q);
            let off = g.common(common::QUEUE_NOTIFY_OFF, 2) * u64::from(NOTIFY_OFF_MULTIPLIER);
            assert!(off + 2 <= notify_len);
            addrs.push(bar + notify + off);
        }
        assert_eq!(addrs, vec![bar + 0x3000, bar + 0x3004]);
        assert_eq!(*g.h.ioevents.registered.lock().unwrap(), addrs);

        // Without an ioeventfd (a trapped write), the queue is notified too.
        g.write(notify + 4, 2, 1);
        assert_eq!(g.h.notify[1].read().unwrap(), 1);
        assert!(g.h.notify[0].read().is_err());

        // The guest moves the BAR: the ioeventfds move with it.
        g.cfg_write(reg::BAR0, 4, 0xc100_0000);
        assert_eq!(*g.h.ioevents.registered.lock().unwrap(), vec![0xc100_3000, 0xc100_3004]);
        // Memory decode off: none left.
        g.cfg_write(reg::COMMAND, 2, 0);
        assert!(g.h.ioevents.registered.lock().unwrap().is_empty());

        // The same, asked of the device itself.
        let (mut dev, h) = device_of_type(device_type::NET, 1).unwrap();
        assert!(dev.notify_addresses().is_empty());
        dev.bar_moved(VIRTIO_BAR, None, Some(0xd000_0000));
        assert_eq!(dev.notify_addresses(), vec![(0xd000_3000, 0), (0xd000_3004, 1)]);
        drop(dev);
        assert!(h.ioevents.registered.lock().unwrap().is_empty(), "dropped");
    }

    #[test]
    fn msix_queue_interrupt_goes_to_the_programmed_vector() {
        let mut g = Guest::new(3);
        g.enable_memory();
        g.program_vector(1, MSG);
        assert_eq!(g.h.router.calls(), vec![(GSI_BASE + 1, Some(MSG))]);
        g.set_common(common::QUEUE_SELECT, 2, 0);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 1);

        g.h.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert_eq!(g.h.irqfds[1].read().unwrap(), 1);
        assert_eq!(g.h.router.route(GSI_BASE + 1), Some(MSG));
        assert!(g.h.irqfds[0].read().is_err() && g.h.irqfds[2].read().is_err());
        assert!(g.h.intx.read().is_err(), "no INTx with MSI-X on");
        assert_eq!(g.isr(), 0, "no ISR queue bit with MSI-X on");

        // Config interrupts go to the config vector and set ISR bit 1.
        g.program_vector(
            0,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x22,
            },
        );
        g.set_common(common::CONFIG_MSIX_VECTOR, 2, 0);
        g.h.interrupt.trigger(InterruptCause::Config).unwrap();
        assert_eq!(g.h.irqfds[0].read().unwrap(), 1);
        assert_eq!(g.h.router.route(GSI_BASE).unwrap().data, 0x22);
        assert_eq!(g.isr(), ISR_CONFIG);

        // NO_VECTOR: no interrupt at all.
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, u64::from(NO_VECTOR));
        g.h.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert!(g.h.irqfds.iter().all(|fd| fd.read().is_err()));
        assert!(g.h.intx.read().is_err());
    }

    /// What a Linux driver's freeze and restore do: reset the device, free
    /// its vectors (MSI-X off), then enable and program them again.
    #[test]
    fn msix_can_be_torn_down_and_enabled_again_across_a_reset() {
        let mut g = Guest::new(3);
        g.enable_memory();
        g.program_vector(1, MSG);
        g.set_common(common::QUEUE_SELECT, 2, 0);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 1);
        g.set_common(common::DEVICE_STATUS, 1, 0);
        let cap = g.msix_cap().unwrap();
        g.mask_vector(1, true);
        g.cfg_write(cap + 2, 2, 0);
        assert_eq!(g.h.router.route(GSI_BASE + 1), None, "route dropped with MSI-X off");
        g.h.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert!(g.h.irqfds.iter().all(|fd| fd.read().is_err()));

        let again = MsiMessage {
            address: 0xfee0_2000,
            data: 0x4031,
        };
        g.program_vector(1, again);
        g.set_common(common::QUEUE_SELECT, 2, 0);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(g.common(common::QUEUE_MSIX_VECTOR, 2), 1);
        g.h.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert_eq!(g.h.irqfds[1].read().unwrap(), 1);
        assert_eq!(g.h.router.route(GSI_BASE + 1), Some(again));
    }

    #[test]
    fn masked_vector_sets_pending_and_fires_on_unmask() {
        let mut g = Guest::new(3);
        g.enable_memory();
        g.program_vector(2, MSG);
        g.set_common(common::QUEUE_SELECT, 2, 1);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 2);
        g.mask_vector(2, true);

        g.h.interrupt.trigger(InterruptCause::Queue(1)).unwrap();
        assert!(g.h.irqfds[2].read().is_err(), "masked: nothing sent");
        let cap = g.msix_cap().unwrap();
        let pba = u64::from(g.cfg_read(cap + 8, 4));
        assert_eq!(g.read(pba, 8), 1 << 2, "pending bit set");
        assert!(g.h.interrupt.msix_pending(2));

        g.mask_vector(2, false);
        assert_eq!(g.h.irqfds[2].read().unwrap(), 1, "sent on unmask");
        assert_eq!(g.read(pba, 8), 0);
        assert_eq!(g.h.router.route(GSI_BASE + 2), Some(MSG));

        // The function mask holds events the same way.
        let control = g.cfg_read(cap + 2, 2);
        g.cfg_write(cap + 2, 2, control | u32::from(CONTROL_FUNCTION_MASK));
        g.h.interrupt.trigger(InterruptCause::Queue(1)).unwrap();
        assert!(g.h.irqfds[2].read().is_err());
        assert_eq!(g.read(pba, 4), 1 << 2);
        g.cfg_write(cap + 2, 2, control);
        assert_eq!(g.h.irqfds[2].read().unwrap(), 1);
    }

    #[test]
    fn vectors_out_of_range_read_back_no_vector() {
        let mut g = Guest::new(2);
        g.enable_memory();
        g.set_common(common::CONFIG_MSIX_VECTOR, 2, 2);
        assert_eq!(g.common(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        g.set_common(common::QUEUE_SELECT, 2, 0);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 1);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 7);
        assert_eq!(g.common(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(g.bad(), 2);
        // A queue that does not exist has no vector and takes none.
        g.set_common(common::QUEUE_SELECT, 2, 5);
        assert_eq!(g.common(common::QUEUE_SIZE, 2), 0);
        assert_eq!(g.common(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 0);
        assert_eq!(g.bad(), 3);
        // Without MSI-X vectors, every vector but NO_VECTOR is out of range.
        let mut g = Guest::new(0);
        g.enable_memory();
        g.set_common(common::CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(g.common(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        g.set_common(common::CONFIG_MSIX_VECTOR, 2, u64::from(NO_VECTOR));
        assert_eq!(g.bad(), 1);
    }

    #[test]
    fn intx_sets_isr_and_writes_the_eventfd() {
        let mut g = Guest::new(3);
        g.enable_memory();
        // MSI-X present but not enabled: INTx.
        g.h.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert_eq!(g.h.intx.read().unwrap(), 1);
        assert!(g.h.irqfds.iter().all(|fd| fd.read().is_err()));
        assert_ne!(g.cfg_read(reg::STATUS, 2) & 0x8, 0, "status: interrupt");
        // The line stays up until the ISR is read: resampling re-raises it.
        g.h.interrupt.intx_resample().unwrap();
        assert_eq!(g.h.intx.read().unwrap(), 1);
        assert_eq!(g.isr(), ISR_QUEUE);
        assert_eq!(g.isr(), 0, "read clears");
        assert_eq!(g.cfg_read(reg::STATUS, 2) & 0x8, 0);
        g.h.interrupt.intx_resample().unwrap();
        assert!(g.h.intx.read().is_err());

        g.h.interrupt.trigger(InterruptCause::Config).unwrap();
        g.h.interrupt.trigger(InterruptCause::Queue(1)).unwrap();
        assert_eq!(g.h.intx.read().unwrap(), 2);
        assert_eq!(g.isr(), ISR_QUEUE | ISR_CONFIG);

        // INTx disabled in the command register: ISR only, then the line
        // goes up when it is enabled again.
        let cmd = g.cfg_read(reg::COMMAND, 2);
        g.cfg_write(reg::COMMAND, 2, cmd | u32::from(command::INTX_DISABLE));
        g.h.interrupt.trigger(InterruptCause::Queue(0)).unwrap();
        assert!(g.h.intx.read().is_err());
        g.cfg_write(reg::COMMAND, 2, cmd);
        assert_eq!(g.h.intx.read().unwrap(), 1);
        assert_eq!(g.isr(), ISR_QUEUE);

        // Works the same without any MSI-X vectors.
        let mut g = Guest::new(0);
        g.enable_memory();
        g.h.interrupt.trigger(InterruptCause::Queue(1)).unwrap();
        assert_eq!(g.h.intx.read().unwrap(), 1);
        assert_eq!(g.isr(), ISR_QUEUE);
    }

    #[test]
    fn bad_widths_and_offsets_are_counted_and_ignored() {
        use common::*;
        let mut g = Guest::new(2);
        g.enable_memory();
        let (_, _, isr, _) = g.virtio_cap(cfg_type::ISR);
        let (_, _, notify, _) = g.virtio_cap(cfg_type::NOTIFY);
        let cap = g.msix_cap().unwrap();
        let pba = u64::from(g.cfg_read(cap + 8, 4));
        let reads: &[(u64, usize)] = &[
            (DEVICE_FEATURE, 2), // 32-bit field read as 16
            (DEVICE_STATUS, 4),  // 8-bit field read as 32
            (QUEUE_SELECT, 4),   // 16-bit field read as 32
            (QUEUE_DESC + 2, 4), // misaligned half
            (QUEUE_DESC + 4, 8), // misaligned 64-bit
            (LEN, 4),            // past the structure
            (0x800, 4),          // gap in the common page
            (isr, 4),            // ISR is one byte
            (isr + 1, 1),        // past the ISR
            (notify, 2),         // notify is write-only
            (pba, 2),            // PBA: dwords and qwords only
            (0x7ffc, 4),         // past everything in the BAR
        ];
        for (i, &(offset, len)) in reads.iter().enumerate() {
            assert_eq!(g.read(offset, len), 0, "read {offset:#x}/{len}");
            assert_eq!(g.bad(), i as u64 + 1, "read {offset:#x}/{len}");
        }
        let before = g.bad();
        let writes: &[(u64, usize, u64)] = &[
            (DEVICE_FEATURE, 4, 0), // read-only
            (NUM_QUEUES, 2, 9),     // read-only
            (CONFIG_GENERATION, 1, 1),
            (QUEUE_NOTIFY_OFF, 2, 3),
            (QUEUE_RESET, 2, 1),   // queue reset not offered
            (QUEUE_ENABLE, 2, 0),  // writing 0 is not allowed
            (DEVICE_STATUS, 2, 1), // wrong width
            (QUEUE_SIZE, 4, 8),    // wrong width
            (isr, 1, 0),           // ISR is read-only
            (notify + 1, 2, 0),    // misaligned notification
            (notify + 4, 1, 1),    // byte notification
            (notify + 8, 2, 2),    // past the last queue
            (pba, 8, 1),           // PBA is read-only
            (0x7000, 4, 1),        // gap
        ];
        for (i, &(offset, len, value)) in writes.iter().enumerate() {
            g.write(offset, len, value);
            assert_eq!(g.bad(), before + i as u64 + 1, "write {offset:#x}/{len}");
        }
        // None of it changed anything.
        assert_eq!(g.common(NUM_QUEUES, 2), QUEUES as u64);
        assert_eq!(g.common(DEVICE_STATUS, 1), 0);
        assert_eq!(g.common(QUEUE_SIZE, 2), 16);
        assert!(g.h.notify.iter().all(|e| e.read().is_err()));
        assert_eq!(g.h.metrics.bad_notifications.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn pci_cfg_capability_reaches_the_bar() {
        let mut g = Guest::new(1);
        // Works with memory decoding off: that is what it is for.
        let (cap, ..) = g.virtio_cap(cfg_type::PCI);
        g.cfg_write(cap + PCI_CFG_BAR, 1, 0);
        g.cfg_write(cap + PCI_CFG_OFFSET, 4, common::DEVICE_FEATURE_SELECT as u32);
        g.cfg_write(cap + PCI_CFG_LENGTH, 4, 4);
        g.cfg_write(cap + PCI_CFG_DATA, 4, 1);
        g.cfg_write(cap + PCI_CFG_OFFSET, 4, common::DEVICE_FEATURE as u32);
        assert_eq!(g.cfg_read(cap + PCI_CFG_DATA, 4), (features::VERSION_1 >> 32) as u32);
        // A byte access through it.
        g.cfg_write(cap + PCI_CFG_OFFSET, 4, common::DEVICE_STATUS as u32);
        g.cfg_write(cap + PCI_CFG_LENGTH, 4, 1);
        g.cfg_write(cap + PCI_CFG_DATA, 4, u32::from(status::ACKNOWLEDGE));
        assert_eq!(g.cfg_read(cap + PCI_CFG_DATA, 1), u32::from(status::ACKNOWLEDGE));
        assert_eq!(g.bad(), 0);
        // A bad length is refused and counted.
        g.cfg_write(cap + PCI_CFG_LENGTH, 4, 3);
        g.cfg_write(cap + PCI_CFG_DATA, 4, 0);
        assert_eq!(g.bad(), 1);
        g.enable_memory();
        assert_eq!(g.common(common::DEVICE_STATUS, 1), u64::from(status::ACKNOWLEDGE));
    }

    #[test]
    fn reset_unassigns_vectors_and_clears_isr() {
        let mut g = Guest::new(3);
        g.enable_memory();
        g.set_common(common::CONFIG_MSIX_VECTOR, 2, 0);
        g.set_common(common::QUEUE_SELECT, 2, 1);
        g.set_common(common::QUEUE_MSIX_VECTOR, 2, 2);
        g.set_common(common::DEVICE_FEATURE_SELECT, 4, 1);
        g.h.interrupt.trigger(InterruptCause::Config).unwrap();
        g.set_common(common::DEVICE_STATUS, 1, 0);
        assert_eq!(g.isr(), 0);
        assert_eq!(g.common(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        g.set_common(common::QUEUE_SELECT, 2, 1);
        assert_eq!(g.common(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(g.common(common::DEVICE_FEATURE_SELECT, 4), 0);
        // The PCI side (BAR, MSI-X table) survives a virtio reset.
        assert_eq!(g.bar(), WINDOW.0);
        let _ = &g.root;
    }
}
