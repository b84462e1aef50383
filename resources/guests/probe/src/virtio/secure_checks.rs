//! `probe.mode=secure`, `probe.secure_case=bounce|bypass|secret`: what a
//! secure guest's devices can and cannot reach (docs/ultracall.md). Each
//! case enters secure mode keeping only the DMA pool shared (secure.rs)
//! and prints `PROBE SECURE-CHECK <name> ok|FAIL ...` per check.
//!
//! * `bounce` (probe.dma=bounce): block I/O before and after ESM, the
//!   second through bounce pages; the host then checks the image holds
//!   pattern `seed` in sectors 0..8 and pattern `seed ^ SECOND` in 8..16.
//! * `bypass` (--dma bypass, identity): data buffers on the (now private)
//!   heap: a write and a read must fail with IOERR and the read must not
//!   change the buffer; sectors 16..24 must stay as they were (zero).
//! * `secret`: a secret pattern in private memory; a block write and a net
//!   transmission from it must fail, and nothing may come back on the
//!   loopback. The host greps every output for it.
//! * `auto` (--dma auto, probe.dma=bounce): the disk offers no
//!   ACCESS_PLATFORM before ESM and block I/O works; after ESM veil sets
//!   DEVICE_NEEDS_RESET; the probe resets the device and sets it up from
//!   scratch, now with ACCESS_PLATFORM offered and accepted, and block I/O
//!   works through bounce pages. Host: pattern `seed` in sectors 0..8,
//!   `seed ^ SECOND` in 8..16.
//! * `unshare` (--dma platform, probe.dma=bounce): after ESM the probe
//!   SHAREs a range of the heap and gives it to the disk directly as data
//!   buffers; `RACE` requests are released to the device at once and the
//!   range is UNSHAREd straight after. Each must complete, OK or IOERR;
//!   then the range is SHAREd again and a write/read-back round must
//!   succeed. Host: pattern `seed ^ THIRD` in `RACE_SECTOR` onwards.
//!
//! Request headers and status bytes live in a pool page, so the device can
//! always answer (IOERR) even when the data is out of its reach.

use alloc::vec::Vec;
use core::hint::spin_loop;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus};
use virtio_drivers::transport::InterruptStatus;

use super::blk::{fill, first_mismatch, Blk};
use super::net::Net;
use super::transport::{Stats, F_ACCESS_PLATFORM};
use super::{error_name, Buf, Device, TIMEOUT};
use crate::acpi::Acpi;
use crate::bootinfo::{param, BootInfo};
use crate::hal;
use crate::secure;
use crate::serial::Line;
use crate::time::rdtsc;
use crate::ultracall as uc;

/// Changes the block pattern's seed for the I/O done after ESM.
pub const SECOND: u64 = 0x5EC0_0000;
/// Sectors of one check's I/O (4 KiB).
const SECTORS: usize = 8;
const LEN: usize = SECTORS * 512;
/// Where `bypass` tries its refused write.
const REFUSED_SECTOR: u64 = 16;
/// Fill of a buffer a refused read must leave alone.
const MARK: u8 = 0xA5;
/// Changes the block pattern's seed for `unshare`'s last round.
pub const THIRD: u64 = 0x0DD0_0000;
/// `unshare`: requests in flight when the range is taken back (at most 5:
/// the queue has 16 descriptors, 3 per request without indirect tables),
/// each this long, from this sector on, one after the other.
const RACE: usize = 5;
const RACE_LEN: usize = 1 << 20;
const RACE_SECTOR: u64 = 64;
/// The device status bit veil sets when the driver must reset it.
const DEVICE_NEEDS_RESET: u32 = 0x40;

/// One check's verdict, counted.
struct Checks {
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, pass: bool) {
        self.failed += u32::from(!pass);
        let line = Line::new("SECURE-CHECK").word(name);
        line.word(if pass { "ok" } else { "FAIL" }).emit();
    }

    /// As `check`, saying what the request ended with.
    fn check_got(&mut self, name: &str, pass: bool, got: &str) {
        self.failed += u32::from(!pass);
        Line::new("SECURE-CHECK")
            .word(name)
            .word(if pass { "ok" } else { "FAIL" })
            .text("got", got.as_bytes())
            .emit();
    }
}

