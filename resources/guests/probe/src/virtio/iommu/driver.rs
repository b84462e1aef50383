//! The virtio-iommu device itself: feature negotiation, the config, the
//! request queue (one request at a time, each waited for) and the event
//! queue (every buffer kept posted, fault reports read when asked).
//!
//! virtio-drivers has no virtio-iommu driver, but its `VirtQueue` and
//! transports fit: the queues run over `hal::Untranslated`, because the
//! vIOMMU's own DMA is not translated and sharing a buffer with it must not
//! send it a request. Everything the device reads or writes (rings, event
//! buffers, the request being answered) is in the DMA pool, so that it
//! still works when the pool is all the probe shares (`probe.secure=1`).

use alloc::collections::VecDeque;
use core::hint::spin_loop;
use core::slice;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};

use super::super::transport::Probed;
use super::super::{error_name, TIMEOUT};
use super::wire::{self, Fault, FAULT_LEN, TAIL_LEN};
use crate::hal::{self, Untranslated};
use crate::time::rdtsc;

/// Feature bits (virtio 1.2 §5.13.3; §6 for VERSION_1).
const F_INPUT_RANGE: u64 = 1 << 0;
const F_DOMAIN_RANGE: u64 = 1 << 1;
const F_MAP_UNMAP: u64 = 1 << 2;
const F_PROBE: u64 = 1 << 4;
const F_BYPASS_CONFIG: u64 = 1 << 6;
const F_VERSION_1: u64 = 1 << 32;
const WANTED: u64 = F_VERSION_1 | F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG;

/// Requests go one at a time; the queue only needs room for one chain.
const REQUEST_QUEUE: usize = 8;
/// Event buffers kept posted.
const EVENT_QUEUE: usize = 16;
/// Largest PROBE answer read.
const PROBE_MAX: usize = 512;
/// The driver's pool page: event buffers, then one request at a time (its
/// device-readable bytes, tail and PROBE properties).
const EVENTS_AT: usize = 0;
const REQUEST_AT: usize = 512;
const REQUEST_MAX: usize = 128;
const TAIL_AT: usize = REQUEST_AT + REQUEST_MAX;
const PROPS_AT: usize = 1024;
const _: () = assert!(EVENT_QUEUE * FAULT_LEN <= REQUEST_AT && PROPS_AT + PROBE_MAX <= 4096);

/// `struct virtio_iommu_config`, as read at start-up.
#[derive(Clone, Copy, Default)]
pub struct Config {
    pub page_size_mask: u64,
    pub input_start: u64,
    pub input_end: u64,
    pub domain_start: u32,
    pub domain_end: u32,
    pub probe_size: u32,
    pub bypass: u8,
}

/// Requests sent, by type.
#[derive(Clone, Copy, Default)]
pub struct Sent {
    pub attaches: u64,
    pub detaches: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub probes: u64,
    /// Answered with a status other than OK.
    pub refused: u64,
}

pub struct Driver {
    transport: Probed,
    requests: VirtQueue<Untranslated, REQUEST_QUEUE>,
    events: VirtQueue<Untranslated, EVENT_QUEUE>,
    /// The pool page laid out above; the driver's for good (it lives in a
    /// static).
    page: u64,
    /// Event buffer by token (descriptor index).
    event_slot: [u8; EVENT_QUEUE],
    pub features: u64,
    pub config: Config,
    pub sent: Sent,
    /// Reports read from the event queue and not yet taken.
    faults: VecDeque<Fault>,
    pub faults_seen: u64,
}

fn read_u64(t: &Probed, at: usize) -> Result<u64, &'static str> {
    // Config space is only 4-byte aligned for the transports.
    let lo: u32 = t.read_config_space(at).map_err(|e| error_name(&e))?;
    let hi: u32 = t.read_config_space(at + 4).map_err(|e| error_name(&e))?;
    Ok(u64::from(hi) << 32 | u64::from(lo))
}

fn read_config(t: &Probed) -> Result<Config, &'static str> {
    let r32 = |at| t.read_config_space::<u32>(at).map_err(|e| error_name(&e));
    Ok(Config {
        page_size_mask: read_u64(t, 0)?,
        input_start: read_u64(t, 8)?,
        input_end: read_u64(t, 16)?,
        domain_start: r32(24)?,
        domain_end: r32(28)?,
        probe_size: r32(32)?,
        bypass: t.read_config_space::<u8>(36).map_err(|e| error_name(&e))?,
    })
}

