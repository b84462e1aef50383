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
        assert_booted(&boot("vmlinux", 1, "quiet"));
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
