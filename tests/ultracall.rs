//! Ultracalls (docs/ultracall.md) from the probe in `probe.mode=ultracall`
//! (resources/guests/probe/src/ultracall_checks.rs): every bad call is
//! refused with its status and changes nothing, ESM makes all RAM private
//! but a 16-page window, SHARE and UNSHARE move pages, and QUERY (whose
//! answers come back in RBX, RCX, RDX and RSI) sees each step. Here: the
//! guest's verdict, its exit status, and veil's own account of it.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
/// 128 MiB of RAM.
const RAM_PAGES: u64 = 32768;
const KEPT_PAGES: u64 = 16;

fn run_probe(extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--memory",
        "128M",
        "--cmdline",
        "probe.mode=ultracall",
        "--timeout",
        "90",
    ];
    args.extend_from_slice(extra);
    run_veil(&args, LIMIT)
}

fn ultracall_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("PROBE ultracall ")).collect()
}

#[test]
fn every_ultracall_gets_its_answer_and_veil_counts_them() {
    if !kvm_available() {
        return;
    }
    let metrics = scratch("ultracall-metrics.json");
    let m = metrics.display().to_string();
    let out = run_probe(&["--metrics", &m]);
    let lines = ultracall_lines(&out.stdout);
    let failed: Vec<&&str> = lines.iter().filter(|l| l.contains(" FAIL")).collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}\n{}", out.stderr);
    assert!(
        out.stdout.contains("PROBE ultracall verdict=pass"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // QUERY's registers reached the guest: it saw every page shared.
    assert!(
        out.stdout.contains(&format!(
            "PROBE ultracall query secure=0 private=0 shared={RAM_PAGES} version=1"
        )),
        "{}",
        out.stdout
    );
    for check in [
        "unknown_ffffffff status ok",
        "esm_npages_overflow state ok",
        "bad_port_in16 data ok",
        "esm_again status ok",
        "unshare_wrapping status ok",
        "share_again state ok",
    ] {
        assert!(lines.iter().any(|l| l.ends_with(check)), "no `{check}`: {lines:#?}");
    }

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let s = &json["secure"];
    assert_eq!(s["secure"], true, "{s}");
    assert_eq!(s["shared_pages"], KEPT_PAGES, "{s}");
    assert_eq!(s["private_pages"], RAM_PAGES - KEPT_PAGES, "{s}");
    let refused = serde_json::json!({
        "unknown_function": 3,
        "unaligned": 4,
        "zero_length": 2,
        "out_of_range": 12,
        "not_secure": 2,
        "already_secure": 1,
        "host_error": 0,
    });
    assert_eq!(s["refused"], refused, "{s}");
    let calls = &s["calls"];
    assert_eq!(
        (&calls["unknown"], &calls["esm"], &calls["share"], &calls["unshare"]),
        (&3.into(), &8.into(), &9.into(), &9.into()),
        "{s}"
    );
    assert_eq!(s["bad_port_accesses"], 3, "{s}");

    // Refusals are logged at warn, but only the first 16 of the 27.
    let warned = out
        .stderr
        .lines()
        .filter(|l| l.contains("WARN") && (l.contains("refused:") || l.contains("ultracall port")))
        .count();
    assert_eq!(warned, 16, "{}", out.stderr);
}

#[test]
fn veil_logs_the_transition_at_info() {
    if !kvm_available() {
        return;
    }
    let out = run_probe(&["--log-level", "info"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let transition: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("guest entered secure mode"))
        .collect();
    assert_eq!(transition.len(), 1, "{}", out.stderr);
    let line = transition[0];
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains(&format!(
            "{} pages private, {KEPT_PAGES} shared",
            RAM_PAGES - KEPT_PAGES
        )),
        "{line}"
    );
    assert!(
        line.contains("s after boot") && line.contains("the transition took"),
        "{line}"
    );
}
