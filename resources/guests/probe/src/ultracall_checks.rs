//! `probe.mode=ultracall`: every ultracall of docs/ultracall.md, good and
//! bad, each followed by a QUERY that checks what changed (for a refused
//! call: nothing). One line per check:
//! `PROBE ultracall <call> status|state|<field> ok` or `... FAIL expected=.. got=..`,
//! then `PROBE ultracall verdict=pass|fail checks=<n> failed=<n>`.

use crate::boot::Racy;
use crate::bootinfo::{BootInfo, E820_RAM};
use crate::serial::Line;
use crate::ultracall::{self as uc, State, PAGE_SIZE};

/// Pages the probe keeps shared at ESM.
const KEPT_PAGES: u64 = 16;
/// Pages it shares and unshares after ESM, just above the kept ones.
const EXTRA_PAGES: u64 = 4;

#[repr(C, align(4096))]
struct Window([u8; ((KEPT_PAGES + EXTRA_PAGES) * PAGE_SIZE) as usize]);

/// Probe-owned RAM for the shared pages; nothing reads or writes it.
#[link_section = ".noinit.ultracall"]
static WINDOW: Racy<Window> = Racy::new(Window([0; ((KEPT_PAGES + EXTRA_PAGES) * PAGE_SIZE) as usize]));

/// Above any RAM below 4 GiB: veil's MMIO hole starts at 3 GiB.
const NOT_RAM: u64 = 0xC000_0000;
const WRAPPING: u64 = 0u64.wrapping_sub(PAGE_SIZE);
/// With this many pages the length overflows u64.
const OVERFLOWING_PAGES: u64 = u64::MAX / PAGE_SIZE + 2;

#[derive(Default)]
struct Checks {
    run: u64,
    failed: u64,
}

impl Checks {
    fn expect(&mut self, call: &str, what: &str, expected: u64, got: u64) {
        self.run += 1;
        let line = Line::new("ultracall").word(call).word(what);
        if expected == got {
            line.word("ok").emit();
        } else {
            self.failed += 1;
            line.word("FAIL").hex("expected", expected).hex("got", got).emit();
        }
    }

    /// QUERY now answers `expected`.
    fn state(&mut self, call: &str, expected: State) {
        match uc::query() {
            Ok(s) if s == expected => {
                self.run += 1;
                Line::new("ultracall").word(call).word("state").word("ok").emit();
            }
            Ok(s) => {
                self.expect(call, "secure", expected.secure as u64, s.secure as u64);
                self.expect(call, "private", expected.private_pages, s.private_pages);
                self.expect(call, "shared", expected.shared_pages, s.shared_pages);
                self.expect(call, "version", expected.version, s.version);
            }
            Err(status) => self.expect(call, "query_status", uc::OK as u64, status as u64),
        }
    }

    /// `status` is what `call` answered; QUERY must still answer `unchanged`.
    fn refused(&mut self, call: &str, expected: u32, status: u32, unchanged: State) {
        self.expect(call, "status", expected as u64, status as u64);
        self.state(call, unchanged);
    }
}

/// Pages of e820 RAM; veil's own count includes the reserved low pages.
fn e820_ram_pages(info: &BootInfo) -> u64 {
    info.e820()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.end() / PAGE_SIZE - e.addr.div_ceil(PAGE_SIZE))
        .sum()
}

/// The end of the RAM entry below 4 GiB that ends highest.
fn low_ram_end(info: &BootInfo) -> u64 {
    info.e820()
        .iter()
        .filter(|e| e.kind == E820_RAM && e.end() <= NOT_RAM)
        .map(|e| e.end() & !(PAGE_SIZE - 1))
        .max()
        .unwrap_or(0)
}

