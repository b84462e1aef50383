//! PVH boot: veil enters ELF kernels with a XEN_ELFNOTE_PHYS32_ENTRY note in
//! 32-bit mode with an `hvm_start_info` (`--boot auto|pvh`), or through the
//! Linux 64-bit protocol (`--boot linux64`). The probe carries the note and
//! reports what it read from either structure.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;

/// The `key=value` pairs of the first `PROBE <topic>` line.
fn probe_line(stdout: &str, topic: &str) -> HashMap<String, String> {
    let prefix = format!("PROBE {topic} ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"));
    line[prefix.len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

fn e820_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("PROBE e820 ")).collect()
}

const CMDLINE: &str = "probe.mode=basic probe.seed=0x1234";
const MEMORY: u64 = 64 << 20;
const INITRD_SIZE: u64 = 10_000;

/// The probe with a known command line and initrd; `boot` is the flag's
/// value, or None for the default.
fn boot(boot: Option<&str>) -> Output {
    let initrd = scratch("pvh-initrd.bin");
    std::fs::write(&initrd, vec![0x5au8; INITRD_SIZE as usize]).unwrap();
    let memory = format!("{}M", MEMORY >> 20);
    let mut args = vec![
        "run",
        "--memory",
        &memory,
        "--cmdline",
        CMDLINE,
        "--initrd",
        initrd.to_str().unwrap(),
        "--timeout",
        "100",
    ];
    if let Some(b) = boot {
        args.extend(["--boot", b]);
    }
    let out = run_veil(&args, Duration::from_secs(130));
    assert_eq!(out.code, Some(0), "probe failed:\n{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("PROBE done status=0"), "{}", out.stdout);
    out
}

/// What both structures must say: the same command line, initrd, RSDP.
fn check_common(b: &HashMap<String, String>) {
    assert_eq!(b["cmdline_len"], CMDLINE.len().to_string());
    // veil puts the initrd as high in low RAM as it fits, page-aligned.
    let addr = (MEMORY - INITRD_SIZE) / 4096 * 4096;
    assert_eq!(b["ramdisk"], format!("{addr:#x}"));
    assert_eq!(b["ramdisk_size"], format!("{INITRD_SIZE:#x}"));
    assert_eq!(b["rsdp"], "0xe0000");
}

#[test]
fn default_and_pvh_boot_the_probe_through_its_note_with_a_start_info_equal_to_boot_params() {
    if !kvm_available() {
        return;
    }
    let pvh = boot(None);
    let b = probe_line(&pvh.stdout, "boot");
    assert_eq!(b["protocol"], "pvh", "{}", pvh.stdout);
    // hvm_start_info at 0x6000 (docs/platform.md), version 1, the initrd as
    // its only module, the RSDP named in it.
    assert_eq!(b["start_info"], "0x6000");
    assert_eq!(b["version"], "1");
    assert_eq!(b["modules"], "1");
    assert_eq!(b["rsdp_from"], "start_info");
    check_common(&b);

    let linux = boot(Some("linux64"));
    let l = probe_line(&linux.stdout, "boot");
    assert_eq!(l["protocol"], "linux64", "{}", linux.stdout);
    assert_eq!(l["boot_params"], "0x7000");
    assert_eq!(l["rsdp_from"], "boot_params");
    check_common(&l);

    // The PVH memory map is the e820 map, entry for entry.
    assert_eq!(b["memmap"], l["memmap"]);
    let (pe, le) = (e820_lines(&pvh.stdout), e820_lines(&linux.stdout));
    assert!(pe.len() >= 5, "{}", pvh.stdout);
    assert_eq!(pe, le);
    // Both pass the same checks (ACPI, RAM) beyond that.
    assert_eq!(
        probe_line(&pvh.stdout, "ram")["pages"],
        probe_line(&linux.stdout, "ram")["pages"]
    );

    let explicit = boot(Some("pvh"));
    assert_eq!(probe_line(&explicit.stdout, "boot")["protocol"], "pvh");
}

#[test]
fn pvh_on_a_kernel_without_the_note_is_a_one_line_data_error() {
    // Checked before any KVM resource: no KVM needed.
    let guest = write_guest("pvh-no-note.elf", &out8(0xf4, 7));
    let out = run_veil(
        &[
            "run",
            "--kernel",
            guest.to_str().unwrap(),
            "--boot",
            "pvh",
            "--timeout",
            "20",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(65), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("veil: error: --boot pvh:"), "{}", out.stderr);
    assert!(out.stderr.contains("no PVH entry"), "{}", out.stderr);
}

#[test]
fn auto_boots_a_kernel_without_the_note_through_the_64_bit_entry() {
    if !kvm_available() {
        return;
    }
    let guest = write_guest("pvh-auto-no-note.elf", &out8(0xf4, 7));
    let out = run_veil(
        &["run", "--kernel", guest.to_str().unwrap(), "--timeout", "20"],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(7), "{}", out.stderr);
}

#[test]
fn a_bad_boot_value_is_a_usage_error() {
    let out = run_veil(
        &["run", "--boot", "multiboot", "--timeout", "5"],
        Duration::from_secs(20),
    );
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr.starts_with("veil: error: invalid --boot 'multiboot'"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1);
}
