//! A type-0 PCI configuration space (PCI Local Bus 3.0 §6.1, PCIe 6.0 §7.5.1).
//!
//! The space is 4 KiB, as ECAM addresses it; the first 256 bytes are the
//! conventional space that configuration mechanism #1 also reaches. Nothing
//! lives above 256 (no extended capabilities), so that part reads as zeros:
//! a zero header at 0x100 is how PCIe says "no extended capabilities".
//!
//! Every byte has a mask of the bits the guest may change; a write merges
//! the new value under that mask, so read-only fields (IDs, class, the
//! capability list) survive any write, and BAR sizing falls out of the mask:
//! writing all-ones to a BAR leaves exactly the address bits set, which read
//! back as the size mask.

/// The whole space as ECAM addresses it.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// The conventional part, the only part configuration mechanism #1 reaches.
pub const LEGACY_CONFIG_SIZE: usize = 256;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Register offsets of the type-0 header.
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION_ID: usize = 0x08;
    /// Programming interface, then subclass, then base class.
    pub const CLASS_CODE: usize = 0x09;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const CAPABILITIES_POINTER: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// First byte after the header: capabilities live from here to 0xff.
    pub const HEADER_END: usize = 0x40;
}

/// Command register bits.
pub mod command {
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR_ENABLE: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// What the guest may set. I/O space stays hard-wired to 0: no function
    /// here has an I/O BAR.
    pub const WRITABLE: u16 = MEMORY_SPACE | BUS_MASTER | PARITY_ERROR_RESPONSE | SERR_ENABLE | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// INTx is being asserted (kept by the function, read-only).
    pub const INTERRUPT: u16 = 1 << 3;
    /// The capabilities pointer at 0x34 is valid.
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
}

/// Interrupt pin values (0 = none).
pub const INTERRUPT_PIN_A: u8 = 1;

/// What identifies a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is already in use")]
    BarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two between 16 bytes and 2 GiB")]
    BarSize(u64),
    #[error("no room left for a {0}-byte capability")]
    CapabilitySpace(usize),
    #[error("capability of {0} bytes is too short or too long")]
    CapabilityLength(usize),
}

/// Whether an access of `len` bytes at `offset` is one a configuration
/// cycle can make: 1, 2 or 4 bytes, naturally aligned, inside the space.
pub fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= CONFIG_SPACE_SIZE
}

/// One function's configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
    /// Size of each 32-bit memory BAR; 0 for a BAR that is not implemented.
    bar_sizes: [u64; NUM_BARS],
    /// Offset of the last capability, whose next pointer a new one goes in.
    last_capability: Option<usize>,
    /// Where the next capability may start.
    capability_end: usize,
}

impl ConfigSpace {
    /// A single-function type-0 header with the given IDs, command register
    /// zero (no decoding until the guest enables it), no BARs, no
    /// capabilities and no interrupt pin.
    pub fn new(ids: PciIds) -> Self {
        let mut space = Self {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            writable: vec![0; CONFIG_SPACE_SIZE],
            bar_sizes: [0; NUM_BARS],
            last_capability: None,
            capability_end: reg::HEADER_END,
        };
        space.set_u16(reg::VENDOR_ID, ids.vendor);
        space.set_u16(reg::DEVICE_ID, ids.device);
        space.bytes[reg::REVISION_ID] = ids.revision;
        space.bytes[reg::CLASS_CODE..reg::CLASS_CODE + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        space.set_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        space.set_u16(reg::SUBSYSTEM_ID, ids.subsystem);
        space.writable[reg::COMMAND..reg::COMMAND + 2].copy_from_slice(&command::WRITABLE.to_le_bytes());
        // Scratch registers for firmware and the OS.
        space.writable[reg::CACHE_LINE_SIZE] = 0xff;
        space.writable[reg::INTERRUPT_LINE] = 0xff;
        space
    }

    /// Sets the interrupt pin (read-only to the guest) and the initial
    /// interrupt line (a scratch register the guest may overwrite).
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[reg::INTERRUPT_PIN] = pin;
        self.bytes[reg::INTERRUPT_LINE] = line;
    }

