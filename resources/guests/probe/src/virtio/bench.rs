//! Mode `bench`: block and net throughput, for `veil bench blk|net`.
//!
//! Settings (command line): `probe.bench=blk|net|all` (default all: every
//! kind present), `probe.qd=<n>` block requests in flight (default 1, at
//! most what the queue holds), `probe.bench_mib=<n>` bytes per block case
//! (default 16 MiB; sequential cases are bounded by the disk size),
//! `probe.net_frames=<n>` frames per net case (default 8192),
//! `probe.bench_case=<name>` runs only that case (the others report
//! `result=skipped reason=not_selected`), so a host tool can attribute all
//! of a run's device work to one request size.
//!
//! Output, per case:
//!
//! ```text
//! PROBE bench begin case=<name>
//! PROBE bench end case=<name>
//! PROBE bench case=<name> dev=<dev> transport=<t> qd=<n> requests=<n> bytes=<n> cycles=<n> [us=<n>] notifies=<n> result=ok|fail|skipped [reason=..]
//! ```
//!
//! `cycles` are TSC ticks between the markers (read at CPL3); `us` is
//! them over the TSC rate measured against the PIT, printed first as
//! `PROBE bench tsc_hz=<n> method=pit` (or `tsc_hz=0 method=none`). The
//! host may time the `begin`/`end` lines itself instead.

use alloc::vec::Vec;

use super::blk::{max_depth, Blk, Engine};
use super::net::{Rig, TX_SLOTS};
use super::{init_failed, iommu, Device, DmaMark, Name, Settings};
use crate::bootinfo::param;
use crate::hal::{self, DmaPolicy};
use crate::serial::Line;
use crate::time::{rdtsc, tsc_hz};
use core::sync::atomic::{AtomicU64, Ordering};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

struct Case {
    name: &'static str,
    write: bool,
    random: bool,
    /// Request size in sectors.
    sectors: usize,
}

const fn case(name: &'static str, write: bool, random: bool, sectors: usize) -> Case {
    Case {
        name,
        write,
        random,
        sectors,
    }
}

/// Sequential 1 MiB first: it also fills the start of a sparse image.
const BLK_CASES: [Case; 6] = [
    case("blk-seqwrite-1m", true, false, 2048),
    case("blk-seqread-1m", false, false, 2048),
    case("blk-seqwrite-64k", true, false, 128),
    case("blk-seqread-64k", false, false, 128),
    case("blk-randwrite-4k", true, true, 8),
    case("blk-randread-4k", false, true, 8),
];

/// What one case measured.
struct Outcome {
    qd: usize,
    requests: u64,
    bytes: u64,
    cycles: u64,
    notifies: u64,
    /// vIOMMU requests and bounces during the case.
    dma: super::DmaMark,
    result: Result<(), &'static str>,
}

/// TSC cycles to wait after each marker (`probe.bench_pause_ms`), so a host
/// that snapshots veil's counters on seeing a marker does so while the
/// guest is idle. Not part of any case's time.
static PAUSE_CYCLES: AtomicU64 = AtomicU64::new(0);

fn marker(what: &str, case: &str) {
    Line::new("bench").word(what).text("case", case.as_bytes()).emit();
    let until = rdtsc() + PAUSE_CYCLES.load(Ordering::Relaxed);
    while rdtsc() < until {
        core::hint::spin_loop();
    }
}

fn report(case: &str, name: Name, hz: u64, o: Outcome) -> bool {
    let mut line = name
        .tag(Line::new("bench").text("case", case.as_bytes()))
        .dec("qd", o.qd as u64)
        .dec("requests", o.requests)
        .dec("bytes", o.bytes)
        .dec("cycles", o.cycles);
    if hz != 0 {
        line = line.dec("us", (o.cycles as u128 * 1_000_000 / hz as u128) as u64);
    }
    line = line.dec("notifies", o.notifies);
    if iommu::present() {
        line = o.dma.tag(line);
    } else if hal::chosen() == DmaPolicy::Bounce {
        line = o.dma.tag_bounces(line);
    }
    match o.result {
        Ok(()) => {
            line.word("result=ok").emit();
            true
        }
        Err(r) => {
            line.word("result=fail").text("reason", r.as_bytes()).emit();
            false
        }
    }
}

fn skipped(case: &str, name: Name, why: &str) {
    name.tag(Line::new("bench").text("case", case.as_bytes()))
        .word("result=skipped")
        .text("reason", why.as_bytes())
        .emit();
}

