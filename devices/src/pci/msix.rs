//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and
//! the pending-bit array, and delivery through the VMM.
//!
//! Delivery is split in two so that raising an interrupt is one eventfd
//! write and nothing else:
//!
//! - each vector comes with a GSI and an irqfd the VMM registered for that
//!   GSI (`MsiVector`); signalling an unmasked vector writes its irqfd;
//! - what message a GSI sends is told to the VMM (`MsiRouter::set_route`)
//!   only when it changes: when the guest unmasks a vector or rewrites an
//!   unmasked one, on the vCPU thread, never on a device's data path. The
//!   VMM keeps the whole routing table (KVM_SET_GSI_ROUTING replaces it).
//!
//! Masking is done here, not in KVM: a masked vector's event sets its
//! pending bit and is sent when the vector is unmasked.

use std::io;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MAX_VECTORS: usize = 2048;

/// Message control bits.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the per-vector mask bit.
const VECTOR_MASKED: u32 = 1;

/// What an MSI writes: the LAPIC address and the vector data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VMM's side of MSI routing. `set_route` points `gsi` at `message`
/// (`None`: the GSI sends nothing any more and its route may go). It is
/// called from the vCPU thread when the guest enables, unmasks or rewrites
/// a vector, and from nowhere on the data path.
pub trait MsiRouter: Send + Sync {
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()>;
}

/// One MSI-X vector as the VMM provides it: a GSI it allocated, and an
/// eventfd it registered with KVM as the irqfd of that GSI.
pub struct MsiVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    message: MsiMessage,
    masked: bool,
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector comes out of reset masked.
        Entry {
            message: MsiMessage::default(),
            masked: true,
        }
    }
}

/// Builds the capability body (after ID and next pointer) and the mask of
/// its writable bytes, for a table and PBA in BAR `bar`.
pub fn capability(vectors: usize, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 2]) {
    debug_assert!((1..=MAX_VECTORS).contains(&vectors));
    debug_assert!(table_offset.is_multiple_of(8) && pba_offset.is_multiple_of(8));
    let mut body = [0; 10];
    body[0..2].copy_from_slice(&((vectors - 1) as u16).to_le_bytes());
    body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
    body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
    // Enable and function mask are the only writable bits.
    let writable = [0, ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8];
    (body, writable)
}

/// Size in bytes of the pending-bit array for `vectors` vectors.
pub fn pba_size(vectors: usize) -> u64 {
    vectors.div_ceil(64) as u64 * 8
}

/// The MSI-X state of one function. Not thread-safe by itself: its owner
/// keeps it behind one lock shared by the vCPU (table and capability
/// accesses) and the device's worker (signals).
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    /// The message the VMM last routed each vector's GSI to.
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_mask: bool,
    vectors: Vec<MsiVector>,
    router: Arc<dyn MsiRouter>,
}

