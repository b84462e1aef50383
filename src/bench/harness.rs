//! The case list of `veil bench all` / `veil bench secure`, and the loop
//! that runs it: for each run, for each job, for each peer, one VMM
//! process, so that drift on the machine hits every peer alike.
//!
//! A job is one VMM process; the guest may measure several cases in it
//! (the six block cases of `probe.bench=blk`). Counters are read when the
//! guest's `PROBE bench begin|end case=..` marker lines arrive on serial.

use super::peer::{Peer, Qemu, RunFiles, Veil};
use super::report::{self, Measure, Report};
use super::sample::{self, Counters};
use crate::cli::HarnessArgs;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Spawn to the first serial line.
    Boot,
    Blk,
    Net,
    /// The ultracall guest; ESM, SHARE and UNSHARE from veil's metrics.
    Esm,
    /// The test guest's default run (`basic`): it writes every page of RAM.
    Mem,
}

/// How the QEMU peer sets up the device's DMA for a job, or why it cannot.
#[derive(Clone, Debug, PartialEq)]
pub enum QemuDma {
    Bypass,
    /// VIRTIO_F_ACCESS_PLATFORM without an IOMMU.
    Platform,
    /// Behind virtio-iommu-pci.
    Iommu,
    Unsupported(&'static str),
}

#[derive(Clone, Debug)]
pub struct Job {
    /// boot, blk, net, dma or secure.
    pub group: &'static str,
    pub name: String,
    pub workload: Workload,
    /// mmio, pci, or "-".
    pub transport: &'static str,
    /// DMA setup (bypass, platform-identity, iommu-lazy, ...).
    pub setup: &'static str,
    pub veil_flags: Vec<String>,
    /// The guest's DMA policy and other words for its command line.
    pub probe_params: String,
    pub qemu: QemuDma,
    /// Guest RAM.
    pub ram: &'static str,
}

impl Job {
    pub fn memory(&self) -> &str {
        self.ram
    }
}

const NO_ULTRACALLS: &str = "ultracalls (ESM, SHARE, UNSHARE) are veil's own";

/// DMA setups: name, veil flags, guest policy, QEMU equivalent.
const DMA_SETUPS: [(&str, &[&str], &str, QemuDma); 3] = [
    (
        "platform-identity",
        &["--dma", "platform"],
        "probe.dma=bounce",
        QemuDma::Platform,
    ),
    (
        "iommu-lazy",
        &["--dma", "platform", "--iommu"],
        "probe.dma=lazy",
        QemuDma::Iommu,
    ),
    (
        "iommu-strict",
        &["--dma", "platform", "--iommu"],
        "probe.dma=strict",
        QemuDma::Iommu,
    ),
];

const SECURE_SETUPS: [(&str, &[&str], &str); 2] = [
    (
        "secure-bounce",
        &["--dma", "platform"],
        "probe.dma=bounce probe.secure=1",
    ),
    (
        "secure-iommu",
        &["--dma", "platform", "--iommu"],
        "probe.dma=lazy probe.secure=1",
    ),
];

pub const GROUPS: [&str; 6] = ["boot", "mem", "blk", "net", "dma", "secure"];

/// Guest RAM sizes of the mem group.
const MEM_SIZES: [&str; 2] = ["256M", "1G"];

/// Every job of the groups asked for, in run order.
pub fn jobs(groups: &[String], esm_memory: &[String]) -> Vec<Job> {
    let want = |g: &str| groups.iter().any(|x| x == g || x == "all");
    let bypass = || vec!["--dma".to_string(), "bypass".to_string()];
    let mut jobs = Vec::new();
    if want("boot") {
        jobs.push(Job {
            group: "boot",
            name: "boot".into(),
            workload: Workload::Boot,
            transport: "-",
            setup: "-",
            veil_flags: vec![],
            probe_params: String::new(),
            qemu: QemuDma::Bypass,
            ram: "256M",
        });
    }
    if want("mem") {
        for ram in MEM_SIZES {
            jobs.push(Job {
                group: "mem",
                name: format!("mem-{ram}"),
                workload: Workload::Mem,
                transport: "-",
                setup: ram,
                veil_flags: vec![],
                probe_params: String::new(),
                qemu: QemuDma::Bypass,
                ram,
            });
        }
    }
    for (group, workload) in [("blk", Workload::Blk), ("net", Workload::Net)] {
        let baseline = group == "blk" && (want("dma") || want("secure"));
        if !want(group) && !baseline {
            continue;
        }
        for transport in ["mmio", "pci"] {
            // dma and secure compare with blk on pci in bypass: run that
            // one even when only they are asked for.
            if !want(group) && transport == "mmio" {
                continue;
            }
            jobs.push(Job {
                group,
                name: format!("{group}-{transport}"),
                workload,
                transport,
                setup: "bypass",
                veil_flags: bypass(),
                probe_params: "probe.dma=identity".into(),
                qemu: QemuDma::Bypass,
                ram: "512M",
            });
        }
    }
    if want("dma") {
        for (setup, flags, params, qemu) in DMA_SETUPS {
            jobs.push(Job {
                group: "dma",
                name: format!("dma-{setup}-pci"),
                workload: Workload::Blk,
                transport: "pci",
                setup,
                veil_flags: flags.iter().map(|s| s.to_string()).collect(),
                probe_params: params.into(),
                qemu,
                ram: "512M",
            });
        }
    }
    if want("secure") {
        for (setup, flags, params) in SECURE_SETUPS {
            jobs.push(Job {
                group: "secure",
                name: format!("{setup}-pci"),
                workload: Workload::Blk,
                transport: "pci",
                setup,
                veil_flags: flags.iter().map(|s| s.to_string()).collect(),
                probe_params: params.into(),
                qemu: QemuDma::Unsupported(NO_ULTRACALLS),
                ram: "512M",
            });
        }
        for mem in esm_memory {
            let ram: &'static str = match mem.as_str() {
                "256M" => "256M",
                "512M" => "512M",
                "1G" => "1G",
                "2G" => "2G",
                "4G" => "4G",
                _ => continue,
            };
            jobs.push(Job {
                group: "secure",
                name: format!("esm-{ram}"),
                workload: Workload::Esm,
                transport: "-",
                // The guest's RAM, which ESM's cost grows with.
                setup: ram,
                veil_flags: vec![],
                probe_params: String::new(),
                qemu: QemuDma::Unsupported(NO_ULTRACALLS),
                ram,
            });
        }
    }
    jobs
}

