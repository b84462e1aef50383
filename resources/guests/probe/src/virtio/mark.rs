//! What the DMA policies cost a stretch of work: vIOMMU requests the probe
//! sent and the lazy policy's bounces, counted from a mark to now.

use super::iommu;
use crate::hal;
use crate::serial::Line;

/// DMA counters at one moment: vIOMMU requests the probe sent, and the
/// lazy policy's bounces.
#[derive(Clone, Copy, Default)]
pub struct DmaMark {
    maps: u64,
    unmaps: u64,
    bounces: u64,
    map_failures: u64,
}

impl DmaMark {
    pub fn now() -> DmaMark {
        let sent = iommu::sent();
        let c = hal::counts();
        DmaMark {
            maps: sent.maps,
            unmaps: sent.unmaps,
            bounces: c.bounces,
            map_failures: c.map_failures,
        }
    }

    /// ` iommu_maps=N iommu_unmaps=M bounces=B`: what happened since `self`.
    pub fn tag(self, line: Line) -> Line {
        let now = DmaMark::now();
        let line = line
            .dec("iommu_maps", now.maps - self.maps)
            .dec("iommu_unmaps", now.unmaps - self.unmaps)
            .dec("bounces", now.bounces - self.bounces);
        match now.map_failures - self.map_failures {
            0 => line,
            n => line.dec("map_failures", n),
        }
    }

    /// ` bounces=B`: the bounce policy's copies since `self`.
    pub fn tag_bounces(self, line: Line) -> Line {
        line.dec("bounces", DmaMark::now().bounces - self.bounces)
    }
}
