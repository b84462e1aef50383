//! The built-in test guest as a virtio-iommu client (`--iommu`): its
//! workloads give the same disk image through the vIOMMU (lazy and strict
//! DMA policies) as without it, the vIOMMU stops what it must (mode
//! `iommu_fault`), and what the guest says it asked for is what veil counted.

mod common;

use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// `key=value` words of the first output line starting with `prefix`.
fn fields(stdout: &str, prefix: &str) -> HashMap<String, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{stdout}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(f: &HashMap<String, String>, key: &str) -> u64 {
    f.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {f:?}"))
}

fn metrics(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn counter(m: &serde_json::Value, dev: &str, name: &str) -> u64 {
    m["devices"][dev]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {dev}.{name} in {m}"))
}

/// What the probe says it sent must be what the vIOMMU counted.
fn requests_match(stdout: &str, m: &serde_json::Value) -> HashMap<String, String> {
    let sent = fields(stdout, "PROBE iommu maps=");
    assert_eq!(num(&sent, "maps"), counter(m, "iommu0", "iommu_maps"), "{stdout}");
    assert_eq!(num(&sent, "unmaps"), counter(m, "iommu0", "iommu_unmaps"), "{stdout}");
    assert_eq!(
        num(&sent, "attaches"),
        counter(m, "iommu0", "iommu_attaches"),
        "{stdout}"
    );
    assert_eq!(
        num(&sent, "detaches"),
        counter(m, "iommu0", "iommu_detaches"),
        "{stdout}"
    );
    assert_eq!(num(&sent, "refused"), counter(m, "iommu0", "iommu_refused"), "{stdout}");
    assert_eq!(num(&sent, "faults"), counter(m, "iommu0", "iommu_faults"), "{stdout}");
    sent
}

/// Every device through `transport`: the `basic` workloads, with `extra`
/// flags and probe command line. Returns the image, the output and the
/// metrics.
fn basic_run(name: &str, transport: &str, extra: &[&str], cmdline: &str) -> (Vec<u8>, String, serde_json::Value) {
    let disk = scratch(&format!("{name}.img"));
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let json = scratch(&format!("{name}.json"));
    let mut args = every_device_args(transport, &disk, &json);
    args.extend(["--cmdline", cmdline].map(String::from));
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_veil(&args, LIMIT);
    assert_eq!(out.code, Some(0), "{name}: {}\n{}", out.stdout, out.stderr);
    for dev in ["blk0", "net0", "rng0", "console0"] {
        let line = fields(&out.stdout, &format!("PROBE virtio dev={dev} "));
        assert_eq!(line.get("result").map(String::as_str), Some("ok"), "{name}: {line:?}");
    }
    (std::fs::read(&disk).unwrap(), out.stdout, metrics(&json))
}

fn same_image_through_the_iommu(transport: &str) {
    if !kvm_available() {
        return;
    }
    let (bypass, _, _) = basic_run(&format!("bypass-{transport}"), transport, &[], "");
    assert_eq!(sectors_without_pattern(&bypass), 0);
    let iommu = ["--dma", "platform", "--iommu"];
    // No probe.dma: with a VIOT the probe's default is lazy.
    for (policy, cmdline) in [("lazy", ""), ("strict", "probe.dma=strict")] {
        let (image, stdout, m) = basic_run(&format!("{policy}-{transport}"), transport, &iommu, cmdline);
        assert!(image == bypass, "{policy}: the image differs from the bypass run's");
        for dev in ["blk0", "net0", "rng0", "console0"] {
            let line = fields(&stdout, &format!("PROBE virtio dev={dev} "));
            assert_eq!(line.get("iommu").map(String::as_str), Some(policy), "{dev}: {line:?}");
            assert_eq!(counter(&m, dev, "dma_denied"), 0, "{dev}");
            assert_eq!(counter(&m, dev, "bad_descriptors"), 0, "{dev}");
        }
        let sent = requests_match(&stdout, &m);
        assert_eq!(num(&sent, "faults"), 0);
        let blk = fields(&stdout, "PROBE virtio dev=blk0 ");
        let requests = num(&blk, "requests");
        match policy {
            // One MAP for the whole pool, made when the disk joined.
            "lazy" => {
                assert_eq!((num(&sent, "maps"), num(&sent, "unmaps")), (1, 0), "{stdout}");
                assert!(num(&blk, "bounces") >= requests, "{blk:?}");
            }
            // The pool, then per request: header, data, status (and an
            // indirect table), each mapped and unmapped.
            _ => {
                assert!(num(&blk, "iommu_maps") > 3 * requests, "{blk:?}");
                assert_eq!(num(&blk, "iommu_maps"), num(&blk, "iommu_unmaps") + 1, "{blk:?}");
            }
        }
        // Each endpoint the VIOT names was PROBEd and has the MSI window.
        assert_eq!(stdout.matches(" probe=ok ").count(), 4, "{stdout}");
        assert_eq!(stdout.matches("msi=0xfee00000 msi_end=0xfeefffff").count(), 4);
    }
}

#[test]
fn the_disk_image_is_the_same_through_the_iommu_over_mmio() {
    same_image_through_the_iommu("mmio");
}

#[test]
fn the_disk_image_is_the_same_through_the_iommu_over_pci() {
    same_image_through_the_iommu("pci");
}

/// Mode `iommu_fault` on one disk; returns the output and the metrics.
fn fault_run(name: &str, transport: &str, cmdline: &str) -> (String, serde_json::Value) {
    let disk = scratch(&format!("{name}.img"));
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let json = scratch(&format!("{name}.json"));
    let disk_arg = format!("path={},transport={transport}", disk.display());
    let cmdline = format!("probe.mode=iommu_fault {cmdline}");
    let out = run_veil(
        &[
            "run",
            "--memory",
            "64M",
            "--timeout",
            "60",
            "--dma",
            "platform",
            "--iommu",
            "--disk",
            &disk_arg,
            "--metrics",
            json.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
        LIMIT,
    );
    assert_eq!(out.code, Some(0), "{name}: {}\n{}", out.stdout, out.stderr);
    (out.stdout, metrics(&json))
}

fn the_iommu_stops_what_it_must(transport: &str) {
    if !kvm_available() {
        return;
    }
    for policy in ["lazy", "strict"] {
        let (stdout, m) = fault_run(
            &format!("fault-{policy}-{transport}"),
            transport,
            &format!("probe.dma={policy}"),
        );
        for check in ["probe", "unmapped", "readonly", "detach"] {
            assert!(
                stdout.contains(&format!("PROBE IOMMU-CHECK {check} ok")),
                "{policy} {check}:\n{stdout}"
            );
        }
        let unmapped = fields(&stdout, "PROBE IOMMU-CHECK unmapped ");
        assert_eq!(unmapped["fault"], "mapping");
        assert_eq!(unmapped["access"], "read");
        assert_eq!(unmapped["iova"], "0xdeadbeef0000");
        let readonly = fields(&stdout, "PROBE IOMMU-CHECK readonly ");
        assert_eq!(
            (readonly["fault"].as_str(), readonly["access"].as_str()),
            ("mapping", "write")
        );
        let detach = fields(&stdout, "PROBE IOMMU-CHECK detach ");
        assert_eq!(
            (detach["fault"].as_str(), detach["answer"].as_str()),
            ("domain", "no_answer")
        );
        assert_eq!(detach["needs_reset"], "1", "a ring it cannot reach breaks the queue");
        assert_eq!(counter(&m, "blk0", "needs_reset"), 1);
        let sent = requests_match(&stdout, &m);
        // One report per failed access: the data read, the data write, the
        // available ring.
        assert!(num(&sent, "faults") >= 3, "{stdout}");
        assert_eq!(counter(&m, "blk0", "dma_translation_faults"), num(&sent, "faults"));
        assert_eq!(counter(&m, "iommu0", "iommu_faults_dropped"), 0);
    }
}

#[test]
fn the_iommu_stops_what_it_must_over_mmio() {
    the_iommu_stops_what_it_must("mmio");
}

#[test]
fn the_iommu_stops_what_it_must_over_pci() {
    the_iommu_stops_what_it_must("pci");
}

/// docs/dma.md: a failed translation fails that request and is counted in
/// `dma_denied`, for the block device's data buffers too.
#[test]
fn a_denied_block_transfer_counts_as_dma_denied() {
    if !kvm_available() {
        return;
    }
    let (stdout, m) = fault_run("denied-mmio", "mmio", "probe.iommu_fault=unmapped");
    assert!(stdout.contains("PROBE IOMMU-CHECK unmapped ok"), "{stdout}");
    assert_eq!(counter(&m, "blk0", "dma_denied"), 1, "{}", m["devices"]["blk0"]);
}

/// `--dma platform` without `--iommu`: the probe accepts ACCESS_PLATFORM
/// with identity addresses; with `--iommu` and `probe.dma=identity` it
/// turns the vIOMMU's bypass on instead of attaching anything.
#[test]
fn identity_addresses_work_without_an_iommu_and_through_its_bypass() {
    if !kvm_available() {
        return;
    }
    for transport in ["mmio", "pci"] {
        let (image, stdout, _) = basic_run(&format!("identity-{transport}"), transport, &["--dma", "platform"], "");
        assert_eq!(sectors_without_pattern(&image), 0);
        assert!(stdout.contains("dma=identity"), "{stdout}");
        assert!(!stdout.contains("PROBE iommu"), "{stdout}");
        let blk = fields(&stdout, "PROBE virtio dev=blk0 ");
        assert!(
            blk.contains_key("access_platform") && !blk.contains_key("iommu"),
            "{blk:?}"
        );
    }
    let (image, stdout, m) = basic_run(
        "bypass-iommu",
        "pci",
        &["--dma", "platform", "--iommu"],
        "probe.dma=identity",
    );
    assert_eq!(sectors_without_pattern(&image), 0);
    assert!(stdout.contains("PROBE iommu bypass=1"), "{stdout}");
    assert_eq!(counter(&m, "iommu0", "iommu_attaches"), 0);
    assert_eq!(counter(&m, "iommu0", "iommu_maps"), 0);
}

/// `probe.secure=1`: ESM keeping only the probe's DMA pool shared. The
/// policies that keep every device access in the pool still give the same
/// image (bounce without a vIOMMU, lazy with one), and the devices never
/// touched a private page.
#[test]
fn only_the_pool_shared_after_esm_is_enough_for_bounce_and_lazy() {
    if !kvm_available() {
        return;
    }
    for (name, extra, cmdline) in [
        (
            "secure-bounce",
            &["--dma", "platform"][..],
            "probe.dma=bounce probe.secure=1",
        ),
        (
            "secure-lazy",
            &["--dma", "platform", "--iommu"][..],
            "probe.dma=lazy probe.secure=1",
        ),
    ] {
        let (image, stdout, m) = basic_run(name, "pci", extra, cmdline);
        assert_eq!(sectors_without_pattern(&image), 0, "{name}");
        assert!(stdout.contains("esm=ok"), "{name}: {stdout}");
        let blk = fields(&stdout, "PROBE virtio dev=blk0 ");
        assert!(num(&blk, "bounces") >= num(&blk, "requests"), "{name}: {blk:?}");
        for dev in ["blk0", "net0", "rng0", "console0"] {
            assert_eq!(counter(&m, dev, "dma_private_denied"), 0, "{name} {dev}");
            assert_eq!(counter(&m, dev, "dma_denied"), 0, "{name} {dev}");
        }
    }
}