/// Workload sizes, the same for every peer.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub mib: u64,
    pub qd: u32,
    pub frames: u64,
}

/// The guest command line of a job, the same for every peer.
pub fn cmdline(job: &Job, sizes: Sizes) -> String {
    let bench = match job.workload {
        Workload::Boot | Workload::Mem => return String::new(),
        Workload::Esm => return "probe.mode=ultracall".into(),
        Workload::Blk => "blk",
        Workload::Net => "net",
    };
    format!(
        "probe.mode=bench probe.bench={bench} probe.bench_mib={} probe.qd={} probe.net_frames={} probe.bench_pause_ms=0 {}",
        sizes.mib, sizes.qd, sizes.frames, job.probe_params
    )
    .trim_end()
    .to_string()
}

/// What one guest `PROBE bench case=..` line says.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestCase {
    pub case: String,
    pub requests: u64,
    pub bytes: u64,
    /// TSC ticks of the case.
    pub cycles: u64,
    /// The same in µs, when the guest could measure its TSC rate.
    pub us: Option<u64>,
}

/// What a serial line means to the harness.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    Begin(String),
    End(String),
    Case(GuestCase),
    Skipped(String),
    /// The guest's TSC rate, when it could measure it (0 otherwise).
    TscHz(u64),
    /// The guest reports a failure: the line itself.
    Failed(String),
    Other,
}

/// Reads one serial line of the test guest.
pub fn parse_line(line: &str) -> Line {
    let line = line.trim_end();
    let Some(rest) = line.strip_prefix("PROBE bench ") else {
        let failed = line.starts_with("PROBE done status=") && line != "PROBE done status=0";
        let verdict_fail = line.starts_with("PROBE ultracall verdict=") && !line.contains("verdict=pass");
        return if failed || verdict_fail || line.starts_with("PROBE fault") || line.starts_with("PROBE panic") {
            Line::Failed(line.to_string())
        } else {
            Line::Other
        };
    };
    let f: HashMap<&str, &str> = rest.split_whitespace().filter_map(|w| w.split_once('=')).collect();
    let case = f.get("case").map(|s| s.to_string());
    if rest.starts_with("error=") {
        return Line::Failed(line.to_string());
    }
    match (rest.split_whitespace().next(), case) {
        (Some("begin"), Some(c)) => Line::Begin(c),
        (Some("end"), Some(c)) => Line::End(c),
        (Some(w), Some(c)) if w.starts_with("case=") => match f.get("result") {
            Some(&"ok") => {
                let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
                match (num("requests"), num("bytes"), num("cycles")) {
                    (Some(requests), Some(bytes), Some(cycles)) if requests > 0 && cycles > 0 => {
                        Line::Case(GuestCase {
                            case: c,
                            requests,
                            bytes,
                            cycles,
                            us: num("us").filter(|&us| us > 0),
                        })
                    }
                    _ => Line::Failed(format!("{line} (no requests, bytes or cycles)")),
                }
            }
            Some(&"skipped") => Line::Skipped(c),
            _ => Line::Failed(line.to_string()),
        },
        (Some(w), None) if w.starts_with("tsc_hz=") => {
            let hz = f.get("tsc_hz").and_then(|v| v.parse().ok()).unwrap_or(0);
            Line::TscHz(if f.get("method") == Some(&"none") { 0 } else { hz })
        }
        _ => Line::Other,
    }
}

