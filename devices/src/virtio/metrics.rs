//! Per-device counters: what happened, and every way a guest got it wrong.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one device; written from any thread, read for `--metrics`.
        #[derive(Debug, Default)]
        pub struct DeviceMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl DeviceMetrics {
            /// Name and value of every counter.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Driver activations (DRIVER_OK with a valid set-up).
    activations,
    /// Of those, activations with ACCESS_PLATFORM negotiated.
    activations_platform,
    /// Of those, activations while the guest was secure.
    activations_secure,
    /// Device resets by the driver.
    resets,
    /// Requests (descriptor chains) completed.
    requests,
    /// Bytes read from guest memory for requests.
    bytes_read,
    /// Bytes written to guest memory for requests.
    bytes_written,
    /// Interrupts raised.
    interrupts,
    /// Requests that failed with an I/O error on the host side.
    io_errors,
    /// Requests the device refused as malformed.
    bad_requests,
    /// Descriptor chains that could not be walked (loops, bad indexes, bad
    /// indirect tables, addresses outside guest memory).
    bad_descriptors,
    /// Queues refused at queue enable or DRIVER_OK because the guest is
    /// secure and a ring is not on pages it shared.
    private_rings,
    /// Accesses outside what the device may touch (unmapped IOVA, denied page).
    dma_denied,
    /// Queue sizes that were not a power of two or too large.
    bad_queue_sizes,
    /// Notifications of queues that do not exist.
    bad_notifications,
    /// Register or config-space writes that were invalid or read-only.
    bad_register_writes,
    /// Feature sets refused at FEATURES_OK.
    features_refused,
    /// Times the device set DEVICE_NEEDS_RESET.
    needs_reset,
    /// virtio-iommu: ATTACH requests.
    iommu_attaches,
    /// virtio-iommu: DETACH requests.
    iommu_detaches,
    /// virtio-iommu: MAP requests.
    iommu_maps,
    /// virtio-iommu: UNMAP requests.
    iommu_unmaps,
    /// virtio-iommu: requests answered with a status other than OK.
    iommu_refused,
    /// virtio-iommu: failed translations of its endpoints' accesses.
    iommu_faults,
    /// virtio-iommu: faults never reported to the driver (the queue of
    /// pending reports was full, or an event buffer could not be written).
    iommu_faults_dropped,
}

impl DeviceMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_every_counter() {
        let m = DeviceMetrics::default();
        DeviceMetrics::inc(&m.requests);
        DeviceMetrics::add(&m.bytes_read, 512);
        let s = m.snapshot();
        assert!(s.contains(&("requests", 1)));
        assert!(s.contains(&("bytes_read", 512)));
        assert!(s.iter().any(|(n, _)| *n == "needs_reset"));
    }
}
