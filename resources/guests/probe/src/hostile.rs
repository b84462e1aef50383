//! `probe.mode=hostile`: a guest driver that breaks the virtio rules on
//! purpose and checks that each broken request gets the answer the virtio
//! 1.2 specification (or, where it leaves a choice, veil's documented one)
//! requires, and that the device keeps serving the correct request that
//! always follows.
//!
//! Devices: every virtio-mmio window the command line announces
//! (`virtio_mmio.device=`) and every modern virtio function on PCI bus 0.
//! Block devices get every case; net and rng the ones that apply to them;
//! other types are listed and skipped. The probe drives each device with
//! its own split-virtqueue driver (hostile/vq.rs) over its own register
//! code (hostile/transport.rs), polling the used ring with a TSC deadline.
//!
//! Output, one line per case:
//!
//! ```text
//! PROBE hostile case=<name> transport=<mmio|pci> dev=<blk0..> expect=<..> got=<..> result=ok|fail
//! ...
//! PROBE hostile done cases=<n> failed=<m>
//! ```
//!
//! First, before any device, the string port I/O cases (hostile/pio.rs).
//!
//! `expect` lists the acceptable answers separated by `|`. Answers: `ok`,
//! `ioerr`, `unsupp` (the block status byte), `len0` (returned with used
//! length 0 and no status), `len=N`, `not_done` (no used entry within the
//! deadline). `got` is the answer, followed by `,next=<why>` when the good
//! request after it failed; a case passes only if both are right.
//!
//! The probe's RAM: two 128 KiB virtqueue areas per device (hostile/vq.rs)
//! from the first MiB boundary above the probe image (at least 4 MiB). "Outside RAM" is
//! 64 GiB (or 1 GiB above the end of RAM, if higher): no RAM and no device
//! there. "The end of RAM" is the end of the highest e820 RAM entry that no
//! other e820 entry continues.

mod blk;
mod common;
mod io;
mod net;
mod pio;
mod rng;
mod transport;
mod vq;

use crate::boot;
use crate::bootinfo::{BootInfo, E820_RAM};
use io::{Out, Text};
use transport::{Mmio, Pci, Transport};
use vq::{Vq, AREA};

/// virtio feature bits the probe cares about (§6).
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_VERSION_1: u64 = 1 << 32;

/// Most virtio-mmio windows looked at.
const MAX_MMIO: usize = 32;

/// What a device did with a request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// No used entry within the deadline.
    NotDone,
    /// Used with length 0, status byte (if any) untouched.
    Len0,
    /// Block: the status byte the device wrote, and the used length.
    Status(u8, u32),
    /// Other devices: the used length (non-zero).
    Len(u32),
}

/// Block status values (§5.2.6).
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Sets of acceptable answers.
pub mod accept {
    pub const LEN0: u8 = 1;
    pub const IOERR: u8 = 2;
    pub const UNSUPP: u8 = 4;
}

impl Answer {
    pub fn text(&self) -> Text {
        let mut t = Text::new();
        match *self {
            Answer::NotDone => t.push("not_done"),
            Answer::Len0 => t.push("len0"),
            Answer::Status(S_OK, _) => t.push("ok"),
            Answer::Status(S_IOERR, _) => t.push("ioerr"),
            Answer::Status(S_UNSUPP, _) => t.push("unsupp"),
            Answer::Status(s, _) => t.push("status=").hex(s as u64),
            Answer::Len(n) => t.push("len=").dec(n as u64),
        };
        t
    }

    pub fn is(&self, set: u8) -> bool {
        match *self {
            Answer::Len0 => set & accept::LEN0 != 0,
            Answer::Status(S_IOERR, _) => set & accept::IOERR != 0,
            Answer::Status(S_UNSUPP, _) => set & accept::UNSUPP != 0,
            _ => false,
        }
    }
}

/// What the probe knows of each kind of device.
pub enum Kind {
    Blk { capacity: u64, ro: bool },
    Net { tag: u32 },
    Rng,
}

/// One device under test.
pub struct Dev<'a> {
    pub t: &'a mut dyn Transport,
    pub name: Text,
    pub vqs: [Vq; 2],
    /// Queues the probe drives: 1, or 2 for net (receive, transmit).
    pub nq: usize,
    /// Features the probe accepts when offered.
    pub want: u64,
    /// Offered at the last negotiation, and accepted.
    pub offered: u64,
    pub features: u64,
    pub kind: Kind,
}

impl Dev<'_> {
    /// One correct request; Err says what went wrong.
    pub fn good(&mut self) -> Result<(), &'static str> {
        match self.kind {
            Kind::Blk { .. } => blk::good(self),
            Kind::Net { .. } => net::good(self),
            Kind::Rng => rng::good(self),
        }
    }
}

pub struct Ctx {
    /// An address with neither RAM nor a device behind it.
    pub outside: u64,
    /// The end of RAM (see the module doc).
    pub ram_end: u64,
    pub cases: u64,
    pub failed: u64,
    next_area: u64,
    areas_end: u64,
}

impl Ctx {
    /// A fresh virtqueue area, or None when RAM runs out.
    fn area(&mut self) -> Option<u64> {
        let a = self.next_area;
        if a + AREA > self.areas_end {
            return None;
        }
        self.next_area += AREA;
        Some(a)
    }

