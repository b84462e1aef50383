//! Boot veil's built-in test guest (the probe) and check what it reports.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;

/// The `key=value` pairs of the first `PROBE <topic>` line.
fn probe_line(stdout: &str, topic: &str) -> Option<HashMap<String, String>> {
    let prefix = format!("PROBE {topic} ");
    let line = stdout.lines().find(|l| l.starts_with(&prefix))?;
    Some(
        line[prefix.len()..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    )
}

fn boot_probe(cpus: u32, memory: &str) -> Output {
    let cpus = cpus.to_string();
    let out = run_veil(
        &["run", "--cpus", &cpus, "--memory", memory, "--timeout", "120"],
        Duration::from_secs(150),
    );
    assert_eq!(out.code, Some(0), "probe failed: {}\n{}", out.stdout, out.stderr);
    out
}

fn check(out: &Output, cpus: usize, memory_bytes: u64) {
    let s = &out.stdout;
    assert!(s.contains("PROBE done status=0"), "{s}");
    let cpu = probe_line(s, "cpus").expect("cpus line");
    assert_eq!(cpu["count"], cpus.to_string());
    assert_eq!(cpu["mailbox"], "0xfeb00000");
    let ram = probe_line(s, "ram").expect("ram line");
    assert_eq!(ram["bad"], "0");
    let pages: u64 = ram["pages"].parse().unwrap();
    // Everything but the first MiB, the probe's own ~1.2 MiB and the ACPI area.
    let expected = memory_bytes / 4096 - 256;
    assert!(
        pages > expected - 1024 && pages <= expected,
        "{pages} pages tested of {expected}"
    );
    let ram_e820: u64 = s
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE e820 "))
        .filter(|l| l.ends_with("type=1"))
        .map(|l| {
            let size = l.split_whitespace().find_map(|kv| kv.strip_prefix("size=0x")).unwrap();
            u64::from_str_radix(size, 16).unwrap()
        })
        .sum();
    assert!(
        ram_e820 <= memory_bytes && ram_e820 > memory_bytes - (1 << 20),
        "e820 RAM {ram_e820:#x}"
    );
    if cpus > 1 {
        for id in 1..cpus {
            assert!(s.contains(&format!("PROBE ap id={id} ok")), "AP {id}: {s}");
        }
        let smp = probe_line(s, "smp").expect("smp line");
        assert_eq!(smp["done"], (cpus - 1).to_string());
        assert_eq!(smp["counter"], smp["expected"]);
    }
}

#[test]
fn one_vcpu_64m() {
    if kvm_available() {
        check(&boot_probe(1, "64M"), 1, 64 << 20);
    }
}

#[test]
fn two_vcpus_64m() {
    if kvm_available() {
        check(&boot_probe(2, "64M"), 2, 64 << 20);
    }
}

#[test]
fn one_vcpu_1g() {
    if kvm_available() {
        check(&boot_probe(1, "1G"), 1, 1 << 30);
    }
}

#[test]
fn two_vcpus_1g() {
    if kvm_available() {
        check(&boot_probe(2, "1G"), 2, 1 << 30);
    }
}

#[test]
fn four_vcpus_from_a_config_file() {
    if !kvm_available() {
        return;
    }
    let cfg = scratch("probe.json");
    std::fs::write(
        &cfg,
        r#"{"cpus": 4, "memory": "128M", "timeout": 60, "log_level": "warn"}"#,
    )
    .unwrap();
    let out = run_veil(&["run", "--config", cfg.to_str().unwrap()], Duration::from_secs(90));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    check(&out, 4, 128 << 20);
}

#[test]
fn a_guest_exception_is_reported_by_the_probe() {
    if !kvm_available() {
        return;
    }
    let out = run_veil(
        &[
            "run",
            "--memory",
            "64M",
            "--cmdline",
            "probe.mode=fault",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(out.code, Some(3), "{}", out.stdout);
    assert!(out.stdout.contains("PROBE fault vec=14"), "{}", out.stdout);
}