impl MsixTable {
    /// A table of `vectors.len()` entries (at most [`MAX_VECTORS`]; extra
    /// ones are dropped), all masked, MSI-X disabled.
    pub fn new(mut vectors: Vec<MsiVector>, router: Arc<dyn MsiRouter>) -> Self {
        vectors.truncate(MAX_VECTORS);
        let n = vectors.len();
        Self {
            entries: vec![Entry::default(); n],
            pending: vec![0; n.div_ceil(64)],
            routed: vec![None; n],
            enabled: false,
            function_mask: false,
            vectors,
            router,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_pending(&self, vector: usize) -> bool {
        self.pending
            .get(vector / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        if let Some(word) = self.pending.get_mut(vector / 64) {
            if pending {
                *word |= 1 << (vector % 64);
            } else {
                *word &= !(1 << (vector % 64));
            }
        }
    }

    fn deliverable(&self, vector: usize) -> bool {
        self.enabled && !self.function_mask && self.entries.get(vector).is_some_and(|e| !e.masked)
    }

    /// Makes the VMM route `vector`'s GSI to its current message, if it
    /// does not already.
    fn sync_route(&mut self, vector: usize) -> io::Result<()> {
        let message = self.entries[vector].message;
        if self.routed[vector] != Some(message) {
            self.router.set_route(self.vectors[vector].gsi, Some(message))?;
            self.routed[vector] = Some(message);
        }
        Ok(())
    }

    fn fire(&mut self, vector: usize) -> io::Result<()> {
        self.sync_route(vector)?;
        self.vectors[vector].irqfd.write(1)
    }

    /// After `vector` may have become deliverable: route it now (so the
    /// data path never has to) and send what is pending.
    fn on_unmask(&mut self, vector: usize) {
        if !self.deliverable(vector) {
            return;
        }
        let result = if self.is_pending(vector) {
            self.set_pending(vector, false);
            self.fire(vector)
        } else {
            self.sync_route(vector)
        };
        if let Err(e) = result {
            log::warn!(
                "MSI-X: cannot route vector {vector} (GSI {}): {e}",
                self.vectors[vector].gsi
            );
        }
    }

    /// The guest wrote the capability's message control.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_mask = control & CONTROL_FUNCTION_MASK != 0;
        let was_enabled = self.enabled;
        self.enabled = enabled;
        self.function_mask = function_mask;
        if was_enabled && !enabled {
            // Nothing may be sent any more: let the VMM drop the routes.
            for vector in 0..self.len() {
                if self.routed[vector].take().is_some() {
                    if let Err(e) = self.router.set_route(self.vectors[vector].gsi, None) {
                        log::warn!("MSI-X: cannot remove the route of vector {vector}: {e}");
                    }
                }
            }
        }
        for vector in 0..self.len() {
            self.on_unmask(vector);
        }
    }

    /// Raises `vector`: sent at once if deliverable, else left pending.
    /// Vectors beyond the table are ignored.
    pub fn signal(&mut self, vector: usize) -> io::Result<()> {
        if vector >= self.len() {
            return Ok(());
        }
        if self.deliverable(vector) {
            self.fire(vector)
        } else {
            self.set_pending(vector, true);
            Ok(())
        }
    }

    /// Forgets every pending event (the function was reset).
    pub fn clear_pending(&mut self) {
        self.pending.fill(0);
    }

    fn dword(&self, vector: usize, field: u64) -> u32 {
        let e = &self.entries[vector];
        match field {
            0 => e.message.address as u32,
            4 => (e.message.address >> 32) as u32,
            8 => e.message.data,
            _ => u32::from(e.masked),
        }
    }

    fn set_dword(&mut self, vector: usize, field: u64, value: u32) {
        let deliverable = self.deliverable(vector);
        let e = &mut self.entries[vector];
        match field {
            // Message addresses are dword aligned: bits 1:0 read as 0.
            0 => e.message.address = (e.message.address & !0xffff_ffff) | u64::from(value & !3),
            4 => e.message.address = (e.message.address & 0xffff_ffff) | (u64::from(value) << 32),
            8 => e.message.data = value,
            _ => e.masked = value & VECTOR_MASKED != 0,
        }
        if deliverable && field != 12 {
            // Rewritten while unmasked (software should mask first; follow
            // it anyway so the route never goes stale).
            if let Err(e) = self.sync_route(vector) {
                log::warn!("MSI-X: cannot reroute vector {vector}: {e}");
            }
        } else {
            self.on_unmask(vector);
        }
    }

    /// A read of the table: aligned dwords or qwords only. Returns false
    /// (and leaves `data` alone) for anything else.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) -> bool {
        let Some((vector, field)) = self.locate(offset, data.len()) else {
            return false;
        };
        let low = self.dword(vector, field);
        if data.len() == 8 {
            let high = self.dword(vector, field + 4);
            data.copy_from_slice(&(u64::from(low) | (u64::from(high) << 32)).to_le_bytes());
        } else {
            data.copy_from_slice(&low.to_le_bytes());
        }
        true
    }

    /// A write to the table: aligned dwords or qwords only. Returns false
    /// (and changes nothing) for anything else.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some((vector, field)) = self.locate(offset, data.len()) else {
            return false;
        };
        let mut bytes = [0; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        self.set_dword(vector, field, value as u32);
        if data.len() == 8 {
            self.set_dword(vector, field + 4, (value >> 32) as u32);
        }
        true
    }

