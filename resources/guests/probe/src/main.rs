//! veil's built-in test guest ("probe").
//!
//! A freestanding x86-64 ELF linked at 1 MiB, entered through its PVH note
//! or the way Linux's 64-bit boot protocol says (docs/platform.md). It spends a few hundred
//! instructions at CPL0 (boot.rs) and does everything else at CPL3, where
//! code runs at native speed on veil's KVM. It reports on COM1 in lines
//! `PROBE <topic> key=value ...` and ends the VM through the debug-exit port
//! with its status:
//!
//! * 0: every check passed;
//! * 1: a check failed (RAM, ACPI, an AP, the shared counter, a virtio device);
//! * 2: unknown `probe.mode`;
//! * 3: the probe crashed (a CPU exception, or a Rust panic).
//!
//! Command line: `probe.mode=<name>` chooses the workload (default `basic`);
//! other words are ignored.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod boot;
mod bootinfo;
mod hal;
mod heap;
mod hostile;
mod mem;
mod memtest;
mod secure;
mod serial;
mod smp;
mod time;
mod ultracall;
mod ultracall_checks;
mod virtio;

use bootinfo::{param, BootInfo};
use serial::Line;

const STATUS_OK: u32 = 0;
const STATUS_FAILED: u32 = 1;
const STATUS_USAGE: u32 = 2;
const STATUS_CRASH: u32 = 3;

/// A workload: true when all its checks passed.
type Workload = fn(&BootInfo) -> bool;

/// The workloads, by `probe.mode` name. Add new ones here.
const MODES: &[(&str, Workload)] = &[
    ("basic", basic),
    ("fault", fault),
    ("hostile", hostile::run),
    ("bench", virtio::bench),
    ("durability", virtio::durability),
    ("netflood", virtio::netflood),
    ("iommu_fault", virtio::faults::run),
    ("ultracall", ultracall_checks::run),
    ("secure", virtio::secure_checks::run),
];

/// The BSP at CPL3, from `_start` or `probe_pvh_start` (boot.rs): `kind`
/// 0 with `boot_params`, 1 with `hvm_start_info`.
pub extern "C" fn bsp_main(boot_structure: u64, kind: u64) -> ! {
    // SAFETY: the entry code passes what the VMM handed over, and its kind.
    let info = unsafe { BootInfo::read(boot_structure, kind) };
    let mode = param(info.cmdline, "probe.mode").unwrap_or(b"basic");
    Line::new("start").text("mode", mode).emit();
    report_boot(&info);
    if !info.valid {
        Line::new("done").dec("status", STATUS_FAILED as u64).emit();
        serial::exit(STATUS_FAILED)
    }

    let status = match MODES.iter().find(|(name, _)| name.as_bytes() == mode) {
        Some((_, run)) if run(&info) => STATUS_OK,
        Some(_) => STATUS_FAILED,
        None => {
            Line::new("error").text("unknown_mode", mode).emit();
            STATUS_USAGE
        }
    };
    Line::new("done").dec("status", status as u64).emit();
    serial::exit(status)
}

/// `PROBE boot protocol=linux64|pvh ...`: what the entry structure said.
fn report_boot(info: &BootInfo) {
    let (protocol, given) = match info.protocol {
        bootinfo::Protocol::Linux64 => ("linux64", "boot_params"),
        bootinfo::Protocol::Pvh => ("pvh", "start_info"),
    };
    let mut line = Line::new("boot").text("protocol", protocol.as_bytes());
    line = match info.protocol {
        bootinfo::Protocol::Linux64 => line.hex("boot_params", info.structure),
        bootinfo::Protocol::Pvh if !info.valid => line.hex("start_info", info.structure).word("bad_magic"),
        bootinfo::Protocol::Pvh => line
            .hex("start_info", info.structure)
            .dec("version", info.pvh_version as u64)
            .dec("modules", info.modules as u64),
    };
    let from = match info.rsdp_source {
        bootinfo::RsdpSource::Given => given,
        bootinfo::RsdpSource::Scan => "scan",
        bootinfo::RsdpSource::None => "none",
    };
    line.dec("cmdline_len", info.cmdline.len() as u64)
        .dec("memmap", info.e820().len() as u64)
        .hex("ramdisk", info.ramdisk.0)
        .hex("ramdisk_size", info.ramdisk.1 - info.ramdisk.0)
        .hex("rsdp", info.rsdp)
        .text("rsdp_from", from.as_bytes())
        .emit();
}

/// The full check: memory map, paging, ACPI, RAM, SMP, virtio devices.
fn basic(info: &BootInfo) -> bool {
    for e in info.e820() {
        Line::new("e820")
            .hex("addr", e.addr)
            .hex("size", e.size)
            .dec("type", e.kind as u64)
            .emit();
    }
    let mapped_end = boot::mapped_end();
    Line::new("paging")
        .hex("page", boot::page_size())
        .hex("mapped", mapped_end)
        .emit();

    let acpi = acpi::parse(info);
    let line = Line::new("acpi")
        .hex("rsdp", acpi.rsdp)
        .hex("root", acpi.root)
        .hex("madt", acpi.madt);
    match acpi.error {
        None => line.word("ok").emit(),
        Some(e) => line.word("fail").text("error", e.as_bytes()).emit(),
    }
    let line = Line::new("cpus").dec("count", acpi.cpus as u64);
    match &acpi.mailbox {
        Some(mb) => line.hex("mailbox", mb.addr).dec("version", mb.version as u64).emit(),
        None => line.word("mailbox=none").emit(),
    }

    // What the RAM test must not touch: the probe itself (code, data,
    // stacks, page tables), the ACPI tables, an initrd. The first MiB
    // (boot_params, command line, veil's tables) is skipped anyway.
    let mut skip = [(0u64, 0u64); 10];
    skip[0] = boot::image_range();
    skip[1] = info.ramdisk;
    for (slot, &r) in skip[2..].iter_mut().zip(acpi.regions()) {
        *slot = r;
    }
    let ram = memtest::run(info, &skip, mapped_end);
    let mut line = Line::new("ram").dec("pages", ram.pages).dec("bad", ram.bad_pages);
    if ram.bad_pages != 0 {
        line = line.hex("first_bad", ram.first_bad);
    }
    if ram.unmapped != 0 {
        line = line.hex("untested", ram.unmapped);
    }
    line.emit();

    let smp_ok = smp::run(&acpi);
    // The virtio devices, if any (after the RAM test: they use RAM it
    // tested).
    let virtio_ok = virtio::run(info, &acpi);
    acpi.error.is_none() && ram.bad_pages == 0 && ram.pages != 0 && smp_ok && virtio_ok
}

/// Read from an address the probe never maps (512 GiB), to check the
/// exception path: expect `PROBE fault vec=14 ...` and status 3.
fn fault(_: &BootInfo) -> bool {
    // SAFETY: none intended: this faults, and the handler ends the VM.
    let v = unsafe { (0x80_0000_0000u64 as *const u64).read_volatile() };
    core::hint::black_box(v);
    false
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new("panic");
    if let Some(loc) = info.location() {
        line = line.text("file", loc.file().as_bytes()).dec("line", loc.line() as u64);
    }
    line.emit();
    serial::exit(STATUS_CRASH)
}

/// The precompiled `core` refers to the unwinding personality routine; with
/// `panic = "abort"` nothing ever unwinds, so nothing calls it. (The release
/// build's LTO drops the reference; the dev build needs the symbol.)
#[no_mangle]
extern "C" fn rust_eh_personality() {}
