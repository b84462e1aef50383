//! virtio-iommu (virtio 1.2 §5.13): the guest decides, per endpoint, which
//! IOVAs a device may reach and where they land in guest-physical memory.
//!
//! # Use from the VMM
//!
//! ```text
//! // One translation per device that sits behind the vIOMMU:
//! let blk_dma = Arc::new(DmaTranslation::new());
//! // The device's DMA view (the transport's `mem`): IOVAs, translated.
//! let blk_mem = translated_view(host_view.clone(), blk_dma.clone());
//! // ... build the block device's transport with `blk_mem` and
//! // DmaMode::Platform, insisting on ACCESS_PLATFORM ...
//! // The vIOMMU gets every endpoint with the ID the guest knows it by:
//! let iommu = Iommu::new("iommu0", vec![(0x0010, blk_dma)], bypass_default)?;
//! // ... and a transport of its own, with an untranslated `direct_view`.
//! ```
//!
//! `Iommu::new` binds each `DmaTranslation` to this device (a translation
//! belongs to one vIOMMU, once) and sets it to the detached state: identity
//! if `bypass_default`, otherwise no access at all until the driver
//! attaches the endpoint and maps something.
//!
//! Endpoint IDs are whatever the firmware tables tell the guest. The
//! convention assumed here, matching an ACPI VIOT whose PCI range node maps
//! BDFs one to one onto endpoint IDs: a PCI function's endpoint ID is its
//! requester ID, `bus << 8 | device << 3 | function` (segment 0); a
//! virtio-mmio device gets an ID outside 0..=0xffff (for instance 0x10000 +
//! its index), given in the VIOT's MMIO endpoint node.
//!
//! # What the device does
//!
//! Queue 0 takes requests, queue 1 gets fault reports. Offered features:
//! VERSION_1, RING_EVENT_IDX, INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE and
//! BYPASS_CONFIG. The legacy F_BYPASS is not offered: §5.13.3.2 says a
//! device should not offer it together with BYPASS_CONFIG, whose `bypass`
//! field governs detached endpoints whether or not the driver accepts it.
//! F_MMIO is not offered either, so MAP_F_MMIO is an unknown flag (INVAL);
//! PROBE gives every endpoint the x86 MSI window 0xfee00000..=0xfeefffff as
//! a RESV_MEM MSI region, which MAP refuses to overlap (RANGE).
//!
//! Config: page_size_mask 4 KiB and up, input_range 0..=2^48-1 (so no
//! mapping reaches u64::MAX), domain_range 0..=1023, probe_size 512,
//! bypass (writable once BYPASS_CONFIG is negotiated; kept over device
//! reset).
//!
//! A domain exists from the first ATTACH naming it until its last endpoint
//! leaves (§5.13.6.4); its mappings go with it. MAP and UNMAP on a domain
//! that does not exist are NOENT. Every request changes the IOTLBs of the
//! affected endpoints before its status is written, so an UNMAP is in force
//! before the driver sees OK.
//!
//! Faults: a failed translation is queued (bounded, oldest dropped) by the
//! endpoint and wakes the worker, which writes one `virtio_iommu_fault` per
//! event buffer and notifies queue 1. Reports wait, bounded, while the
//! driver has no event buffer out.
//!
//! Counters: `iommu_attaches`, `iommu_detaches`, `iommu_maps`,
//! `iommu_unmaps`, `iommu_refused` (non-OK statuses), `iommu_faults`,
//! `iommu_faults_dropped`; `requests` per request answered;
//! `bad_requests` for requests that could not be answered at all (no room
//! for the tail, unknown type; given back with used length 0) and event
//! buffers too small for a report; `bad_descriptors` / `dma_denied` as for
//! every device.

mod handler;
pub mod request;
mod state;
#[cfg(test)]
mod tests;

pub use state::{Limits, Status};

