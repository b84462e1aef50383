//! The two virtio transports at register level, as a driver sees them
//! (virtio 1.2 §4.1 PCI, §4.2 MMIO), and finding the devices on them.
//!
//! virtio-mmio: version 2 registers in a 4 KiB window, announced by
//! `virtio_mmio.device=<size>@<addr>:<irq>` on the command line.
//!
//! virtio-pci: functions 1af4:1040+type on bus 0, found through ECAM; the
//! vendor-specific capabilities (ID 0x09) say where in which BAR the
//! common configuration, notification area, ISR and device configuration
//! are. veil assigns the BARs itself; the probe only turns on memory
//! decoding (and bus mastering) in the command register.

use super::io::{rd16, rd32, rd8, wr16, wr32, wr8, Deadline, Text, ANSWER_TICKS};

/// Device status bits (§2.1).
pub const ACKNOWLEDGE: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const DEVICE_NEEDS_RESET: u8 = 64;
pub const FAILED: u8 = 128;

/// The "configuration change" interrupt cause, in virtio-mmio's
/// InterruptStatus and in virtio-pci's ISR alike.
pub const INT_CONFIG: u32 = 2;

/// Most queues the probe drives on one device.
pub const MAX_QUEUES: u16 = 8;

/// What the cases need from a transport.
pub trait Transport {
    /// "mmio" or "pci".
    fn kind(&self) -> &'static str;
    /// Where the device is (window or function), for the report.
    fn location(&self) -> u64;
    fn device_type(&self) -> u32;
    fn status(&mut self) -> u8;
    fn set_status(&mut self, v: u8);
    fn device_features(&mut self) -> u64;
    fn set_driver_features(&mut self, f: u64);
    fn select_queue(&mut self, q: u16);
    /// Largest size of the selected queue; 0 when it does not exist.
    fn queue_max(&mut self) -> u16;
    fn set_queue_size(&mut self, n: u16);
    /// The size as the device reads it back; None where the register is
    /// write-only (virtio-mmio's QueueNum).
    fn read_queue_size(&mut self) -> Option<u16>;
    fn set_queue_rings(&mut self, desc: u64, avail: u64, used: u64);
    fn enable_queue(&mut self);
    fn queue_enabled(&mut self) -> bool;
    /// Tell the device that queue `q` has new buffers.
    fn notify(&mut self, q: u16);
    /// A notification no queue owns; returns what was done.
    fn bogus_notify(&mut self, nq: u16) -> &'static str;
    /// 32 bits of the device-specific configuration.
    fn config32(&mut self, off: u64) -> u32;
    /// Pending interrupt causes, cleared (acknowledged) by the call.
    fn take_interrupts(&mut self) -> u32;
}

