//! The probe as a virtio-iommu client (virtio 1.2 §5.13).
//!
//! One vIOMMU at most, found among the virtio devices and set up before
//! any other device (`install`). Every translated endpoint joins one domain,
//! `DOMAIN`, when its device accepts VIRTIO_F_ACCESS_PLATFORM
//! (`attach_endpoint`, from the transport wrapper); the first one to join
//! also maps the DMA pool there at IOVA = guest-physical address, where the
//! virtqueues live for good. One domain suits both DMA policies: lazy needs
//! nothing but the pool, and strict allocates IOVAs per request (hal.rs),
//! so endpoints never need apart address spaces.
//!
//! Endpoint IDs come from the ACPI VIOT (acpi/viot.rs); without one, from
//! veil's documented rule, and the output says so.
//!
//! The Hal reaches the vIOMMU through static functions, so the driver is
//! global; the probe is single-threaded when it drives devices, and a
//! request sent from inside another one is a bug that panics.

mod driver;
pub mod wire;

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use super::discover::Bus;
use super::transport::Probed;
use crate::acpi::viot::{Viot, ViotIommu};
use crate::hal;
use crate::serial::Line;
use crate::time::rdtsc;
pub use driver::Sent;
use driver::{Config, Driver};
pub use wire::Fault;

pub const MAP_READ: u32 = 1 << 0;
pub const MAP_WRITE: u32 = 1 << 1;
/// The domain of every translated endpoint.
pub const DOMAIN: u32 = 1;
/// What every endpoint must find reserved: the x86 MSI doorbells.
pub const MSI_START: u64 = 0xfee0_0000;
pub const MSI_END: u64 = 0xfeef_ffff;
/// The last IOVA the probe uses: the strict policy's and the fault checks'
/// lie below 2^48.
const IOVA_END: u64 = (1 << 48) - 1;
/// veil's rule for virtio-mmio endpoint IDs, used without a VIOT.
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_ENDPOINT_BASE: u32 = 0x1_0000;

struct State {
    driver: Driver,
    /// Endpoints in DOMAIN now.
    attached: Vec<u32>,
    /// Endpoints PROBEd already.
    probed: Vec<u32>,
    pool_mapped: bool,
    /// Every check so far passed (PROBE answers, attaches, the pool map).
    ok: bool,
}

struct Global {
    busy: AtomicBool,
    state: UnsafeCell<Option<State>>,
}

// SAFETY: `state` is only touched by the one caller that set `busy`.
unsafe impl Sync for Global {}

static IOMMU: Global = Global {
    busy: AtomicBool::new(false),
    state: UnsafeCell::new(None),
};

fn with_slot<R>(f: impl FnOnce(&mut Option<State>) -> R) -> R {
    if IOMMU.busy.swap(true, Ordering::Acquire) {
        panic!("virtio-iommu used from inside itself");
    }
    // SAFETY: `busy` makes this the only reference.
    let r = f(unsafe { &mut *IOMMU.state.get() });
    IOMMU.busy.store(false, Ordering::Release);
    r
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    with_slot(|s| s.as_mut().map(f))
}

