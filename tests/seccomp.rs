//! veil's seccomp filters through the real binary: a forbidden system call
//! from a device or vCPU thread ends veil with one clear line, `--seccomp
//! off` lets it through, and while a guest runs every thread is filtered.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// The probe's basic run with a disk, so a block worker thread starts.
fn with_disk(name: &str, extra: &[&str]) -> Command {
    let disk = scratch(name);
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let mut cmd = Command::new(veil_bin());
    cmd.args(["run", "--memory", "128M", "--timeout", "40", "--disk"])
        .arg(format!("path={}", disk.display()))
        .args(extra);
    cmd
}

#[test]
fn a_forbidden_call_from_a_device_thread_ends_veil_with_one_line() {
    if !kvm_available() {
        return;
    }
    let out = run_command(
        with_disk("seccomp-device.img", &[]).env("VEIL_SECCOMP_SELFTEST", "device"),
        LIMIT,
    );
    assert_eq!(out.code, Some(71), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains("veil: error:")).collect();
    assert_eq!(lines.len(), 1, "stderr: {}", out.stderr);
    let syscall = libc::SYS_socket.to_string();
    assert!(
        lines[0].contains("seccomp: thread blk0 made forbidden system call")
            && lines[0].ends_with(&format!("call {syscall}; run with --seccomp off to debug")),
        "{}",
        lines[0]
    );
    // The guest had started its block work when the worker died.
    assert!(out.stdout.contains("PROBE virtio"), "stdout: {}", out.stdout);
}

#[test]
fn a_forbidden_call_from_a_vcpu_thread_ends_veil_too() {
    if !kvm_available() {
        return;
    }
    let out = run_command(
        Command::new(veil_bin())
            .args(["run", "--memory", "64M", "--timeout", "30"])
            .env("VEIL_SECCOMP_SELFTEST", "vcpu"),
        LIMIT,
    );
    assert_eq!(out.code, Some(71), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains("veil: error: seccomp: thread vcpu0 made forbidden system call"),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn seccomp_off_lets_the_same_call_through() {
    if !kvm_available() {
        return;
    }
    let out = run_command(
        with_disk("seccomp-off.img", &["--seccomp", "off"]).env("VEIL_SECCOMP_SELFTEST", "device"),
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("PROBE done status=0"), "stdout: {}", out.stdout);
    assert!(!out.stderr.contains("seccomp: thread"), "stderr: {}", out.stderr);
}

#[test]
fn a_bad_seccomp_value_is_a_usage_error() {
    let out = run_veil(&["run", "--seccomp", "maybe"], LIMIT);
    assert_eq!(out.code, Some(64));
    assert!(out.stderr.contains("invalid --seccomp 'maybe'"), "{}", out.stderr);
}

/// `Seccomp:` and `Seccomp_filters:` of each of veil's threads, by name.
fn thread_filters(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((name, field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

#[test]
fn every_thread_runs_filtered_while_the_guest_works() {
    if !kvm_available() {
        return;
    }
    // A block benchmark long enough to look at the threads while it runs.
    let mut child = with_disk(
        "seccomp-threads.img",
        &["--cmdline", "probe.mode=bench probe.bench=blk probe.bench_mib=64"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen = thread_filters(child.id());
        let names: Vec<&str> = seen.iter().map(|(n, _, _)| n.as_str()).collect();
        // Main and vCPU threads filter themselves first thing; wait for the
        // block worker, which the guest's driver starts.
        if names.contains(&"blk0") && seen.iter().all(|(_, mode, _)| *mode == 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let get = |name: &str| seen.iter().find(|(n, _, _)| n == name).cloned();
    for name in ["vcpu0", "blk0"] {
        let (_, mode, _) = get(name).unwrap_or_else(|| panic!("no thread {name} in {seen:?}"));
        assert_eq!(mode, 2, "{name} is not in seccomp filter mode: {seen:?}");
    }
    assert!(seen.iter().all(|(_, mode, _)| *mode == 2), "{seen:?}");
    // The worker runs under the vCPU filter it inherited and its own.
    assert_eq!(get("blk0").unwrap().2, 2, "{seen:?}");
    assert_eq!(get("vcpu0").unwrap().2, 1, "{seen:?}");
}