/// Status 0, then wait until the device reads back 0 (§2.4: reset is done
/// when it does).
pub fn reset(t: &mut dyn Transport) -> bool {
    t.set_status(0);
    let deadline = Deadline::after(ANSWER_TICKS);
    while t.status() != 0 {
        if deadline.passed() {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Queues the device has: select each until one has no size.
pub fn count_queues(t: &mut dyn Transport) -> u16 {
    let mut n = 0;
    while n < MAX_QUEUES {
        t.select_queue(n);
        if t.queue_max() == 0 {
            break;
        }
        n += 1;
    }
    t.select_queue(0);
    n
}

// ---------------------------------------------------------------- mmio

mod mmio_reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG: u64 = 0x100;
}

/// "virt"
const MMIO_MAGIC: u32 = 0x7472_6976;

pub struct Mmio {
    base: u64,
    device_type: u32,
}

impl Mmio {
    /// The device in the window at `base`, if there is a version 2 device.
    pub fn probe(base: u64) -> Option<Mmio> {
        use mmio_reg::*;
        if rd32(base + MAGIC) != MMIO_MAGIC || rd32(base + VERSION) != 2 {
            return None;
        }
        let device_type = rd32(base + DEVICE_ID);
        (device_type != 0).then_some(Mmio { base, device_type })
    }

    fn r(&self, off: u64) -> u32 {
        rd32(self.base + off)
    }

    fn w(&self, off: u64, v: u32) {
        wr32(self.base + off, v)
    }
}

impl Transport for Mmio {
    fn kind(&self) -> &'static str {
        "mmio"
    }
    fn location(&self) -> u64 {
        self.base
    }
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn status(&mut self) -> u8 {
        self.r(mmio_reg::STATUS) as u8
    }
    fn set_status(&mut self, v: u8) {
        self.w(mmio_reg::STATUS, v as u32)
    }
    fn device_features(&mut self) -> u64 {
        use mmio_reg::*;
        self.w(DEVICE_FEATURES_SEL, 0);
        let lo = self.r(DEVICE_FEATURES) as u64;
        self.w(DEVICE_FEATURES_SEL, 1);
        let hi = self.r(DEVICE_FEATURES) as u64;
        lo | hi << 32
    }
    fn set_driver_features(&mut self, f: u64) {
        use mmio_reg::*;
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, f as u32);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, (f >> 32) as u32);
    }
    fn select_queue(&mut self, q: u16) {
        self.w(mmio_reg::QUEUE_SEL, q as u32)
    }
    fn queue_max(&mut self) -> u16 {
        self.r(mmio_reg::QUEUE_NUM_MAX).min(0xFFFF) as u16
    }
    fn set_queue_size(&mut self, n: u16) {
        self.w(mmio_reg::QUEUE_NUM, n as u32)
    }
    fn read_queue_size(&mut self) -> Option<u16> {
        None
    }
    fn set_queue_rings(&mut self, desc: u64, avail: u64, used: u64) {
        use mmio_reg::*;
        self.w(QUEUE_DESC_LOW, desc as u32);
        self.w(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(QUEUE_DRIVER_LOW, avail as u32);
        self.w(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(QUEUE_DEVICE_LOW, used as u32);
        self.w(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    }
    fn enable_queue(&mut self) {
        self.w(mmio_reg::QUEUE_READY, 1)
    }
    fn queue_enabled(&mut self) -> bool {
        self.r(mmio_reg::QUEUE_READY) & 1 != 0
    }
    fn notify(&mut self, q: u16) {
        self.w(mmio_reg::QUEUE_NOTIFY, q as u32)
    }
    fn bogus_notify(&mut self, nq: u16) -> &'static str {
        // Queue 7 (or the first missing one, should a device have more).
        self.w(mmio_reg::QUEUE_NOTIFY, nq.max(7) as u32);
        "queue_notify_missing_queue"
    }
    fn config32(&mut self, off: u64) -> u32 {
        self.r(mmio_reg::CONFIG + off)
    }
    fn take_interrupts(&mut self) -> u32 {
        let pending = self.r(mmio_reg::INTERRUPT_STATUS);
        if pending != 0 {
            self.w(mmio_reg::INTERRUPT_ACK, pending);
        }
        pending
    }
}

/// The windows `virtio_mmio.device=<size>@<addr>:<irq>` words announce, in
/// command-line order (at most `out.len()`).
pub fn mmio_windows(cmdline: &[u8], out: &mut [u64]) -> usize {
    let mut n = 0;
    for word in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(rest) = word.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        let Some(at) = rest.iter().position(|&b| b == b'@') else {
            continue;
        };
        let addr = &rest[at + 1..];
        let end = addr.iter().position(|&b| b == b':').unwrap_or(addr.len());
        if let Some(a) = parse_number(&addr[..end]) {
            if n < out.len() {
                out[n] = a;
                n += 1;
            }
        }
    }
    n
}

/// `0x`-prefixed hex or decimal.
fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

// ----------------------------------------------------------------- pci

/// ECAM of bus 0 (docs/platform.md).
pub const ECAM_BASE: u64 = 0xE000_0000;
const PCI_VENDOR_VIRTIO: u16 = 0x1af4;
const PCI_DEVICE_MODERN_BASE: u16 = 0x1040;

