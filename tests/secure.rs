//! A secure guest's devices (docs/ultracall.md, docs/dma.md): the built-in
//! test guest's `probe.mode=secure` enters secure mode keeping only its DMA
//! pool shared and checks what its devices can still reach. Here: the
//! guest's checks, its exit status, and what reached the disk image, the
//! logs and the metrics, on both transports.

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const SEED: u64 = PROBE_SEED;
/// The probe's seed change for I/O after ESM (secure_checks.rs).
const SECOND: u64 = 0x5EC0_0000;
/// `unshare`: the seed change of the last round, and where its requests
/// go (5 of 1 MiB from sector 64; secure_checks.rs).
const THIRD: u64 = 0x0DD0_0000;
const RACE_SECTOR: u64 = 64;
const RACE_SECTORS: u64 = 5 * 2048;
/// The secret `secret` hides in private memory; built from parts, as the
/// probe does, so that this file's own bytes are no accidental match.
fn secret_marker() -> Vec<u8> {
    [&b"VEIL-"[..], b"SECRET-", b"7f3a"].concat()
}

/// Whether sectors `first..first + n` of `data` hold the pattern of `seed`.
fn holds_pattern(data: &[u8], seed: u64, first: u64, n: u64) -> bool {
    (first..first + n).all(|s| sector_holds_pattern(&data[s as usize * 512..(s as usize + 1) * 512], seed, s))
}

struct Run {
    out: Output,
    disk: PathBuf,
    metrics: Value,
    metrics_text: String,
}

/// One `probe.mode=secure` run of `case` on `transport` with a fresh 8 MiB
/// disk (`unshare` writes 5 MiB); the guest must pass every check and exit 0.
fn run_case(case: &str, transport: &str, dma: &str, policy: &str, net: bool) -> Run {
    run_case_with(case, transport, dma, policy, net.then_some("loopback"), None)
}

/// `run_case` with a network backend of choice (`loopback`, `tap=NAME`),
/// run inside `ns` when given.
fn run_case_with(
    case: &str,
    transport: &str,
    dma: &str,
    policy: &str,
    net: Option<&str>,
    ns: Option<&TapNamespace>,
) -> Run {
    let disk = scratch(&format!("secure-{case}-{transport}.img"));
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let metrics = scratch(&format!("secure-{case}-{transport}.json"));
    let disk_arg = format!("path={},transport={transport}", disk.display());
    let net_arg = format!("{},transport={transport}", net.unwrap_or(""));
    let cmdline = format!("probe.mode=secure probe.secure_case={case} probe.dma={policy}");
    let m = metrics.display().to_string();
    let mut args = vec![
        "run",
        "--memory",
        "128M",
        "--timeout",
        "90",
        "--dma",
        dma,
        "--disk",
        &disk_arg,
        "--metrics",
        &m,
        "--cmdline",
        &cmdline,
    ];
    if net.is_some() {
        args.extend_from_slice(&["--net", &net_arg]);
    }
    let out = match ns {
        Some(ns) => run_command(ns.veil().args(&args), LIMIT),
        None => run_veil(&args, LIMIT),
    };
    let checks: Vec<&str> = out.stdout.lines().filter(|l| l.contains("SECURE-CHECK")).collect();
    assert!(
        checks.iter().all(|l| !l.contains(" FAIL")),
        "failed checks: {checks:#?}\n{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("PROBE SECURE-CHECK verdict result=pass failed=0"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let metrics_text = std::fs::read_to_string(&metrics).unwrap();
    let metrics: Value = serde_json::from_str(&metrics_text).unwrap();
    assert_eq!(metrics["secure"]["secure"], true, "{}", metrics["secure"]);
    Run {
        out,
        disk,
        metrics,
        metrics_text,
    }
}

fn counter(m: &Value, dev: &str, name: &str) -> u64 {
    m["devices"][dev]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} for {dev}: {}", m["devices"]))
}

fn private_denied(m: &Value, dev: &str) -> u64 {
    counter(m, dev, "dma_private_denied")
}

/// veil itself stayed up: it logged no panic and no signal.
fn veil_did_not_crash(r: &Run) {
    for bad in ["panicked", "SIGSEGV", "SIGBUS"] {
        assert!(!r.out.stderr.contains(bad), "veil: {bad}\n{}", r.out.stderr);
    }
}

