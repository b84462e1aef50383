//! PCI bus 0: a host bridge at 00.0 and up to 31 single-function devices,
//! reached three ways, each a [`BusDevice`] over the same [`PciRoot`]:
//!
//! - [`PciConfigIo`], configuration mechanism #1 at I/O ports 0xCF8–0xCFF
//!   (PCI Local Bus 3.0 §3.2.2.3.2), which Linux uses for the first 256
//!   bytes of every function;
//! - [`PciConfigMmio`], ECAM (PCIe 6.0 §7.2.2), offset
//!   `bus << 20 | device << 15 | function << 12 | register`;
//! - [`PciBarWindow`], the MMIO window the BARs are placed in: an access is
//!   passed to the device whose memory BAR covers it *now*. BARs are read
//!   from the devices' configuration spaces, so a BAR the guest moves is
//!   followed at once; a BAR decodes only while its function's memory
//!   space enable bit is set and only if it lies wholly inside the window
//!   (a host bridge forwards nothing else).
//!
//! Whenever a configuration write changes where one of a device's BARs
//! decodes, the device is told through [`PciDevice::bar_moved`]; that is
//! where virtio-pci moves its ioeventfds.
//!
//! The host bridge is 1b36:0008, the ID Red Hat assigned to QEMU's generic
//! PCIe host bridge (listed in the PCI ID database). No x86 Linux driver or
//! quirk matches it, so Linux treats it as what its class (06/00/00) says:
//! a plain host bridge, which also makes it pass Linux's sanity check of
//! mechanism #1 (a host bridge class on bus 0). An Intel ID would be looked
//! up by chipset quirks, EDAC and AGP drivers that expect registers we do
//! not have; a virtio vendor ID (1af4) would be probed by virtio-pci.

use super::config::{valid_access, ConfigSpace, PciIds, CONFIG_SPACE_SIZE, NUM_BARS};
use crate::bus::BusDevice;
use std::sync::{Arc, Mutex, MutexGuard};

pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Class 06/00/00: bridge, host bridge.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
/// Device numbers on a bus.
pub const MAX_DEVICES: usize = 32;

/// The configuration address register: enable bit, then bus, device,
/// function and dword-aligned register.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of the address register that hold something; bits 30:24 are
/// reserved (AMD's extended register bits are not implemented) and 1:0 are 0.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// Size of the I/O port range of mechanism #1.
pub const CONFIG_IO_SIZE: u64 = 8;

/// A function on bus 0.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// A guest configuration read, already checked with `valid_access`.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// A guest configuration write, already checked with `valid_access`.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// A read at `offset` into memory BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    /// A write at `offset` into memory BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// BAR `bar` now decodes at `new` (None: not at all) instead of `old`.
    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        let _ = (bar, old, new);
    }
}

/// Device 00.0: identifies the bus, decodes nothing.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(PciIds {
                vendor: HOST_BRIDGE_VENDOR_ID,
                device: HOST_BRIDGE_DEVICE_ID,
                revision: 0,
                class: CLASS_HOST_BRIDGE,
                subsystem_vendor: HOST_BRIDGE_VENDOR_ID,
                subsystem: HOST_BRIDGE_DEVICE_ID,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR window {base:#x}+{size:#x} is empty or not below 4 GiB")]
    Window { base: u64, size: u64 },
    #[error("all {MAX_DEVICES} device numbers on bus 0 are in use")]
    NoSlot,
    #[error("no room in the BAR window for a BAR of {0:#x} bytes")]
    NoBarSpace(u64),
}

struct Slot {
    device: Box<dyn PciDevice>,
    /// Where each BAR decodes, as the device was last told.
    decoded: [Option<u64>; NUM_BARS],
}

/// Bus 0 and the BAR window below it.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    window: (u64, u64),
    /// Next free address for BAR assignment.
    next_bar: u64,
}

