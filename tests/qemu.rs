//! The same probe ELF that veil embeds boots under QEMU through its PVH note
//! (resources/qemu/run-probe.sh) and passes its basic mode with a virtio-blk
//! disk and a virtio-net NIC on an echoing UDP socket: on `-M microvm`
//! (virtio-mmio) and on `-M q35` (virtio-pci, BARs from SeaBIOS, ECAM from
//! the MCFG).
//!
//! CI installs QEMU (.ci/run); there a missing qemu-system-x86_64 is a
//! failure, elsewhere the tests skip and say why.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn qemu_available() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have qemu-system-x86_64 (qemu-system-x86, installed by .ci/run)"
        );
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
    }
    found
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/qemu/run-probe.sh")
}

/// Runs the probe under QEMU with `transport`'s machine; returns the output
/// after checking that the probe ended with status 0.
fn run_probe(transport: &str, port: u16, probe_args: &str) -> Output {
    let elf = scratch(&format!("qemu-{transport}-probe.elf"));
    let out = run_veil(&["probe-elf", elf.to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "veil probe-elf: {}", out.stderr);
    let disk = scratch(&format!("qemu-{transport}-disk.img"));
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let out = run_command(
        Command::new("bash")
            .arg(script())
            .arg(transport)
            .arg(probe_args)
            .env("PROBE_ELF", &elf)
            .env("DISK", &disk)
            .env("NET_PORT", port.to_string()),
        Duration::from_secs(240),
    );
    assert_eq!(
        out.code,
        Some(0),
        "the probe under QEMU ({transport}) failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("PROBE done status=0"), "{}", out.stdout);
    out
}

fn check_devices(out: &Output, transport: &str) {
    let s = &out.stdout;
    assert!(s.contains("PROBE boot protocol=pvh "), "{s}");
    let acpi = s
        .lines()
        .find(|l| l.starts_with("PROBE acpi rsdp="))
        .expect("acpi line");
    assert!(acpi.trim_end().ends_with(" ok"), "{acpi}");
    for dev in ["blk0", "net0"] {
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("PROBE virtio dev={dev} ")))
            .unwrap_or_else(|| panic!("no {dev} line:\n{s}"));
        assert!(line.contains(&format!("transport={transport}")), "{line}");
        assert!(line.ends_with("result=ok"), "{line}");
    }
}

#[test]
fn the_probe_passes_basic_under_qemu_microvm_with_virtio_mmio() {
    if !kvm_available() || !qemu_available() {
        return;
    }
    let port = 41000 + (std::process::id() % 1000) as u16;
    let out = run_probe("mmio", port, "probe.mode=basic");
    check_devices(&out, "mmio");
}

#[test]
fn the_probe_passes_basic_under_qemu_q35_with_virtio_pci() {
    if !kvm_available() || !qemu_available() {
        return;
    }
    let port = 43000 + (std::process::id() % 1000) as u16;
    let out = run_probe("pci", port, "probe.mode=basic");
    check_devices(&out, "pci");
}

#[test]
fn ultracalls_are_reported_unsupported_under_qemu() {
    if !kvm_available() || !qemu_available() {
        return;
    }
    let elf = scratch("qemu-uc-probe.elf");
    let out = run_veil(&["probe-elf", elf.to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(0));
    let out = run_command(
        Command::new("bash")
            .arg(script())
            .arg("mmio")
            .arg("probe.mode=ultracall")
            .env("PROBE_ELF", &elf)
            .env("NET_PORT", (45000 + std::process::id() % 1000).to_string()),
        Duration::from_secs(120),
    );
    assert!(
        out.stdout.contains("PROBE ultracall unsupported port=0xf5"),
        "{}",
        out.stdout
    );
    assert_eq!(out.code, Some(1), "{}", out.stdout);
}