fn counters(peer: &dyn Peer, pid: u32, files: &RunFiles, debugfs: bool) -> Counters {
    let (vcpu_ns, vmm_ns) = sample::thread_cpu(pid, &|n| peer.is_vcpu_thread(n));
    let exits = if debugfs {
        sample::kvm_exits(Path::new(sample::KVM_DEBUGFS), pid)
    } else {
        peer.own_exits(pid, files)
    };
    Counters { vcpu_ns, vmm_ns, exits }
}

/// Kills the child when dropped, so no error path leaves a VMM behind.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `job` once on `peer`: its measures, or why it failed.
pub fn run_once(
    peer: &dyn Peer,
    job: &Job,
    sizes: Sizes,
    files: &RunFiles,
    debugfs: bool,
    limit: Duration,
    tsc_hz: &mut Option<u64>,
) -> Result<Vec<Measure>, String> {
    let mut cmd = peer.command(job, &cmdline(job, sizes), files)?;
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().to_string_lossy()))?;
    let mut child = Reaper(child);
    let pid = child.0.id();
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.0.stderr.take().ok_or("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + limit;
    let mut measures = Vec::new();
    let mut begin: Option<(String, Counters)> = None;
    let mut end: Option<(String, Counters, u64)> = None;
    let mut saw_line = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("timed out after {} s", limit.as_secs()));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if job.workload == Workload::Boot && !saw_line {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let c = counters(peer, pid, files, debugfs);
            let rss = sample::rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
            measures.push(Measure::new("first-serial-line", ms, 1, &c, &Counters::default()));
            let none = Counters::default();
            measures.push(Measure::new("rss-at-first-line", rss, 1, &none, &none));
            // The rest of the guest's run is not part of this case.
            return Ok(measures);
        }
        saw_line = true;
        if job.workload == Workload::Mem && line.trim_end() == "PROBE done status=0" {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let c = counters(peer, pid, files, debugfs);
            measures.push(Measure::new("touch-ram", ms, 1, &c, &Counters::default()));
        }
        match parse_line(&line) {
            Line::Begin(c) => begin = Some((c, counters(peer, pid, files, debugfs))),
            // The end marker costs one port write per byte, newline included.
            Line::End(c) => end = Some((c, counters(peer, pid, files, debugfs), line.len() as u64 + 1)),
            Line::Case(g) => {
                let (Some((bc, b)), Some((ec, mut e, marker))) = (begin.take(), end.take()) else {
                    return Err(format!("no begin/end markers around '{line}'"));
                };
                if bc != g.case || ec != g.case {
                    return Err(format!("markers for {bc}/{ec} around the result of {}", g.case));
                }
                e.exits = e.exits.map(|x| x.saturating_sub(marker));
                // Without its own TSC rate (QEMU microvm has no PIT OUT2),
                // the guest's cycles at the rate another run measured: KVM
                // does not scale the TSC, so every guest here counts alike.
                let us = match (g.us, *tsc_hz) {
                    (Some(us), _) => us as f64,
                    (None, Some(hz)) => g.cycles as f64 * 1e6 / hz as f64,
                    (None, None) => {
                        return Err(format!(
                            "the guest could not measure its TSC rate and no other run did: '{line}'"
                        ));
                    }
                };
                let mbps = g.bytes as f64 / us;
                measures.push(Measure::new(&g.case, mbps, g.requests, &e, &b));
            }
            Line::TscHz(hz) if hz > 0 => *tsc_hz = Some(hz),
            Line::TscHz(_) | Line::Skipped(_) | Line::Other => {}
            Line::Failed(l) => return Err(format!("the guest reported '{l}'")),
        }
    }
    let status = child.0.wait().map_err(|e| format!("wait: {e}"))?;
    if job.workload == Workload::Mem && !measures.is_empty() {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let none = Counters::default();
        measures.push(Measure::new("whole-process", ms, 1, &none, &none));
    }
    let err = err_reader.join().unwrap_or_default();
    if !peer.succeeded(status) {
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(format!(
            "exited with {status}{}",
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        ));
    }
    if job.workload == Workload::Esm {
        let text = std::fs::read_to_string(Veil::metrics(files)).map_err(|e| format!("no metrics: {e}"))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("bad metrics: {e}"))?;
        let s = &json["secure"];
        let n = |k: &str| s[k].as_u64();
        let (Some(esm), Some(pages)) = (n("esm_ns"), n("private_pages")) else {
            return Err("veil's metrics hold no ESM figures".into());
        };
        let none = Counters::default();
        measures.push(Measure::new("esm-ms", esm as f64 / 1e6, pages, &none, &none));
        for op in ["share", "unshare"] {
            if let (Some(ns), Some(p)) = (n(&format!("{op}_ns")), n(&format!("{op}_pages"))) {
                if p > 0 {
                    measures.push(Measure::new(
                        &format!("{op}-ns-per-page"),
                        ns as f64 / p as f64,
                        p,
                        &none,
                        &none,
                    ));
                }
            }
        }
    }
    if measures.is_empty() {
        return Err(match job.workload {
            Workload::Boot => "no line on the serial console".into(),
            Workload::Mem => "the guest did not end with PROBE done status=0".into(),
            _ => "the guest reported no result".into(),
        });
    }
    Ok(measures)
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(40404)
}

