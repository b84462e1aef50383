//! The built-in test guest drives every virtio device through the
//! `virtio-drivers` crate — a driver nobody here wrote — on both transports,
//! and the host checks what reached the backends.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn device_line<'a>(stdout: &'a str, dev: &str) -> &'a str {
    let prefix = format!("PROBE virtio dev={dev} ");
    stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line for {dev}:\n{stdout}"))
}

fn every_device_works(transport: &str) {
    if !kvm_available() {
        return;
    }
    let disk = scratch(&format!("virtio-{transport}.img"));
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let metrics = scratch(&format!("virtio-{transport}.json"));
    let args = every_device_args(transport, &disk, &metrics);
    let out = run_veil(&args.iter().map(String::as_str).collect::<Vec<_>>(), LIMIT);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("PROBE virtio count=4"), "{}", out.stdout);
    for dev in ["blk0", "net0", "rng0", "console0"] {
        let line = device_line(&out.stdout, dev);
        assert!(
            line.contains(&format!("transport={transport}")) && line.ends_with("result=ok"),
            "{line}"
        );
    }
    assert!(device_line(&out.stdout, "blk0").contains("sectors=16384"));
    assert!(
        out.stdout.contains(&format!("PROBE-CONSOLE hello from {transport}")),
        "{}",
        out.stdout
    );
    assert_eq!(
        sectors_without_pattern(&std::fs::read(&disk).unwrap()),
        0,
        "the image must hold what the guest wrote"
    );
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    for dev in ["blk0", "net0", "rng0", "console0"] {
        let d = &json["devices"][dev];
        assert_eq!(d["transport"], transport);
        assert!(d["counters"]["requests"].as_u64().unwrap() > 0, "{dev}: {d}");
        assert_eq!(d["counters"]["bad_descriptors"], 0, "{dev}: {d}");
    }
}

#[test]
fn every_device_works_over_mmio() {
    every_device_works("mmio");
}

#[test]
fn every_device_works_over_pci() {
    every_device_works("pci");
}

#[test]
fn a_read_only_disk_refuses_writes_and_keeps_its_data() {
    if !kvm_available() {
        return;
    }
    for transport in ["mmio", "pci"] {
        // Fill an image with the pattern through a writable run first.
        let disk = scratch(&format!("ro-{transport}.img"));
        std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
        let rw = format!("path={},transport={transport}", disk.display());
        assert_eq!(
            run_veil(&["run", "--memory", "64M", "--disk", &rw, "--serial", "off"], LIMIT).code,
            Some(0)
        );
        let before = std::fs::read(&disk).unwrap();
        let ro = format!("{rw},readonly=on");
        let out = run_veil(&["run", "--memory", "64M", "--timeout", "60", "--disk", &ro], LIMIT);
        assert_eq!(out.code, Some(0), "{}", out.stdout);
        let line = device_line(&out.stdout, "blk0");
        assert!(
            line.contains("ro=1") && line.contains("write=refused") && line.contains("pattern=2048"),
            "{line}"
        );
        assert_eq!(std::fs::read(&disk).unwrap(), before);
    }
}

/// SIGKILL right after the guest saw its FLUSH complete: every block it
/// wrote before the flush is in the image.
#[test]
fn no_flushed_block_is_lost_to_sigkill() {
    if !kvm_available() {
        return;
    }
    for transport in ["mmio", "pci"] {
        let disk = scratch(&format!("flush-{transport}.img"));
        std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
        let arg = format!("path={},transport={transport}", disk.display());
        let mut child = Command::new(veil_bin())
            .args(["run", "--memory", "64M", "--timeout", "60", "--disk", &arg])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut seen = false;
        // The probe writes every sector, flushes, reads back, then reports
        // blk0: the report comes after the flush completed.
        for line in BufReader::new(stdout).lines() {
            if line.unwrap().starts_with("PROBE virtio dev=blk0 ") {
                child.kill().unwrap();
                seen = true;
                break;
            }
        }
        let _ = child.wait();
        assert!(seen, "the guest never reported its disk");
        assert_eq!(sectors_without_pattern(&std::fs::read(&disk).unwrap()), 0);
    }
}

/// The guest ARPs the host through a TAP device that the test creates in a
/// network namespace of its own; the reply names the TAP's MAC.
#[test]
fn the_guest_exchanges_frames_with_the_host_over_a_tap() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = TapNamespace::create("virtio") else {
        return;
    };
    for transport in ["mmio", "pci"] {
        let net = format!("tap=vtap0,transport={transport}");
        let out = run_command(
            ns.veil().args([
                "run",
                "--memory",
                "64M",
                "--timeout",
                "60",
                "--net",
                &net,
                "--cmdline",
                "probe.net_peer=10.0.2.1 probe.net_ip=10.0.2.15",
            ]),
            LIMIT,
        );
        assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
        let line = device_line(&out.stdout, "net0");
        assert!(line.contains("peer=arp") && line.ends_with("result=ok"), "{line}");
        assert!(line.contains(&format!("peer_mac={}", ns.mac)), "{line} vs {}", ns.mac);
    }
}
