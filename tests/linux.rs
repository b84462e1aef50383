//! Boot the Linux guest from resources/linux (built and cached by
//! resources/linux/build.sh; scripts/test.sh exports VEIL_LINUX_DIR) to its
//! userspace marker and a clean ACPI power-off.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

/// The boot line this machine's KVM needs (resources/linux/README.md says
/// why each word is there); harmless on ordinary KVM hosts.
const CMDLINE: &str =
    "console=ttyS0 clearcpuid=xsave,cx16,popcnt,smap,erms,fsrm noint3selftest noreplace-smp reboot=k panic=-1";
/// KVM paravirtual features whose hypercalls (vmcall at CPL0) never return
/// on the nested KVM of veil's CI; hidden from the guest, which then uses
/// the native paths (IPIs through the LAPIC, no PV spinlock kicks).
const CPUID_HIDE: &str = "kvm_pv_unhalt,kvm_pv_send_ipi,kvm_pv_sched_yield";
const MARKER: &str = "VEIL-LINUX-UP";
const LIMIT: Duration = Duration::from_secs(480);

/// The built kernel, or None (after saying why) where it may be skipped.
fn linux_dir() -> Option<PathBuf> {
    if !kvm_available() {
        return None;
    }
    match std::env::var_os("VEIL_LINUX_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set VEIL_LINUX_DIR (scripts/test.sh does)"
            );
            eprintln!("SKIPPED: VEIL_LINUX_DIR is not set; run scripts/test.sh, which builds the Linux guest");
            None
        }
    }
}

fn boot(kernel: &str, cpus: u32, extra_cmdline: &str) -> Output {
    boot_with(kernel, cpus, extra_cmdline, &[])
}

/// Boots the guest with more `veil run` arguments (devices, DMA modes).
fn boot_with(kernel: &str, cpus: u32, extra_cmdline: &str, extra_args: &[&str]) -> Output {
    let dir = linux_dir().expect("checked by the caller");
    let kernel = dir.join(kernel);
    let initrd = dir.join("initramfs.cpio");
    let cmdline = format!("{CMDLINE} {extra_cmdline}");
    let cpus = cpus.to_string();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        cmdline.trim(),
        "--memory",
        "256M",
        "--cpus",
        &cpus,
        "--timeout",
        "420",
        "--cpuid-hide",
        CPUID_HIDE,
    ];
    args.extend_from_slice(extra_args);
    let out = run_veil(&args, LIMIT);
    eprintln!(
        "{kernel:?} with {cpus} vCPU(s) {extra_args:?}: {:.1} s to power-off, exit {:?}",
        out.elapsed.as_secs_f64(),
        out.code
    );
    out
}

fn assert_booted(out: &Output) {
    assert!(
        out.stdout.contains(MARKER),
        "no {MARKER}:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
}

#[test]
fn linux_vmlinux_boots_to_userspace_and_powers_off() {
    if linux_dir().is_some() {
        // vmlinux has a PVH note (CONFIG_PVH=y): the default (auto) enters
        // it there, in 32-bit mode with an hvm_start_info.
        let out = boot_with("vmlinux", 1, "quiet", &["--log-level", "info"]);
        assert_booted(&out);
        assert!(out.stderr.contains(", boot pvh at 0x"), "{}", out.stderr);
    }
}

#[test]
fn linux_vmlinux_boots_through_the_64_bit_protocol_with_boot_linux64() {
    if linux_dir().is_some() {
        let out = boot_with("vmlinux", 1, "quiet", &["--boot", "linux64", "--log-level", "info"]);
        assert_booted(&out);
        assert!(out.stderr.contains(", boot linux64"), "{}", out.stderr);
    }
}

#[test]
fn linux_bzimage_boots_to_userspace_and_powers_off() {
    if linux_dir().is_some() {
        assert_booted(&boot("bzImage", 1, "quiet"));
    }
}

#[test]
fn linux_two_vcpus_boot_through_the_wakeup_mailbox() {
    if linux_dir().is_none() {
        return;
    }
    let out = boot("vmlinux", 2, "");
    assert_booted(&out);
    assert!(out.stdout.contains("smp: Brought up 1 node, 2 CPUs"), "{}", out.stdout);
}

/// An ext4 image holding `hello.txt`, made with mke2fs -d.
fn ext4_image(name: &str) -> PathBuf {
    let root = scratch(&format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), "veil-blk-ok\n").unwrap();
    let image = scratch(&format!("{name}.img"));
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
    assert!(status.success());
    image
}

