//! Ultracalls from the probe (docs/ultracall.md): `in eax, 0xF5` with the
//! function in EAX and arguments in RBX, RCX, RDX, RSI. Works at CPL3: the
//! TSS I/O bitmap (boot.rs) allows every port.

use core::arch::asm;

pub const QUERY: u32 = 1;
pub const ESM: u32 = 2;
pub const SHARE: u32 = 3;
pub const UNSHARE: u32 = 4;

pub const OK: u32 = 0;
pub const UNKNOWN_FUNCTION: u32 = 1;
pub const UNALIGNED: u32 = 2;
pub const ZERO_LENGTH: u32 = 3;
pub const OUT_OF_RANGE: u32 = 4;
pub const NOT_SECURE: u32 = 5;
pub const ALREADY_SECURE: u32 = 6;
/// veil could not change its view of the pages; no probe call provokes it.
#[allow(dead_code)]
pub const HOST_ERROR: u32 = 7;

pub const PAGE_SIZE: u64 = 4096;

/// One call: the status (EAX) and RBX, RCX, RDX, RSI afterwards.
pub fn call(function: u32, args: [u64; 4]) -> (u32, [u64; 4]) {
    let [mut b, mut c, mut d, mut si] = args;
    let mut a = function;
    // SAFETY: port I/O only; veil changes no memory of the probe's, only
    // these registers. LLVM reserves RBX, so it is swapped through another
    // register around the `in`.
    unsafe {
        asm!(
            "xchg {b}, rbx",
            "in eax, 0xF5",
            "xchg {b}, rbx",
            b = inout(reg) b,
            inout("eax") a,
            inout("rcx") c,
            inout("rdx") d,
            inout("rsi") si,
            options(nostack, preserves_flags),
        );
    }
    (a, [b, c, d, si])
}

/// QUERY's answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub secure: bool,
    pub private_pages: u64,
    pub shared_pages: u64,
    pub version: u64,
}

/// QUERY: the state, or the status if the call failed.
pub fn query() -> Result<State, u32> {
    match call(QUERY, [0; 4]) {
        (OK, [secure, private_pages, shared_pages, version]) => Ok(State {
            secure: secure != 0,
            private_pages,
            shared_pages,
            version,
        }),
        (status, _) => Err(status),
    }
}

/// Whether the VMM answers ultracalls at all: QUERY must come back with one
/// of the ABI's statuses. Another VMM (QEMU) has nothing at port 0xF5 and
/// reads back all-ones or similar; then this prints `PROBE ultracall
/// unsupported port=0xf5 query=0x..` once per caller and says no.
pub fn require() -> bool {
    let (status, _) = call(QUERY, [0; 4]);
    if status <= HOST_ERROR {
        return true;
    }
    crate::serial::Line::new("ultracall")
        .word("unsupported")
        .hex("port", 0xF5)
        .hex("query", status as u64)
        .emit();
    false
}

/// ESM: all RAM private but `npages` pages from `gpa`. Returns the status.
pub fn esm(gpa: u64, npages: u64) -> u32 {
    call(ESM, [gpa, npages, 0, 0]).0
}

pub fn share(gpa: u64, npages: u64) -> u32 {
    call(SHARE, [gpa, npages, 0, 0]).0
}

pub fn unshare(gpa: u64, npages: u64) -> u32 {
    call(UNSHARE, [gpa, npages, 0, 0]).0
}

/// Accesses to the port that are not calls (veil counts and ignores them):
/// what a 1-byte and a 2-byte `in` read, after a 4-byte `out`.
pub fn bad_port_accesses() -> (u8, u16) {
    let narrow: u8;
    let half: u16;
    // SAFETY: port I/O only, which veil ignores but for the data it reads.
    unsafe {
        asm!("out 0xF5, eax", in("eax") QUERY, options(nomem, nostack, preserves_flags));
        asm!("in al, 0xF5", out("al") narrow, options(nomem, nostack, preserves_flags));
        asm!("in ax, 0xF5", out("ax") half, options(nomem, nostack, preserves_flags));
    }
    (narrow, half)
}
