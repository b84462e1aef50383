//! The DMA view: the one way every device reaches guest memory.
//!
//! Rings and buffers alike are read and written through a `DmaMemory`, a
//! `DmaView` (view.rs): veil's own `GuestMemory` over the host view of guest
//! RAM, so virtio-queue and `Bytes` use it like any other memory. With the
//! IOMMU off (IOMMU-bypass, or ACCESS_PLATFORM without a vIOMMU) an address
//! is a guest-physical address; with it on, every access is translated by
//! `DmaTranslation` first. Either way the shared-page gate is checked
//! before any slice of the host view is handed out.
//!
//! # Translated devices
//!
//! A `DmaTranslation` is one endpoint of a vIOMMU (virtio-iommu): the
//! endpoint's IOTLB, which the vIOMMU keeps equal to the complete set of
//! translations the endpoint may use right now. A lookup that misses is
//! therefore a real fault, not a cache miss: the access fails, the fault is
//! counted on the endpoint, recorded in the vIOMMU's `FaultQueue` (which
//! wakes the vIOMMU through an eventfd) and the device gets an
//! `IommuError` back for that one access, so it fails that one request and
//! touches nothing else.
//!
//! The VMM creates one `Arc<DmaTranslation>` per translated device, gives
//! the device `translated_view(host_view, translation.clone())`, and hands
//! the translation to the vIOMMU together with the endpoint ID the guest
//! knows the device by (see `virtio::iommu`). Until then it translates
//! nothing.
//!
//! A `DmaTranslation` is a handle: clones (and the copy inside every view
//! built from it) share one endpoint's state.
//!
//! The data path is a read lock and a range-map lookup; the vIOMMU takes the
//! write lock to change translations, so once it has answered a request
//! (an UNMAP, say) no access can still use what that request removed.

mod shared;
mod tlb;
mod view;

pub use shared::{HostProtection, PageCounts, ShareError, SharedPages, PAGE_SIZE};
pub use view::DmaView;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockWriteGuard};
use vm_memory::iommu::Error as IommuError;
use vm_memory::{GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

/// How a device's addresses are to be understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DmaMode {
    /// No VIRTIO_F_ACCESS_PLATFORM: addresses are guest-physical.
    Bypass,
    /// VIRTIO_F_ACCESS_PLATFORM: addresses go through the platform.
    Platform,
    /// Bypass while the guest is an ordinary VM; once it enters secure
    /// mode the device asks to be reset and then offers ACCESS_PLATFORM.
    Auto,
}

impl std::str::FromStr for DmaMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bypass" => Ok(DmaMode::Bypass),
            "platform" => Ok(DmaMode::Platform),
            "auto" => Ok(DmaMode::Auto),
            _ => Err(format!("invalid DMA mode '{s}': expected bypass, platform or auto")),
        }
    }
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// The endpoint is not attached to a domain (and not in bypass).
    Domain,
    /// Nothing is mapped at the address.
    Unmapped,
    /// The address is mapped, but not for this kind of access.
    Permission,
}

/// One failed translation, as the vIOMMU reports it to its driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub endpoint: u32,
    /// The first address of the access that could not be translated.
    pub iova: u64,
    pub reason: FaultReason,
    /// What the device tried: `Read`, `Write` or both.
    pub access: Permissions,
}

/// Faults waiting for the vIOMMU to report them: a bounded queue that
/// drops its oldest entry when full, and an eventfd that becomes readable
/// when a fault arrives in an empty queue.
#[derive(Debug)]
pub struct FaultQueue {
    faults: Mutex<VecDeque<Fault>>,
    capacity: usize,
    evt: EventFd,
    recorded: AtomicU64,
    dropped: AtomicU64,
}

