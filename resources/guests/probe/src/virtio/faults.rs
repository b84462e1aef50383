//! `probe.mode=iommu_fault`: what the vIOMMU must stop, on the first block
//! device, which must sit behind it (`--dma platform --iommu`).
//!
//! `probe.iommu_fault=all|probe|unmapped|readonly|detach` (default all, in
//! that order; detach ends the device, so it comes last):
//!
//! * `probe`: PROBE the disk's endpoint; the x86 MSI doorbells must be a
//!   reserved MSI region.
//! * `unmapped`: a write whose data buffer the device is given at an IOVA
//!   nothing is mapped at: status IOERR, a MAPPING fault naming the
//!   endpoint, a read access and that IOVA, and the sectors keep their data.
//! * `readonly`: a read into a buffer mapped read-only: IOERR, a MAPPING
//!   fault with a write access in the buffer's IOVA range, and the buffer
//!   keeps what it held.
//! * `detach`: four reads complete, then the endpoint is DETACHed and a
//!   fifth read is sent into a marked buffer: it must not complete with
//!   data (no answer within a bounded wait, or an error), the buffer keeps
//!   its marks, and a DOMAIN fault names the endpoint. Then the device is
//!   reset behind its driver and the endpoint attached again.
//!
//! One line per check, `PROBE IOMMU-CHECK <name> ok|fail ...`, then the
//! run's vIOMMU totals (`PROBE iommu maps=..`).

use alloc::boxed::Box;
use core::hint::spin_loop;

use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE};
use virtio_drivers::Error;

use super::blk::{fill, first_mismatch, Blk};
use super::iommu::{self, wire, Fault};
use super::transport::Stats;
use super::{error_name, Buf, Device, DEFAULT_SEED, TIMEOUT};
use crate::acpi;
use crate::bootinfo::{param, BootInfo};
use crate::hal;
use crate::serial::Line;
use crate::time::rdtsc;

/// An IOVA the probe never maps (below the 2^48 input range's end, far
/// from the pool's and the strict policy's).
const UNMAPPED_IOVA: u64 = 0xdead_beef_0000;
/// Bytes per check request: one page.
const LEN: usize = 4096;
const SECTORS: u64 = (LEN / SECTOR_SIZE) as u64;
/// Reads before the DETACH.
const BEFORE_DETACH: u64 = 4;
/// How long a fault report, or a request the device must not answer, is
/// waited for (~1–2 s).
const WAIT: u64 = 4_000_000_000;
/// virtio DEVICE_NEEDS_RESET.
const NEEDS_RESET: u32 = 0x40;

const CHECKS: [&str; 4] = ["probe", "unmapped", "readonly", "detach"];

fn check(name: &str) -> Line {
    Line::new("IOMMU-CHECK").word(name)
}

fn fail(name: &str, why: &str) -> bool {
    check(name).word("fail").text("reason", why.as_bytes()).emit();
    false
}

pub fn run(info: &BootInfo) -> bool {
    let acpi = acpi::parse(info);
    let Some((devs, found_ok)) = super::devices(info, &acpi) else {
        return fail("setup", "no_devices");
    };
    if !iommu::present() || !hal::chosen().translates() {
        return fail("setup", "no_iommu_or_identity_policy");
    }
    let Some(dev) = devs.into_iter().find(|d| d.name.kind == "blk") else {
        return fail("setup", "no_blk");
    };
    let Device { transport, stats, .. } = dev;
    let mut blk = match Blk::new(transport) {
        Ok(b) => b,
        Err(e) => return fail("setup", error_name(&e)),
    };
    let Some(ep) = stats.endpoint.get().filter(|_| stats.translated.get()) else {
        return fail("setup", "blk_not_translated");
    };
    let which = param(info.cmdline, "probe.iommu_fault").unwrap_or(b"all");
    if which != b"all" && !CHECKS.iter().any(|c| c.as_bytes() == which) {
        return fail("setup", "unknown_probe.iommu_fault");
    }
    let want = |c: &str| which == b"all" || which == c.as_bytes();
    // Known data where the checks read and write.
    let mut ok = found_ok && prepare(&mut blk);
    if want("probe") {
        ok &= check_probe(ep);
    }
    if want("unmapped") {
        ok &= check_unmapped(&mut blk, ep);
    }
    if want("readonly") {
        ok &= check_readonly(&mut blk, ep);
    }
    if want("detach") {
        ok &= check_detach(blk, &stats, ep);
    }
    ok & iommu::report(true)
}