/// Sets up the vIOMMU found at `addr` on `bus` and checks the VIOT names
/// it. Prints `PROBE iommu ...`; false if it cannot be used.
pub fn install(transport: Probed, bus: &Bus, addr: u64, viot: Option<&Viot>) -> bool {
    let viot_state = match viot {
        None => "none",
        Some(v) if v.error.is_some() => v.error.unwrap_or(""),
        Some(v) => match (v.iommu, bus) {
            (Some(ViotIommu::Pci { segment: 0, bdf }), Bus::Pci) if u64::from(bdf) == addr => "ok",
            (Some(ViotIommu::Mmio { base }), Bus::Mmio) if base == addr => "ok",
            _ => "names_another_device",
        },
    };
    let line = Line::new("iommu")
        .text("transport", bus.name().as_bytes())
        .hex("addr", addr)
        .text("viot", viot_state.as_bytes());
    let driver = match Driver::new(transport) {
        Ok(d) => d,
        Err(e) => {
            line.word("result=fail").text("reason", e.as_bytes()).emit();
            return false;
        }
    };
    let c: Config = driver.config;
    line.hex("features", driver.features)
        .hex("page_size_mask", c.page_size_mask)
        .hex("input_end", c.input_end)
        .dec(
            "domains",
            u64::from(c.domain_end) + 1 - u64::from(c.domain_start.min(c.domain_end)),
        )
        .dec("probe_size", u64::from(c.probe_size))
        .dec("bypass", u64::from(c.bypass))
        .emit();
    let ok = viot_state == "ok" || viot_state == "none";
    let fits = (c.domain_start..=c.domain_end).contains(&DOMAIN)
        && c.page_size_mask & 0x1fff == 0x1000
        && c.input_start <= hal::pool_range().0
        && c.input_end >= IOVA_END;
    if !fits {
        Line::new("iommu").word("result=fail reason=config_unusable").emit();
    }
    with_slot(|s| {
        *s = Some(State {
            driver,
            attached: Vec::new(),
            probed: Vec::new(),
            pool_mapped: false,
            ok: ok && fits,
        })
    });
    ok && fits
}

pub fn present() -> bool {
    with(|_| ()).is_some()
}

/// Detached endpoints reach all memory (`on`) or nothing; false if the
/// device does not let the driver choose.
pub fn set_bypass(on: bool) -> bool {
    with(|s| s.driver.set_bypass(on)).unwrap_or(false)
}

/// The endpoint ID of the device at `addr` on `bus` (a virtio-mmio base, or
/// a PCI BDF): the VIOT's if it has one, else veil's rule (said once per
/// device on the output), None if the VIOT does not list the device.
pub fn endpoint_of(viot: Option<&Viot>, bus: &Bus, addr: u64) -> Option<u32> {
    if let Some(v) = viot.filter(|v| v.error.is_none()) {
        return match bus {
            Bus::Pci => v.pci_endpoint(addr as u16),
            Bus::Mmio => v.mmio_endpoint(addr),
        };
    }
    let id = match bus {
        Bus::Pci => addr as u32,
        Bus::Mmio => MMIO_ENDPOINT_BASE + (addr.checked_sub(MMIO_BASE)? / 0x1000) as u32,
    };
    Line::new("iommu")
        .word("endpoint_rule=fallback")
        .text("transport", bus.name().as_bytes())
        .hex("addr", addr)
        .hex("endpoint", u64::from(id))
        .emit();
    Some(id)
}

impl State {
    /// PROBE `endpoint` once and check the MSI doorbells are reserved.
    fn probe_once(&mut self, endpoint: u32) {
        if self.probed.contains(&endpoint) || !self.driver.has_probe() {
            return;
        }
        self.probed.push(endpoint);
        let (ok, line) = probe_line(&mut self.driver, endpoint);
        line.emit();
        self.ok &= ok;
    }

    fn attach(&mut self, endpoint: u32) -> bool {
        if self.attached.contains(&endpoint) {
            return true;
        }
        self.probe_once(endpoint);
        let status = self.driver.attach(DOMAIN, endpoint);
        if status != Ok(wire::S_OK) {
            fail_line("attach", endpoint, status);
            self.ok = false;
            return false;
        }
        self.attached.push(endpoint);
        if !self.pool_mapped {
            let (base, len) = hal::pool_range();
            let status = self.driver.map(DOMAIN, base, base, len, MAP_READ | MAP_WRITE);
            if status != Ok(wire::S_OK) {
                fail_line("map_pool", endpoint, status);
                self.ok = false;
                return false;
            }
            self.pool_mapped = true;
        }
        true
    }
}

fn fail_line(what: &str, endpoint: u32, status: Result<u8, &'static str>) {
    let why = match status {
        Ok(s) => wire::status_name(s),
        Err(e) => e,
    };
    Line::new("iommu")
        .text("request", what.as_bytes())
        .hex("endpoint", u64::from(endpoint))
        .word("result=fail")
        .text("status", why.as_bytes())
        .emit();
}