impl FaultQueue {
    pub fn new(capacity: usize) -> std::io::Result<FaultQueue> {
        Ok(FaultQueue {
            faults: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            recorded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Readable once a fault is queued (after the queue was empty).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Fault>> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record(&self, fault: Fault) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        let was_empty = {
            let mut q = self.lock();
            if q.len() >= self.capacity {
                q.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(fault);
            q.len() == 1
        };
        if was_empty {
            // The counter of a non-blocking eventfd only fails when it is
            // about to overflow, and then it is readable anyway.
            let _ = self.evt.write(1);
        }
    }

    /// The oldest fault, removed from the queue.
    pub fn pop(&self) -> Option<Fault> {
        self.lock().pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Forgets every queued fault; they count as dropped.
    pub fn clear(&self) {
        let mut q = self.lock();
        self.dropped.fetch_add(q.len() as u64, Ordering::Relaxed);
        q.clear();
    }

    /// Faults recorded and faults dropped since the last call.
    pub fn take_counts(&self) -> (u64, u64) {
        (
            self.recorded.swap(0, Ordering::Relaxed),
            self.dropped.swap(0, Ordering::Relaxed),
        )
    }
}

/// One translation the vIOMMU installs: `iova..=last` to `phys..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    pub iova: u64,
    /// Last IOVA of the mapping (inclusive).
    pub last: u64,
    pub phys: u64,
    pub perm: Permissions,
}

/// What one endpoint can reach right now.
#[derive(Debug, Default)]
struct EndpointTlb {
    /// Every address is its own guest-physical address.
    identity: bool,
    tlb: tlb::Tlb,
    /// Attached to a domain: a miss is a mapping fault, not a domain fault.
    attached: bool,
}

impl EndpointTlb {
    fn identity(&mut self) {
        self.tlb.clear();
        self.identity = true;
    }

    fn nothing(&mut self) {
        self.tlb.clear();
        self.identity = false;
    }
}

/// Set once, when a vIOMMU takes the endpoint.
#[derive(Debug)]
struct Binding {
    endpoint: u32,
    faults: Arc<FaultQueue>,
}

#[derive(Debug, Default)]
struct EndpointState {
    tlb: RwLock<EndpointTlb>,
    binding: OnceLock<Binding>,
    faults: AtomicU64,
    /// Checked after translation, under the `tlb` read lock.
    gate: Option<Arc<SharedPages>>,
    /// Accesses the gate refused (private pages).
    private_denied: AtomicU64,
    /// Who is translated here, for the logs.
    owner: String,
    /// Guest-physical addresses as they are: nothing to fault on.
    identity: bool,
}

/// The per-endpoint half of an IOMMU: translations a device may use when
/// its IOMMU is on. Until a vIOMMU fills it, it holds nothing and every
/// translated access fails.
#[derive(Clone, Debug, Default)]
pub struct DmaTranslation {
    state: Arc<EndpointState>,
}

impl DmaTranslation {
    /// An endpoint with no gate: every page it translates to is reachable.
    pub fn new() -> DmaTranslation {
        DmaTranslation::default()
    }

    fn gated(gate: &Arc<SharedPages>, owner: &str, identity: bool) -> DmaTranslation {
        let mut tlb = EndpointTlb::default();
        if identity {
            tlb.identity();
        }
        let state = Arc::new(EndpointState {
            tlb: RwLock::new(tlb),
            gate: Some(gate.clone()),
            owner: owner.to_string(),
            identity,
            ..Default::default()
        });
        gate.register(Arc::downgrade(&state));
        DmaTranslation { state }
    }

    /// Guest-physical addresses as they are (IOMMU-bypass, or
    /// ACCESS_PLATFORM without a vIOMMU), limited to what `gate` allows.
    pub fn identity(gate: &Arc<SharedPages>, owner: &str) -> DmaTranslation {
        DmaTranslation::gated(gate, owner, true)
    }

    /// A vIOMMU endpoint whose translations land only on pages `gate`
    /// allows.
    pub fn gated_endpoint(gate: &Arc<SharedPages>, owner: &str) -> DmaTranslation {
        DmaTranslation::gated(gate, owner, false)
    }

    /// Accesses refused because they reached private pages.
    pub fn private_denied(&self) -> u64 {
        self.state.private_denied.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn begin_access_for_test(&self) -> std::sync::RwLockReadGuard<'_, EndpointTlb> {
        self.state.tlb.read().unwrap()
    }

    /// The endpoint ID a vIOMMU gave it, if one did.
    pub fn endpoint(&self) -> Option<u32> {
        self.state.binding.get().map(|b| b.endpoint)
    }

    /// Failed translations so far.
    pub fn faults(&self) -> u64 {
        self.state.faults.load(Ordering::Relaxed)
    }

    /// Whether `self` and `other` are handles of the same endpoint.
    pub fn same_endpoint(&self, other: &DmaTranslation) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Makes this the endpoint `endpoint` of the vIOMMU that owns `faults`.
    /// False if another vIOMMU (or this one) already has it.
    pub(crate) fn bind(&self, endpoint: u32, faults: Arc<FaultQueue>) -> bool {
        self.state.binding.set(Binding { endpoint, faults }).is_ok()
    }

    fn write(&self) -> RwLockWriteGuard<'_, EndpointTlb> {
        self.state.tlb.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Not attached: identity (bypass) or nothing at all.
    pub fn show_detached(&self, bypass: bool) {
        let mut tlb = self.write();
        tlb.attached = false;
        if bypass {
            tlb.identity();
        } else {
            tlb.nothing();
        }
    }

    /// Attached to a bypass domain (identity), or to a domain with
    /// `mappings`; replaces whatever was there in one step.
    pub fn show_domain<'a>(&self, bypass: bool, mappings: impl Iterator<Item = &'a DmaMapping>) {
        let mut tlb = self.write();
        tlb.attached = true;
        if bypass {
            tlb.identity();
        } else {
            tlb.nothing();
            for m in mappings {
                tlb.tlb.insert(*m);
            }
        }
    }

    pub fn add_mapping(&self, m: &DmaMapping) {
        self.write().tlb.insert(*m);
    }

    /// Removes every translation in `iova..=last`. When this returns, no
    /// access can use them: accesses in flight held the read lock.
    pub fn remove_range(&self, iova: u64, last: u64) {
        self.write().tlb.remove(iova, last);
    }

    /// Counts and logs an access to a private page; returns the error for
    /// the device.
    fn private(&self, iova: u64, length: usize, gpa: u64) -> IommuError {
        let n = self.state.private_denied.fetch_add(1, Ordering::Relaxed) + 1;
        // The first few, then one in a thousand: a guest cannot flood the log.
        if n <= 8 || n.is_multiple_of(1000) {
            log::warn!(
                "{}: access to private page at guest-physical {gpa:#x} refused ({n} so far)",
                self.state.owner
            );
        }
        view::cannot_resolve(iova, length, format!("private page at {gpa:#x}"))
    }

    /// Counts and records a failed translation; returns the error for the
    /// device.
    fn fault(&self, iova: u64, length: usize, access: Permissions, reason: FaultReason, at: u64) -> IommuError {
        self.state.faults.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = self.state.binding.get() {
            b.faults.record(Fault {
                endpoint: b.endpoint,
                iova: at,
                reason,
                access,
            });
        }
        view::cannot_resolve(iova, length, format!("{reason:?} fault at {at:#x}"))
    }
}

/// Guest memory as a device sees it.
pub type DmaMemory = DmaView;

/// Whether a failed access was refused by the DMA view (a vIOMMU fault or
/// a private page) rather than aimed at an address no memory has: devices
/// count the first as `dma_denied`, the second as `bad_descriptors`.
pub fn refused_by_view(e: &vm_memory::GuestMemoryError) -> bool {
    matches!(e, vm_memory::GuestMemoryError::IommuError(_))
}

/// A view with addresses taken as guest-physical and nothing gated (for
/// memory no guest can make private, and tests).
pub fn direct_view(host_view: GuestMemoryMmap) -> DmaMemory {
    DmaView::ungated(host_view)
}

/// A view whose addresses go through `translation`: an identity one
/// (`DmaTranslation::identity`) or a vIOMMU endpoint.
pub fn translated_view(host_view: GuestMemoryMmap, translation: Arc<DmaTranslation>) -> DmaMemory {
    DmaView::translated(host_view, translation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemory};

    fn host() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn bound(id: u32) -> (Arc<DmaTranslation>, Arc<FaultQueue>) {
        let t = Arc::new(DmaTranslation::new());
        let q = Arc::new(FaultQueue::new(4).unwrap());
        assert!(t.bind(id, q.clone()));
        assert!(!t.bind(id, q.clone()), "bound twice");
        (t, q)
    }

    fn map(iova: u64, len: u64, phys: u64, perm: Permissions) -> DmaMapping {
        DmaMapping {
            iova,
            last: iova + len - 1,
            phys,
            perm,
        }
    }

    #[test]
    fn direct_view_reads_guest_physical_addresses() {
        let mem = host();
        mem.write_obj(0xabcd_u32, GuestAddress(0x100)).unwrap();
        let view = direct_view(mem);
        assert_eq!(view.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 0xabcd);
        assert!(view.read_obj::<u32>(GuestAddress(0x10000)).is_err());
        assert!(view.read_obj::<u32>(GuestAddress(u64::MAX - 1)).is_err());
    }

    #[test]
    fn translated_view_without_mappings_refuses_everything() {
        let t = Arc::new(DmaTranslation::new());
        let view = translated_view(host(), t.clone());
        assert!(view.read_obj::<u32>(GuestAddress(0x100)).is_err());
        assert_eq!(t.faults(), 1);
        assert_eq!(t.endpoint(), None);
    }

    #[test]
    fn mapped_iovas_reach_their_guest_physical_pages() {
        let mem = host();
        let (t, faults) = bound(7);
        let view = translated_view(mem.clone(), t.clone());
        t.show_domain(false, [map(0x10_0000, 0x2000, 0x4000, Permissions::ReadWrite)].iter());
        view.write_obj(0x1122_3344_u32, GuestAddress(0x10_1008)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x5008)).unwrap(), 0x1122_3344);
        mem.write_obj(0x55_u8, GuestAddress(0x4000)).unwrap();
        assert_eq!(view.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0x55);
        // Across the end of the mapping: refused as a whole.
        assert!(view.read_obj::<u32>(GuestAddress(0x10_1ffe)).is_err());
        assert_eq!(t.faults(), 1);
        let f = faults.pop().unwrap();
        assert_eq!(
            f,
            Fault {
                endpoint: 7,
                iova: 0x10_2000,
                reason: FaultReason::Unmapped,
                access: Permissions::Read,
            }
        );
    }

