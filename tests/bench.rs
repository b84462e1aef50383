//! The benchmark harness end to end: `veil bench all` on a tiny block
//! workload writes a JSON report of the documented shape, and a case that
//! cannot finish fails the run with one clear error and no figures.

mod common;

use std::time::Duration;
use veil::bench::report::{Report, Status};

#[test]
fn tiny_block_run_writes_its_json() {
    if !common::kvm_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("veil-bench-test-{}.json", std::process::id()));
    let json_arg = json.display().to_string();
    let args = [
        "bench", "all", "--only", "blk", "--runs", "2", "--mib", "1", "--json", &json_arg,
    ];
    let out = common::run_veil(&args, Duration::from_secs(240));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let text = std::fs::read_to_string(&json).expect("the JSON report");
    let _ = std::fs::remove_file(&json);
    let report: Report = serde_json::from_str(&text).expect("JSON of the documented schema");
    assert_eq!(report.schema, "veil-bench/1");
    assert_eq!(report.runs, 2);
    assert_eq!(report.peers, ["veil"]);
    let cases = [
        "blk-seqwrite-1m",
        "blk-seqread-1m",
        "blk-seqwrite-64k",
        "blk-seqread-64k",
        "blk-randwrite-4k",
        "blk-randread-4k",
    ];
    for transport in ["mmio", "pci"] {
        for case in cases {
            let row = report
                .rows
                .iter()
                .find(|r| r.case == case && r.transport == transport)
                .unwrap_or_else(|| panic!("no row for {case} on {transport}"));
            assert_eq!(row.unit, "MB/s");
            let veil = &row.results["veil"];
            assert_eq!(veil.status, Status::Ok);
            let v = veil.value.as_ref().unwrap();
            assert_eq!(v.n, 2);
            assert!(v.min > 0.0 && v.min <= v.median && v.median <= v.max, "{v:?}");
            // 1 MiB per case: 1 request of 1 MiB, 16 of 64 KiB, 256 of 4 KiB.
            let expected = match case.rsplit('-').next().unwrap() {
                "1m" => 1,
                "64k" => 16,
                _ => 256,
            };
            assert_eq!(veil.requests, Some(expected), "{case}");
            assert!(veil.exits_per_request.is_some(), "veil's exits are always counted");
            assert!(veil.vcpu_cpu_us_per_request.as_ref().unwrap().median > 0.0);
            // The table shows the same median.
            assert!(out
                .stdout
                .contains(&format!("| {case} | {transport} | bypass | MB/s |")));
        }
    }
}

#[test]
fn a_case_that_times_out_fails_the_run_without_figures() {
    if !common::kvm_available() {
        return;
    }
    let args = [
        "bench",
        "all",
        "--only",
        "blk",
        "--runs",
        "1",
        "--mib",
        "64",
        "--case-timeout",
        "1",
    ];
    let out = common::run_veil(&args, Duration::from_secs(120));
    assert_eq!(out.code, Some(70), "stdout: {}", out.stdout);
    assert_eq!(
        out.stderr.trim(),
        "veil: error: bench blk-mmio on veil: timed out after 1 s"
    );
    assert!(
        !out.stdout.contains("MB/s"),
        "no figures for a failed run: {}",
        out.stdout
    );
}

#[test]
fn a_missing_peer_fails_the_run_clearly() {
    let args = [
        "bench",
        "all",
        "--only",
        "boot",
        "--runs",
        "1",
        "--peer",
        "qemu",
        "--qemu",
        "/nonexistent/qemu-system-x86_64",
    ];
    let out = common::run_veil(&args, Duration::from_secs(60));
    assert_eq!(out.code, Some(70));
    assert!(
        out.stderr
            .starts_with("veil: error: bench peer qemu: cannot run /nonexistent/qemu-system-x86_64:"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1);
    assert!(out.stdout.is_empty());
}

#[test]
fn usage_errors() {
    let out = common::run_veil(&["bench", "all", "--only", "nosuch"], Duration::from_secs(30));
    assert_eq!(out.code, Some(64));
    assert!(
        out.stderr.starts_with("veil: error: invalid --only nosuch"),
        "{}",
        out.stderr
    );
    let out = common::run_veil(&["bench", "secure", "--peer", "xen"], Duration::from_secs(30));
    assert_eq!(out.code, Some(64));
    assert!(
        out.stderr.starts_with("veil: error: invalid --peer xen"),
        "{}",
        out.stderr
    );
}

/// Like tests/qemu.rs: QEMU is optional on a developer machine, required in CI.
fn qemu_available() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !found {
        assert!(std::env::var_os("CI").is_none(), "CI must have qemu-system-x86_64");
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
    }
    found
}

#[test]
fn qemu_peer_runs_net_and_cannot_run_ultracalls() {
    if !common::kvm_available() || !qemu_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("veil-bench-qemu-{}.json", std::process::id()));
    let json_arg = json.display().to_string();
    let args = [
        "bench", "all", "--peer", "qemu", "--only", "net,boot", "--runs", "1", "--frames", "64", "--json", &json_arg,
    ];
    let out = common::run_veil(&args, Duration::from_secs(240));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let report: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(report.peers, ["veil", "qemu"]);
    for transport in ["mmio", "pci"] {
        let row = report
            .rows
            .iter()
            .find(|r| r.case == "net-1500" && r.transport == transport)
            .unwrap();
        let qemu = &row.results["qemu"];
        assert_eq!(qemu.status, Status::Ok);
        assert_eq!(qemu.requests, Some(64));
        assert!(qemu.value.as_ref().unwrap().median > 0.0);
        let ratio = row.ratio_veil_to_peer.unwrap();
        let veil = row.results["veil"].value.as_ref().unwrap().median;
        assert!((ratio - veil / qemu.value.as_ref().unwrap().median).abs() < 1e-9);
    }
    let boot = report.rows.iter().find(|r| r.case == "first-serial-line").unwrap();
    assert!(boot.results["qemu"].value.as_ref().unwrap().median > 0.0);

    // The secure group: QEMU's column says why it has no figures.
    let out = common::run_veil(
        &[
            "bench",
            "secure",
            "--peer",
            "qemu",
            "--runs",
            "1",
            "--mib",
            "1",
            "--esm-memory",
            "256M",
        ],
        Duration::from_secs(240),
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("| blk-seqread-64k | pci | secure-bounce | MB/s |"));
    assert!(out
        .stdout
        .contains("- qemu n/a for secure-bounce-pci: ultracalls (ESM, SHARE, UNSHARE) are veil's own"));
}

/// `veil bench net --peer qemu` is the harness's net group: both peers, as
/// `veil bench all --only net` would run it.
#[test]
fn a_single_group_command_takes_a_peer_too() {
    if !common::kvm_available() || !qemu_available() {
        return;
    }
    let json = std::env::temp_dir().join(format!("veil-bench-net-peer-{}.json", std::process::id()));
    let json_arg = json.display().to_string();
    let args = ["bench", "net", "--peer", "qemu", "--frames", "32", "--json", &json_arg];
    let out = common::run_veil(&args, Duration::from_secs(300));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let report: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(report.peers, ["veil", "qemu"]);
    assert!(!report.rows.is_empty());
    assert!(report.rows.iter().all(|r| r.group == "net"), "only the net group");
    assert!(report.rows.iter().all(|r| r.results["qemu"].status == Status::Ok));
}
