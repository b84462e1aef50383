//! Every way a user can get `veil run` wrong ends in one line on stderr and
//! a documented non-zero status — never a panic.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn expect_error(args: &[&str], code: i32, needle: &str) {
    let out = run_veil(args, LIMIT);
    assert_eq!(out.code, Some(code), "veil {args:?}: {}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "one line for {args:?}: {}", out.stderr);
    assert!(out.stderr.starts_with("veil: error: "), "{}", out.stderr);
    assert!(
        out.stderr.contains(needle),
        "veil {args:?}: expected '{needle}' in: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn bad_flag_values() {
    expect_error(&["run", "--cpus", "0"], 64, "--cpus");
    expect_error(&["run", "--cpus", "many"], 64, "many");
    expect_error(&["run", "--memory", "12X"], 64, "invalid size '12X'");
    expect_error(&["run", "--serial", "tty"], 64, "invalid serial output");
    expect_error(&["run", "--timeout", "-1"], 64, "--timeout");
    expect_error(&["run", "--timeout", "0"], 64, "--timeout");
    expect_error(&["run", "--log-level", "loud"], 64, "loud");
    expect_error(&["run", "--cpuid-hide", "warp"], 64, "unknown CPUID feature 'warp'");
    expect_error(&["run", "--bogus"], 64, "--bogus");
    expect_error(&["frobnicate"], 64, "frobnicate");
}

#[test]
fn bad_config_files() {
    let missing = scratch("missing.json");
    expect_error(
        &["run", "--config", missing.to_str().unwrap()],
        64,
        "cannot read config file",
    );
    let typo = scratch("typo.json");
    std::fs::write(&typo, r#"{"memroy": "1G"}"#).unwrap();
    expect_error(&["run", "--config", typo.to_str().unwrap()], 64, "memroy");
    let bad_value = scratch("bad-value.json");
    std::fs::write(&bad_value, r#"{"cpus": 0}"#).unwrap();
    expect_error(&["run", "--config", bad_value.to_str().unwrap()], 64, "--cpus");
}

#[test]
fn missing_and_unrecognised_kernels() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        66,
        "cannot open kernel /nonexistent/vmlinux",
    );
    expect_error(&["run", "--kernel", "/"], 66, "is a directory");
    let text = scratch("not-a-kernel");
    std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
    expect_error(
        &["run", "--kernel", text.to_str().unwrap()],
        65,
        "not a recognised kernel",
    );
    let empty = scratch("empty-kernel");
    std::fs::write(&empty, "").unwrap();
    expect_error(
        &["run", "--kernel", empty.to_str().unwrap()],
        65,
        "not a recognised kernel",
    );
}

#[test]
fn memory_sizes_out_of_range() {
    expect_error(&["run", "--memory", "1M"], 65, "too small");
    expect_error(&["run", "--memory", "64T"], 65, "more than this host");
    expect_error(&["run", "--memory", "1000000000000T"], 64, "too large");
}

#[test]
fn an_initrd_that_does_not_fit() {
    let kernel = write_guest("initrd-host.elf", &SPIN);
    let initrd = scratch("huge-initrd");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(100 << 20).unwrap(); // sparse: 100 MiB into 64 MiB of RAM
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        65,
        "does not fit",
    );
    expect_error(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        66,
        "cannot open initrd",
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn no_dev_kvm() {
    if !is_root() {
        eprintln!("SKIPPED: hiding /dev/kvm needs a private mount namespace, which needs root");
        return;
    }
    let veil = veil_bin();
    let kernel = write_guest("no-kvm.elf", &SPIN);
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {}",
        veil.display(),
        kernel.display()
    );
    let out = run_command(
        std::process::Command::new("unshare").args(["-m", "sh", "-c", &script]),
        LIMIT,
    );
    assert_eq!(out.code, Some(69), "{}", out.stderr);
    assert!(out.stderr.contains("/dev/kvm does not exist"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1);
}

#[test]
fn no_permission_for_dev_kvm() {
    if !is_root() || !kvm_available() {
        eprintln!("SKIPPED: needs root (to drop to an unprivileged user) and /dev/kvm");
        return;
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata("/dev/kvm").unwrap().permissions());
    if mode & 0o006 != 0 {
        eprintln!("SKIPPED: /dev/kvm is world-accessible here ({mode:o})");
        return;
    }
    let kernel = write_guest("no-permission.elf", &SPIN);
    std::fs::set_permissions(
        kernel.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&kernel, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // The build tree may sit where an unprivileged user cannot reach it.
    let veil_copy = scratch("veil-for-nobody");
    std::fs::copy(veil_bin(), &veil_copy).unwrap();
    std::fs::set_permissions(&veil_copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_command(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&veil_copy)
            .args(["run", "--kernel"])
            .arg(&kernel),
        LIMIT,
    );
    assert_eq!(out.code, Some(69), "{}", out.stderr);
    assert!(out.stderr.contains("no permission to open /dev/kvm"), "{}", out.stderr);
}