impl PciRoot {
    /// Bus 0 with the host bridge at 00.0, placing BARs in the MMIO window
    /// `(base, size)`, which must lie below 4 GiB (BARs are 32-bit).
    pub fn new(bar_window: (u64, u64)) -> Result<Self, PciError> {
        let (base, size) = bar_window;
        let window_error = PciError::Window { base, size };
        let end = base.checked_add(size).ok_or(window_error.clone())?;
        if size == 0 || end > 1 << 32 {
            return Err(window_error);
        }
        let mut slots: Vec<Option<Slot>> = (0..MAX_DEVICES).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Box::new(HostBridge::new()),
            decoded: [None; NUM_BARS],
        });
        Ok(Self {
            slots,
            window: bar_window,
            next_bar: base,
        })
    }

    /// The BAR window `(base, size)`: put a [`PciBarWindow`] over it.
    pub fn bar_window(&self) -> (u64, u64) {
        self.window
    }

    /// Plugs `device` into the lowest free device number (1..=31), which is
    /// returned, and assigns its BARs in the window, each aligned to its
    /// size, as firmware would. Decoding starts when the guest sets the
    /// memory space enable bit.
    pub fn add_device(&mut self, mut device: Box<dyn PciDevice>) -> Result<u8, PciError> {
        let slot = (1..MAX_DEVICES)
            .find(|&s| self.slots[s].is_none())
            .ok_or(PciError::NoSlot)?;
        let (base, size) = self.window;
        let mut next = self.next_bar;
        let mut assigned = Vec::new();
        for bar in 0..NUM_BARS {
            if let Some(bar_size) = device.config().bar_size(bar) {
                let at = next.next_multiple_of(bar_size);
                if at + bar_size > base + size {
                    return Err(PciError::NoBarSpace(bar_size));
                }
                assigned.push((bar, at));
                next = at + bar_size;
            }
        }
        for (bar, at) in assigned {
            // Below 4 GiB: checked against the window.
            device.config_mut().set_bar_address(bar, at as u32);
        }
        self.next_bar = next;
        self.slots[slot] = Some(Slot {
            device,
            decoded: [None; NUM_BARS],
        });
        self.refresh_bars(slot);
        log::debug!("PCI: device 00:{slot:02x}.0 plugged");
        Ok(slot as u8)
    }

    /// The device at 00:`slot`.0, if any.
    pub fn device(&self, slot: u8) -> Option<&dyn PciDevice> {
        let slot = self.slots.get(usize::from(slot))?.as_ref()?;
        Some(slot.device.as_ref())
    }

    fn function(&mut self, bus: u8, device: u8, function: u8) -> Option<usize> {
        let slot = usize::from(device);
        (bus == 0 && function == 0 && self.slots.get(slot)?.is_some()).then_some(slot)
    }

    /// A configuration read of `bus:device.function` at `offset`. Absent
    /// functions and invalid accesses read as all-ones.
    pub fn config_read(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(slot) if valid_access(offset, data.len()) => {
                if let Some(s) = self.slots[slot].as_mut() {
                    s.device.read_config(offset, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; dropped for absent functions and invalid
    /// accesses.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(slot) = self.function(bus, device, function) else {
            return;
        };
        if !valid_access(offset, data.len()) {
            return log::debug!("PCI: dropped {}-byte config write at {offset:#x}", data.len());
        }
        if let Some(s) = self.slots[slot].as_mut() {
            s.device.write_config(offset, data);
        }
        self.refresh_bars(slot);
    }

    /// Tells the device in `slot` about BARs that decode somewhere new.
    fn refresh_bars(&mut self, slot: usize) {
        let (lo, size) = self.window;
        let hi = lo + size;
        let Some(s) = self.slots[slot].as_mut() else {
            return;
        };
        for bar in 0..NUM_BARS {
            let config = s.device.config();
            let now = match (config.bar_address(bar), config.bar_size(bar)) {
                (Some(at), Some(len)) if config.memory_enabled() && at >= lo && at + len <= hi => Some(at),
                _ => None,
            };
            let before = s.decoded[bar];
            if now != before {
                s.decoded[bar] = now;
                log::debug!("PCI: 00:{slot:02x}.0 BAR {bar} decodes at {now:x?} (was {before:x?})");
                s.device.bar_moved(bar, before, now);
            }
        }
    }

    /// The device, BAR and offset that `addr`..`addr + len` falls in.
    fn find_bar(&mut self, addr: u64, len: usize) -> Option<(&mut dyn PciDevice, usize, u64)> {
        let len = len as u64;
        for s in self.slots.iter_mut().flatten() {
            for (bar, base) in s.decoded.iter().enumerate() {
                let (Some(base), Some(size)) = (*base, s.device.config().bar_size(bar)) else {
                    continue;
                };
                if addr >= base && addr + len <= base + size {
                    return Some((s.device.as_mut(), bar, addr - base));
                }
            }
        }
        None
    }

    /// A read at guest-physical `addr`; false (and all-ones) when no BAR
    /// decodes there.
    pub fn bar_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.find_bar(addr, data.len()) {
            Some((device, bar, offset)) => {
                device.read_bar(bar, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A write at guest-physical `addr`; false when no BAR decodes there.
    pub fn bar_write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find_bar(addr, data.len()) {
            Some((device, bar, offset)) => {
                device.write_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

fn lock(root: &Mutex<PciRoot>) -> MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configuration mechanism #1: put it on the I/O bus at 0xCF8, 8 ports.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// Bus, device, function and register the address register selects,
    /// with `byte` (0..=3) added to the register; None when disabled.
    fn target(&self, byte: usize) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & CONFIG_ADDRESS_ENABLE != 0).then(|| {
            (
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 0x7) as u8,
                (a & 0xfc) as usize + byte,
            )
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // The address register answers dword accesses only; narrower
            // ones are other (absent) legacy registers.
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if (offset - 4) as usize + data.len() <= 4 => match self.target((offset - 4) as usize) {
                Some((bus, dev, func, reg)) => lock(&self.root).config_read(bus, dev, func, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_MASK;
                }
            }
            4..=7 if (offset - 4) as usize + data.len() <= 4 => {
                if let Some((bus, dev, func, reg)) = self.target((offset - 4) as usize) {
                    lock(&self.root).config_write(bus, dev, func, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: put it on the MMIO bus over the MCFG window (bus 0 at offset 0).
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }
}

fn ecam_decode(offset: u64) -> Option<(u8, u8, u8, usize)> {
    let bus = u8::try_from(offset >> 20).ok()?;
    Some((
        bus,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & (CONFIG_SPACE_SIZE as u64 - 1)) as usize,
    ))
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match ecam_decode(offset) {
            Some((bus, dev, func, reg)) => lock(&self.root).config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg)) = ecam_decode(offset) {
            lock(&self.root).config_write(bus, dev, func, reg, data);
        }
    }
}

/// The BAR window: put it on the MMIO bus at `root.bar_window()`.
pub struct PciBarWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciBarWindow {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        let base = lock(&root).bar_window().0;
        Self { root, base }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.root).bar_read(self.base + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.root).bar_write(self.base + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{command, reg};

    const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);

    type Log<T> = Arc<Mutex<Vec<T>>>;

    /// A device with one BAR that records what reaches it.
    #[derive(Default)]
    struct Probe {
        config: Option<ConfigSpace>,
        accesses: Log<(usize, u64, usize)>,
        moves: Log<(usize, Option<u64>, Option<u64>)>,
    }

    impl Probe {
        fn new(size: u64) -> Self {
            let mut config = ConfigSpace::new(PciIds {
                vendor: 0x1234,
                device: 0x11,
                revision: 0,
                class: 0xff_00_00,
                subsystem_vendor: 0,
                subsystem: 0,
            });
            config.add_memory_bar(0, size).unwrap();
            Self {
                config: Some(config),
                ..Default::default()
            }
        }
    }

    impl PciDevice for Probe {
        fn config(&self) -> &ConfigSpace {
            self.config.as_ref().unwrap()
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            self.config.as_mut().unwrap()
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.accesses.lock().unwrap().push((bar, offset, data.len()));
            data.fill(0x5a);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.accesses.lock().unwrap().push((bar, offset, data.len()));
        }
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.lock().unwrap().push((bar, old, new));
        }
    }

    fn root() -> Arc<Mutex<PciRoot>> {
        Arc::new(Mutex::new(PciRoot::new(WINDOW).unwrap()))
    }

    fn conf1_address(dev: u8, func: u8, reg: u8) -> [u8; 4] {
        (CONFIG_ADDRESS_ENABLE | u32::from(dev) << 11 | u32::from(func) << 8 | u32::from(reg)).to_le_bytes()
    }

    fn conf1_read32(io: &mut PciConfigIo, dev: u8, reg: u8) -> u32 {
        io.write(0, &conf1_address(dev, 0, reg));
        let mut d = [0; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn ecam_read32(ecam: &mut PciConfigMmio, dev: u64, reg: u64) -> u32 {
        let mut d = [0; 4];
        ecam.read(dev << 15 | reg, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn mechanism_one_and_ecam_read_the_same_ids() {
        let root = root();
        let slot = lock(&root).add_device(Box::new(Probe::new(0x1000))).unwrap();
        assert_eq!(slot, 1);
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root.clone());
        let bridge = u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID);
        assert_eq!(conf1_read32(&mut io, 0, 0), bridge);
        assert_eq!(ecam_read32(&mut ecam, 0, 0), bridge);
        assert_eq!(conf1_read32(&mut io, 1, 0), 0x0011_1234);
        assert_eq!(ecam_read32(&mut ecam, 1, 0), 0x0011_1234);
        // Class: host bridge 06/00/00, as Linux's mechanism #1 check wants.
        assert_eq!(conf1_read32(&mut io, 0, 8) >> 8, 0x06_00_00);
        // Byte and word accesses through 0xCFC..0xCFF.
        io.write(0, &conf1_address(1, 0, 0));
        let mut w = [0; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0011);
        let mut b = [0; 1];
        io.read(5, &mut b);
        assert_eq!(b[0], 0x12);
        // A write through one path is seen through the other.
        io.write(0, &conf1_address(1, 0, reg::INTERRUPT_LINE as u8));
        io.write(4, &[9]);
        assert_eq!(ecam_read32(&mut ecam, 1, 0x3c) & 0xff, 9);
        ecam.write(1 << 15 | 0x3c, &[7]);
        assert_eq!(conf1_read32(&mut io, 1, 0x3c) & 0xff, 7);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let root = root();
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root.clone());
        assert_eq!(conf1_read32(&mut io, 5, 0), u32::MAX, "empty slot");
        assert_eq!(ecam_read32(&mut ecam, 5, 0), u32::MAX);
        let mut d = [0; 4];
        ecam.read(1 << 12, &mut d);
        assert_eq!(d, [0xff; 4], "function 1 of the host bridge");
        ecam.read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1");
        io.write(0, &((1u32 << 31) | (1 << 16)).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 through mechanism #1");
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "enable bit clear");
        ecam.read(2, &mut d);
        assert_eq!(d, [0xff; 4], "misaligned");
        // Writes to absent functions go nowhere and hurt nothing.
        ecam.write(5 << 15 | 4, &[0xff; 4]);
        io.write(4, &[0xff; 4]);
    }

    #[test]
    fn address_register_reads_back_as_a_kernel_probes_it() {
        let root = root();
        let mut io = PciConfigIo::new(root);
        // Linux writes 1 to 0xCFB first; that is not the address register.
        io.write(3, &[1]);
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), CONFIG_ADDRESS_MASK);
        let mut b = [0; 1];
        io.read(0, &mut b);
        assert_eq!(b[0], 0xff, "byte reads of 0xCF8 are not the register");
        // An access crossing 0xCFF is dropped.
        let mut w = [0; 2];
        io.read(7, &mut w);
        assert_eq!(w, [0xff; 2]);
    }

    #[test]
    fn bars_are_assigned_aligned_inside_the_window() {
        let mut root = PciRoot::new(WINDOW).unwrap();
        let a = root.add_device(Box::new(Probe::new(0x1000))).unwrap();
        let b = root.add_device(Box::new(Probe::new(0x8000))).unwrap();
        let bar = |root: &PciRoot, slot| root.device(slot).unwrap().config().bar_address(0).unwrap();
        assert_eq!(bar(&root, a), 0xc000_0000);
        assert_eq!(bar(&root, b), 0xc000_8000, "aligned to its size");
        assert!(root
            .add_device(Box::new(Probe::new(1 << 31)))
            .is_err_and(|e| e == PciError::NoBarSpace(1 << 31)));
        for _ in 3..MAX_DEVICES {
            root.add_device(Box::new(Probe::new(0x1000))).unwrap();
        }
        assert_eq!(
            root.add_device(Box::new(Probe::new(0x1000))).err(),
            Some(PciError::NoSlot)
        );
        assert!(PciRoot::new((0xffff_f000, 0x2000)).is_err());
        assert!(PciRoot::new((0xc000_0000, 0)).is_err());
    }

    #[test]
    fn bar_accesses_follow_the_bar_and_the_decode_bit() {
        let root = root();
        let probe = Probe::new(0x1000);
        let accesses = probe.accesses.clone();
        let moves = probe.moves.clone();
        let slot = u64::from(lock(&root).add_device(Box::new(probe)).unwrap());
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut window = PciBarWindow::new(root.clone());
        let mut d = [0; 4];

        // Assigned but not decoding until memory space is enabled.
        assert!(!lock(&root).bar_read(0xc000_0010, &mut d));
        assert_eq!(d, [0xff; 4]);
        ecam.write(slot << 15 | 4, &command::MEMORY_SPACE.to_le_bytes());
        assert_eq!(*moves.lock().unwrap(), vec![(0, None, Some(0xc000_0000))]);
        window.read(0x10, &mut d);
        assert_eq!(d, [0x5a; 4]);
        window.write(0xffc, &[1, 2, 3, 4]);
        assert_eq!(*accesses.lock().unwrap(), vec![(0, 0x10, 4), (0, 0xffc, 4)]);
        // An access running past the BAR's end reaches nobody.
        assert!(!lock(&root).bar_write(0xc000_0ffe, &[0; 4]));

        // The guest moves the BAR: the old address goes dead, the new one lives.
        ecam.write(slot << 15 | 0x10, &0xc123_4000u32.to_le_bytes());
        assert_eq!(moves.lock().unwrap()[1], (0, Some(0xc000_0000), Some(0xc123_4000)));
        assert!(!lock(&root).bar_read(0xc000_0010, &mut d));
        assert!(lock(&root).bar_read(0xc123_4010, &mut d));
        assert_eq!(accesses.lock().unwrap().last(), Some(&(0, 0x10, 4)));

        // Sizing with decode off reports no intermediate addresses.
        ecam.write(slot << 15 | 4, &0u16.to_le_bytes());
        ecam.write(slot << 15 | 0x10, &[0xff; 4]);
        ecam.write(slot << 15 | 0x10, &0xc123_4000u32.to_le_bytes());
        assert_eq!(moves.lock().unwrap()[2], (0, Some(0xc123_4000), None));
        assert_eq!(moves.lock().unwrap().len(), 3);
        assert!(!lock(&root).bar_read(0xc123_4010, &mut d));

        // Outside the window a BAR does not decode even when enabled.
        ecam.write(slot << 15 | 0x10, &0xf000_0000u32.to_le_bytes());
        ecam.write(slot << 15 | 4, &command::MEMORY_SPACE.to_le_bytes());
        assert_eq!(moves.lock().unwrap().len(), 3);
        assert!(!lock(&root).bar_read(0xf000_0000, &mut d));
    }
}
