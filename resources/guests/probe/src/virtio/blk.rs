//! virtio-blk: the write/verify workload of mode `basic`, and `Engine`,
//! which keeps several requests in flight for it and for the benchmark.
//!
//! The pattern (README.md has it too, for checking an image from the
//! host): sector `s` holds 64 little-endian u64 words; word `i` (0..64) is
//!
//! ```text
//! ((seed ^ (s << 16) ^ i) * 0x9E3779B97F4A7C15) mod 2^64
//! ```
//!
//! with `seed` from `probe.seed=` (default 0x7665696c). It is a bijection
//! of (s, i) for s < 2^48, so a sector written to the wrong place, or a
//! torn one, does not match.

use alloc::vec::Vec;
use core::hint::spin_loop;

use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};

use super::transport::{Probed, F_INDIRECT_DESC};
use super::{annotate, check_features, error_name, init_failed, Buf, Device, Settings, TIMEOUT};
use crate::hal::ProbeHal;
use crate::time::rdtsc;

pub type Blk = VirtIOBlk<ProbeHal, Probed>;

/// Largest request of the write/verify passes: 64 KiB.
const VERIFY_SECTORS: usize = 128;
/// Requests in flight during the write/verify passes.
const VERIFY_DEPTH: usize = 4;
/// Descriptors in virtio-drivers' block queue (its QUEUE_SIZE).
pub const QUEUE_SIZE: usize = 16;
const WORDS: usize = SECTOR_SIZE / 8;
const NO_SLOT: u8 = u8::MAX;

pub fn pattern_word(seed: u64, sector: u64, i: u64) -> u64 {
    (seed ^ (sector << 16) ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fill `buf` (whole sectors) with the pattern of `first` onwards.
pub fn fill(seed: u64, first: u64, buf: &mut [u8]) {
    for (n, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let s = first + n as u64;
        for (i, w) in sector.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pattern_word(seed, s, i as u64).to_le_bytes());
        }
    }
}

/// Whether one sector holds the pattern of sector `s`.
fn sector_matches(seed: u64, s: u64, data: &[u8]) -> bool {
    data.chunks_exact(8)
        .take(WORDS)
        .enumerate()
        .all(|(i, w)| u64::from_le_bytes(w.try_into().unwrap()) == pattern_word(seed, s, i as u64))
}

/// The first sector of `buf` (starting at `first`) without the pattern.
pub fn first_mismatch(seed: u64, first: u64, buf: &[u8]) -> Option<u64> {
    buf.chunks_exact(SECTOR_SIZE)
        .enumerate()
        .find(|(n, d)| !sector_matches(seed, first + *n as u64, d))
        .map(|(n, _)| first + n as u64)
}

/// Why a pass stopped, and at which sector.
pub struct Fail {
    pub reason: &'static str,
    pub sector: u64,
}

fn fail(reason: &'static str, sector: u64) -> Fail {
    Fail { reason, sector }
}

struct Slot {
    req: BlkReq,
    resp: BlkResp,
    buf: Buf,
    sector: u64,
    len: usize,
    write: bool,
}

/// Up to `depth` requests in flight on one device, each with its own
/// buffer of `max_sectors`, through virtio-drivers' non-blocking calls
/// (`read_blocks_nb`/`write_blocks_nb`, `peek_used`, `complete_*`).
pub struct Engine<'a> {
    blk: &'a mut Blk,
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_token: [u8; QUEUE_SIZE],
    pub requests: u64,
    pub bytes: u64,
}

/// How many requests fit in the queue at once: one descriptor each with
/// indirect descriptors, else three (header, data, status).
pub fn max_depth(accepted_features: u64) -> usize {
    if accepted_features & F_INDIRECT_DESC != 0 {
        QUEUE_SIZE
    } else {
        QUEUE_SIZE / 3
    }
}