    /// Declares BAR `index` as a 32-bit, non-prefetchable memory BAR of
    /// `size` bytes, at address 0 until someone assigns it.
    pub fn add_memory_bar(&mut self, index: usize, size: u64) -> Result<(), ConfigError> {
        if index >= NUM_BARS || self.bar_sizes[index] != 0 {
            return Err(ConfigError::BarIndex(index));
        }
        if !size.is_power_of_two() || !(16..=1 << 31).contains(&size) {
            return Err(ConfigError::BarSize(size));
        }
        self.bar_sizes[index] = size;
        // The address bits at and above the size are writable; the type
        // bits (memory, 32-bit, not prefetchable: all 0) and the bits below
        // the size are not.
        let mask = !(size as u32 - 1) & !0xf;
        let at = reg::BAR0 + 4 * index;
        self.writable[at..at + 4].copy_from_slice(&mask.to_le_bytes());
        Ok(())
    }

    /// Size of BAR `index`, if it is implemented.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bar_sizes.get(index).copied().filter(|&size| size != 0)
    }

    /// The address BAR `index` holds now, if it is implemented.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        self.bar_size(index)?;
        Some(u64::from(self.u32_at(reg::BAR0 + 4 * index) & !0xf))
    }

    /// Places BAR `index` at `addr` (aligned down to the BAR's size), as
    /// firmware would.
    pub fn set_bar_address(&mut self, index: usize, addr: u32) {
        if let Some(size) = self.bar_size(index) {
            let value = addr & !(size as u32 - 1) & !0xf;
            self.set_u32(reg::BAR0 + 4 * index, value);
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(reg::COMMAND)
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & command::MEMORY_SPACE != 0
    }

    pub fn intx_disabled(&self) -> bool {
        self.command() & command::INTX_DISABLE != 0
    }

    /// Appends a capability with ID `id`. `body` is everything after the
    /// ID and next-pointer bytes; `writable` masks the body's bytes the
    /// guest may change (it may be shorter than `body`). Returns the
    /// capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len() + 2;
        if len > LEGACY_CONFIG_SIZE - reg::HEADER_END || writable.len() > body.len() {
            return Err(ConfigError::CapabilityLength(len));
        }
        let offset = self.capability_end.next_multiple_of(4);
        if offset + len > LEGACY_CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + len].copy_from_slice(body);
        self.writable[offset + 2..offset + 2 + writable.len()].copy_from_slice(writable);
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = offset as u8,
            None => {
                self.bytes[reg::CAPABILITIES_POINTER] = offset as u8;
                let status = self.u16_at(reg::STATUS) | status::CAPABILITIES_LIST;
                self.set_u16(reg::STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.capability_end = offset + len;
        Ok(offset)
    }

    /// Walks the capability list as a driver does: `(offset, id)` of each.
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut found = Vec::new();
        if self.u16_at(reg::STATUS) & status::CAPABILITIES_LIST == 0 {
            return found;
        }
        let mut at = usize::from(self.bytes[reg::CAPABILITIES_POINTER] & !3);
        // 48 four-byte slots fit between 0x40 and 0x100: more is a loop.
        while at >= reg::HEADER_END && found.len() < 48 {
            found.push((at, self.bytes[at]));
            at = usize::from(self.bytes[at + 1] & !3);
        }
        found
    }

    /// A guest read. Invalid accesses (see [`valid_access`]) read all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if valid_access(offset, data.len()) {
            data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
        } else {
            data.fill(0xff);
        }
    }

    /// A guest write: only writable bits change. Returns false (and changes
    /// nothing) for an invalid access.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        if !valid_access(offset, data.len()) {
            return false;
        }
        for (i, &value) in data.iter().enumerate() {
            let mask = self.writable[offset + i];
            let byte = &mut self.bytes[offset + i];
            *byte = (*byte & !mask) | (value & mask);
        }
        true
    }

    /// Sets bytes as the function itself does, ignoring the writable mask.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    pub fn u8_at(&self, offset: usize) -> u8 {
        self.bytes[offset]
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 0x5678,
            revision: 3,
            class: 0x01_80_00,
            subsystem_vendor: 0xabcd,
            subsystem: 0xef01,
        })
    }

    fn read32(s: &ConfigSpace, offset: usize) -> u32 {
        let mut d = [0; 4];
        s.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn header_holds_ids_and_class() {
        let s = space();
        assert_eq!(read32(&s, 0), 0x5678_1234);
        assert_eq!(read32(&s, 8), 0x0180_0003);
        assert_eq!(read32(&s, 0x2c), 0xef01_abcd);
        assert_eq!(s.u8_at(reg::HEADER_TYPE), 0, "type 0, single function");
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut s = space();
        s.add_memory_bar(0, 0x8000).unwrap();
        s.set_bar_address(0, 0xc000_8000);
        assert_eq!(s.bar_address(0), Some(0xc000_8000));
        // The sizing protocol: save, write all-ones, read, restore.
        let saved = read32(&s, 0x10);
        assert!(s.write(0x10, &[0xff; 4]));
        assert_eq!(read32(&s, 0x10), 0xffff_8000);
        let size = (!(read32(&s, 0x10) & !0xf)).wrapping_add(1);
        assert_eq!(size, 0x8000);
        s.write(0x10, &saved.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0xc000_8000));
        // Unimplemented BARs read 0 whatever is written.
        for bar in 1..NUM_BARS {
            s.write(0x10 + 4 * bar, &[0xff; 4]);
            assert_eq!(read32(&s, 0x10 + 4 * bar), 0, "BAR {bar}");
        }
        // Byte-wise writes merge too: low address bits stay 0.
        s.write(0x11, &[0xff]);
        assert_eq!(read32(&s, 0x10) & 0xff00, 0x8000);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut s = space();
        assert_eq!(s.add_memory_bar(6, 0x1000), Err(ConfigError::BarIndex(6)));
        assert_eq!(s.add_memory_bar(0, 0x1800), Err(ConfigError::BarSize(0x1800)));
        assert_eq!(s.add_memory_bar(0, 8), Err(ConfigError::BarSize(8)));
        s.add_memory_bar(0, 0x1000).unwrap();
        assert_eq!(s.add_memory_bar(0, 0x1000), Err(ConfigError::BarIndex(0)));
    }

    #[test]
    fn read_only_fields_survive_writes() {
        let mut s = space();
        s.set_interrupt(INTERRUPT_PIN_A, 10);
        s.write(0, &[0; 4]);
        s.write(8, &[0; 4]);
        s.write(0x3c, &[0x0b, 0xff, 0xff, 0xff]);
        assert_eq!(read32(&s, 0), 0x5678_1234);
        assert_eq!(read32(&s, 8), 0x0180_0003);
        assert_eq!(s.u8_at(reg::INTERRUPT_LINE), 0x0b, "line is writable");
        assert_eq!(s.u8_at(reg::INTERRUPT_PIN), INTERRUPT_PIN_A, "pin is not");
        s.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(s.command(), command::WRITABLE);
        assert!(s.memory_enabled() && s.intx_disabled());
    }

    #[test]
    fn capability_list_links_in_order() {
        let mut s = space();
        assert!(s.capabilities().is_empty());
        assert_eq!(s.u16_at(reg::STATUS) & status::CAPABILITIES_LIST, 0);
        let a = s.add_capability(0x09, &[7, 1, 2, 3, 4], &[]).unwrap();
        let b = s.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48, "4-byte aligned after the first");
        assert_ne!(s.u16_at(reg::STATUS) & status::CAPABILITIES_LIST, 0);
        assert_eq!(s.capabilities(), vec![(0x40, 0x09), (0x48, 0x11)]);
        // Only the masked bits of a capability are writable.
        s.write(b, &[0xff; 4]);
        assert_eq!(read32(&s, b), 0xc000_0011);
        s.write(a, &[0; 4]);
        assert_eq!(s.u8_at(a + 2), 7);
        assert!(s
            .add_capability(0x09, &[0; 200], &[])
            .is_err_and(|e| e == ConfigError::CapabilityLength(202)));
        while s.add_capability(0x09, &[0; 14], &[]).is_ok() {}
        assert!(s.capabilities().len() < 48);
    }

    #[test]
    fn invalid_accesses_read_all_ones_and_write_nothing() {
        let mut s = space();
        let mut d = [0; 4];
        s.read(2, &mut d);
        assert_eq!(d, [0xff; 4], "misaligned dword");
        let mut d = [0; 3];
        s.read(0, &mut d);
        assert_eq!(d, [0xff; 3], "3-byte access");
        let mut d = [0; 2];
        s.read(CONFIG_SPACE_SIZE - 1, &mut d);
        assert_eq!(d, [0xff; 2]);
        assert!(!s.write(reg::COMMAND + 1, &[0xff, 0xff]));
        assert_eq!(s.command(), 0);
        // Extended space exists and reads as zeros: no extended capabilities.
        let mut d = [0xaa; 4];
        s.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