/// A block request's header and status in the shared pool.
struct Hdr {
    req: BlkReq,
    resp: BlkResp,
}

fn pool_hdr() -> Option<&'static mut Hdr> {
    let at = hal::pool_alloc(1)? as *mut Hdr;
    // SAFETY: a fresh, page-aligned pool page, ours for the rest of the run.
    unsafe {
        at.write(Hdr {
            req: BlkReq::default(),
            resp: BlkResp::default(),
        });
        Some(&mut *at)
    }
}

/// One request, waited for (bounded): "ok", or the error's name
/// ("io_error" for IOERR, "timeout").
fn io(blk: &mut Blk, hdr: &mut Hdr, write: bool, sector: u64, buf: &mut [u8]) -> &'static str {
    // A stale status from the last request must not pass for this one's.
    hdr.resp = BlkResp::default();
    // SAFETY: header, status and buffer outlive the request, which is
    // completed (or given up on: then they are leaked by the caller's
    // Hdr being 'static and the buffer never freed) before return.
    let token = unsafe {
        if write {
            blk.write_blocks_nb(sector as usize, &mut hdr.req, buf, &mut hdr.resp)
        } else {
            blk.read_blocks_nb(sector as usize, &mut hdr.req, buf, &mut hdr.resp)
        }
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => return error_name(&e),
    };
    let start = rdtsc();
    while blk.peek_used() != Some(token) {
        if rdtsc() - start > TIMEOUT {
            return "timeout";
        }
        spin_loop();
    }
    // SAFETY: the same header, buffer and status as above.
    let r = unsafe {
        if write {
            blk.complete_write_blocks(token, &hdr.req, buf, &mut hdr.resp)
        } else {
            blk.complete_read_blocks(token, &hdr.req, buf, &mut hdr.resp)
        }
    };
    match r {
        Ok(()) if hdr.resp.status() != RespStatus::OK => "status_not_ok",
        Ok(()) => "ok",
        Err(e) => error_name(&e),
    }
}

/// Write the pattern of `seed` at `sector`, read it back, compare.
fn write_verify(c: &mut Checks, name: &str, blk: &mut Blk, hdr: &mut Hdr, seed: u64, sector: u64) {
    let mut buf = Buf::new(LEN);
    fill(seed, sector, buf.as_mut_slice());
    let w = io(blk, hdr, true, sector, buf.as_mut_slice());
    let mut back = Buf::new(LEN);
    let r = io(blk, hdr, false, sector, back.as_mut_slice());
    let same = first_mismatch(seed, sector, back.as_slice()).is_none();
    let pass = w == "ok" && r == "ok" && same;
    c.failed += u32::from(!pass);
    Line::new("SECURE-CHECK")
        .word(name)
        .word(if pass { "ok" } else { "FAIL" })
        .text("write", w.as_bytes())
        .text("read", r.as_bytes())
        .dec("same", same as u64)
        .emit();
}

fn first_of(devs: &mut Vec<Device>, kind: &str) -> Option<Device> {
    let i = devs.iter().position(|d| d.name.kind == kind)?;
    Some(devs.remove(i))
}

fn esm(c: &mut Checks) -> bool {
    let ok = secure::enter();
    c.check("esm", ok);
    ok
}

/// The start of the bounce and bypass cases: the first disk, a verified
/// write at sector 0 while the guest is ordinary, then ESM. None (after
/// recording why) if any of it failed.
fn written_then_secure(c: &mut Checks, devs: &mut Vec<Device>, seed: u64) -> Option<(Blk, &'static mut Hdr)> {
    let Some(dev) = first_of(devs, "blk") else {
        c.check("blk_present", false);
        return None;
    };
    let Ok(mut blk) = Blk::new(dev.transport) else {
        c.check("blk_init", false);
        return None;
    };
    let Some(hdr) = pool_hdr() else {
        c.check("pool_room", false);
        return None;
    };
    write_verify(c, "before_esm", &mut blk, hdr, seed, 0);
    esm(c).then_some((blk, hdr))
}

