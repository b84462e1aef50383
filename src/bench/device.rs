//! `veil bench blk` and `veil bench net`: the test guest's device workloads
//! (probe.mode=bench), one veil run per transport, with veil's own counters
//! read at each case's start and end markers.
//!
//! Per case it prints throughput (from the guest's TSC), exits per request
//! and CPU time per request, split into the VMM's threads (main loop and
//! device workers) and the vCPU threads (which include guest time).

use crate::cli::DeviceBenchArgs;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blk,
    Net,
}

/// veil's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub exits: u64,
    pub vmm_cpu_ns: u64,
    pub vcpu_cpu_ns: u64,
    /// The vIOMMU's MAP and UNMAP requests, when there is one.
    pub iommu_maps: u64,
    pub iommu_unmaps: u64,
}

impl Snapshot {
    pub fn from_metrics(json: &Value) -> Snapshot {
        let num = |v: &Value| v.as_u64().unwrap_or(0);
        let iommu = &json["devices"]["iommu0"]["counters"];
        let mut s = Snapshot {
            exits: num(&json["exits_pio"]) + num(&json["exits_mmio"]),
            iommu_maps: num(&iommu["iommu_maps"]),
            iommu_unmaps: num(&iommu["iommu_unmaps"]),
            ..Default::default()
        };
        if let Some(threads) = json["thread_cpu_ns"].as_object() {
            for (name, ns) in threads {
                if name.starts_with("vcpu") {
                    s.vcpu_cpu_ns += num(ns);
                } else {
                    s.vmm_cpu_ns += num(ns);
                }
            }
        }
        s
    }
}

/// One measured case.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseResult {
    pub case: String,
    pub transport: String,
    pub requests: u64,
    pub bytes: u64,
    pub guest_us: u64,
    pub exits: u64,
    pub vmm_cpu_ns: u64,
    pub vcpu_cpu_ns: u64,
    pub iommu_maps: u64,
    pub iommu_unmaps: u64,
}

impl CaseResult {
    pub fn mb_per_s(&self) -> f64 {
        if self.guest_us == 0 {
            0.0
        } else {
            self.bytes as f64 / self.guest_us as f64
        }
    }

    pub fn per_request(&self, v: u64) -> f64 {
        v as f64 / self.requests.max(1) as f64
    }
}

/// `key=value` words of a `PROBE bench ...` line.
pub fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).collect()
}

/// Asks the running veil for its counters and waits for the file.
fn snapshot(pid: u32, metrics: &Path) -> Result<Snapshot, String> {
    let _ = std::fs::remove_file(metrics);
    Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(metrics) {
            let json: Value = serde_json::from_str(&text).map_err(|e| format!("bad metrics: {e}"))?;
            return Ok(Snapshot::from_metrics(&json));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err("veil did not write its metrics on SIGUSR1".into())
}

/// How veil and the guest are set up for a run, beyond the workload.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Flags for `veil run` (DMA mode, vIOMMU).
    pub veil_flags: Vec<String>,
    /// Words for the guest's command line (its DMA policy).
    pub probe_params: String,
}

impl Setup {
    pub fn dma(mode: &str) -> Setup {
        Setup {
            veil_flags: vec!["--dma".into(), mode.into()],
            probe_params: String::new(),
        }
    }
}

