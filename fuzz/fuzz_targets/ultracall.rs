//! Arbitrary ultracall register sets, through the port gate's call and
//! KVM_HC_MAP_GPA_RANGE's decoding, on a SharedPages map; the page state
//! is checked against a model after each call.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Instant;
use veil::vmm::ultracall::{Status, UltracallGate};
use veil::vmm::HostViewProtection;
use veil_devices::dma::{SharedPages, PAGE_SIZE};
use veil_fuzz::Input;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Two RAM ranges with a hole between them, 64 pages in all.
const RAM: [(u64, u64); 2] = [(0, 32 * PAGE_SIZE), (64 * PAGE_SIZE, 32 * PAGE_SIZE)];

fn page_of(gpa: u64) -> Option<usize> {
    let mut base = 0;
    for (start, len) in RAM {
        if gpa >= start && gpa < start + len {
            return Some(base + ((gpa - start) / PAGE_SIZE) as usize);
        }
        base += (len / PAGE_SIZE) as usize;
    }
    None
}

/// A guest-physical address: mostly near RAM, sometimes anything.
fn gpa(input: &mut Input) -> u64 {
    let b = input.u8();
    if b & 0x80 != 0 {
        input.u64()
    } else {
        u64::from(b) * PAGE_SIZE + if b & 0x40 != 0 { u64::from(input.u8()) } else { 0 }
    }
}

fn npages(input: &mut Input) -> u64 {
    let b = input.u8();
    if b & 0x80 != 0 {
        input.u64()
    } else {
        u64::from(b & 0x7f)
    }
}

fn bitmap(pages: &SharedPages) -> Vec<bool> {
    RAM.iter()
        .flat_map(|&(start, len)| (start..start + len).step_by(PAGE_SIZE as usize))
        .map(|g| pages.allows(g, PAGE_SIZE))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let pages = Arc::new(SharedPages::new(&RAM));
    // The host view covers all of RAM, so host changes succeed.
    let view = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (96 * PAGE_SIZE) as usize)]).unwrap();
    let gate = UltracallGate::new(pages.clone(), HostViewProtection::new(view), Instant::now());
    while !input.is_empty() {
        let op = input.u8();
        let (a, n) = (gpa(&mut input), npages(&mut input));
        let old = bitmap(&pages);
        let was_secure = pages.counts().secure;
        // (function, status) of the call as the gate saw it.
        let (function, ok) = if op & 8 != 0 {
            let attrs = if op & 16 != 0 {
                input.u64()
            } else {
                u64::from(op >> 5 & 1) << 4
            };
            let nr = if op & 0xc0 == 0xc0 { u64::from(input.u8()) } else { 12 };
            let ret = gate.hypercall(nr, [a, n, attrs, input.u64(), 0, 0]);
            let function = if attrs & (1 << 4) != 0 { 4 } else { 3 };
            (function, ret == 0)
        } else {
            let function = u32::from(op & 7);
            let r = gate.call(function, [a, n, input.u64(), input.u64()]);
            assert_eq!(r.query.is_some(), r.status == Status::Ok && function == 1);
            (function, r.status == Status::Ok)
        };
        let new = bitmap(&pages);
        let c = pages.counts();
        let in_range = |p: usize| (0..n.min(64)).any(|i| a.checked_add(i * PAGE_SIZE).and_then(page_of) == Some(p));
        if !ok {
            assert_eq!(old, new, "a failed call ({op:#x} {a:#x}+{n}) changed pages");
            assert_eq!(c.secure, was_secure);
        } else {
            match function {
                1 => assert_eq!(old, new),
                2 => {
                    assert!(!was_secure && c.secure);
                    for (p, &s) in new.iter().enumerate() {
                        assert_eq!(s, in_range(p), "ESM {a:#x}+{n}: page {p}");
                    }
                }
                3 | 4 => {
                    assert!(was_secure, "a conversion succeeded before ESM");
                    assert!(n > 0 && n <= 64 && a.is_multiple_of(PAGE_SIZE));
                    for (p, &s) in new.iter().enumerate() {
                        let want = if in_range(p) { function == 3 } else { old[p] };
                        assert_eq!(s, want, "{function} {a:#x}+{n}: page {p}");
                    }
                }
                f => panic!("unknown function {f} succeeded"),
            }
        }
        // Counts add up and match the pages.
        assert_eq!(c.private_pages + c.shared_pages, 64);
        if c.secure {
            assert_eq!(c.shared_pages, new.iter().filter(|&&s| s).count() as u64);
        } else {
            assert_eq!(c.private_pages, 0);
            assert!(new.iter().all(|&s| s));
        }
        // QUERY reports the same.
        let answer = gate.call(1, [0; 4]).query.expect("QUERY answers");
        assert_eq!(
            (answer.secure, answer.private_pages, answer.shared_pages),
            (c.secure, c.private_pages, c.shared_pages)
        );
    }
});