/// Writes the block pattern to the sectors the checks use.
fn prepare(blk: &mut Blk) -> bool {
    let mut buf = Buf::new(LEN);
    for n in 0..=BEFORE_DETACH {
        fill(DEFAULT_SEED, n * SECTORS, buf.as_mut_slice());
        match bounded(blk, true, n * SECTORS, &mut buf, TIMEOUT) {
            Some(Ok(())) => {}
            Some(Err(e)) => return fail("setup", error_name(&e)),
            None => return fail("setup", "timeout"),
        }
    }
    true
}

/// The request and response of one block request, kept apart from the
/// stack so that a request the device never answers can be leaked whole.
#[derive(Default)]
struct Pending {
    req: BlkReq,
    resp: BlkResp,
}

/// One block request of `buf` at `sector`, waited for at most `ticks`:
/// its result, or None (and `buf` must then never be used or freed again:
/// the device still holds it).
fn bounded(blk: &mut Blk, write: bool, sector: u64, buf: &mut Buf, ticks: u64) -> Option<Result<(), Error>> {
    let mut p = Box::new(Pending::default());
    // SAFETY: `p` and `buf` stay put until the token is completed below, or
    // are never touched again (leaked) if it is not.
    let token = unsafe {
        if write {
            blk.write_blocks_nb(sector as usize, &mut p.req, buf.as_slice(), &mut p.resp)
        } else {
            blk.read_blocks_nb(sector as usize, &mut p.req, buf.as_mut_slice(), &mut p.resp)
        }
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let start = rdtsc();
    while blk.peek_used() != Some(token) {
        if rdtsc() - start > ticks {
            Box::leak(p);
            return None;
        }
        spin_loop();
    }
    // SAFETY: the same request, buffer and response as above.
    Some(unsafe {
        if write {
            blk.complete_write_blocks(token, &p.req, buf.as_slice(), &mut p.resp)
        } else {
            blk.complete_read_blocks(token, &p.req, buf.as_mut_slice(), &mut p.resp)
        }
    })
}

/// Fault reports left over from before a check.
fn drain_faults() {
    while iommu::wait_fault(0).is_some() {}
}

/// The first report for `ep` with `reason` (and, if given, an access in
/// `access` and an address in `range`) within the wait; others are skipped.
fn expect_fault(ep: u32, reason: u8, access: u32, range: Option<(u64, u64)>) -> Result<Fault, &'static str> {
    let start = rdtsc();
    let mut other = false;
    loop {
        let left = WAIT.saturating_sub(rdtsc() - start);
        let Some(f) = iommu::wait_fault(left) else {
            return Err(if other { "other_fault_only" } else { "no_fault" });
        };
        let address_ok = range.is_none_or(|(a, b)| f.flags & wire::FAULT_ADDRESS != 0 && (a..b).contains(&f.address));
        let access_ok = access == 0 || f.flags & access != 0;
        if f.endpoint == ep && f.reason == reason && address_ok && access_ok {
            return Ok(f);
        }
        other = true;
    }
}

fn access_name(flags: u32) -> &'static str {
    match flags & (wire::FAULT_READ | wire::FAULT_WRITE) {
        0 => "none",
        wire::FAULT_READ => "read",
        wire::FAULT_WRITE => "write",
        _ => "rw",
    }
}

fn fault_tags(line: Line, f: &Fault) -> Line {
    line.hex("endpoint", u64::from(f.endpoint))
        .text("fault", wire::reason_name(f.reason).as_bytes())
        .text("access", access_name(f.flags).as_bytes())
        .hex("iova", f.address)
}

fn check_probe(ep: u32) -> bool {
    if iommu::probe_check(ep) {
        check("probe").word("ok").hex("endpoint", u64::from(ep)).emit();
        true
    } else {
        fail("probe", "msi_region_not_reported")
    }
}

fn check_unmapped(blk: &mut Blk, ep: u32) -> bool {
    drain_faults();
    let mut buf = Buf::new(LEN);
    buf.as_mut_slice().fill(0xa5);
    hal::pin(buf.addr(), UNMAPPED_IOVA);
    let r = bounded(blk, true, 0, &mut buf, TIMEOUT);
    hal::unpin();
    match r {
        Some(Err(Error::IoError)) => {}
        Some(Ok(())) => return fail("unmapped", "write_succeeded"),
        Some(Err(e)) => return fail("unmapped", error_name(&e)),
        None => {
            core::mem::forget(buf);
            return fail("unmapped", "no_answer");
        }
    }
    let f = match expect_fault(
        ep,
        wire::REASON_MAPPING,
        wire::FAULT_READ,
        Some((UNMAPPED_IOVA, UNMAPPED_IOVA + LEN as u64)),
    ) {
        Ok(f) => f,
        Err(why) => return fail("unmapped", why),
    };
    // The disk must still hold what `prepare` wrote.
    match bounded(blk, false, 0, &mut buf, TIMEOUT) {
        Some(Ok(())) if first_mismatch(DEFAULT_SEED, 0, buf.as_slice()).is_none() => {}
        Some(Ok(())) => return fail("unmapped", "disk_changed"),
        _ => return fail("unmapped", "read_back_failed"),
    }
    fault_tags(check("unmapped").word("ok status=ioerr"), &f).emit();
    true
}