    pub fn report(&mut self, d: &Dev, case: &str, expect: impl AsRef<[u8]>, got: &Text, ok: bool) {
        self.cases += 1;
        if !ok {
            self.failed += 1;
        }
        Out::new("")
            .str("case", case)
            .str("transport", d.t.kind())
            .text("dev", d.name.as_bytes())
            .text("expect", expect.as_ref())
            .text("got", got.as_bytes())
            .str("result", if ok { "ok" } else { "fail" })
            .emit();
    }

    /// A bad request answered `answer`: check it, send a good request,
    /// report both.
    pub fn judge(&mut self, d: &mut Dev, case: &str, expect: &str, set: u8, answer: Answer) {
        let next = d.good();
        let mut got = answer.text();
        if let Err(why) = next {
            got.push(",next=").push(why);
        }
        self.report(d, case, expect, &got, answer.is(set) && next.is_ok());
    }

    /// A case that does not apply (a feature the device does not offer).
    pub fn skip(&self, d: &Dev, case: &str, why: &str) {
        Out::new("skip")
            .str("case", case)
            .str("transport", d.t.kind())
            .text("dev", d.name.as_bytes())
            .str("reason", why)
            .emit();
    }
}

/// The end of RAM and an address outside everything.
fn memory_facts(info: &BootInfo) -> (u64, u64) {
    let e820 = info.e820();
    let mut ram_end = 0;
    let mut top = 0;
    for e in e820.iter().filter(|e| e.kind == E820_RAM) {
        top = top.max(e.end());
        let continued = e820.iter().any(|o| o.addr <= e.end() && e.end() < o.end());
        if !continued {
            ram_end = ram_end.max(e.end());
        }
    }
    const GIB: u64 = 1 << 30;
    let outside = (64 * GIB).max(top.next_multiple_of(GIB) + GIB);
    (ram_end, outside)
}

/// Where the virtqueue areas go: RAM above the probe image, inside the e820
/// RAM entry that holds it.
fn areas(info: &BootInfo) -> (u64, u64) {
    let start = boot::image_range().1.next_multiple_of(1 << 20).max(4 << 20);
    let end = info
        .e820()
        .iter()
        .find(|e| e.kind == E820_RAM && e.addr <= start && start < e.end())
        .map_or(start, |e| e.end().min(boot::mapped_end()));
    (start, end)
}

pub fn run(info: &BootInfo) -> bool {
    let (ram_end, outside) = memory_facts(info);
    let (next_area, areas_end) = areas(info);
    let mut ctx = Ctx {
        outside,
        ram_end,
        cases: 0,
        failed: 0,
        next_area,
        areas_end,
    };
    // Before any device: string port I/O on the legacy ports.
    let pio_ok = pio::run();
    Out::new("memory")
        .hex("ram_end", ram_end)
        .hex("outside", outside)
        .hex("areas", next_area)
        .emit();

    let mut counts = [0u64; 8];
    let mut devices = 0;

    let mut windows = [0u64; MAX_MMIO];
    let n = transport::mmio_windows(info.cmdline, &mut windows);
    for &base in &windows[..n] {
        if let Some(mut m) = Mmio::probe(base) {
            test_device(&mut ctx, &mut m, &mut counts);
            devices += 1;
        }
    }
    for dev in 1..32 {
        if let Some(mut p) = Pci::probe(dev) {
            test_device(&mut ctx, &mut p, &mut counts);
            devices += 1;
        }
    }

    Out::new("done")
        .dec("devices", devices)
        .dec("cases", ctx.cases)
        .dec("failed", ctx.failed)
        .emit();
    pio_ok && ctx.cases > 0 && ctx.failed == 0
}

fn test_device(ctx: &mut Ctx, t: &mut dyn Transport, counts: &mut [u64; 8]) {
    let ty = t.device_type();
    let count = &mut counts[(ty as usize).min(7)];
    let name = transport::device_name(ty, *count);
    *count += 1;
    Out::new("device")
        .str("transport", t.kind())
        .text("dev", name.as_bytes())
        .hex("at", t.location())
        .dec("type", ty as u64)
        .emit();
    let (kind, nq, want) = match ty {
        2 => (
            Kind::Blk { capacity: 0, ro: false },
            1,
            F_VERSION_1 | F_INDIRECT_DESC | blk::F_RO,
        ),
        1 => (Kind::Net { tag: 0 }, 2, F_VERSION_1),
        4 => (Kind::Rng, 1, F_VERSION_1),
        _ => {
            Out::new("skip")
                .str("transport", t.kind())
                .text("dev", name.as_bytes())
                .str("reason", "no_cases_for_this_type")
                .emit();
            return;
        }
    };
    let (Some(a0), Some(a1)) = (ctx.area(), ctx.area()) else {
        Out::new("error").str("reason", "no_ram_for_queues").emit();
        ctx.cases += 1;
        ctx.failed += 1;
        return;
    };
    let mut d = Dev {
        t,
        name,
        vqs: [Vq::new(0, a0), Vq::new(1, a1)],
        nq,
        want,
        offered: 0,
        features: 0,
        kind,
    };
    common::run(ctx, &mut d);
}
