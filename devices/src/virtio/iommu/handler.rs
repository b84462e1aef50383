//! The virtio-iommu worker: answers requests on queue 0 and reports
//! faults on queue 1, woken by either queue's notification or by the
//! endpoints' fault eventfd.

use super::request::{encode_fault, parse, write_properties, ParseError, Request, FAULT_LEN, TAIL_LEN};
use super::state::{IommuState, Status};
use super::{lock, F_MAP_UNMAP, F_PROBE, PROBE_SIZE};
use crate::dma::{DmaMemory, FaultQueue};
use crate::virtio::net::chain::{complete, memory_error_counter, notify_used, pop_chain, unpop, Buffers};
use crate::virtio::{ActiveQueue, DeviceMetrics, VirtioInterrupt};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::{Arc, Mutex};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryError};
use vmm_sys_util::epoll::EventSet;

/// Requests answered per wake-up before the loop looks at other events.
const BUDGET: usize = 256;
/// The device-readable part read at most: the longest request (PROBE,
/// 72 bytes) with room to spare; anything after it is ignored.
const MAX_READ: usize = 128;
/// The device-writable part of a request at most: PROBE's properties and
/// the tail. Larger ones are not answered.
const MAX_WRITE: u64 = PROBE_SIZE as u64 + TAIL_LEN as u64;

const REQUESTS: u32 = 0;
const EVENTS: u32 = 1;
const FAULTS: u32 = 2;

pub(super) struct IommuWorker {
    mem: DmaMemory,
    requests: ActiveQueue,
    events: ActiveQueue,
    faults: Arc<FaultQueue>,
    state: Arc<Mutex<IommuState>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    bufs: Buffers,
    input: Vec<u8>,
    output: Vec<u8>,
}

impl IommuWorker {
    pub fn new(
        mem: DmaMemory,
        requests: ActiveQueue,
        events: ActiveQueue,
        faults: Arc<FaultQueue>,
        state: Arc<Mutex<IommuState>>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
    ) -> IommuWorker {
        IommuWorker {
            mem,
            requests,
            events,
            faults,
            state,
            interrupt,
            metrics,
            bufs: Buffers::default(),
            input: Vec::with_capacity(MAX_READ),
            output: Vec::with_capacity(MAX_WRITE as usize),
        }
    }

    pub(super) fn process_requests(&mut self) {
        if let Err(e) = self.requests.queue.disable_notification(&self.mem) {
            log::debug!("iommu: cannot disable notifications: {e}");
        }
        let mut done = 0;
        while let Some(chain) = pop_chain(&mut self.requests.queue, &self.mem, &self.metrics) {
            let len = match self.bufs.load(chain) {
                Ok(()) => self.answer(),
                Err(e) => {
                    DeviceMetrics::inc(&self.metrics.bad_descriptors);
                    log::debug!("iommu: chain {}: {e:?}", self.bufs.head);
                    0
                }
            };
            complete(&mut self.requests.queue, &self.mem, &self.metrics, self.bufs.head, len);
            done += 1;
            if done == BUDGET {
                let _ = self.requests.notify.write(1);
                break;
            }
        }
        if done > 0 {
            let index = self.requests.index;
            notify_used(
                &mut self.requests.queue,
                index,
                &self.mem,
                self.interrupt.as_ref(),
                &self.metrics,
            );
        }
    }

    /// Answers the loaded request; returns the used length.
    fn answer(&mut self) -> u32 {
        let bufs = &self.bufs;
        let m = &self.metrics;
        if bufs.readable_len < 4 || bufs.writable_len < TAIL_LEN as u64 || bufs.writable_len > MAX_WRITE {
            DeviceMetrics::inc(&m.bad_requests);
            log::debug!(
                "iommu: request {} has {} readable and {} writable bytes",
                bufs.head,
                bufs.readable_len,
                bufs.writable_len
            );
            return 0;
        }
        if let Err(e) = read_prefix(bufs, &self.mem, &mut self.input) {
            DeviceMetrics::inc(memory_error_counter(m, &e));
            log::debug!("iommu: request {}: {e}", bufs.head);
            return 0;
        }
        let request = match parse(&self.input) {
            Ok(Request::Probe { .. }) if lock(&self.state).acked() & F_PROBE == 0 => {
                DeviceMetrics::inc(&m.bad_requests);
                return 0;
            }
            Ok(r) => Some(r),
            Err(ParseError::Short(_)) => None,
            Err(ParseError::UnknownType(t)) => {
                DeviceMetrics::inc(&m.bad_requests);
                log::debug!("iommu: request {} has unknown type {t}", bufs.head);
                return 0;
            }
        };
        // The tail ends the writable part; PROBE's properties come before it.
        let total = bufs.writable_len as usize;
        let tail_at = total - TAIL_LEN;
        self.output.clear();
        self.output.resize(total, 0);
        let status = match request {
            // Too short for its type; or a PROBE without room for
            // `probe_size` bytes of properties (§5.13.6.7: none written).
            None => {
                DeviceMetrics::inc(&m.iommu_refused);
                Status::Inval
            }
            Some(Request::Probe { .. }) if tail_at < PROBE_SIZE as usize => {
                DeviceMetrics::inc(&m.iommu_refused);
                Status::Inval
            }
            Some(r) => execute(&self.state, m, r),
        };
        if let (Some(Request::Probe { .. }), Status::Ok) = (request, status) {
            write_properties(&mut self.output[..tail_at]);
        }
        self.output[tail_at] = status as u8;
        if let Err(e) = bufs.writer().write(&self.mem, &self.output) {
            DeviceMetrics::inc(memory_error_counter(m, &e));
            log::debug!("iommu: request {}: cannot write the answer: {e}", bufs.head);
            return 0;
        }
        DeviceMetrics::inc(&m.requests);
        DeviceMetrics::add(&m.bytes_written, total as u64);
        total as u32
    }