    fn locate(&self, offset: u64, len: usize) -> Option<(usize, u64)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let vector = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (vector < self.len()).then_some((vector, offset % ENTRY_SIZE))
    }

    /// A read of the pending-bit array: aligned dwords or qwords only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) -> bool {
        let len = data.len() as u64;
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len) || offset + len > pba_size(self.len()) {
            return false;
        }
        let word = self.pending[(offset / 8) as usize];
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::testing::MockRouter;

    fn table(n: usize) -> (MsixTable, Arc<MockRouter>, Vec<EventFd>) {
        let router = Arc::new(MockRouter::default());
        let mut fds = Vec::new();
        let vectors = (0..n)
            .map(|i| {
                let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                fds.push(irqfd.try_clone().unwrap());
                MsiVector {
                    gsi: 40 + i as u32,
                    irqfd,
                }
            })
            .collect();
        (MsixTable::new(vectors, router.clone()), router, fds)
    }

    fn program(t: &mut MsixTable, vector: u64, address: u64, data: u32) {
        let base = vector * ENTRY_SIZE;
        assert!(t.write_table(base, &address.to_le_bytes()));
        assert!(t.write_table(base + 8, &data.to_le_bytes()));
    }

    fn unmask(t: &mut MsixTable, vector: u64) {
        assert!(t.write_table(vector * ENTRY_SIZE + 12, &0u32.to_le_bytes()));
    }

    #[test]
    fn capability_encodes_size_and_locations() {
        let (body, writable) = capability(3, 0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2, "table size is N-1");
        assert_eq!(&body[2..6], &0x4000u32.to_le_bytes());
        assert_eq!(&body[6..10], &0x5000u32.to_le_bytes());
        assert_eq!(writable, [0, 0xc0]);
        assert_eq!(pba_size(1), 8);
        assert_eq!(pba_size(65), 16);
    }

    #[test]
    fn entries_start_masked_and_read_back() {
        let (mut t, router, _) = table(2);
        let mut d = [0; 4];
        assert!(t.read_table(12, &mut d));
        assert_eq!(u32::from_le_bytes(d), 1);
        program(&mut t, 1, 0xfee0_1003, 0x4041);
        let mut q = [0; 8];
        assert!(t.read_table(16, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000, "bits 1:0 are read-only");
        assert!(t.read_table(24, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_4041, "data, then masked control");
        // Nothing is routed while masked or disabled.
        assert!(router.calls().is_empty());
        // Bad accesses: wrong width, misaligned, past the table.
        assert!(!t.read_table(2, &mut d));
        assert!(!t.read_table(4, &mut q));
        assert!(!t.write_table(32, &[0; 4]));
        assert!(!t.write_table(0, &[0; 2]));
    }

    #[test]
    fn unmasking_routes_before_anything_is_sent() {
        let (mut t, router, fds) = table(2);
        t.set_control(CONTROL_ENABLE);
        program(&mut t, 0, 0xfee0_0000, 0x31);
        unmask(&mut t, 0);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(router.calls(), vec![(40, Some(msg))]);
        t.signal(0).unwrap();
        t.signal(0).unwrap();
        assert_eq!(fds[0].read().unwrap(), 2);
        assert_eq!(router.calls().len(), 1, "no routing on the data path");
        // Disabling drops the route and sends nothing.
        t.set_control(0);
        t.signal(0).unwrap();
        assert!(fds[0].read().is_err());
        assert_eq!(router.calls().last(), Some(&(40, None)));
    }

    #[test]
    fn function_mask_holds_events_until_cleared() {
        let (mut t, router, fds) = table(70);
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut t, 65, 0xfee0_0000, 0x55);
        unmask(&mut t, 65);
        t.signal(65).unwrap();
        assert!(fds[65].read().is_err());
        let mut q = [0; 8];
        assert!(t.read_pba(8, &mut q));
        assert_eq!(u64::from_le_bytes(q), 1 << 1);
        t.set_control(CONTROL_ENABLE);
        assert_eq!(fds[65].read().unwrap(), 1);
        assert!(!t.is_pending(65));
        assert_eq!(router.route(105).unwrap().data, 0x55);
        assert!(!t.read_pba(16, &mut q), "past the PBA");
        assert!(t.signal(70).is_ok(), "vectors past the table are ignored");
    }
}