mod cfg {
    pub const VENDOR: u64 = 0x00;
    pub const DEVICE: u64 = 0x02;
    pub const COMMAND: u64 = 0x04;
    pub const STATUS: u64 = 0x06;
    pub const BAR0: u64 = 0x10;
    pub const CAP_PTR: u64 = 0x34;
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    pub const CAP_VENDOR: u8 = 0x09;
}

/// `cfg_type` of the virtio capabilities (§4.1.4).
mod cap {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
}

/// `virtio_pci_common_cfg` (§4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

pub struct Pci {
    /// ECAM address of the function's configuration space.
    ecam: u64,
    device_type: u32,
    common: u64,
    notify: u64,
    notify_len: u64,
    notify_mult: u32,
    isr: u64,
    device: u64,
    selected: u16,
    /// queue_notify_off of each queue, read when it is enabled.
    notify_off: [u16; MAX_QUEUES as usize],
}

/// Where a virtio capability points: BAR address + offset, and length.
fn cap_region(ecam: u64, at: u64) -> (u64, u64) {
    let bar = rd8(ecam + at + 4) as u64;
    let offset = rd32(ecam + at + 8) as u64;
    let length = rd32(ecam + at + 12) as u64;
    (bar_address(ecam, bar) + offset, length)
}

/// A memory BAR's address (32 or 64 bits); 0 for anything else.
fn bar_address(ecam: u64, bar: u64) -> u64 {
    if bar > 5 {
        return 0;
    }
    let lo = rd32(ecam + cfg::BAR0 + 4 * bar);
    if lo & 1 != 0 {
        return 0; // an I/O BAR
    }
    let mut addr = (lo & !0xF) as u64;
    if (lo >> 1) & 3 == 2 && bar < 5 {
        addr |= (rd32(ecam + cfg::BAR0 + 4 * (bar + 1)) as u64) << 32;
    }
    addr
}

impl Pci {
    /// The modern virtio function at 00:`dev`.0, with decoding turned on.
    pub fn probe(dev: u64) -> Option<Pci> {
        let ecam = ECAM_BASE + (dev << 15);
        if rd16(ecam + cfg::VENDOR) != PCI_VENDOR_VIRTIO {
            return None;
        }
        let id = rd16(ecam + cfg::DEVICE);
        if !(PCI_DEVICE_MODERN_BASE..=PCI_DEVICE_MODERN_BASE + 0x3f).contains(&id) {
            return None;
        }
        if rd16(ecam + cfg::STATUS) & cfg::STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut p = Pci {
            ecam,
            device_type: (id - PCI_DEVICE_MODERN_BASE) as u32,
            common: 0,
            notify: 0,
            notify_len: 0,
            notify_mult: 0,
            isr: 0,
            device: 0,
            selected: 0,
            notify_off: [0; MAX_QUEUES as usize],
        };
        // The capability list: at most 48 entries fit in 0x40..0x100.
        let mut at = (rd8(ecam + cfg::CAP_PTR) & 0xFC) as u64;
        let mut hops = 0;
        while at >= 0x40 && hops < 48 {
            if rd8(ecam + at) == cfg::CAP_VENDOR {
                let kind = rd8(ecam + at + 3);
                // The first capability of each type is the one to use (§4.1.4).
                match kind {
                    cap::COMMON if p.common == 0 => p.common = cap_region(ecam, at).0,
                    cap::NOTIFY if p.notify == 0 => {
                        (p.notify, p.notify_len) = cap_region(ecam, at);
                        p.notify_mult = rd32(ecam + at + 16);
                    }
                    cap::ISR if p.isr == 0 => p.isr = cap_region(ecam, at).0,
                    cap::DEVICE if p.device == 0 => p.device = cap_region(ecam, at).0,
                    _ => {}
                }
            }
            at = (rd8(ecam + at + 1) & 0xFC) as u64;
            hops += 1;
        }
        if p.common == 0 || p.notify == 0 || p.isr == 0 {
            return None;
        }
        let command = rd16(ecam + cfg::COMMAND);
        wr16(
            ecam + cfg::COMMAND,
            command | cfg::COMMAND_MEMORY | cfg::COMMAND_BUS_MASTER,
        );
        Some(p)
    }
}