fn case_bounce(c: &mut Checks, devs: &mut Vec<Device>, seed: u64) {
    let Some((mut blk, hdr)) = written_then_secure(c, devs, seed) else {
        return;
    };
    write_verify(c, "after_esm", &mut blk, hdr, seed ^ SECOND, SECTORS as u64);
    // What was written before ESM comes back through bounce pages too.
    let mut back = Buf::new(LEN);
    let r = io(&mut blk, hdr, false, 0, back.as_mut_slice());
    let same = first_mismatch(seed, 0, back.as_slice()).is_none();
    c.check("reread_before", r == "ok" && same);
}

fn case_bypass(c: &mut Checks, devs: &mut Vec<Device>, seed: u64) {
    let Some((mut blk, hdr)) = written_then_secure(c, devs, seed) else {
        return;
    };
    // The heap is private now: the device may not read this buffer.
    let mut data = Buf::new(LEN);
    fill(seed ^ SECOND, REFUSED_SECTOR, data.as_mut_slice());
    let w = io(&mut blk, hdr, true, REFUSED_SECTOR, data.as_mut_slice());
    c.check_got("write_refused", w == "io_error", w);
    // Nor write it.
    let mut into = Buf::new(LEN);
    into.as_mut_slice().fill(MARK);
    let r = io(&mut blk, hdr, false, 0, into.as_mut_slice());
    c.check_got("read_refused", r == "io_error", r);
    let untouched = into.as_slice().iter().all(|&b| b == MARK);
    c.check("read_buffer_unchanged", untouched);
    // The guest itself still works: QUERY answers, secure.
    let q = uc::query();
    c.check("query", matches!(q, Ok(s) if s.secure));
}

/// The secret, built at run time so that the probe's image does not hold
/// it as one string: "VEIL-" "SECRET-" "7f3a" and a counter, repeated.
fn secret(len: usize) -> Buf {
    let mut b = Buf::new(len);
    let parts: [&[u8]; 3] = [b"VEIL-", b"SECRET-", b"7f3a:"];
    let mut unit = [0u8; 32];
    let mut n = 0;
    for p in parts {
        unit[n..n + p.len()].copy_from_slice(p);
        n += p.len();
    }
    for (i, chunk) in b.as_mut_slice().chunks_mut(n).enumerate() {
        chunk.copy_from_slice(&unit[..chunk.len()]);
        // Keep the marker intact; the separator varies so that no page of
        // zeros or repeats could pass for it.
        if chunk.len() == n {
            chunk[n - 1] = b':' + (i % 4) as u8;
        }
    }
    b
}

/// The control frame's payload (no part of the secret).
const CONTROL: &[u8] = b"CTRL-veil-control-frame-before-esm";

/// Transmits `frame` and waits (bounded) for the device to give it back.
fn send(net: &mut Net, frame: &[u8]) -> bool {
    // SAFETY: `frame` outlives the transmission, waited for below.
    let Ok(token) = (unsafe { net.transmit_begin(frame) }) else {
        return false;
    };
    let start = rdtsc();
    while rdtsc() - start < TIMEOUT {
        if net.poll_transmit() == Some(token) {
            // SAFETY: the same buffer as transmit_begin's.
            let _ = unsafe { net.transmit_complete(token, frame) };
            return true;
        }
        spin_loop();
    }
    false
}