/// `PROBE iommu endpoint=.. probe=ok msi=0x..-0x.. regions=N`, and whether
/// the MSI window is reserved as such.
fn probe_line(d: &mut Driver, endpoint: u32) -> (bool, Line) {
    let mut regions = [wire::ResvMem::default(); 8];
    let line = Line::new("iommu").hex("endpoint", u64::from(endpoint));
    match d.probe(endpoint, &mut regions) {
        Ok((wire::S_OK, n)) => {
            let msi = regions[..n]
                .iter()
                .find(|r| r.subtype == wire::RESV_MSI && r.start == MSI_START && r.end == MSI_END);
            let line = line.word("probe=ok").dec("regions", n as u64);
            match msi {
                Some(r) => (true, line.hex("msi", r.start).hex("msi_end", r.end)),
                None => (false, line.word("msi=missing result=fail")),
            }
        }
        Ok((s, _)) => (false, line.text("probe", wire::status_name(s).as_bytes())),
        Err(e) => (false, line.text("probe", e.as_bytes())),
    }
}

/// Joins `endpoint` to DOMAIN (the pool mapped there); false if that failed
/// or there is no vIOMMU.
pub fn attach_endpoint(endpoint: u32) -> bool {
    with(|s| s.attach(endpoint)).unwrap_or(false)
}

/// Takes `endpoint` out of DOMAIN. The last endpoint out ends the domain
/// (§5.13.6.4), with its mappings; the next attach maps the pool again.
pub fn detach_endpoint(endpoint: u32) -> Result<u8, &'static str> {
    with(|s| {
        let status = s.driver.detach(DOMAIN, endpoint)?;
        if status == wire::S_OK {
            s.attached.retain(|&e| e != endpoint);
            if s.attached.is_empty() {
                s.pool_mapped = false;
            }
        }
        Ok(status)
    })
    .unwrap_or(Err("no_iommu"))
}

/// MAP in DOMAIN; true when the device said OK.
pub fn map(iova: u64, phys: u64, len: u64, flags: u32) -> bool {
    with(|s| s.driver.map(DOMAIN, iova, phys, len, flags) == Ok(wire::S_OK)).unwrap_or(false)
}

/// UNMAP in DOMAIN; true when the device said OK.
pub fn unmap(iova: u64, len: u64) -> bool {
    with(|s| s.driver.unmap(DOMAIN, iova, len) == Ok(wire::S_OK)).unwrap_or(false)
}

/// PROBE `endpoint` (again) and print what it says; true if the MSI window
/// is reserved.
pub fn probe_check(endpoint: u32) -> bool {
    with(|s| {
        let (ok, line) = probe_line(&mut s.driver, endpoint);
        line.emit();
        ok
    })
    .unwrap_or(false)
}

/// The next fault report, waiting at most `ticks` TSC ticks for one.
pub fn wait_fault(ticks: u64) -> Option<Fault> {
    let start = rdtsc();
    loop {
        if let Some(f) = with(|s| s.driver.take_fault()).flatten() {
            return Some(f);
        }
        if rdtsc() - start > ticks {
            return None;
        }
        core::hint::spin_loop();
    }
}

/// Requests sent so far (all zero without a vIOMMU).
pub fn sent() -> Sent {
    with(|s| s.driver.sent).unwrap_or_default()
}

/// `PROBE iommu maps=.. unmaps=.. ...`: what the probe sent over the whole
/// run, to compare with veil's counters. False if any check failed, a
/// fault was reported, or a map of the DMA policy was refused.
pub fn report(expect_faults: bool) -> bool {
    let Some((sent, faults, ok)) = with(|s| {
        s.driver.collect_events();
        (s.driver.sent, s.driver.faults_seen, s.ok)
    }) else {
        return true;
    };
    let failures = hal::counts().map_failures;
    let clean = faults == 0 && failures == 0 && sent.refused == 0;
    let good = ok && (expect_faults || clean);
    Line::new("iommu")
        .dec("maps", sent.maps)
        .dec("unmaps", sent.unmaps)
        .dec("attaches", sent.attaches)
        .dec("detaches", sent.detaches)
        .dec("probes", sent.probes)
        .dec("refused", sent.refused)
        .dec("faults", faults)
        .dec("map_failures", failures)
        .word(if good { "result=ok" } else { "result=fail" })
        .emit();
    good
}