fn bounce(transport: &str) {
    if !kvm_available() {
        return;
    }
    let r = run_case("bounce", transport, "platform", "bounce", false);
    let data = std::fs::read(&r.disk).unwrap();
    assert!(holds_pattern(&data, SEED, 0, 8), "sectors 0..8: the write before ESM");
    assert!(
        holds_pattern(&data, SEED ^ SECOND, 8, 8),
        "sectors 8..16: the write after ESM"
    );
    // Everything went through the shared pool: nothing was refused.
    assert_eq!(private_denied(&r.metrics, "blk0"), 0, "{}", r.metrics["devices"]);
}

fn bypass(transport: &str) {
    if !kvm_available() {
        return;
    }
    let r = run_case("bypass", transport, "bypass", "identity", false);
    let data = std::fs::read(&r.disk).unwrap();
    assert!(holds_pattern(&data, SEED, 0, 8), "sectors 0..8: the write before ESM");
    assert!(
        data[16 * 512..24 * 512].iter().all(|&b| b == 0),
        "the refused write reached the disk"
    );
    assert!(private_denied(&r.metrics, "blk0") >= 2, "{}", r.metrics["devices"]);
    assert!(
        r.out.stderr.contains("access to private page"),
        "veil logs the refusal: {}",
        r.out.stderr
    );
}

fn auto(transport: &str) {
    if !kvm_available() {
        return;
    }
    let r = run_case("auto", transport, "auto", "bounce", false);
    for step in [
        "no_platform_before_esm ok",
        "before_esm ok",
        "esm ok",
        "needs_reset ok",
        "config_interrupt ok",
        "reset ok",
        "platform_after_reset ok",
        "after_reset ok",
        "bounced ok",
        "reread_before ok",
    ] {
        assert!(
            r.out.stdout.contains(&format!("SECURE-CHECK {step}")),
            "{step}:\n{}",
            r.out.stdout
        );
    }
    let data = std::fs::read(&r.disk).unwrap();
    assert!(holds_pattern(&data, SEED, 0, 8), "sectors 0..8: the write before ESM");
    assert!(
        holds_pattern(&data, SEED ^ SECOND, 8, 8),
        "sectors 8..16: the write after renegotiation"
    );
    assert!(
        counter(&r.metrics, "blk0", "needs_reset") >= 1,
        "{}",
        r.metrics["devices"]
    );
    assert!(
        counter(&r.metrics, "blk0", "activations") >= 2,
        "{}",
        r.metrics["devices"]
    );
    // After ESM the probe used only its shared pool (bounce pages).
    assert_eq!(private_denied(&r.metrics, "blk0"), 0, "{}", r.metrics["devices"]);
    veil_did_not_crash(&r);
}

