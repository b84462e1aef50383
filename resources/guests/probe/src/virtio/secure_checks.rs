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
//!
//! Request headers and status bytes live in a pool page, so the device can
//! always answer (IOERR) even when the data is out of its reach.

use alloc::vec::Vec;
use core::hint::spin_loop;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus};

use super::blk::{fill, first_mismatch, Blk};
use super::net::Net;
use super::{error_name, Buf, Device, TIMEOUT};
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

fn case_bounce(c: &mut Checks, devs: &mut Vec<Device>, seed: u64) {
    let Some(dev) = first_of(devs, "blk") else {
        return c.check("blk_present", false);
    };
    let mut blk = match Blk::new(dev.transport) {
        Ok(b) => b,
        Err(_) => return c.check("blk_init", false),
    };
    let Some(hdr) = pool_hdr() else {
        return c.check("pool_room", false);
    };
    write_verify(c, "before_esm", &mut blk, hdr, seed, 0);
    if !esm(c) {
        return;
    }
    write_verify(c, "after_esm", &mut blk, hdr, seed ^ SECOND, SECTORS as u64);
    // What was written before ESM comes back through bounce pages too.
    let mut back = Buf::new(LEN);
    let r = io(&mut blk, hdr, false, 0, back.as_mut_slice());
    let same = first_mismatch(seed, 0, back.as_slice()).is_none();
    c.check("reread_before", r == "ok" && same);
}

fn case_bypass(c: &mut Checks, devs: &mut Vec<Device>, seed: u64) {
    let Some(dev) = first_of(devs, "blk") else {
        return c.check("blk_present", false);
    };
    let mut blk = match Blk::new(dev.transport) {
        Ok(b) => b,
        Err(_) => return c.check("blk_init", false),
    };
    let Some(hdr) = pool_hdr() else {
        return c.check("pool_room", false);
    };
    write_verify(c, "before_esm", &mut blk, hdr, seed, 0);
    if !esm(c) {
        return;
    }
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
    let rx_token = unsafe { net.receive_begin(rx_buf) };
    c.check("rx_posted", rx_token.is_ok());
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
    // SAFETY: `frame` outlives the transmission, waited for below.
    let sent = unsafe { net.transmit_begin(frame.as_slice()) };
    let mut done = false;
    if let Ok(token) = sent {
        let start = rdtsc();
        while rdtsc() - start < TIMEOUT {
            if net.poll_transmit() == Some(token) {
                // SAFETY: the same buffer as transmit_begin's.
                let _ = unsafe { net.transmit_complete(token, frame.as_slice()) };
                done = true;
                break;
            }
            spin_loop();
        }
    }
    c.check("net_tx_completed", done);
    // Give the loopback time to echo whatever it got.
    let start = rdtsc();
    let mut echoed = false;
    while rdtsc() - start < TIMEOUT / 10 {
        if net.poll_receive().is_some() {
            echoed = true;
            break;
        }
        spin_loop();
    }
    c.check("net_nothing_echoed", !echoed);
    let leaked = rx_buf.windows(5).any(|w| w == b"VEIL-");
    c.check("rx_buffer_clean", !leaked);
    drop(s);
}

/// Mode `secure`: find the devices, run `probe.secure_case`.
pub fn run(info: &BootInfo) -> bool {
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