fn case_secret(c: &mut Checks, devs: &mut Vec<Device>) {
    let blk_dev = first_of(devs, "blk");
    let net_dev = first_of(devs, "net");
    if blk_dev.is_none() || net_dev.is_none() {
        return c.check("devices_present", false);
    }
    let mut blk = match Blk::new(blk_dev.unwrap().transport) {
        Ok(b) => b,
        Err(_) => return c.check("blk_init", false),
    };
    let mut net = match Net::new(net_dev.unwrap().transport) {
        Ok(n) => n,
        Err(_) => return c.check("net_init", false),
    };
    let Some(hdr) = pool_hdr() else {
        return c.check("pool_room", false);
    };
    // Receive buffers in the shared pool: anything the loopback sends back
    // would land here.
    let Some(rx) = hal::pool_alloc(1) else {
        return c.check("pool_room", false);
    };
    // SAFETY: a fresh pool page, ours alone.
    let rx_buf = unsafe { core::slice::from_raw_parts_mut(rx as *mut u8, 2048) };
    // SAFETY: rx_buf stays posted (never freed) for the rest of the run.
    let mut rx_token = unsafe { net.receive_begin(rx_buf) };
    c.check("rx_posted", rx_token.is_ok());
    // A control frame while the guest is ordinary: a host-side capture
    // must see it, which shows the capture would have seen the secret.
    let mut control = Buf::new(CONTROL.len() + 14);
    let cf = control.as_mut_slice();
    cf[..6].fill(0xff);
    cf[6..12].copy_from_slice(&net.mac_address());
    cf[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    cf[14..].copy_from_slice(CONTROL);
    c.check("control_sent", send(&mut net, control.as_slice()));
    // The loopback echoes it: take it and post the buffer again, clean.
    let start = rdtsc();
    while rdtsc() - start < TIMEOUT / 10 {
        if let (Some(t), Ok(posted)) = (net.poll_receive(), rx_token.as_ref()) {
            if t == *posted {
                // SAFETY: the buffer receive_begin was given.
                let _ = unsafe { net.receive_complete(t, rx_buf) };
                rx_buf.fill(0);
                // SAFETY: as above.
                rx_token = unsafe { net.receive_begin(rx_buf) };
                break;
            }
        }
        spin_loop();
    }
    if !esm(c) {
        return;
    }
    let mut s = secret(LEN);
    let w = io(&mut blk, hdr, true, 0, s.as_mut_slice());
    c.check_got("blk_write_refused", w == "io_error", w);

    // A frame to ourselves whose header and payload are the secret but for
    // the addresses: the loopback would echo it if the device could read it.
    let mut frame = secret(1514);
    let mac = net.mac_address();
    let f = frame.as_mut_slice();
    f[12..18].copy_from_slice(&mac);
    f[18..24].copy_from_slice(&mac);
    c.check("net_tx_completed", send(&mut net, frame.as_slice()));
    // Give the backend time to bring back whatever it got (the loopback
    // echoes; a TAP's host side may send frames of its own, which is fine
    // as long as none carries the secret).
    let start = rdtsc();
    let mut leaked = false;
    while rdtsc() - start < TIMEOUT / 10 {
        if let (Some(t), Ok(posted)) = (net.poll_receive(), rx_token.as_ref()) {
            if t == *posted {
                // SAFETY: the buffer receive_begin was given.
                let _ = unsafe { net.receive_complete(t, rx_buf) };
                leaked |= rx_buf.windows(5).any(|w| w == b"VEIL-");
                rx_buf.fill(0);
                // SAFETY: as above; it stays posted for the rest of the run.
                rx_token = unsafe { net.receive_begin(rx_buf) };
            }
        }
        spin_loop();
    }
    leaked |= rx_buf.windows(5).any(|w| w == b"VEIL-");
    c.check("nothing_received_carries_the_secret", !leaked);
    drop(s);
}

/// Reads `reg` until `done` holds of it or TIMEOUT passes; the last value.
fn poll_status(reg: super::transport::StatusReg, done: impl Fn(u32) -> bool) -> u32 {
    let start = rdtsc();
    let mut st = reg.read();
    while !done(st) && rdtsc() - start < TIMEOUT {
        spin_loop();
        st = reg.read();
    }
    st
}

fn case_auto(c: &mut Checks, devs: &mut Vec<Device>, seed: u64, info: &BootInfo, acpi: &Acpi) {
    let Some(dev) = first_of(devs, "blk") else {
        return c.check("blk_present", false);
    };
    let name = dev.name;
    let stats = dev.stats.clone();
    let mut blk = match Blk::new(dev.transport) {
        Ok(b) => b,
        Err(_) => return c.check("blk_init", false),
    };
    let Some(hdr) = pool_hdr() else {
        return c.check("pool_room", false);
    };
    // An ordinary guest's `auto` device runs as in bypass: no ACCESS_PLATFORM.
    let offered = stats.offered.get();
    c.failed += u32::from(offered & F_ACCESS_PLATFORM != 0);
    Line::new("SECURE-CHECK")
        .word("no_platform_before_esm")
        .word(if offered & F_ACCESS_PLATFORM == 0 { "ok" } else { "FAIL" })
        .hex("offered", offered)
        .emit();
    write_verify(c, "before_esm", &mut blk, hdr, seed, 0);
    if !esm(c) {
        return;
    }
    let Some(reg) = stats.status_reg.get() else {
        return c.check("status_reg", false);
    };
    // veil marks the device at ESM; polled, as interrupts stay off.
    let st = poll_status(reg, |s| s & DEVICE_NEEDS_RESET != 0);
    // The configuration interrupt's cause: virtio-drivers sets up no MSI-X
    // vectors, so both transports report it in their interrupt status.
    let irq = blk.ack_interrupt();
    let config = irq.contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT);
    let pass = st & DEVICE_NEEDS_RESET != 0;
    c.failed += u32::from(!pass);
    Line::new("SECURE-CHECK")
        .word("needs_reset")
        .word(if pass { "ok" } else { "FAIL" })
        .hex("status", u64::from(st))
        .dec("config_irq", u64::from(config))
        .emit();
    c.check("config_interrupt", config);
    // Reset behind the driver's back, then let it go: its Drop stops the
    // queue and resets again, which a reset device takes in its stride.
    reg.reset();
    let st = poll_status(reg, |s| s == 0);
    c.failed += u32::from(st != 0);
    Line::new("SECURE-CHECK")
        .word("reset")
        .word(if st == 0 { "ok" } else { "FAIL" })
        .hex("status", u64::from(st))
        .emit();
    drop(blk);
    // From scratch: a new transport, a new driver, a new negotiation.
    let Some(dev) = super::rediscover(info, acpi, name) else {
        return c.check("rediscover", false);
    };
    let stats = dev.stats.clone();
    let mut blk = match Blk::new(dev.transport) {
        Ok(b) => b,
        Err(e) => return c.check_got("reinit", false, error_name(&e)),
    };
    let (offered, accepted) = (stats.offered.get(), stats.accepted.get());
    let pass = offered & accepted & F_ACCESS_PLATFORM != 0 && !stats.refused.get();
    c.failed += u32::from(!pass);
    Line::new("SECURE-CHECK")
        .word("platform_after_reset")
        .word(if pass { "ok" } else { "FAIL" })
        .hex("offered", offered)
        .hex("accepted", accepted)
        .emit();
    let before = hal::counts().bounces;
    write_verify(c, "after_reset", &mut blk, hdr, seed ^ SECOND, SECTORS as u64);
    // Data buffers live on the (private) heap: they must have bounced.
    c.check("bounced", hal::counts().bounces > before);
    let mut back = Buf::new(LEN);
    let r = io(&mut blk, hdr, false, 0, back.as_mut_slice());
    let same = first_mismatch(seed, 0, back.as_slice()).is_none();
    c.check("reread_before", r == "ok" && same);
}