fn unshare(transport: &str) {
    if !kvm_available() {
        return;
    }
    let r = run_case("unshare", transport, "platform", "bounce", false);
    for step in [
        "share ok",
        "direct_before ok",
        "unshare ok",
        "race_completed ok",
        "query ok",
        "share_again ok",
        "direct_after ok",
    ] {
        assert!(
            r.out.stdout.contains(&format!("SECURE-CHECK {step}")),
            "{step}:\n{}",
            r.out.stdout
        );
    }
    let data = std::fs::read(&r.disk).unwrap();
    assert!(
        holds_pattern(&data, SEED ^ THIRD, RACE_SECTOR, RACE_SECTORS),
        "the last round's writes are on the disk"
    );
    // However the race went, veil's refusals match the guest's IOERRs:
    // none refused means every request completed OK.
    let race = r.out.stdout.lines().find(|l| l.contains("race_completed")).unwrap();
    let io_errors: u64 = race
        .split_whitespace()
        .find_map(|w| w.strip_prefix("io_error="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no io_error= in {race}"));
    let denied = private_denied(&r.metrics, "blk0");
    assert!(denied >= io_errors, "{race}\n{}", r.metrics["devices"]);
    assert_eq!(denied == 0, io_errors == 0, "{race}\n{}", r.metrics["devices"]);
    let calls = &r.metrics["secure"]["calls"];
    assert!(calls["unshare"].as_u64().unwrap() >= 1, "{}", r.metrics["secure"]);
    assert!(calls["share"].as_u64().unwrap() >= 2, "{}", r.metrics["secure"]);
    veil_did_not_crash(&r);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn secret(transport: &str) {
    if !kvm_available() {
        return;
    }
    let r = run_case("secret", transport, "bypass", "identity", true);
    let marker = secret_marker();
    let image = std::fs::read(&r.disk).unwrap();
    for (what, bytes) in [
        ("disk image", image.as_slice()),
        ("stdout", r.out.stdout.as_bytes()),
        ("stderr", r.out.stderr.as_bytes()),
        ("metrics", r.metrics_text.as_bytes()),
    ] {
        assert!(!contains(bytes, &marker), "the secret leaked into the {what}");
    }
    assert!(private_denied(&r.metrics, "blk0") > 0, "{}", r.metrics["devices"]);
    assert!(private_denied(&r.metrics, "net0") > 0, "{}", r.metrics["devices"]);
}

/// Captures every frame on `ifname` inside `ns` into `file` until killed
/// (a raw AF_PACKET socket; Python is on every machine veil is tested on).
fn capture(ns: &TapNamespace, ifname: &str, file: &std::path::Path) -> Capture {
    let script = "import socket,sys\n\
s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(3))\n\
s.bind((sys.argv[1],0))\n\
f=open(sys.argv[2],'wb',buffering=0)\n\
f.write(b'READY')\n\
while True:\n    f.write(s.recv(65536))\n";
    use std::os::unix::process::CommandExt;
    // Its own process group: `ip netns exec` leaves python running when it
    // is killed itself, so the group is what `stop_capture` kills.
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", script, ifname])
        .arg(file)
        .process_group(0)
        .spawn()
        .expect("python3 is needed for the TAP capture");
    // Wait until the socket is bound, so that no frame goes uncaptured.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read(file).map_or(true, |b| !b.starts_with(b"READY")) {
        assert!(std::time::Instant::now() < deadline, "the capture did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Capture(child)
}

/// A running capture; dropping it (also when a test fails) kills it.
struct Capture(std::process::Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// The secret case through a TAP device: what the guest sends before ESM
/// (a control frame) shows up in a capture on the host side; the secret,
/// which it tries to send after ESM, does not.
fn secret_over_tap(transport: &str) {
    if !kvm_available() {
        return;
    }
    let Some(ns) = TapNamespace::create(&format!("sec{}", &transport[..1])) else {
        return;
    };
    let file = scratch(&format!("secret-tap-{transport}.cap"));
    let _ = std::fs::remove_file(&file);
    let cap = capture(&ns, "vtap0", &file);
    let r = run_case_with("secret", transport, "bypass", "identity", Some("tap=vtap0"), Some(&ns));
    // Frames still in flight when veil exited reach the socket shortly.
    std::thread::sleep(Duration::from_millis(200));
    drop(cap);
    let captured = std::fs::read(&file).unwrap();
    assert!(
        contains(&captured, b"CTRL-veil-control-frame-before-esm"),
        "the capture saw no control frame ({} bytes)",
        captured.len()
    );
    assert!(!contains(&captured, &secret_marker()), "the secret reached the TAP");
    assert!(private_denied(&r.metrics, "net0") > 0, "{}", r.metrics["devices"]);
}

#[test]
fn a_secret_in_private_memory_never_reaches_a_tap_over_mmio() {
    secret_over_tap("mmio");
}

#[test]
fn a_secret_in_private_memory_never_reaches_a_tap_over_pci() {
    secret_over_tap("pci");
}

#[test]
fn bounce_buffers_carry_io_after_esm_over_mmio() {
    bounce("mmio");
}

#[test]
fn bounce_buffers_carry_io_after_esm_over_pci() {
    bounce("pci");
}

#[test]
fn private_buffers_fail_with_ioerr_in_bypass_over_mmio() {
    bypass("mmio");
}

#[test]
fn private_buffers_fail_with_ioerr_in_bypass_over_pci() {
    bypass("pci");
}

#[test]
fn a_secret_in_private_memory_reaches_no_device_over_mmio() {
    secret("mmio");
}

#[test]
fn a_secret_in_private_memory_reaches_no_device_over_pci() {
    secret("pci");
}

#[test]
fn auto_dma_renegotiates_access_platform_after_esm_over_mmio() {
    auto("mmio");
}

#[test]
fn auto_dma_renegotiates_access_platform_after_esm_over_pci() {
    auto("pci");
}

#[test]
fn unshare_during_io_fails_requests_cleanly_over_mmio() {
    unshare("mmio");
}

#[test]
fn unshare_during_io_fails_requests_cleanly_over_pci() {
    unshare("pci");
}
