//! A hostile guest: the probe in `probe.mode=hostile` sends malformed
//! virtio requests and register writes to every device (two disks, one of
//! them read-only, a loopback NIC, an entropy device) on each transport,
//! and checks that each gets the specification's answer while the device
//! keeps serving the correct request that follows (see
//! resources/guests/probe/src/hostile.rs). Here: veil must stay up and the
//! guest must finish with status 0, every case line must say `result=ok`,
//! the read-only image must be untouched, and veil's own counters must
//! show that it saw each kind of abuse.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// The guest gives itself up to `--timeout`; this is the test's own limit.
const LIMIT: Duration = Duration::from_secs(180);
const IMAGE_SIZE: usize = 4 << 20;

/// A recognisable, position-dependent pattern (so a write anywhere shows).
fn image(seed: u8) -> Vec<u8> {
    (0..IMAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 9) as u8) ^ seed)
        .collect()
}

/// Cases every device of a type must report, on both transports.
const COMMON_CASES: &[&str] = &[
    "features_unoffered",
    "queue_size_not_pow2",
    "select_missing_queue",
    "desc_ring_outside_ram",
    "used_ring_outside_ram",
    "avail_ring_straddles_ram_end",
];
const BLK_CASES: &[&str] = &[
    "desc_loop",
    "desc_self_loop",
    "desc_next_out_of_table",
    "indirect_nested",
    "indirect_len_not_x16",
    "indirect_too_many",
    "indirect_len_huge",
    "buf_outside_ram",
    "buf_straddles_ram_end",
    "header_outside_ram",
    "status_outside_ram",
    "indirect_outside_ram",
    "len_overflow_u32",
    "addr_len_overflow_u64",
    "status_addr_wraps",
    "read_past_end",
    "read_straddles_end",
    "read_sector_max",
    "read_sector_u64_max",
];
const RW_BLK_CASES: &[&str] = &["write_read_back", "write_past_end"];
const RO_BLK_CASES: &[&str] = &["write_readonly", "write_zeroes_readonly", "discard_readonly"];
const NET_CASES: &[&str] = &[
    "tx_desc_loop",
    "tx_desc_next_out_of_table",
    "tx_buf_outside_ram",
    "tx_buf_straddles_ram_end",
    "tx_len_overflow_u32",
    "tx_addr_len_overflow_u64",
    "rx_buf_outside_ram",
    "rx_buf_straddles_ram_end",
];
const RNG_CASES: &[&str] = &[
    "desc_loop",
    "desc_next_out_of_table",
    "buf_outside_ram",
    "buf_straddles_ram_end",
    "addr_len_overflow_u64",
    "readable_buffer",
];

/// The value of ` key=` in a line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

fn counter(metrics: &serde_json::Value, dev: &str, name: &str) -> u64 {
    metrics["devices"][dev]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} for {dev} in {metrics}"))
}

