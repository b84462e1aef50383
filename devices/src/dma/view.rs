//! `DmaView`: guest memory as one device sees it, a `vm_memory::GuestMemory`
//! that virtio-queue and `Bytes` use like any other.
//!
//! Every access takes the endpoint's read lock, translates (identity, or
//! the endpoint's `Tlb`), checks the shared-page gate, and only then hands
//! out slices of the host view; the lock is held until the caller has
//! finished with the slices, which is what lets UNSHARE and UNMAP wait for
//! accesses in flight.

use super::tlb::{Miss, Pieces};
use super::{DmaTranslation, EndpointTlb, FaultReason};
use std::iter::FusedIterator;
use std::sync::{Arc, PoisonError, RwLockReadGuard};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::iommu::{Error as IommuError, IovaRange};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, Permissions, VolatileSlice,
};

type Bitmap = ();

/// Guest memory as a device sees it.
#[derive(Clone, Debug)]
pub struct DmaView {
    host: GuestMemoryMmap,
    /// None: guest-physical addresses with no gate (unit tests, and memory
    /// no guest can make private).
    translation: Option<Arc<DmaTranslation>>,
}

impl DmaView {
    /// Addresses are guest-physical; nothing is gated.
    pub fn ungated(host: GuestMemoryMmap) -> DmaView {
        DmaView {
            host,
            translation: None,
        }
    }

    /// Addresses go through `translation` (identity or a vIOMMU endpoint)
    /// and its shared-page gate.
    pub fn translated(host: GuestMemoryMmap, translation: Arc<DmaTranslation>) -> DmaView {
        DmaView {
            host,
            translation: Some(translation),
        }
    }

    /// The translation this view goes through, if any.
    pub fn translation(&self) -> Option<&Arc<DmaTranslation>> {
        self.translation.as_ref()
    }

    /// Where `addr..addr + count` lands, under the endpoint's read lock.
    fn resolve<'a>(
        t: &'a DmaTranslation,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<(RwLockReadGuard<'a, EndpointTlb>, Pieces), IommuError> {
        let state = &t.state;
        let guard = state.tlb.read().unwrap_or_else(PoisonError::into_inner);
        if addr.0.checked_add(count as u64).is_none() {
            drop(guard);
            if state.identity {
                // Not a translation fault: an address no memory has.
                return Err(cannot_resolve(addr.0, count, "wraps around the address space".into()));
            }
            return Err(t.fault(addr.0, count, access, FaultReason::Unmapped, addr.0));
        }
        let pieces = if guard.identity {
            Pieces::one(addr.0, count)
        } else {
            match guard.tlb.lookup(addr.0, count, access) {
                Ok(p) => p,
                Err(miss) => {
                    let attached = guard.attached;
                    drop(guard);
                    let (reason, at) = match miss {
                        _ if !attached => (FaultReason::Domain, addr.0),
                        Miss::Unmapped(at) | Miss::Fragmented(at) => (FaultReason::Unmapped, at),
                        Miss::Permission(at) => (FaultReason::Permission, at),
                    };
                    return Err(t.fault(addr.0, count, access, reason, at));
                }
            }
        };
        if let Some(gate) = state.gate.as_deref() {
            for &(gpa, len) in pieces.as_slice() {
                if !gate.allows(gpa, len as u64) {
                    drop(guard);
                    return Err(t.private(addr.0, count, gpa));
                }
            }
        }
        Ok((guard, pieces))
    }
}

pub(super) fn cannot_resolve(iova: u64, length: usize, reason: String) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange {
            base: GuestAddress(iova),
            length,
        },
        reason,
    }
}

/// The slices of one access, holding the endpoint's read lock until the
/// caller is done with them.
pub struct DmaSlices<'a> {
    _guard: Option<RwLockReadGuard<'a, EndpointTlb>>,
    host: &'a GuestMemoryMmap,
    pieces: Pieces,
    next_piece: usize,
    current: Option<GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>>,
    failed: bool,
}

impl<'a> Iterator for DmaSlices<'a> {
    type Item = vm_memory::GuestMemoryResult<VolatileSlice<'a, BS<'a, Bitmap>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(item) = self.current.as_mut().and_then(Iterator::next) {
                self.failed = item.is_err();
                return Some(item);
            }
            let &(gpa, len) = self.pieces.as_slice().get(self.next_piece)?;
            self.next_piece += 1;
            self.current = Some(GuestMemoryBackend::get_slices(self.host, GuestAddress(gpa), len));
        }
    }
}

impl FusedIterator for DmaSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, Bitmap>> for DmaSlices<'a> {}

impl GuestMemory for DmaView {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = Bitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let Some(t) = &self.translation else {
            return GuestMemoryBackend::check_range(&self.host, addr, count);
        };
        if count == 0 {
            return true;
        }
        match Self::resolve(t, addr, count, access) {
            Ok((_guard, pieces)) => pieces
                .as_slice()
                .iter()
                .all(|&(gpa, len)| GuestMemoryBackend::check_range(&self.host, GuestAddress(gpa), len)),
            Err(_) => false,
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        let (guard, pieces) = match &self.translation {
            Some(t) if count > 0 => {
                let (g, p) = Self::resolve(t, addr, count, access).map_err(GuestMemoryError::IommuError)?;
                (Some(g), p)
            }
            _ => (None, Pieces::one(addr.0, count)),
        };
        Ok(DmaSlices {
            _guard: guard,
            host: &self.host,
            pieces,
            next_piece: 0,
            current: None,
            failed: false,
        })
    }

    fn physical_memory(&self) -> Option<&GuestMemoryMmap> {
        // Only an ungated view may be bypassed.
        match self.translation {
            None => Some(&self.host),
            Some(_) => None,
        }
    }
}