fn check_readonly(blk: &mut Blk, ep: u32) -> bool {
    drain_faults();
    let mut buf = Buf::new(LEN);
    buf.as_mut_slice().fill(0x5a);
    let iova = hal::fresh_iova(1);
    if !iommu::map(iova, buf.addr(), LEN as u64, iommu::MAP_READ) {
        return fail("readonly", "map_refused");
    }
    hal::pin(buf.addr(), iova);
    let r = bounded(blk, false, 0, &mut buf, TIMEOUT);
    hal::unpin();
    let result = match r {
        Some(Err(Error::IoError)) => Ok(()),
        Some(Ok(())) => Err("read_succeeded"),
        Some(Err(e)) => Err(error_name(&e)),
        None => {
            core::mem::forget(buf);
            return fail("readonly", "no_answer");
        }
    };
    let unmapped = iommu::unmap(iova, LEN as u64);
    if let Err(why) = result {
        return fail("readonly", why);
    }
    let f = match expect_fault(
        ep,
        wire::REASON_MAPPING,
        wire::FAULT_WRITE,
        Some((iova, iova + LEN as u64)),
    ) {
        Ok(f) => f,
        Err(why) => return fail("readonly", why),
    };
    if buf.as_slice().iter().any(|&b| b != 0x5a) {
        return fail("readonly", "buffer_written");
    }
    if !unmapped {
        return fail("readonly", "unmap_refused");
    }
    fault_tags(check("readonly").word("ok status=ioerr"), &f).emit();
    true
}

fn check_detach(mut blk: Blk, stats: &Stats, ep: u32) -> bool {
    let mut buf = Buf::new(LEN);
    for n in 0..BEFORE_DETACH {
        match bounded(&mut blk, false, n * SECTORS, &mut buf, TIMEOUT) {
            Some(Ok(())) => {}
            _ => return fail("detach", "read_before_detach_failed"),
        }
    }
    drain_faults();
    match iommu::detach_endpoint(ep) {
        Ok(wire::S_OK) => {}
        Ok(s) => return fail("detach", wire::status_name(s)),
        Err(e) => return fail("detach", e),
    }
    let failures = hal::counts().map_failures;
    buf.as_mut_slice().fill(0xc3);
    let answer = bounded(&mut blk, false, BEFORE_DETACH * SECTORS, &mut buf, WAIT);
    let fault = expect_fault(ep, wire::REASON_DOMAIN, 0, None);
    let marks_kept = buf.as_slice().iter().all(|&b| b == 0xc3);
    let status = stats.status_reg.get().map(|r| r.read());
    // Nothing the device holds may be used again: stop it, then let the
    // endpoint back in (which maps the pool again if its domain ended).
    if let Some(r) = stats.status_reg.get() {
        r.reset();
    }
    if answer.is_none() {
        core::mem::forget(buf);
    }
    let reattached = iommu::attach_endpoint(ep);
    drop(blk);
    let got = match answer {
        None => "no_answer",
        Some(Ok(())) => "completed",
        Some(Err(e)) => error_name(&e),
    };
    let why = match (answer, fault) {
        (Some(Ok(())), _) => Some("read_completed_after_detach"),
        (_, Err(why)) => Some(why),
        _ if !marks_kept => Some("buffer_written"),
        _ if !reattached => Some("reattach_failed"),
        _ => None,
    };
    let mut line = check("detach")
        .word(if why.is_none() { "ok" } else { "fail" })
        .text("answer", got.as_bytes());
    if let Some(why) = why {
        line = line.text("reason", why.as_bytes());
    }
    if let Ok(f) = &fault {
        line = fault_tags(line, f);
    }
    if let Some(s) = status {
        line = line.dec("needs_reset", u64::from(s & NEEDS_RESET != 0));
    }
    line.dec("map_failures", hal::counts().map_failures - failures).emit();
    why.is_none()
}