pub fn run(info: &BootInfo) -> bool {
    if !uc::require() {
        return false;
    }
    let mut c = Checks::default();
    // (a) An ordinary VM: everything shared.
    let ordinary = match uc::query() {
        Ok(s) => s,
        Err(status) => {
            c.expect("query", "status", uc::OK as u64, status as u64);
            return false;
        }
    };
    let total = ordinary.shared_pages;
    Line::new("ultracall")
        .word("query")
        .dec("secure", ordinary.secure as u64)
        .dec("private", ordinary.private_pages)
        .dec("shared", total)
        .dec("version", ordinary.version)
        .emit();
    c.expect("query", "secure", 0, ordinary.secure as u64);
    c.expect("query", "private", 0, ordinary.private_pages);
    c.expect("query", "version", 1, ordinary.version);
    let e820 = e820_ram_pages(info);
    c.expect("query", "shared_covers_e820", 1, (total >= e820 && e820 > 0) as u64);

    // (b) Every bad call while ordinary.
    for (name, f) in [("unknown_0", 0), ("unknown_5", 5), ("unknown_ffffffff", u32::MAX)] {
        let (status, _) = uc::call(f, [0x10_0000, 1, 0, 0]);
        c.refused(name, uc::UNKNOWN_FUNCTION, status, ordinary);
    }
    let window = WINDOW.get() as u64;
    let ram_end = low_ram_end(info);
    c.refused("share_before_esm", uc::NOT_SECURE, uc::share(window, 1), ordinary);
    c.refused("unshare_before_esm", uc::NOT_SECURE, uc::unshare(window, 1), ordinary);
    let bad_esms = [
        ("esm_unaligned", window + 0x800, KEPT_PAGES, uc::UNALIGNED),
        ("esm_unaligned_empty", window + 8, 0, uc::UNALIGNED),
        ("esm_outside_ram", NOT_RAM, 1, uc::OUT_OF_RANGE),
        ("esm_across_ram_end", ram_end - PAGE_SIZE, 2, uc::OUT_OF_RANGE),
        ("esm_wrapping", WRAPPING, 2, uc::OUT_OF_RANGE),
        ("esm_npages_overflow", window, OVERFLOWING_PAGES, uc::OUT_OF_RANGE),
    ];
    for (name, gpa, npages, expected) in bad_esms {
        c.refused(name, expected, uc::esm(gpa, npages), ordinary);
    }
    let (narrow, half) = uc::bad_port_accesses();
    c.expect("bad_port_in8", "data", 0xff, narrow as u64);
    c.expect("bad_port_in16", "data", 0xffff, half as u64);
    c.state("bad_port_accesses", ordinary);

    // (c) Secure, keeping the window's first pages shared.
    let secure = |shared: u64| State {
        secure: true,
        private_pages: total - shared,
        shared_pages: shared,
        version: 1,
    };
    c.expect("esm", "status", uc::OK as u64, uc::esm(window, KEPT_PAGES) as u64);
    c.state("esm", secure(KEPT_PAGES));
    let kept = secure(KEPT_PAGES);
    c.refused("esm_again", uc::ALREADY_SECURE, uc::esm(window, KEPT_PAGES), kept);
    let extra = window + KEPT_PAGES * PAGE_SIZE;
    let bad_conversions = [
        ("zero_length", extra, 0, uc::ZERO_LENGTH),
        ("unaligned", extra + 0x10, 1, uc::UNALIGNED),
        ("outside_ram", NOT_RAM, 1, uc::OUT_OF_RANGE),
        ("across_ram_end", ram_end - PAGE_SIZE, 2, uc::OUT_OF_RANGE),
        ("wrapping", WRAPPING, 2, uc::OUT_OF_RANGE),
        ("npages_overflow", extra, OVERFLOWING_PAGES, uc::OUT_OF_RANGE),
    ];
    for (what, gpa, npages, expected) in bad_conversions {
        for (call, f) in [("share", uc::SHARE), ("unshare", uc::UNSHARE)] {
            let mut name = [0u8; 32];
            let name = join(&mut name, call, what);
            c.refused(name, expected, uc::call(f, [gpa, npages, 0, 0]).0, kept);
        }
    }
    c.expect("share", "status", uc::OK as u64, uc::share(extra, EXTRA_PAGES) as u64);
    c.state("share", secure(KEPT_PAGES + EXTRA_PAGES));
    c.expect(
        "share_again",
        "status",
        uc::OK as u64,
        uc::share(extra, EXTRA_PAGES) as u64,
    );
    c.state("share_again", secure(KEPT_PAGES + EXTRA_PAGES));
    c.expect(
        "unshare",
        "status",
        uc::OK as u64,
        uc::unshare(extra, EXTRA_PAGES) as u64,
    );
    c.state("unshare", kept);
    c.expect(
        "unshare_again",
        "status",
        uc::OK as u64,
        uc::unshare(extra, EXTRA_PAGES) as u64,
    );
    c.state("unshare_again", kept);

    let pass = c.failed == 0;
    Line::new("ultracall")
        .text("verdict", if pass { b"pass" } else { b"fail" })
        .dec("checks", c.run)
        .dec("failed", c.failed)
        .emit();
    pass
}

/// `a` + "_" + `b` in `buf` (cut to fit).
fn join<'a>(buf: &'a mut [u8; 32], a: &str, b: &str) -> &'a str {
    let mut n = 0;
    for &byte in a.as_bytes().iter().chain(b"_").chain(b.as_bytes()) {
        if n < buf.len() {
            buf[n] = byte;
            n += 1;
        }
    }
    core::str::from_utf8(&buf[..n]).unwrap_or("?")
}