impl<'a> Engine<'a> {
    pub fn new(blk: &'a mut Blk, depth: usize, max_sectors: usize) -> Engine<'a> {
        let slots: Vec<Slot> = (0..depth.max(1))
            .map(|_| Slot {
                req: BlkReq::default(),
                resp: BlkResp::default(),
                buf: Buf::new(max_sectors * SECTOR_SIZE),
                sector: 0,
                len: 0,
                write: false,
            })
            .collect();
        Engine {
            blk,
            free: (0..slots.len()).rev().collect(),
            slots,
            by_token: [NO_SLOT; QUEUE_SIZE],
            requests: 0,
            bytes: 0,
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn submit(&mut self, i: usize) -> Result<(), Fail> {
        let Engine {
            blk, slots, by_token, ..
        } = self;
        let s = &mut slots[i];
        let len = s.len;
        // SAFETY: the slot's request, buffer and response stay where they
        // are (the Vec never grows) and untouched until `wait_one`
        // completes this token; Drop waits for whatever is still in flight.
        let token = unsafe {
            if s.write {
                blk.write_blocks_nb(s.sector as usize, &mut s.req, &s.buf.as_slice()[..len], &mut s.resp)
            } else {
                blk.read_blocks_nb(
                    s.sector as usize,
                    &mut s.req,
                    &mut s.buf.as_mut_slice()[..len],
                    &mut s.resp,
                )
            }
        }
        .map_err(|e| fail(error_name(&e), s.sector))?;
        match by_token.get_mut(token as usize) {
            Some(t) => *t = i as u8,
            None => return Err(fail("bad_token", s.sector)),
        }
        Ok(())
    }

    /// Wait for the next completion; returns its slot, now free to reuse
    /// (its buffer holds the data read). A failed request is an error.
    fn wait_one(&mut self) -> Result<usize, Fail> {
        let start = rdtsc();
        let token = loop {
            if let Some(t) = self.blk.peek_used() {
                break t;
            }
            if rdtsc() - start > TIMEOUT {
                return Err(fail("timeout", 0));
            }
            spin_loop();
        };
        let Engine {
            blk,
            slots,
            by_token,
            free,
            requests,
            bytes,
        } = self;
        let i = match by_token.get_mut(token as usize) {
            Some(t) if *t != NO_SLOT => core::mem::replace(t, NO_SLOT) as usize,
            _ => return Err(fail("unknown_token", 0)),
        };
        let s = &mut slots[i];
        let len = s.len;
        // SAFETY: the same request, buffer and response that `submit` gave
        // with this token.
        let r = unsafe {
            if s.write {
                blk.complete_write_blocks(token, &s.req, &s.buf.as_slice()[..len], &mut s.resp)
            } else {
                blk.complete_read_blocks(token, &s.req, &mut s.buf.as_mut_slice()[..len], &mut s.resp)
            }
        };
        free.push(i);
        *requests += 1;
        r.map_err(|e| fail(error_name(&e), s.sector))?;
        *bytes += len as u64;
        Ok(i)
    }

    /// Run the requests `next` yields ((first sector, sectors), at most
    /// `max_sectors`), writing or reading, keeping the pipe full. For a
    /// write `data` fills the buffer before it goes; for a read it checks
    /// the data that came (false: mismatch). Returns once all completed.
    pub fn run(
        &mut self,
        write: bool,
        next: &mut dyn FnMut() -> Option<(u64, usize)>,
        data: &mut dyn FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<(), Fail> {
        let mut more = true;
        loop {
            while more && !self.free.is_empty() {
                let Some((sector, sectors)) = next() else {
                    more = false;
                    break;
                };
                let i = self.free.pop().unwrap();
                let s = &mut self.slots[i];
                s.sector = sector;
                s.len = (sectors * SECTOR_SIZE).min(s.buf.as_slice().len());
                s.write = write;
                if write {
                    let len = s.len;
                    data(sector, &mut s.buf.as_mut_slice()[..len]);
                }
                if let Err(e) = self.submit(i) {
                    self.free.push(i);
                    return Err(e);
                }
            }
            if self.in_flight() == 0 {
                return Ok(());
            }
            let i = self.wait_one()?;
            if !write {
                let s = &mut self.slots[i];
                let (sector, len) = (s.sector, s.len);
                if !data(sector, &mut s.buf.as_mut_slice()[..len]) {
                    return Err(fail("mismatch", sector));
                }
            }
        }
    }

    /// Fill every slot's buffer with the pattern (of sectors 0..): data for
    /// writes that then go out as they are.
    pub fn prefill(&mut self, seed: u64) {
        for s in &mut self.slots {
            fill(seed, 0, s.buf.as_mut_slice());
        }
    }

    /// A blocking request with no data in flight beside it.
    pub fn flush(&mut self) -> Result<(), Fail> {
        self.requests += 1;
        self.blk.flush().map_err(|e| fail(error_name(&e), 0))
    }

    /// Write `data` at `sector` and wait (the read-only check).
    pub fn write_blocking(&mut self, sector: u64, data: &[u8]) -> Result<(), virtio_drivers::Error> {
        self.requests += 1;
        self.blk.write_blocks(sector as usize, data)
    }
}

impl Drop for Engine<'_> {
    /// After a failure, requests may still be in flight: wait for them, or,
    /// if the device does not answer, leak their buffers rather than hand
    /// memory the device may still write back to the heap.
    fn drop(&mut self) {
        while self.in_flight() != 0 {
            match self.wait_one() {
                Ok(_) => {}
                Err(e) if e.reason == "timeout" || e.reason == "unknown_token" => {
                    core::mem::forget(core::mem::take(&mut self.slots));
                    return;
                }
                Err(_) => {}
            }
        }
    }
}

/// Sequential (sector, sectors) pieces covering [0, capacity).
fn sequential(capacity: u64, piece: usize) -> impl FnMut() -> Option<(u64, usize)> {
    let mut at = 0u64;
    move || {
        if at >= capacity {
            return None;
        }
        let n = (capacity - at).min(piece as u64) as usize;
        let s = at;
        at += n as u64;
        Some((s, n))
    }
}

/// Mode `basic`: write the pattern to every sector, flush, read it all
/// back and compare. A read-only disk: read it all (counting the sectors
/// that hold the pattern already) and check that a write fails.
pub fn workload(dev: Device, settings: &Settings) -> bool {
    let Device { transport, stats, name } = dev;
    let mut blk = match Blk::new(transport) {
        Ok(b) => b,
        Err(e) => return init_failed(name, &e),
    };
    if !check_features(name, &stats) {
        return false;
    }
    let seed = settings.seed;
    let capacity = blk.capacity();
    let readonly = blk.readonly();
    let depth = VERIFY_DEPTH.min(max_depth(stats.accepted.get()));
    let mut engine = Engine::new(&mut blk, depth, VERIFY_SECTORS);

    let mut matching = 0u64;
    let mut write_refused = false;
    let result = if !readonly {
        engine
            .run(true, &mut sequential(capacity, VERIFY_SECTORS), &mut |s, buf| {
                fill(seed, s, buf);
                true
            })
            .and_then(|_| engine.flush())
            .and_then(|_| {
                engine.run(false, &mut sequential(capacity, VERIFY_SECTORS), &mut |s, buf| {
                    first_mismatch(seed, s, buf).is_none()
                })
            })
    } else {
        let mut first = Buf::new(SECTOR_SIZE);
        engine
            .run(false, &mut sequential(capacity, VERIFY_SECTORS), &mut |s, buf| {
                if s == 0 {
                    first.as_mut_slice().copy_from_slice(&buf[..SECTOR_SIZE]);
                }
                for (n, d) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
                    matching += sector_matches(seed, s + n as u64, d) as u64;
                }
                true
            })
            .and_then(|_| {
                if capacity == 0 {
                    write_refused = true;
                    return Ok(());
                }
                // Write sector 0 with what it holds: a device that wrongly
                // accepts the write changes nothing.
                match engine.write_blocking(0, first.as_slice()) {
                    Ok(()) => Err(fail("ro_write_accepted", 0)),
                    Err(_) => {
                        write_refused = true;
                        Ok(())
                    }
                }
            })
    };
    let (requests, bytes) = (engine.requests, engine.bytes);
    drop(engine);
    // Tear the driver down before reporting: `annotate` tells how it went.
    drop(blk);

    let mut line = name.line();
    if readonly {
        line = line.word("ro=1");
    }
    line = line
        .dec("sectors", capacity)
        .dec("bytes", bytes)
        .dec("requests", requests)
        .dec("notifies", stats.notifies.get());
    if readonly {
        line = line
            .dec("pattern", matching)
            .text("write", if write_refused { b"refused" } else { b"accepted" });
    }
    line = annotate(line, &stats);
    match result {
        Ok(()) => {
            line.word("result=ok").emit();
            true
        }
        Err(f) => {
            line.word("result=fail")
                .text("reason", f.reason.as_bytes())
                .dec("sector", f.sector)
                .emit();
            false
        }
    }
}