fn fail(msg: String) -> ExitCode {
    eprintln!("veil: error: {msg}");
    ExitCode::from(70)
}

/// `veil bench all` and `veil bench secure`.
pub fn run(groups: &[String], args: &HarnessArgs) -> ExitCode {
    let veil_exe = match super::veil_exe() {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Some(bad) = groups.iter().find(|g| *g != "all" && !GROUPS.contains(&g.as_str())) {
        eprintln!("veil: error: invalid --only {bad}: expected {}", GROUPS.join(", "));
        return ExitCode::from(64);
    }
    if args.runs == 0 {
        eprintln!("veil: error: --runs must be at least 1");
        return ExitCode::from(64);
    }
    let dir = std::env::temp_dir().join(format!("veil-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let result = run_in(&dir, &veil_exe, groups, args);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(code) => code,
        Err(msg) => fail(msg),
    }
}

fn run_in(dir: &Path, veil_exe: &Path, groups: &[String], args: &HarnessArgs) -> Result<ExitCode, String> {
    let mut peers: Vec<Box<dyn Peer>> = vec![Box::new(Veil {
        exe: veil_exe.to_path_buf(),
    })];
    let mut qemu_version = None;
    match args.peer.as_deref() {
        None => {}
        Some("qemu") => {
            let qemu = Qemu::prepare(&args.qemu, veil_exe, dir).map_err(|e| format!("bench peer qemu: {e}"))?;
            qemu_version = Qemu::version(&args.qemu);
            peers.push(Box::new(qemu));
        }
        Some(other) => {
            eprintln!("veil: error: invalid --peer {other}: expected qemu");
            return Ok(ExitCode::from(64));
        }
    }
    let jobs = jobs(groups, &args.esm_memory);
    let sizes = Sizes {
        mib: args.mib,
        qd: args.qd,
        frames: args.frames,
    };
    let debugfs = sample::ensure_debugfs();
    let total = args.runs as u64
        * jobs
            .iter()
            .map(|j| peers.iter().filter(|p| p.unsupported(j).is_none()).count() as u64)
            .sum::<u64>();
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}") {
        bar.set_style(style);
    }
    let image = dir.join("disk.img");
    let limit = Duration::from_secs(args.case_timeout);
    // (job, peer) -> one Vec<Measure> per run.
    let mut got: HashMap<(usize, &'static str), Vec<Vec<Measure>>> = HashMap::new();
    // The TSC rate the last guest that could measure it reported.
    let mut tsc_hz = None;
    for _run in 0..args.runs {
        for (j, job) in jobs.iter().enumerate() {
            for peer in &peers {
                if peer.unsupported(job).is_some() {
                    continue;
                }
                bar.set_message(format!("{} on {}", job.name, peer.name()));
                if job.workload == Workload::Blk {
                    // A fresh, zeroed image for each run, the same size for each peer.
                    std::fs::File::create(&image)
                        .and_then(|f| f.set_len((args.mib.max(1) * 2) << 20))
                        .map_err(|e| format!("cannot create the disk image: {e}"))?;
                }
                let files = RunFiles {
                    dir,
                    image: (job.workload == Workload::Blk).then_some(image.as_path()),
                    udp_port: free_udp_port(),
                };
                let m = run_once(peer.as_ref(), job, sizes, &files, debugfs, limit, &mut tsc_hz)
                    .map_err(|e| format!("bench {} on {}: {e}", job.name, peer.name()))?;
                got.entry((j, peer.name())).or_default().push(m);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let peer_names: Vec<&'static str> = peers.iter().map(|p| p.name()).collect();
    let unsupported = |j: usize, p: &str| {
        peers
            .iter()
            .find(|x| x.name() == p)
            .and_then(|x| x.unsupported(&jobs[j]))
    };
    let rows = report::rows(&jobs, &peer_names, &got, &unsupported)?;
    let report = Report {
        schema: report::SCHEMA.into(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        runs: args.runs,
        peers: peer_names.iter().map(|s| s.to_string()).collect(),
        sizes: report::SizesJson {
            mib: sizes.mib,
            qd: sizes.qd,
            frames: sizes.frames,
        },
        host: report::Host::here(debugfs, qemu_version),
        rows,
    };
    print!("{}", report::markdown(&report));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(plot) = &args.plot {
        report::plot(&report, plot)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_lines() {
        assert_eq!(
            parse_line("PROBE bench begin case=blk-seqread-64k"),
            Line::Begin("blk-seqread-64k".into())
        );
        assert_eq!(parse_line("PROBE bench end case=net-64\r"), Line::End("net-64".into()));
        assert_eq!(
            parse_line("PROBE bench case=blk-randread-4k dev=blk0 transport=mmio qd=1 requests=4096 bytes=16777216 cycles=1 us=613135 notifies=4096 result=ok"),
            Line::Case(GuestCase {
                case: "blk-randread-4k".into(),
                requests: 4096,
                bytes: 16777216,
                cycles: 1,
                us: Some(613135)
            })
        );
        assert_eq!(
            parse_line("PROBE bench case=blk-seqwrite-1m dev=blk0 transport=pci result=skipped reason=readonly"),
            Line::Skipped("blk-seqwrite-1m".into())
        );
        // Under QEMU microvm: cycles, no us.
        assert_eq!(
            parse_line("PROBE bench case=net-64 dev=net0 transport=mmio requests=5 bytes=320 cycles=99 result=ok"),
            Line::Case(GuestCase {
                case: "net-64".into(),
                requests: 5,
                bytes: 320,
                cycles: 99,
                us: None
            })
        );
        assert_eq!(parse_line("PROBE bench tsc_hz=0 method=none"), Line::TscHz(0));
        // A case without a time cannot give a rate: a failure, not a number.
        assert!(matches!(
            parse_line("PROBE bench case=x requests=5 bytes=9 result=ok"),
            Line::Failed(_)
        ));
        assert!(matches!(
            parse_line("PROBE bench case=x requests=5 bytes=9 us=3 result=ioerr"),
            Line::Failed(_)
        ));
        assert!(matches!(parse_line("PROBE bench error=no_blk_device"), Line::Failed(_)));
        assert!(matches!(parse_line("PROBE done status=1"), Line::Failed(_)));
        assert_eq!(parse_line("PROBE done status=0"), Line::Other);
        assert_eq!(
            parse_line("PROBE bench tsc_hz=2445508732 method=pit"),
            Line::TscHz(2445508732)
        );
    }

    #[test]
    fn case_list() {
        let all = jobs(&["all".into()], &["256M".into()]);
        let names: Vec<&str> = all.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "boot",
                "mem-256M",
                "mem-1G",
                "blk-mmio",
                "blk-pci",
                "net-mmio",
                "net-pci",
                "dma-platform-identity-pci",
                "dma-iommu-lazy-pci",
                "dma-iommu-strict-pci",
                "secure-bounce-pci",
                "secure-iommu-pci",
                "esm-256M"
            ]
        );
        assert!(all
            .iter()
            .filter(|j| j.group == "secure")
            .all(|j| matches!(j.qemu, QemuDma::Unsupported(_))));
        // dma alone still runs its bypass baseline.
        let dma: Vec<String> = jobs(&["dma".into()], &[]).into_iter().map(|j| j.name).collect();
        assert_eq!(dma[0], "blk-pci");
        assert_eq!(dma.len(), 4);
    }

    #[test]
    fn same_cmdline_for_every_peer() {
        let j = &jobs(&["dma".into()], &[])[2];
        let sizes = Sizes {
            mib: 4,
            qd: 2,
            frames: 100,
        };
        assert_eq!(
            cmdline(j, sizes),
            "probe.mode=bench probe.bench=blk probe.bench_mib=4 probe.qd=2 probe.net_frames=100 probe.bench_pause_ms=0 probe.dma=lazy"
        );
    }
}