impl Driver {
    /// Brings the device up (virtio 1.2 §3.1.1) and posts every event buffer.
    pub fn new(mut transport: Probed) -> Result<Driver, &'static str> {
        let base = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
        transport.set_status(DeviceStatus::empty());
        transport.set_status(base);
        let offered = transport.read_device_features();
        if offered & (F_VERSION_1 | F_MAP_UNMAP) != F_VERSION_1 | F_MAP_UNMAP {
            return Err("no_version_1_or_map_unmap");
        }
        let features = offered & WANTED;
        transport.write_driver_features(features);
        transport.set_status(base | DeviceStatus::FEATURES_OK);
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err("features_refused");
        }
        let config = read_config(&transport)?;
        let page = hal::pool_alloc(1).ok_or("no_pool_page")?;
        let mut requests = VirtQueue::new(&mut transport, 0, false, false).map_err(|e| error_name(&e))?;
        let mut events = VirtQueue::new(&mut transport, 1, false, false).map_err(|e| error_name(&e))?;
        // The probe polls with interrupts off: an interrupt per answer
        // would only cost the VMM work.
        requests.set_dev_notify(false);
        events.set_dev_notify(false);
        transport.set_status(base | DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK);
        let mut d = Driver {
            transport,
            requests,
            events,
            page,
            event_slot: [0; EVENT_QUEUE],
            features,
            config,
            sent: Sent::default(),
            faults: VecDeque::new(),
            faults_seen: 0,
        };
        for slot in 0..EVENT_QUEUE {
            d.post_event(slot)?;
        }
        d.transport.notify(1);
        Ok(d)
    }

    pub fn has_probe(&self) -> bool {
        self.features & F_PROBE != 0
    }

    /// Writes the `bypass` config field; false if BYPASS_CONFIG was not
    /// negotiated.
    pub fn set_bypass(&mut self, on: bool) -> bool {
        if self.features & F_BYPASS_CONFIG == 0 {
            return false;
        }
        let ok = self.transport.write_config_space::<u8>(36, u8::from(on)).is_ok();
        self.config.bypass = self.transport.read_config_space::<u8>(36).unwrap_or(0xff);
        ok && self.config.bypass == u8::from(on)
    }

    /// Bytes `at..at + len` of the driver's page.
    ///
    /// # Safety
    /// No other slice of those bytes may be in use at the same time.
    unsafe fn bytes(&self, at: usize, len: usize) -> &'static mut [u8] {
        slice::from_raw_parts_mut((self.page as usize + at) as *mut u8, len)
    }

    fn post_event(&mut self, slot: usize) -> Result<(), &'static str> {
        // SAFETY: event buffer `slot` is free: never posted, or its report
        // was just read.
        let buf = unsafe { self.bytes(EVENTS_AT + slot * FAULT_LEN, FAULT_LEN) };
        buf.fill(0);
        // SAFETY: the page is the driver's for good; the buffer is only
        // read again once the device gives its token back.
        let token = unsafe { self.events.add(&[], &mut [buf]) }.map_err(|e| error_name(&e))?;
        *self.event_slot.get_mut(token as usize).ok_or("bad_event_token")? = slot as u8;
        Ok(())
    }

    /// Reads every fault report the device has written, and posts their
    /// buffers again.
    pub fn collect_events(&mut self) {
        let mut reposted = false;
        while let Some(token) = self.events.peek_used() {
            let Some(&slot) = self.event_slot.get(token as usize) else {
                break;
            };
            let slot = slot as usize;
            // SAFETY: the buffer `post_event` gave with this token, which
            // the device gave back.
            let buf = unsafe { self.bytes(EVENTS_AT + slot * FAULT_LEN, FAULT_LEN) };
            // SAFETY: as above.
            let len = unsafe { self.events.pop_used(token, &[], &mut [&mut buf[..]]) };
            if matches!(len, Ok(n) if n as usize >= FAULT_LEN) {
                let mut report = [0u8; FAULT_LEN];
                report.copy_from_slice(buf);
                self.faults.push_back(wire::parse_fault(&report));
                self.faults_seen += 1;
            }
            if self.post_event(slot).is_ok() {
                reposted = true;
            }
        }
        if reposted {
            self.transport.notify(1);
        }
    }

    /// The oldest fault report not yet taken.
    pub fn take_fault(&mut self) -> Option<Fault> {
        self.collect_events();
        self.faults.pop_front()
    }

    /// Sends one request and waits for its answer; returns the status.
    /// `props` (PROBE only) receives the properties.
    fn exchange(&mut self, req: &[u8], props: Option<&mut [u8]>) -> Result<u8, &'static str> {
        let props_len = props.as_ref().map_or(0, |p| p.len().min(PROBE_MAX));
        if req.len() > REQUEST_MAX {
            return Err("request_too_long");
        }
        // SAFETY: one request at a time, and these three ranges of the page
        // are apart from each other and from the event buffers.
        let (staged, tail, answer) = unsafe {
            (
                self.bytes(REQUEST_AT, req.len()),
                self.bytes(TAIL_AT, TAIL_LEN),
                self.bytes(PROPS_AT, props_len),
            )
        };
        staged.copy_from_slice(req);
        tail.fill(0xff);
        let mut both: [&mut [u8]; 2];
        let mut just_tail: [&mut [u8]; 1];
        let outs: &mut [&mut [u8]] = if props_len > 0 {
            both = [answer, tail];
            &mut both
        } else {
            just_tail = [tail];
            &mut just_tail
        };
        let ins = [&staged[..]];
        // SAFETY: the staged bytes stay in the page until the wait below
        // pops this token (or gives up on the device for good).
        let token = unsafe { self.requests.add(&ins, outs) }.map_err(|e| error_name(&e))?;
        if self.requests.should_notify() {
            self.transport.notify(0);
        }
        let start = rdtsc();
        while self.requests.peek_used() != Some(token) {
            if rdtsc() - start > TIMEOUT {
                // Stop the device rather than let it answer into the page
                // a request nobody waits for any more.
                self.transport.set_status(DeviceStatus::FAILED);
                self.transport.set_status(DeviceStatus::empty());
                panic!("virtio-iommu: no answer to a request");
            }
            spin_loop();
        }
        // SAFETY: the same buffers `add` was given with this token.
        unsafe { self.requests.pop_used(token, &ins, outs) }.map_err(|e| error_name(&e))?;
        // SAFETY: the device is done with the tail and the properties.
        let status = unsafe { self.bytes(TAIL_AT, 1)[0] };
        if let Some(p) = props {
            // SAFETY: as above.
            p[..props_len].copy_from_slice(unsafe { self.bytes(PROPS_AT, props_len) });
        }
        if status != wire::S_OK {
            self.sent.refused += 1;
        }
        Ok(status)
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) -> Result<u8, &'static str> {
        self.sent.attaches += 1;
        self.exchange(&wire::attach(domain, endpoint, 0), None)
    }

    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<u8, &'static str> {
        self.sent.detaches += 1;
        self.exchange(&wire::detach(domain, endpoint), None)
    }

    /// Maps `len` bytes (whole pages) at `iova` to `phys`.
    pub fn map(&mut self, domain: u32, iova: u64, phys: u64, len: u64, flags: u32) -> Result<u8, &'static str> {
        self.sent.maps += 1;
        self.exchange(&wire::map(domain, iova, iova + len - 1, phys, flags), None)
    }

    pub fn unmap(&mut self, domain: u32, iova: u64, len: u64) -> Result<u8, &'static str> {
        self.sent.unmaps += 1;
        self.exchange(&wire::unmap(domain, iova, iova + len - 1), None)
    }

    /// PROBE `endpoint`: the status and its reserved regions.
    pub fn probe(&mut self, endpoint: u32, out: &mut [wire::ResvMem]) -> Result<(u8, usize), &'static str> {
        self.sent.probes += 1;
        let size = (self.config.probe_size as usize).min(PROBE_MAX);
        if size == 0 {
            return Err("probe_size_0");
        }
        let mut props = [0u8; PROBE_MAX];
        let status = self.exchange(&wire::probe(endpoint), Some(&mut props[..size]))?;
        if status != wire::S_OK {
            return Ok((status, 0));
        }
        wire::resv_mem(&props[..size], out).map(|n| (status, n))
    }
}
