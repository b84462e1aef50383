//! Touch and verify every page of e820 RAM the probe does not itself use.
//!
//! Pass 1 writes every 8-byte word of every page with a value derived from
//! its address; pass 2 reads them all back. Because the pattern is a
//! bijection of the address, two guest pages that alias one host page (or a
//! page veil did not map) show up as mismatches.

use crate::bootinfo::{BootInfo, E820_RAM};

const PAGE: u64 = 4096;
/// The first MiB (boot_params, command line, veil's tables, BIOS area).
const LOW_LIMIT: u64 = 1 << 20;

pub struct Report {
    pub pages: u64,
    pub bad_pages: u64,
    /// First mismatching address (valid when bad_pages > 0).
    pub first_bad: u64,
    /// RAM bytes above the probe's identity map, which it cannot test.
    pub unmapped: u64,
}

fn pattern(addr: u64) -> u64 {
    // Odd multiplier: a bijection on u64, so no two addresses share a value.
    addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED_5EED_5EED_5EED
}

/// Call `f` for each testable page: e820 RAM above 1 MiB, below
/// `mapped_end`, outside every range in `skip`.
fn for_each_page(info: &BootInfo, skip: &[(u64, u64)], mapped_end: u64, mut f: impl FnMut(u64)) {
    for e in info.e820().iter().filter(|e| e.kind == E820_RAM) {
        let start = e.addr.max(LOW_LIMIT).next_multiple_of(PAGE);
        let end = (e.end() & !(PAGE - 1)).min(mapped_end);
        let mut page = start;
        while page < end {
            match skip.iter().find(|&&(s, t)| page < t && s < page + PAGE) {
                // Jump past the skipped range in one step.
                Some(&(_, t)) => page = t.next_multiple_of(PAGE),
                None => {
                    f(page);
                    page += PAGE;
                }
            }
        }
    }
}

pub fn run(info: &BootInfo, skip: &[(u64, u64)], mapped_end: u64) -> Report {
    let mut report = Report {
        pages: 0,
        bad_pages: 0,
        first_bad: 0,
        unmapped: 0,
    };
    for e in info.e820().iter().filter(|e| e.kind == E820_RAM) {
        report.unmapped += e.end().saturating_sub(e.addr.max(mapped_end));
    }

    for_each_page(info, skip, mapped_end, |page| {
        let p = page as *mut u64;
        for i in 0..PAGE / 8 {
            // SAFETY: an identity-mapped RAM page that nothing else uses.
            unsafe { p.add(i as usize).write_volatile(pattern(page + 8 * i)) };
        }
        report.pages += 1;
    });

    for_each_page(info, skip, mapped_end, |page| {
        let p = page as *const u64;
        let mut bad = None;
        for i in 0..PAGE / 8 {
            let addr = page + 8 * i;
            // SAFETY: as above.
            if unsafe { p.add(i as usize).read_volatile() } != pattern(addr) && bad.is_none() {
                bad = Some(addr);
            }
        }
        if let Some(addr) = bad {
            if report.bad_pages == 0 {
                report.first_bad = addr;
            }
            report.bad_pages += 1;
        }
    });
    report
}