pub fn run_transport(
    veil: &Path,
    kind: Kind,
    args: &DeviceBenchArgs,
    transport: &str,
    setup: &Setup,
) -> Result<Vec<CaseResult>, String> {
    let dir = std::env::temp_dir().join(format!("veil-bench-{}-{transport}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let metrics: PathBuf = dir.join("metrics.json");
    let mut cmd = Command::new(veil);
    let cmdline = format!(
        "probe.mode=bench probe.bench={} probe.bench_mib={} probe.qd={} probe.net_frames={} probe.bench_pause_ms=30 {}",
        match kind {
            Kind::Blk => "blk",
            Kind::Net => "net",
        },
        args.mib,
        args.qd,
        args.frames,
        setup.probe_params
    );
    cmd.args([
        "run",
        "--memory",
        "512M",
        "--timeout",
        "600",
        "--cmdline",
        &cmdline,
        "--metrics",
    ])
    .arg(&metrics)
    .args(&setup.veil_flags);
    match kind {
        Kind::Blk => {
            let image = dir.join("disk.img");
            let size = (args.mib.max(1) * 2) << 20;
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(size))
                .map_err(|e| format!("cannot create the disk image: {e}"))?;
            cmd.arg("--disk")
                .arg(format!("path={},transport={transport}", image.display()));
        }
        Kind::Net => {
            cmd.arg("--net").arg(format!("loopback,transport={transport}"));
        }
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start veil: {e}"))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut begin: Option<Snapshot> = None;
    // The end marker itself costs one port write per byte, newline included.
    let mut end_marker_exits = 0;
    let mut end: Option<Snapshot> = None;
    let mut results = Vec::new();
    let mut failure = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(rest) = line.strip_prefix("PROBE bench ") else {
            continue;
        };
        if rest.starts_with("begin ") {
            begin = Some(snapshot(pid, &metrics)?);
        } else if rest.starts_with("end ") {
            end = Some(snapshot(pid, &metrics)?);
            end_marker_exits = line.len() as u64 + 1;
        } else if rest.starts_with("case=") {
            let f = fields(rest);
            match f.get("result") {
                Some(&"ok") => {}
                Some(&"skipped") => continue,
                _ => {
                    failure = Some(format!("guest reported a failed case: {line}"));
                    continue;
                }
            }
            let (Some(b), Some(e)) = (begin.take(), end.take()) else {
                failure = Some(format!("no begin/end markers around: {line}"));
                continue;
            };
            let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            results.push(CaseResult {
                case: f.get("case").unwrap_or(&"?").to_string(),
                transport: transport.to_string(),
                requests: num("requests"),
                bytes: num("bytes"),
                guest_us: num("us"),
                exits: e.exits.saturating_sub(b.exits).saturating_sub(end_marker_exits),
                vmm_cpu_ns: e.vmm_cpu_ns.saturating_sub(b.vmm_cpu_ns),
                vcpu_cpu_ns: e.vcpu_cpu_ns.saturating_sub(b.vcpu_cpu_ns),
                iommu_maps: e.iommu_maps.saturating_sub(b.iommu_maps),
                iommu_unmaps: e.iommu_unmaps.saturating_sub(b.iommu_unmaps),
            });
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(f) = failure {
        return Err(f);
    }
    if !status.success() {
        return Err(format!("veil exited with {status} during the {transport} run"));
    }
    if results.is_empty() {
        return Err(format!("the guest reported no benchmark case on {transport}"));
    }
    Ok(results)
}

pub fn print_table(results: &[CaseResult]) {
    println!("| case | transport | MB/s | k req/s | requests | exits/req | VMM CPU µs/req | vCPU CPU µs/req |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.2} |",
            r.case,
            r.transport,
            r.mb_per_s(),
            r.requests as f64 * 1e3 / r.guest_us.max(1) as f64,
            r.requests,
            r.per_request(r.exits),
            r.per_request(r.vmm_cpu_ns) / 1e3,
            r.per_request(r.vcpu_cpu_ns) / 1e3
        );
    }
}

pub fn run(kind: Kind, args: &DeviceBenchArgs) -> ExitCode {
    let veil = match super::veil_exe() {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut all = Vec::new();
    for transport in &args.transport {
        if transport != "mmio" && transport != "pci" {
            eprintln!("veil: error: invalid --transport {transport}: expected mmio or pci");
            return ExitCode::from(64);
        }
        match run_transport(&veil, kind, args, transport, &Setup::dma(&args.dma)) {
            Ok(mut r) => all.append(&mut r),
            Err(e) => {
                eprintln!("veil: error: {e}");
                return ExitCode::from(70);
            }
        }
    }
    println!(
        "veil bench {kind:?}: DMA {}, qd {}, the built-in test guest\n",
        args.dma, args.qd
    );
    print_table(&all);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines_and_metrics() {
        let f =
            fields("case=blk-randread-4k dev=blk0 transport=pci qd=1 requests=4096 bytes=16777216 us=81920 result=ok");
        assert_eq!(f["requests"], "4096");
        assert_eq!(f["result"], "ok");
        let json: Value = serde_json::from_str(r#"{"exits_pio": 10, "exits_mmio": 5, "thread_cpu_ns": {"veil": 100, "blk0": 50, "vcpu0": 1000, "vcpu1": 7}}"#).unwrap();
        assert_eq!(
            Snapshot::from_metrics(&json),
            Snapshot {
                exits: 15,
                vmm_cpu_ns: 150,
                vcpu_cpu_ns: 1007,
                ..Default::default()
            }
        );
    }

    #[test]
    fn rates() {
        let r = CaseResult {
            case: "x".into(),
            transport: "mmio".into(),
            requests: 100,
            bytes: 4_000_000,
            guest_us: 2_000,
            exits: 50,
            vmm_cpu_ns: 1_000_000,
            vcpu_cpu_ns: 0,
            iommu_maps: 0,
            iommu_unmaps: 0,
        };
        assert_eq!(r.mb_per_s(), 2000.0);
        assert_eq!(r.per_request(r.exits), 0.5);
    }
}