use super::net::chain::read_config_bytes;
use super::worker::Worker;
use super::{device_type, features, take_queues, ActivateError, Activation, VirtioDevice};
use crate::dma::{DmaTranslation, FaultQueue};
use handler::IommuWorker;
use state::IommuState;
use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Feature bits (virtio 1.2 §5.13.3).
pub const F_INPUT_RANGE: u64 = 1 << 0;
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
pub const F_MAP_UNMAP: u64 = 1 << 2;
pub const F_BYPASS: u64 = 1 << 3;
pub const F_PROBE: u64 = 1 << 4;
pub const F_MMIO: u64 = 1 << 5;
pub const F_BYPASS_CONFIG: u64 = 1 << 6;

/// ATTACH flags.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;
/// MAP flags.
pub const MAP_F_READ: u32 = 1 << 0;
pub const MAP_F_WRITE: u32 = 1 << 1;
pub const MAP_F_MMIO: u32 = 1 << 2;

/// 4 KiB granule; any larger power of two may be used too.
pub const PAGE_SIZE_MASK: u64 = !0xfff;
pub const INPUT_START: u64 = 0;
pub const INPUT_END: u64 = (1 << 48) - 1;
pub const DOMAIN_START: u32 = 0;
pub const DOMAIN_END: u32 = 1023;
pub const PROBE_SIZE: u32 = 512;
/// The x86 MSI doorbell window, reserved in every endpoint's IOVA space.
pub const MSI_START: u64 = 0xfee0_0000;
pub const MSI_END: u64 = 0xfeef_ffff;

pub const REQUEST_QUEUE_SIZE: u16 = 256;
pub const EVENT_QUEUE_SIZE: u16 = 64;
const QUEUE_SIZES: [u16; 2] = [REQUEST_QUEUE_SIZE, EVENT_QUEUE_SIZE];
/// Fault reports waiting for event buffers, at most.
pub const PENDING_FAULTS: usize = 256;

/// `struct virtio_iommu_config`.
pub const CONFIG_LEN: usize = 40;
mod config {
    pub const PAGE_SIZE_MASK: usize = 0;
    pub const INPUT_RANGE: usize = 8;
    pub const DOMAIN_RANGE: usize = 24;
    pub const PROBE_SIZE: usize = 32;
    pub const BYPASS: usize = 36;
}

/// The worker of `Iommu::sync_worker`.
#[doc(hidden)]
pub struct SyncWorker(IommuWorker);

impl SyncWorker {
    /// What a notification of the request queue does.
    pub fn process_requests(&mut self) {
        self.0.process_requests();
    }

    /// What a notification of the event queue (or a fault) does.
    pub fn report_faults(&mut self) {
        self.0.report_faults();
    }
}

/// A virtio-iommu device.
pub struct Iommu {
    name: String,
    state: Arc<Mutex<IommuState>>,
    faults: Arc<FaultQueue>,
    worker: Option<Worker>,
}

