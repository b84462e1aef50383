//! `veil bench dma`: the same block and net workloads of the test guest in
//! every DMA setup, side by side, and what entering secure mode costs.
//!
//! Setups (veil flags, and the guest's DMA policy `probe.dma`):
//!
//! | setup | veil | guest |
//! | --- | --- | --- |
//! | bypass | `--dma bypass` | buffers given by guest-physical address |
//! | platform-identity | `--dma platform` | every buffer bounced through its DMA pool (swiotlb-style) |
//! | iommu-lazy | `--dma platform --iommu` | the pool mapped once; other buffers bounced through it |
//! | iommu-strict | `--dma platform --iommu` | every buffer mapped before its request, unmapped after |
//! | secure-bounce | `--dma platform` | ESM keeping the pool shared, then bounce |
//! | secure-iommu | `--dma platform --iommu` | ESM keeping the pool shared, then lazy |
//!
//! Ratios are to bypass on the same transport and case, from the same
//! invocation. ESM's cost is read from veil's metrics after the guest's
//! ultracall run (`probe.mode=ultracall`) at each memory size.

use super::device::{run_transport, CaseResult, Kind, Setup};
use crate::cli::{DeviceBenchArgs, DmaBenchArgs};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

const SETUPS: [(&str, &[&str], &str); 6] = [
    ("bypass", &["--dma", "bypass"], "probe.dma=identity"),
    ("platform-identity", &["--dma", "platform"], "probe.dma=bounce"),
    ("iommu-lazy", &["--dma", "platform", "--iommu"], "probe.dma=lazy"),
    ("iommu-strict", &["--dma", "platform", "--iommu"], "probe.dma=strict"),
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

struct Row {
    setup: &'static str,
    result: CaseResult,
}

fn print_rows(rows: &[Row]) {
    println!(
        "| setup | transport | case | MB/s | vs bypass | k IO/s | exits/IO | maps/IO | unmaps/IO | VMM CPU µs/IO |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let r = &row.result;
        let base = rows
            .iter()
            .find(|b| b.setup == "bypass" && b.result.case == r.case && b.result.transport == r.transport)
            .map(|b| b.result.mb_per_s());
        let ratio = match base {
            Some(b) if b > 0.0 => format!("{:.2}", r.mb_per_s() / b),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {:.1} | {ratio} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
            row.setup,
            r.transport,
            r.case,
            r.mb_per_s(),
            r.requests as f64 * 1e3 / r.guest_us.max(1) as f64,
            r.per_request(r.exits),
            r.per_request(r.iommu_maps),
            r.per_request(r.iommu_unmaps),
            r.per_request(r.vmm_cpu_ns) / 1e3,
        );
    }
}

/// ESM and SHARE/UNSHARE as veil measured them during one ultracall run.
fn esm_cost(veil: &Path, memory: &str) -> Result<Value, String> {
    let metrics = std::env::temp_dir().join(format!("veil-bench-esm-{}-{memory}.json", std::process::id()));
    let status = Command::new(veil)
        .args(["run", "--memory", memory, "--timeout", "300", "--serial", "off"])
        .args(["--cmdline", "probe.mode=ultracall", "--metrics"])
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot start veil: {e}"))?;
    let text = std::fs::read_to_string(&metrics).map_err(|e| format!("no metrics from the ESM run: {e}"))?;
    let _ = std::fs::remove_file(&metrics);
    if !status.success() {
        return Err(format!("the ultracall guest failed with {memory} ({status})"));
    }
    let json: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(json["secure"].clone())
}

fn print_esm(veil: &Path, sizes: &[String]) -> Result<(), String> {
    println!("\n| RAM | ESM ms (vCPU thread, VMM work) | pages made private | SHARE ns/page | UNSHARE ns/page |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for size in sizes {
        let s = esm_cost(veil, size)?;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let per_page = |ns: &str, pages: &str| match n(pages) {
            0 => "-".to_string(),
            p => format!("{:.0}", n(ns) as f64 / p as f64),
        };
        println!(
            "| {size} | {:.3} | {} | {} | {} |",
            n("esm_ns") as f64 / 1e6,
            n("private_pages"),
            per_page("share_ns", "share_pages"),
            per_page("unshare_ns", "unshare_pages"),
        );
    }
    Ok(())
}

pub fn run(args: &DmaBenchArgs) -> ExitCode {
    let veil = match super::veil_exe() {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut rows = Vec::new();
    for kind in &args.kind {
        let kind = match kind.as_str() {
            "blk" => Kind::Blk,
            "net" => Kind::Net,
            other => {
                eprintln!("veil: error: invalid --kind {other}: expected blk or net");
                return ExitCode::from(64);
            }
        };
        let device_args = DeviceBenchArgs {
            transport: args.transport.clone(),
            dma: String::new(),
            mib: args.mib,
            qd: args.qd,
            frames: args.frames,
            compare: Default::default(),
        };
        for transport in &args.transport {
            for (name, flags, params) in SETUPS {
                if !args.setup.is_empty() && !args.setup.iter().any(|s| s == name) {
                    continue;
                }
                let setup = Setup {
                    veil_flags: flags.iter().map(|f| f.to_string()).collect(),
                    probe_params: params.to_string(),
                };
                match run_transport(&veil, kind, &device_args, transport, &setup) {
                    Ok(results) => rows.extend(results.into_iter().map(|result| Row { setup: name, result })),
                    Err(e) => {
                        eprintln!("veil: error: {name}: {e}");
                        return ExitCode::from(70);
                    }
                }
            }
        }
    }
    println!(
        "veil bench dma: the built-in test guest, qd {}, {} MiB per block case, {} frames per net case\n",
        args.qd, args.mib, args.frames
    );
    print_rows(&rows);
    let sizes: Vec<String> = args.esm_memory.iter().filter(|s| !s.is_empty()).cloned().collect();
    if !sizes.is_empty() {
        if let Err(e) = print_esm(&veil, &sizes) {
            eprintln!("veil: error: {e}");
            return ExitCode::from(70);
        }
    }
    ExitCode::SUCCESS
}