    /// Writes queued faults into event buffers while there are both.
    pub(super) fn report_faults(&mut self) {
        let (recorded, dropped) = self.faults.take_counts();
        DeviceMetrics::add(&self.metrics.iommu_faults, recorded);
        DeviceMetrics::add(&self.metrics.iommu_faults_dropped, dropped);
        let mut used = false;
        while !self.faults.is_empty() {
            let Some(chain) = pop_chain(&mut self.events.queue, &self.mem, &self.metrics) else {
                break;
            };
            used = true;
            if let Err(e) = self.bufs.load(chain) {
                DeviceMetrics::inc(&self.metrics.bad_descriptors);
                log::debug!("iommu: event chain {}: {e:?}", self.bufs.head);
                complete(&mut self.events.queue, &self.mem, &self.metrics, self.bufs.head, 0);
                continue;
            }
            let head = self.bufs.head;
            if !self.bufs.readable.is_empty() || self.bufs.writable_len < FAULT_LEN as u64 {
                DeviceMetrics::inc(&self.metrics.bad_requests);
                log::debug!("iommu: event buffer {head} cannot take a fault report");
                complete(&mut self.events.queue, &self.mem, &self.metrics, head, 0);
                continue;
            }
            let Some(fault) = self.faults.pop() else {
                unpop(&mut self.events.queue);
                break;
            };
            let len = match self.bufs.writer().write(&self.mem, &encode_fault(&fault)) {
                Ok(_) => FAULT_LEN as u32,
                Err(e) => {
                    DeviceMetrics::inc(memory_error_counter(&self.metrics, &e));
                    DeviceMetrics::inc(&self.metrics.iommu_faults_dropped);
                    log::debug!("iommu: event buffer {head}: {e}");
                    0
                }
            };
            complete(&mut self.events.queue, &self.mem, &self.metrics, head, len);
        }
        if used {
            let index = self.events.index;
            notify_used(
                &mut self.events.queue,
                index,
                &self.mem,
                self.interrupt.as_ref(),
                &self.metrics,
            );
        }
    }
}

/// Runs one request against the state; counts it.
fn execute(state: &Mutex<IommuState>, m: &DeviceMetrics, request: Request) -> Status {
    let mut st = lock(state);
    let map_unmap = st.acked() & F_MAP_UNMAP != 0;
    let result = match request {
        Request::Attach {
            domain,
            endpoint,
            flags,
            reserved,
        } => {
            DeviceMetrics::inc(&m.iommu_attaches);
            st.attach(domain, endpoint, flags, reserved)
        }
        Request::Detach { domain, endpoint } => {
            DeviceMetrics::inc(&m.iommu_detaches);
            st.detach(domain, endpoint)
        }
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => {
            DeviceMetrics::inc(&m.iommu_maps);
            if map_unmap {
                st.map(domain, virt_start, virt_end, phys_start, flags)
            } else {
                Err(Status::Unsupp)
            }
        }
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => {
            DeviceMetrics::inc(&m.iommu_unmaps);
            if map_unmap {
                st.unmap(domain, virt_start, virt_end)
            } else {
                Err(Status::Unsupp)
            }
        }
        Request::Probe { endpoint } => st.probe(endpoint),
    };
    match result {
        Ok(()) => Status::Ok,
        Err(s) => {
            DeviceMetrics::inc(&m.iommu_refused);
            log::debug!("iommu: {request:?}: {s:?}");
            s
        }
    }
}

/// Reads the first `MAX_READ` bytes (or fewer) of the readable buffers.
fn read_prefix(bufs: &Buffers, mem: &DmaMemory, out: &mut Vec<u8>) -> Result<(), GuestMemoryError> {
    let want = usize::try_from(bufs.readable_len).unwrap_or(MAX_READ).min(MAX_READ);
    out.clear();
    out.resize(want, 0);
    let mut at = 0;
    for seg in &bufs.readable {
        if at == want {
            break;
        }
        let n = (seg.len as usize).min(want - at);
        mem.read_slice(&mut out[at..at + n], seg.addr)?;
        at += n;
    }
    Ok(())
}

impl MutEventSubscriber for IommuWorker {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            REQUESTS => {
                let _ = self.requests.notify.read();
                self.process_requests();
            }
            EVENTS => {
                let _ = self.events.notify.read();
                self.report_faults();
            }
            _ => {
                let _ = self.faults.eventfd().read();
                self.report_faults();
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let watch = [
            Events::with_data(&self.requests.notify, REQUESTS, EventSet::IN),
            Events::with_data(&self.events.notify, EVENTS, EventSet::IN),
            Events::with_data(self.faults.eventfd(), FAULTS, EventSet::IN),
        ];
        for events in watch {
            if let Err(e) = ops.add(events) {
                log::error!("iommu: cannot watch event {}: {e:?}", events.data());
            }
        }
        // Faults recorded before the driver was ready.
        self.report_faults();
    }
}