fn lock(state: &Mutex<IommuState>) -> MutexGuard<'_, IommuState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Iommu {
    /// A vIOMMU for `endpoints` (endpoint ID, its translation). Detached
    /// endpoints bypass it while the `bypass` config field is 1, which it
    /// is at first if `bypass_default`.
    pub fn new(name: &str, endpoints: Vec<(u32, Arc<DmaTranslation>)>, bypass_default: bool) -> io::Result<Iommu> {
        Iommu::with_limits(name, endpoints, bypass_default, Limits::default())
    }

    /// As `new`, with other bounds on what the guest may make it keep.
    pub fn with_limits(
        name: &str,
        endpoints: Vec<(u32, Arc<DmaTranslation>)>,
        bypass_default: bool,
        limits: Limits,
    ) -> io::Result<Iommu> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: {why}"));
        let mut ids = BTreeSet::new();
        for (i, (id, t)) in endpoints.iter().enumerate() {
            if !ids.insert(*id) {
                return Err(invalid(format!("endpoint ID {id} given twice")));
            }
            if let Some((other, _)) = endpoints[..i].iter().find(|(_, u)| u.same_endpoint(t)) {
                return Err(invalid(format!("endpoints {other} and {id} have the same translation")));
            }
            if let Some(other) = t.endpoint() {
                return Err(invalid(format!(
                    "endpoint {id}: its translation already is endpoint {other} of a vIOMMU"
                )));
            }
        }
        let faults = Arc::new(FaultQueue::new(PENDING_FAULTS)?);
        for (id, t) in &endpoints {
            if !t.bind(*id, faults.clone()) {
                return Err(invalid(format!("endpoint {id}: its translation was taken meanwhile")));
            }
        }
        let state = IommuState::new(endpoints, bypass_default, limits).map_err(invalid)?;
        Ok(Iommu {
            name: name.to_string(),
            state: Arc::new(Mutex::new(state)),
            faults,
            worker: None,
        })
    }

    /// The `bypass` config field.
    pub fn bypass(&self) -> bool {
        lock(&self.state).bypass()
    }

    /// Faults recorded by the endpoints and not yet reported.
    pub fn pending_faults(&self) -> usize {
        self.faults.len()
    }

    /// The worker of an activation, before it gets a thread: `activate`
    /// spawns one for it; fuzzing and tests serve it on their own thread,
    /// step by step.
    #[doc(hidden)]
    pub fn sync_worker(&mut self, activation: Activation) -> Result<SyncWorker, ActivateError> {
        self.reset();
        let Activation {
            mem,
            queues,
            interrupt,
            acked_features,
            metrics,
        } = activation;
        let [requests, events] = take_queues(queues, &self.name)?;
        lock(&self.state).set_acked(acked_features);
        Ok(SyncWorker(IommuWorker::new(
            mem,
            requests,
            events,
            self.faults.clone(),
            self.state.clone(),
            interrupt,
            metrics,
        )))
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(&mut c, config::PAGE_SIZE_MASK, &PAGE_SIZE_MASK.to_le_bytes());
        put(&mut c, config::INPUT_RANGE, &INPUT_START.to_le_bytes());
        put(&mut c, config::INPUT_RANGE + 8, &INPUT_END.to_le_bytes());
        put(&mut c, config::DOMAIN_RANGE, &DOMAIN_START.to_le_bytes());
        put(&mut c, config::DOMAIN_RANGE + 4, &DOMAIN_END.to_le_bytes());
        put(&mut c, config::PROBE_SIZE, &PROBE_SIZE.to_le_bytes());
        c[config::BYPASS] = u8::from(self.bypass());
        c
    }
}

impl VirtioDevice for Iommu {
    fn device_type(&self) -> u32 {
        device_type::IOMMU
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | F_INPUT_RANGE
            | F_DOMAIN_RANGE
            | F_MAP_UNMAP
            | F_PROBE
            | F_BYPASS_CONFIG
    }

    /// Called once the rest of FEATURES_OK is fine: from here on the
    /// features are negotiated (bypass becomes writable).
    fn accept_features(&self, acked: u64) -> Result<(), String> {
        lock(&self.state).set_acked(acked);
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    /// Only `bypass`, one byte, 0 or 1, once BYPASS_CONFIG is negotiated.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset != config::BYPASS as u64 || data.len() != 1 {
            return false;
        }
        let mut state = lock(&self.state);
        if state.acked() & F_BYPASS_CONFIG == 0 {
            return false;
        }
        match data[0] {
            0 => state.set_bypass(false),
            1 => state.set_bypass(true),
            _ => return false,
        }
        true
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let SyncWorker(handler) = self.sync_worker(activation)?;
        self.worker = Some(Worker::spawn(&self.name, handler)?);
        Ok(())
    }

    /// Stops the worker; every endpoint is detached, every domain gone,
    /// faults not yet reported are forgotten. `bypass` stays.
    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        lock(&self.state).reset();
        self.faults.clear();
    }
}
