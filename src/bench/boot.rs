//! `veil bench boot`: how fast veil starts a guest and how much memory it
//! needs beside guest RAM. Each run is a fresh `veil run` process, timed
//! from outside, so process start-up is included.

use crate::cli::BootBenchArgs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// One boot, as seen from the parent.
struct BootSample {
    /// Spawn to veil's first KVM_RUN of the boot CPU.
    to_entry: Duration,
    /// Spawn to the first complete serial line (or to the marker).
    to_line: Duration,
    rss_overhead_kib: u64,
    exits: u64,
}

fn boot_once(veil: &Path, args: &[String], marker: Option<&str>, metrics: &Path) -> Result<BootSample, String> {
    let spawned_ns = crate::vmm::unix_ns();
    let spawned = Instant::now();
    let mut child = Command::new(veil)
        .arg("run")
        .args(args)
        .arg("--metrics")
        .arg(metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", veil.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut to_line = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let hit = marker.is_none_or(|m| line.contains(m));
        if to_line.is_none() && hit {
            to_line = Some(spawned.elapsed());
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for veil: {e}"))?;
    if !status.success() {
        return Err(format!("veil run {} exited with {status}", args.join(" ")));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(metrics).map_err(|e| format!("no metrics: {e}"))?)
            .map_err(|e| format!("bad metrics: {e}"))?;
    let field = |k: &str| report.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let entry_ns = field("first_entry_unix_ns").saturating_sub(spawned_ns);
    Ok(BootSample {
        to_entry: Duration::from_nanos(entry_ns),
        to_line: to_line.ok_or_else(|| format!("no {} on the serial console", marker.unwrap_or("line")))?,
        rss_overhead_kib: field("rss_overhead_kib"),
        exits: field("exits_pio") + field("exits_mmio"),
    })
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    Stats {
        median,
        min: v.first().copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

fn row(name: &str, unit: &str, values: Vec<f64>) {
    let s = stats(values);
    println!(
        "| {name} | {:.2} {unit} | {:.2} – {:.2} {unit} |",
        s.median, s.min, s.max
    );
}

fn series(veil: &Path, runs: u32, args: &[String], marker: Option<&str>) -> Result<Vec<BootSample>, String> {
    let metrics: PathBuf = std::env::temp_dir().join(format!("veil-bench-{}.json", std::process::id()));
    let samples = (0..runs).map(|_| boot_once(veil, args, marker, &metrics)).collect();
    let _ = std::fs::remove_file(&metrics);
    samples
}

pub fn boot(what: &BootBenchArgs) -> ExitCode {
    let BootBenchArgs {
        runs,
        kernel,
        initrd,
        cmdline,
        linux_flags,
        marker,
        linux_runs,
        ..
    } = what.clone();
    let veil = match super::veil_exe() {
        Ok(p) => p,
        Err(code) => return code,
    };
    let probe_args: Vec<String> = ["--memory", "256M", "--serial", "stdout", "--timeout", "60"]
        .map(String::from)
        .to_vec();
    println!("veil bench boot: built-in test guest, 256 MiB, 1 vCPU, {runs} runs\n");
    println!("| figure | median | min – max |\n| --- | --- | --- |");
    match series(&veil, runs, &probe_args, None) {
        Ok(s) => {
            row(
                "spawn → first guest entry (KVM_RUN)",
                "ms",
                s.iter().map(|x| x.to_entry.as_secs_f64() * 1e3).collect(),
            );
            row(
                "spawn → first serial line",
                "ms",
                s.iter().map(|x| x.to_line.as_secs_f64() * 1e3).collect(),
            );
            row(
                "RSS beyond guest RAM",
                "MiB",
                s.iter().map(|x| x.rss_overhead_kib as f64 / 1024.0).collect(),
            );
            row("exits per boot", "", s.iter().map(|x| x.exits as f64).collect());
        }
        Err(e) => {
            eprintln!("veil: error: {e}");
            return ExitCode::from(70);
        }
    }
    if let Some(kernel) = kernel {
        let mut args = vec![
            "--kernel".to_string(),
            kernel.display().to_string(),
            "--memory".into(),
            "256M".into(),
            "--timeout".into(),
            "300".into(),
        ];
        if let Some(i) = initrd {
            args.extend(["--initrd".to_string(), i.display().to_string()]);
        }
        if let Some(c) = cmdline {
            args.extend(["--cmdline".to_string(), c]);
        }
        args.extend(linux_flags.unwrap_or_default().split_whitespace().map(String::from));
        println!("\nLinux guest {}, {linux_runs} runs\n", kernel.display());
        println!("| figure | median | min – max |\n| --- | --- | --- |");
        match series(&veil, linux_runs, &args, Some(&marker)) {
            Ok(s) => {
                row(
                    &format!("spawn → '{marker}'"),
                    "s",
                    s.iter().map(|x| x.to_line.as_secs_f64()).collect(),
                );
                row(
                    "RSS beyond guest RAM",
                    "MiB",
                    s.iter().map(|x| x.rss_overhead_kib as f64 / 1024.0).collect(),
                );
                row("exits per boot", "", s.iter().map(|x| x.exits as f64).collect());
            }
            Err(e) => {
                eprintln!("veil: error: {e}");
                return ExitCode::from(70);
            }
        }
    }
    ExitCode::SUCCESS
}