fn run_hostile(transport: &str) {
    if !kvm_available() {
        return;
    }
    let rw = scratch(&format!("hostile-{transport}-rw.img"));
    let ro = scratch(&format!("hostile-{transport}-ro.img"));
    let metrics_path = scratch(&format!("hostile-{transport}-metrics.json"));
    let ro_bytes = image(0x5A);
    std::fs::write(&rw, image(0xC3)).unwrap();
    std::fs::write(&ro, &ro_bytes).unwrap();
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    let disk_rw = format!("path={},transport={transport}", arg(&rw));
    let disk_ro = format!("path={},readonly=on,transport={transport}", arg(&ro));
    let net = format!("loopback,transport={transport}");
    let rng = format!("transport={transport}");
    let metrics_arg = arg(&metrics_path);
    let out = run_veil(
        &[
            "run",
            "--disk",
            &disk_rw,
            "--disk",
            &disk_ro,
            "--net",
            &net,
            "--rng",
            &rng,
            "--cmdline",
            "probe.mode=hostile",
            "--metrics",
            &metrics_arg,
            "--timeout",
            "120",
        ],
        LIMIT,
    );
    let context = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);

    // veil survived and the guest finished with every check passed.
    assert_eq!(out.code, Some(0), "veil or the guest failed\n{context}");
    assert!(!out.stderr.contains("panicked"), "{context}");
    assert!(
        out.stdout.contains("PROBE done status=0"),
        "the guest did not finish\n{context}"
    );

    // Every case passed, and every device got the cases meant for it.
    let cases: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("PROBE hostile case="))
        .collect();
    for line in &cases {
        assert_eq!(field(line, "result"), Some("ok"), "{line}\n{context}");
        assert_eq!(field(line, "transport"), Some(transport), "{line}");
    }
    let has = |dev: &str, case: &str| {
        cases
            .iter()
            .any(|l| field(l, "dev") == Some(dev) && field(l, "case") == Some(case))
    };
    let notify_case = if transport == "mmio" {
        "queue_notify_missing_queue"
    } else {
        "notify_past_region"
    };
    let expect = [
        ("blk0", &[COMMON_CASES, BLK_CASES, RW_BLK_CASES][..]),
        ("blk1", &[COMMON_CASES, BLK_CASES, RO_BLK_CASES][..]),
        ("net0", &[COMMON_CASES, NET_CASES][..]),
        ("rng0", &[COMMON_CASES, RNG_CASES][..]),
    ];
    for (dev, lists) in expect {
        for case in lists.iter().flat_map(|l| l.iter()).chain([&notify_case]) {
            assert!(has(dev, case), "no case {case} for {dev}\n{context}");
        }
    }
    let done = out
        .stdout
        .lines()
        .find(|l| l.starts_with("PROBE hostile done"))
        .unwrap_or_else(|| panic!("no summary line\n{context}"));
    assert_eq!(field(done, "failed"), Some("0"), "{done}");
    assert_eq!(field(done, "devices"), Some("4"), "{done}");
    assert_eq!(field(done, "cases"), Some(cases.len().to_string().as_str()), "{done}");

    // String port I/O: each element of a `rep ins/outs` is its own access
    // (PCI mechanism #1 exists only when there is a PCI device).
    let mut pio_cases = vec!["rep_insb_com1_lsr", "rep_outsb_com1_scratch"];
    if transport == "pci" {
        pio_cases.extend(["rep_insl_pci_config", "rep_outsl_pci_address"]);
    }
    for case in pio_cases {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with("PROBE hostile pio ") && field(l, "case") == Some(case))
            .unwrap_or_else(|| panic!("no string I/O case {case}\n{context}"));
        assert_eq!(field(line, "result"), Some("ok"), "{line}");
    }

    // The read-only disk is byte for byte what it was; the writable one
    // did not grow (the write past its end was refused).
    assert!(std::fs::read(&ro).unwrap() == ro_bytes, "the read-only image changed");
    assert_eq!(std::fs::metadata(&rw).unwrap().len(), IMAGE_SIZE as u64);

    // veil counted each kind of abuse, per device.
    let text = std::fs::read_to_string(&metrics_path).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    for dev in ["blk0", "blk1", "net0", "rng0"] {
        let c = |name: &str| counter(&m, dev, name);
        assert_eq!(m["devices"][dev]["transport"], transport, "{dev}: {text}");
        // One refused queue size, one refused feature set, three sets of
        // rings outside RAM (each also a bad descriptor).
        assert!(c("bad_queue_sizes") >= 1, "{dev}: {text}");
        assert!(c("features_refused") >= 1, "{dev}: {text}");
        assert!(c("needs_reset") >= 3, "{dev}: {text}");
        // A missing queue sized and enabled: two refused register writes.
        assert!(c("bad_register_writes") >= 2, "{dev}: {text}");
        if transport == "mmio" {
            assert!(c("bad_notifications") >= 1, "{dev}: {text}");
        } else {
            // PCI: the write past the notification region is a bad access.
            assert!(c("bad_register_writes") >= 3, "{dev}: {text}");
        }
        // Nothing failed on the host side.
        assert_eq!(c("io_errors"), 0, "{dev}: {text}");
        // Every bring-up activated the device again (first, after each
        // ring case).
        assert!(c("activations") >= 4, "{dev}: {text}");
    }
    // Chains refused as malformed or pointing outside RAM, plus the three
    // ring cases.
    // A buffer wrapping around the address space is refused by the DMA
    // view (dma_denied) rather than by the chain walker.
    let c = |dev: &str, name: &str| counter(&m, dev, name);
    let refused = |dev: &str| c(dev, "bad_descriptors") + c(dev, "dma_denied");
    assert!(refused("blk0") >= 17, "{text}");
    assert!(refused("blk1") >= 17, "{text}");
    assert!(refused("net0") >= 11, "{text}");
    assert!(refused("rng0") >= 8, "{text}");
    // Requests the disk refused: 4 reads past the end, the write past the
    // end, sizes beyond size_max; on the read-only disk, 3 writes.
    assert!(c("blk0", "bad_requests") >= 6, "{text}");
    assert!(c("blk1", "bad_requests") >= 8, "{text}");
    assert!(c("rng0", "bad_requests") >= 1, "{text}");
}

#[test]
fn hostile_guest_on_mmio() {
    run_hostile("mmio");
}

#[test]
fn hostile_guest_on_pci() {
    run_hostile("pci");
}