/// `RACE` requests on consecutive `RACE_LEN` pieces of `data`, from
/// `RACE_SECTOR` on, writes where `write(i)`, all released to the device
/// by one notification, after which `then` runs. Each request's outcome
/// ("ok", "io_error", ...; "timeout" if it never completed), or why the
/// batch could not be submitted.
fn batch(
    blk: &mut Blk,
    stats: &Stats,
    hdrs: &mut [&'static mut Hdr],
    data: &mut [u8],
    write: impl Fn(usize) -> bool,
    then: impl FnOnce(),
) -> Result<[&'static str; RACE], &'static str> {
    let mut bufs: Vec<&mut [u8]> = data.chunks_mut(RACE_LEN).collect();
    let mut tokens = [0u16; RACE];
    stats.hold_notify();
    for (i, (hdr, buf)) in hdrs.iter_mut().zip(bufs.iter_mut()).enumerate() {
        hdr.resp = BlkResp::default();
        let sector = RACE_SECTOR + (i * RACE_LEN / 512) as u64;
        // SAFETY: header, status and buffer stay put until the request
        // completes below (or, on a timeout, forever: the header is
        // 'static and the caller leaks `data`).
        let t = unsafe {
            if write(i) {
                blk.write_blocks_nb(sector as usize, &mut hdr.req, buf, &mut hdr.resp)
            } else {
                blk.read_blocks_nb(sector as usize, &mut hdr.req, buf, &mut hdr.resp)
            }
        };
        match t {
            Ok(t) => tokens[i] = t,
            Err(e) => {
                // Whatever was queued still goes out, so that it completes.
                stats.release();
                return Err(error_name(&e));
            }
        }
    }
    if !stats.release() {
        return Err("no_doorbell");
    }
    then();
    let mut got = ["timeout"; RACE];
    let mut left = RACE;
    let start = rdtsc();
    while left > 0 && rdtsc() - start < TIMEOUT {
        let Some(token) = blk.peek_used() else {
            spin_loop();
            continue;
        };
        let Some(i) = (0..RACE).find(|&i| tokens[i] == token && got[i] == "timeout") else {
            return Err("unknown_token");
        };
        let hdr = &mut hdrs[i];
        // SAFETY: the same header, buffer and status as at submission.
        let r = unsafe {
            if write(i) {
                blk.complete_write_blocks(token, &hdr.req, bufs[i], &mut hdr.resp)
            } else {
                blk.complete_read_blocks(token, &hdr.req, bufs[i], &mut hdr.resp)
            }
        };
        got[i] = match r {
            Ok(()) => "ok",
            Err(e) => error_name(&e),
        };
        left -= 1;
    }
    Ok(got)
}

/// Writes the pattern of `seed` through the range, reads it back into the
/// zeroed range, compares; one SECURE-CHECK line.
fn race_round(
    c: &mut Checks,
    name: &str,
    blk: &mut Blk,
    stats: &Stats,
    hdrs: &mut [&'static mut Hdr],
    data: &mut [u8],
    seed: u64,
) {
    fill(seed, RACE_SECTOR, data);
    let before = hal::counts().bounces;
    let w = batch(blk, stats, hdrs, data, |_| true, || {});
    data.fill(0);
    let r = batch(blk, stats, hdrs, data, |_| false, || {});
    // The range is given to the device as it is, and the headers live in
    // the pool: nothing may have bounced.
    let bounces = hal::counts().bounces - before;
    let all_ok = |b: &Result<[&str; RACE], &str>| matches!(b, Ok(g) if g.iter().all(|&x| x == "ok"));
    let same = first_mismatch(seed, RACE_SECTOR, data).is_none();
    let pass = all_ok(&w) && all_ok(&r) && same && bounces == 0;
    c.failed += u32::from(!pass);
    Line::new("SECURE-CHECK")
        .word(name)
        .word(if pass { "ok" } else { "FAIL" })
        .text("write", summary(&w).as_bytes())
        .text("read", summary(&r).as_bytes())
        .dec("same", same as u64)
        .dec("bounces", bounces)
        .emit();
}

/// "ok" when every request of a batch was, else the first other outcome.
fn summary(b: &Result<[&'static str; RACE], &'static str>) -> &'static str {
    match b {
        Ok(g) => g.iter().copied().find(|&x| x != "ok").unwrap_or("ok"),
        Err(e) => e,
    }
}

fn case_unshare(c: &mut Checks, devs: &mut Vec<Device>, seed: u64) {
    // Without indirect tables (which virtio-drivers puts on the heap and
    // the policy would bounce), a request's only buffer outside the pool
    // is its data, so "nothing bounced" shows the range was used directly.
    secure::set_direct_only();
    let Some(dev) = first_of(devs, "blk") else {
        return c.check("blk_present", false);
    };
    let stats = dev.stats.clone();
    let mut blk = match Blk::new(dev.transport) {
        Ok(b) => b,
        Err(_) => return c.check("blk_init", false),
    };
    let mut hdrs: Vec<&'static mut Hdr> = Vec::new();
    for _ in 0..RACE {
        let Some(h) = pool_hdr() else {
            return c.check("pool_room", false);
        };
        hdrs.push(h);
    }
    if !esm(c) {
        return;
    }
    // Heap memory: private since ESM until shared here.
    let mut range = Buf::new(RACE * RACE_LEN);
    let (base, pages) = (range.addr(), (RACE * RACE_LEN) as u64 / uc::PAGE_SIZE);
    let s = uc::share(base, pages);
    c.check_got("share", s == uc::OK, status_name(s));
    hal::set_direct_range(base, (RACE * RACE_LEN) as u64);
    race_round(
        c,
        "direct_before",
        &mut blk,
        &stats,
        &mut hdrs,
        range.as_mut_slice(),
        seed ^ SECOND,
    );

    // Even requests write (the device reads the range), odd ones read (it
    // writes the range); the range is taken back as soon as they are out.
    fill(seed ^ SECOND, RACE_SECTOR, range.as_mut_slice());
    let mut unshared = u32::MAX;
    let got = batch(
        &mut blk,
        &stats,
        &mut hdrs,
        range.as_mut_slice(),
        |i| i % 2 == 0,
        || unshared = uc::unshare(base, pages),
    );
    c.check_got("unshare", unshared == uc::OK, status_name(unshared));
    let (mut ok, mut ioerr, mut other) = (0u64, 0u64, 0u64);
    if let Ok(g) = &got {
        for &x in g {
            match x {
                "ok" => ok += 1,
                "io_error" => ioerr += 1,
                _ => other += 1,
            }
        }
    }
    let pass = got.is_ok() && other == 0;
    c.failed += u32::from(!pass);
    Line::new("SECURE-CHECK")
        .word("race_completed")
        .word(if pass { "ok" } else { "FAIL" })
        .dec("requests", RACE as u64)
        .dec("ok", ok)
        .dec("io_error", ioerr)
        .text("other", summary(&got).as_bytes())
        .emit();
    if got.is_err() || other != 0 {
        // A request may still be the device's: leave the range to it.
        core::mem::forget(range);
        return;
    }
    // veil is still there and still answers.
    c.check("query", matches!(uc::query(), Ok(q) if q.secure));
    let s = uc::share(base, pages);
    c.check_got("share_again", s == uc::OK, status_name(s));
    race_round(
        c,
        "direct_after",
        &mut blk,
        &stats,
        &mut hdrs,
        range.as_mut_slice(),
        seed ^ THIRD,
    );
}

fn status_name(s: u32) -> &'static str {
    match s {
        uc::OK => "ok",
        uc::NOT_SECURE => "not_secure",
        uc::OUT_OF_RANGE => "out_of_range",
        uc::UNALIGNED => "unaligned",
        u32::MAX => "not_called",
        _ => "other",
    }
}

/// Mode `secure`: find the devices, run `probe.secure_case`.
pub fn run(info: &BootInfo) -> bool {
    if !crate::ultracall::require() {
        return false;
    }
    let acpi = crate::acpi::parse(info);
    let Some((mut devs, _)) = super::devices(info, &acpi) else {
        return false;
    };
    let seed = super::settings(info).seed;
    let case = param(info.cmdline, "probe.secure_case").unwrap_or(b"");
    let mut c = Checks { failed: 0 };
    // With identity addresses virtio-drivers' indirect tables (heap) would
    // turn private too and the device could not even find the status byte.
    if hal::chosen() == crate::hal::DmaPolicy::Identity {
        secure::set_direct_only();
    }
    match case {
        b"bounce" => case_bounce(&mut c, &mut devs, seed),
        b"bypass" => case_bypass(&mut c, &mut devs, seed),
        b"secret" => case_secret(&mut c, &mut devs),
        b"auto" => case_auto(&mut c, &mut devs, seed, info, &acpi),
        b"unshare" => case_unshare(&mut c, &mut devs, seed),
        _ => {
            Line::new("SECURE-CHECK").text("unknown_case", case).word("FAIL").emit();
            return false;
        }
    }
    Line::new("SECURE-CHECK")
        .word("verdict")
        .text("result", if c.failed == 0 { b"pass" } else { b"fail" })
        .dec("failed", c.failed as u64)
        .emit();
    c.failed == 0
}