/// Runs `veil` inside a fresh network namespace that holds a TAP device
/// `vtap0` at 10.0.2.1/24; the guest pings it from 10.0.2.15.
fn boot_virtio_in_netns(transport: &str) -> Option<Output> {
    let dir = linux_dir()?;
    let ns = TapNamespace::create(&format!("linux-{transport}"))?;
    let image = ext4_image(&format!("linux-{transport}"));
    let cmdline = format!("{CMDLINE} quiet veil.test=virtio");
    let out = run_command(
        ns.veil()
            .arg("run")
            .arg("--kernel")
            .arg(dir.join("vmlinux"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio"))
            .args([
                "--cmdline",
                &cmdline,
                "--memory",
                "256M",
                "--timeout",
                "420",
                "--cpuid-hide",
                CPUID_HIDE,
            ])
            .args([
                "--disk",
                &format!("path={},readonly=on,transport={transport}", image.display()),
            ])
            .args(["--net", &format!("tap=vtap0,transport={transport}")])
            .args(["--rng", &format!("transport={transport}")]),
        LIMIT,
    );
    eprintln!(
        "Linux virtio over {transport}: {:.1} s, exit {:?}",
        out.elapsed.as_secs_f64(),
        out.code
    );
    Some(out)
}

fn linux_drives_virtio(transport: &str) {
    let Some(out) = boot_virtio_in_netns(transport) else {
        return;
    };
    assert_booted(&out);
    for check in ["VEIL-CHECK blk ok", "VEIL-CHECK net ok", "VEIL-CHECK rng ok"] {
        assert!(out.stdout.contains(check), "missing '{check}':\n{}", out.stdout);
    }
}

#[test]
fn linux_drives_virtio_over_mmio() {
    linux_drives_virtio("mmio");
}

#[test]
fn linux_drives_virtio_over_pci() {
    linux_drives_virtio("pci");
}

/// A raw 8 MiB disk for the secure scenarios (they write at 1 and 4 MiB).
fn raw_disk(name: &str) -> PathBuf {
    let image = scratch(&format!("{name}.img"));
    std::fs::File::create(&image).and_then(|f| f.set_len(8 << 20)).unwrap();
    image
}

/// Runs init's `secure` or `secure_auto` scenario with `--dma <dma>`
/// (plus `extra` veil arguments); returns the output and the metrics.
fn secure_run(name: &str, scenario: &str, expect: &str, dma: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    secure_run_with(name, &format!("swiotlb=force veil.test={scenario}"), expect, dma, extra)
}

fn secure_run_with(name: &str, words: &str, expect: &str, dma: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let disk = raw_disk(name);
    let metrics = scratch(&format!("{name}-metrics.json"));
    let disk_arg = format!("path={}", disk.display());
    let mut args = vec![
        "--dma",
        dma,
        "--disk",
        &disk_arg,
        "--metrics",
        metrics.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let cmdline = format!("quiet {words} veil.expect={expect} veil.io_limit=60");
    let out = boot_with("vmlinux", 1, &cmdline, &args);
    let json = std::fs::read_to_string(&metrics)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| panic!("no metrics:\n{}\n{}", out.stdout, out.stderr));
    (out, json)
}

fn blk_counter(m: &serde_json::Value, name: &str) -> u64 {
    m["devices"]["blk0"]["counters"][name].as_u64().unwrap_or(0)
}

/// The motivating scenario: Linux goes secure at run time, shares only its
/// swiotlb pool and rings, and keeps using its disk through bounce buffers.
#[test]
fn linux_secure_with_platform_dma_keeps_its_disk_working() {
    if linux_dir().is_none() {
        return;
    }
    let (out, m) = secure_run("secure-platform", "secure", "ok", "platform", &[]);
    assert_booted(&out);
    for line in [
        "VEIL-CHECK pre-secure io ok",
        "VEIL-QUERY secure=1",
        "VEIL-CHECK secure io ok",
    ] {
        assert!(out.stdout.contains(line), "no {line}:\n{}", out.stdout);
    }
    assert_eq!(m["secure"]["secure"], true, "{m}");
    assert!(m["secure"]["shared_pages"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(blk_counter(&m, "dma_private_denied"), 0, "{m}");
}

/// The same guest with bypass DMA: its I/O after ESM uses private pages and
/// fails, veil refuses every such access, keeps running and says so.
#[test]
fn linux_secure_with_bypass_dma_fails_safely() {
    if linux_dir().is_none() {
        return;
    }
    let (out, m) = secure_run("secure-bypass", "secure", "fail", "bypass", &[]);
    assert_booted(&out);
    assert!(
        out.stdout.contains("VEIL-CHECK secure io failed as expected"),
        "{}",
        out.stdout
    );
    assert!(blk_counter(&m, "dma_private_denied") > 0, "{m}");
    assert!(
        out.stderr.contains("private page"),
        "veil logs the refusals:\n{}",
        out.stderr
    );
}

/// `--dma auto`: veil asks for a reset at ESM; whatever Linux does about it
/// is recorded, and veil stays up with every private access refused.
#[test]
fn linux_secure_with_auto_dma_is_recorded() {
    if linux_dir().is_none() {
        return;
    }
    let (out, m) = secure_run("secure-auto", "secure_auto", "ok", "auto", &[]);
    assert_booted(&out);
    assert!(out.stdout.contains("VEIL-AUTO secure ok"), "{}", out.stdout);
    assert!(
        blk_counter(&m, "needs_reset") >= 1,
        "veil raised DEVICE_NEEDS_RESET: {m}"
    );
    for line in out.stdout.lines().filter(|l| l.starts_with("VEIL-AUTO")) {
        eprintln!("recorded: {line}");
    }
}

/// Linux's virtio-iommu driver attaches the disk's endpoint from the VIOT
/// and writes and reads it through translated DMA (checked by the guest's
/// read-back); veil's vIOMMU counted the maps and unmaps.
#[test]
fn linux_reads_and_writes_its_disk_through_virtio_iommu() {
    if linux_dir().is_none() {
        return;
    }
    // The scenario's I/O before ESM is what is checked here. Without
    // swiotlb=force Linux maps its page-cache pages through the vIOMMU, and
    // those are private after ESM, so the I/O after it must fail.
    let (out, m) = secure_run_with("iommu-rw", "veil.test=secure", "fail", "platform", &["--iommu"]);
    assert_booted(&out);
    assert!(out.stdout.contains("VEIL-CHECK pre-secure io ok"), "{}", out.stdout);
    let iommu = &m["devices"]["iommu0"]["counters"];
    assert!(iommu["iommu_attaches"].as_u64().unwrap() >= 1, "{m}");
    assert!(iommu["iommu_maps"].as_u64().unwrap() > 0, "{m}");
    assert!(iommu["iommu_unmaps"].as_u64().unwrap() > 0, "{m}");
    assert!(
        blk_counter(&m, "bytes_read") >= 1 << 20,
        "the device read the 1 MiB pattern: {m}"
    );
}