    #[test]
    fn denied_accesses_fault_and_touch_nothing() {
        let mem = host();
        let (t, faults) = bound(3);
        let view = translated_view(mem.clone(), t.clone());
        t.show_domain(false, [map(0x2000, 0x1000, 0x8000, Permissions::Read)].iter());
        mem.write_obj(0xaaaa_u16, GuestAddress(0x8010)).unwrap();

        let e = view.write_obj(0x5555_u16, GuestAddress(0x2010)).unwrap_err();
        assert!(matches!(e, vm_memory::GuestMemoryError::IommuError(_)), "{e:?}");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x8010)).unwrap(), 0xaaaa);
        assert!(view.write_obj(0x5555_u16, GuestAddress(0x3010)).is_err());
        assert_eq!(t.faults(), 2);
        assert_eq!(
            faults.pop().unwrap(),
            Fault {
                endpoint: 3,
                iova: 0x2010,
                reason: FaultReason::Permission,
                access: Permissions::Write
            }
        );
        assert_eq!(faults.pop().unwrap().reason, FaultReason::Unmapped);
        // Still readable.
        assert_eq!(view.read_obj::<u16>(GuestAddress(0x2010)).unwrap(), 0xaaaa);

        // A wrapping range is refused before it reaches the IOTLB.
        assert!(!view.check_range(GuestAddress(u64::MAX - 1), 4, Permissions::Read));
        assert_eq!(t.faults(), 3);
    }

    #[test]
    fn detached_endpoints_bypass_or_fault_on_the_domain() {
        let mem = host();
        let (t, faults) = bound(1);
        let view = translated_view(mem.clone(), t.clone());
        mem.write_obj(0x77_u8, GuestAddress(0x9000)).unwrap();
        t.show_detached(true);
        assert_eq!(view.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0x77);
        t.show_detached(false);
        assert!(view.read_obj::<u8>(GuestAddress(0x9000)).is_err());
        assert_eq!(faults.pop().unwrap().reason, FaultReason::Domain);
        // A bypass domain is identity too.
        t.show_domain(true, std::iter::empty());
        assert_eq!(view.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0x77);
    }

    #[test]
    fn removed_ranges_fail_at_once() {
        let mem = host();
        let (t, _faults) = bound(1);
        let view = translated_view(mem, t.clone());
        t.show_domain(false, std::iter::empty());
        t.add_mapping(&map(0x1000, 0x1000, 0x1000, Permissions::ReadWrite));
        t.add_mapping(&map(0x2000, 0x1000, 0x2000, Permissions::ReadWrite));
        assert!(
            view.read_obj::<u64>(GuestAddress(0x1ffc)).is_ok(),
            "two adjacent mappings"
        );
        t.remove_range(0x1000, 0x1fff);
        assert!(view.read_obj::<u8>(GuestAddress(0x1000)).is_err());
        assert!(view.read_obj::<u8>(GuestAddress(0x2000)).is_ok());
    }

    #[test]
    fn the_gate_applies_after_translation_in_both_views() {
        struct Nothing;
        impl HostProtection for Nothing {
            fn set_accessible(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mem = host();
        let gate = Arc::new(SharedPages::new(&[(0, 0x10000)]));
        let direct = translated_view(mem.clone(), Arc::new(DmaTranslation::identity(&gate, "blk0")));
        let t = Arc::new(DmaTranslation::gated_endpoint(&gate, "net0"));
        let translated = translated_view(mem.clone(), t.clone());
        // IOVA 0x10_0000.. -> 0x3000..0x5000: one page shared, one private.
        t.show_domain(false, [map(0x10_0000, 0x2000, 0x3000, Permissions::ReadWrite)].iter());
        mem.write_obj(0x5a_u8, GuestAddress(0x4000)).unwrap();
        assert_eq!(
            direct.read_obj::<u8>(GuestAddress(0x4000)).unwrap(),
            0x5a,
            "ordinary VM"
        );
        assert_eq!(translated.read_obj::<u8>(GuestAddress(0x10_1000)).unwrap(), 0x5a);

        gate.enter_secure(0x3000, 1, &Nothing).unwrap();
        assert!(direct.read_obj::<u8>(GuestAddress(0x4000)).is_err());
        assert!(direct.write_obj(1_u8, GuestAddress(0x4000)).is_err());
        assert!(translated.read_obj::<u8>(GuestAddress(0x10_1000)).is_err());
        assert!(
            translated.read_obj::<u16>(GuestAddress(0x10_0fff)).is_err(),
            "straddling"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(),
            0x5a,
            "nothing written"
        );
        direct.write_obj(7_u8, GuestAddress(0x3000)).unwrap();
        assert_eq!(translated.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 7);
        assert_eq!(t.private_denied(), 2);
        assert_eq!(t.faults(), 0, "a private page is not an IOMMU fault");
    }

    #[test]
    fn the_fault_queue_is_bounded_and_signals_once() {
        let q = FaultQueue::new(2).unwrap();
        let f = |iova| Fault {
            endpoint: 1,
            iova,
            reason: FaultReason::Unmapped,
            access: Permissions::Read,
        };
        q.record(f(1));
        q.record(f(2));
        q.record(f(3));
        assert_eq!(q.eventfd().read().unwrap(), 1, "signalled on the first fault only");
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().unwrap().iova, 2, "the oldest was dropped");
        assert_eq!(q.take_counts(), (3, 1));
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.take_counts(), (0, 1));
    }
}
