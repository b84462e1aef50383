//! The DMA view: the one way every device reaches guest memory.
//!
//! Rings and buffers alike are read and written through a `DmaMemory`, which
//! is vm-memory's `IommuMemory` over the host view of guest RAM. With the
//! IOMMU off (IOMMU-bypass, or ACCESS_PLATFORM without a vIOMMU) an address
//! is a guest-physical address; with it on, every access is translated by
//! `DmaTranslation` first.

use std::sync::{RwLock, RwLockReadGuard};
use vm_memory::iommu::{Error as IommuError, Iommu, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryMmap, IommuMemory, Iotlb, Permissions};

/// How a device's addresses are to be understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DmaMode {
    /// No VIRTIO_F_ACCESS_PLATFORM: addresses are guest-physical.
    Bypass,
    /// VIRTIO_F_ACCESS_PLATFORM: addresses go through the platform.
    Platform,
}

impl std::str::FromStr for DmaMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bypass" => Ok(DmaMode::Bypass),
            "platform" => Ok(DmaMode::Platform),
            _ => Err(format!("invalid DMA mode '{s}': expected bypass or platform")),
        }
    }
}

/// Translations a device may use when its IOMMU is on. Until a vIOMMU
/// fills it, it holds nothing and every translated access fails.
#[derive(Debug, Default)]
pub struct DmaTranslation {
    iotlb: RwLock<Iotlb>,
}

impl Iommu for DmaTranslation {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        // vm-memory adds `length` to `iova` unchecked: refuse wrapping ranges here.
        let refuse = |reason: String| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason,
        };
        if iova.0.checked_add(length as u64).is_none() {
            return Err(refuse("the range wraps around".into()));
        }
        let guard = self.iotlb.read().unwrap_or_else(|e| e.into_inner());
        Iotlb::lookup(guard, iova, length, access).map_err(|fails| {
            refuse(format!(
                "{} unmapped and {} forbidden subranges",
                fails.misses.len(),
                fails.access_fails.len()
            ))
        })
    }
}

/// Guest memory as a device sees it.
pub type DmaMemory = IommuMemory<GuestMemoryMmap, DmaTranslation>;

/// A view with addresses taken as guest-physical (bypass, or platform
/// without a vIOMMU).
pub fn direct_view(host_view: GuestMemoryMmap) -> DmaMemory {
    IommuMemory::new(host_view, DmaTranslation::default(), false, ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn direct_view_reads_guest_physical_addresses() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0xabcd_u32, GuestAddress(0x100)).unwrap();
        let view = direct_view(mem);
        assert_eq!(view.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 0xabcd);
        assert!(view.read_obj::<u32>(GuestAddress(0x10000)).is_err());
        assert!(view.read_obj::<u32>(GuestAddress(u64::MAX - 1)).is_err());
    }

    #[test]
    fn translated_view_without_mappings_refuses_everything() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut view = direct_view(mem);
        view.set_iommu_enabled(true);
        assert!(view.read_obj::<u32>(GuestAddress(0x100)).is_err());
        assert!(view.read_obj::<u32>(GuestAddress(u64::MAX - 1)).is_err());
    }
}