impl Transport for Pci {
    fn kind(&self) -> &'static str {
        "pci"
    }
    fn location(&self) -> u64 {
        self.ecam
    }
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn status(&mut self) -> u8 {
        rd8(self.common + common::DEVICE_STATUS)
    }
    fn set_status(&mut self, v: u8) {
        wr8(self.common + common::DEVICE_STATUS, v)
    }
    fn device_features(&mut self) -> u64 {
        use common::*;
        wr32(self.common + DEVICE_FEATURE_SELECT, 0);
        let lo = rd32(self.common + DEVICE_FEATURE) as u64;
        wr32(self.common + DEVICE_FEATURE_SELECT, 1);
        let hi = rd32(self.common + DEVICE_FEATURE) as u64;
        lo | hi << 32
    }
    fn set_driver_features(&mut self, f: u64) {
        use common::*;
        wr32(self.common + DRIVER_FEATURE_SELECT, 0);
        wr32(self.common + DRIVER_FEATURE, f as u32);
        wr32(self.common + DRIVER_FEATURE_SELECT, 1);
        wr32(self.common + DRIVER_FEATURE, (f >> 32) as u32);
    }
    fn select_queue(&mut self, q: u16) {
        self.selected = q;
        wr16(self.common + common::QUEUE_SELECT, q)
    }
    fn queue_max(&mut self) -> u16 {
        // queue_size reads the maximum until the driver writes it, and 0
        // for a queue that does not exist (§4.1.4.3).
        rd16(self.common + common::QUEUE_SIZE)
    }
    fn set_queue_size(&mut self, n: u16) {
        wr16(self.common + common::QUEUE_SIZE, n)
    }
    fn read_queue_size(&mut self) -> Option<u16> {
        Some(rd16(self.common + common::QUEUE_SIZE))
    }
    fn set_queue_rings(&mut self, desc: u64, avail: u64, used: u64) {
        use common::*;
        for (off, v) in [(QUEUE_DESC, desc), (QUEUE_DRIVER, avail), (QUEUE_DEVICE, used)] {
            wr32(self.common + off, v as u32);
            wr32(self.common + off + 4, (v >> 32) as u32);
        }
    }
    fn enable_queue(&mut self) {
        if let Some(slot) = self.notify_off.get_mut(self.selected as usize) {
            *slot = rd16(self.common + common::QUEUE_NOTIFY_OFF);
        }
        wr16(self.common + common::QUEUE_ENABLE, 1)
    }
    fn queue_enabled(&mut self) -> bool {
        rd16(self.common + common::QUEUE_ENABLE) & 1 != 0
    }
    fn notify(&mut self, q: u16) {
        let off = self.notify_off.get(q as usize).copied().unwrap_or(q);
        wr16(self.notify + off as u64 * self.notify_mult as u64, q)
    }
    fn bogus_notify(&mut self, nq: u16) -> &'static str {
        // Notification addresses are per queue: write where queue 7 (or
        // the first one past the device's) would be, which lies beyond the
        // notification region when the device has fewer queues.
        let q = nq.max(7);
        let at = q as u64 * self.notify_mult.max(2) as u64;
        wr16(self.notify + at.max(self.notify_len), q);
        "notify_past_region"
    }
    fn config32(&mut self, off: u64) -> u32 {
        if self.device == 0 {
            return 0;
        }
        rd32(self.device + off)
    }
    fn take_interrupts(&mut self) -> u32 {
        // Reading the ISR clears it (§4.1.4.5).
        rd8(self.isr) as u32
    }
}

/// Name of a device type for reports.
pub fn type_name(t: u32) -> &'static str {
    match t {
        1 => "net",
        2 => "blk",
        3 => "console",
        4 => "rng",
        _ => "dev",
    }
}

/// `<type><n>`, e.g. `blk0`.
pub fn device_name(t: u32, n: u64) -> Text {
    let mut name = Text::from(type_name(t));
    name.dec(n);
    name
}