/// xorshift64: the random sectors.
/// Whether `probe.bench_case` (absent: every case) names this case.
fn selected(settings: &Settings, case: &str) -> bool {
    param(settings.cmdline, "probe.bench_case").is_none_or(|want| want == case.as_bytes())
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn bench_blk(dev: Device, settings: &Settings, hz: u64) -> bool {
    let Device { transport, stats, name } = dev;
    let mut blk = match Blk::new(transport) {
        Ok(b) => b,
        Err(e) => return init_failed(name, &e),
    };
    if !super::check_features(name, &stats) {
        return false;
    }
    let capacity = blk.capacity();
    let readonly = blk.readonly();
    let budget = settings.num("probe.bench_mib", 16).max(1) * MIB;
    let qd = (settings.num("probe.qd", 1) as usize).clamp(1, max_depth(stats.accepted.get()));
    let mut ok = true;
    for case in &BLK_CASES {
        let piece = case.sectors as u64;
        if !selected(settings, case.name) {
            skipped(case.name, name, "not_selected");
            continue;
        }
        if case.write && readonly {
            skipped(case.name, name, "readonly");
            continue;
        }
        if capacity < piece {
            skipped(case.name, name, "disk_too_small");
            continue;
        }
        let requests = if case.random {
            budget / (piece * SECTOR)
        } else {
            (budget.min(capacity * SECTOR) / (piece * SECTOR)).max(1)
        };
        // One case's buffers take at most half the room there is for them.
        let depth = qd.min((super::buffer_room() / 2 / (piece * SECTOR)).max(1) as usize);
        let mut engine = Engine::new(&mut blk, depth, case.sectors);
        engine.prefill(settings.seed);

        let slots = capacity / piece;
        let mut issued = 0u64;
        let mut rng = settings.seed | 1;
        let random = case.random;
        let mut next = || {
            if issued == requests {
                return None;
            }
            let at = if random {
                xorshift(&mut rng) % slots
            } else {
                issued % slots
            };
            issued += 1;
            Some((at * piece, case.sectors))
        };
        let notifies = stats.notifies.get();
        let dma = DmaMark::now();
        marker("begin", case.name);
        let start = rdtsc();
        let result = engine.run(case.write, &mut next, &mut |_, _| true);
        let cycles = rdtsc() - start;
        marker("end", case.name);
        let outcome = Outcome {
            qd: depth,
            requests: engine.requests,
            bytes: engine.bytes,
            cycles,
            notifies: stats.notifies.get() - notifies,
            dma,
            result: result.map_err(|f| f.reason),
        };
        drop(engine);
        ok &= report(case.name, name, hz, outcome);
    }
    ok
}

fn bench_net(dev: Device, settings: &Settings, hz: u64) -> bool {
    let Device { transport, stats, name } = dev;
    let mut rig = match Rig::new(transport) {
        Ok(r) => r,
        Err(e) => return init_failed(name, &e),
    };
    if !super::check_features(name, &stats) {
        return false;
    }
    let frames = settings.num("probe.net_frames", 8192).clamp(1, u32::MAX as u64) as u32;
    let mut ok = true;
    for (case, len) in [("net-64", 64usize), ("net-1500", 1500)] {
        if !selected(settings, case) {
            skipped(case, name, "not_selected");
            continue;
        }
        let notifies = stats.notifies.get();
        let dma = DmaMark::now();
        marker("begin", case);
        let start = rdtsc();
        let result = rig.echo(frames, &|_| len);
        let cycles = rdtsc() - start;
        marker("end", case);
        let (requests, bytes) = match &result {
            Ok(m) => (m.frames, m.bytes),
            Err(_) => (0, 0),
        };
        let outcome = Outcome {
            qd: TX_SLOTS,
            requests,
            bytes,
            cycles,
            notifies: stats.notifies.get() - notifies,
            dma,
            result: result.map(|_| ()),
        };
        ok &= report(case, name, hz, outcome);
    }
    ok
}

pub fn run(devs: Vec<Device>, settings: &Settings) -> bool {
    let which = param(settings.cmdline, "probe.bench").unwrap_or(b"all");
    let (want_blk, want_net) = match which {
        b"blk" => (true, false),
        b"net" => (false, true),
        b"all" => (true, true),
        _ => {
            Line::new("bench")
                .text("error", b"unknown_bench")
                .text("bench", which)
                .emit();
            return false;
        }
    };
    let hz = tsc_hz().unwrap_or(0);
    PAUSE_CYCLES.store(settings.num("probe.bench_pause_ms", 0) * hz / 1000, Ordering::Relaxed);
    Line::new("bench")
        .dec("tsc_hz", hz)
        .text("method", if hz != 0 { b"pit" } else { b"none" })
        .emit();

    let (mut blk, mut net) = (None, None);
    for d in devs {
        match d.name.kind {
            "blk" if blk.is_none() => blk = Some(d),
            "net" if net.is_none() => net = Some(d),
            _ => {}
        }
    }
    let mut ok = true;
    let mut ran = false;
    if want_blk {
        match blk {
            Some(d) => {
                ok &= bench_blk(d, settings, hz);
                ran = true;
            }
            None if which == b"blk" => {
                Line::new("bench").word("error=no_blk_device").emit();
                ok = false;
            }
            None => {}
        }
    }
    if want_net {
        match net {
            Some(d) => {
                ok &= bench_net(d, settings, hz);
                ran = true;
            }
            None if which == b"net" => {
                Line::new("bench").word("error=no_net_device").emit();
                ok = false;
            }
            None => {}
        }
    }
    if !ran && ok {
        Line::new("bench").word("error=no_device").emit();
        ok = false;
    }
    ok & iommu::report(false)
}
