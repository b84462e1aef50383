//! String port I/O: `rep ins*` and `rep outs*` reach veil as one exit of
//! `count` elements, and each element must act as its own access, as on
//! hardware. Each case compares a string access with the single accesses
//! it stands for.
//!
//! ```text
//! PROBE hostile pio case=<name> expect=<..> got=<..> result=ok|fail
//! ```
//!
//! Cases: `rep_insb_com1_lsr` (16 reads of COM1's line status: each is what
//! one `in` reads), `rep_outsb_com1_scratch` (3 writes to COM1's scratch
//! register: the last one stays), and on PCI machines `rep_insl_pci_config`
//! (2 reads of 00.0's ID through mechanism #1) and `rep_outsl_pci_address`
//! (2 writes to CONFIG_ADDRESS: the last one stays).

use super::io::{Out, Text};
use core::arch::asm;

const COM1_SCRATCH: u16 = 0x3FF;
const COM1_LSR: u16 = 0x3FD;
const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;
/// Bus 0, device 0, function 0, register 0 (vendor and device ID).
const HOST_BRIDGE_ID: u32 = 0x8000_0000;

// Port accesses at CPL3: IOPL=3 and the TSS I/O bitmap allow every port
// (boot.rs). The ports are veil's legacy devices; the string forms read
// and write only the probe's own local buffers, with DF clear (the ABI).

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: see above.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) };
    v
}

fn outb(port: u16, v: u8) {
    // SAFETY: see above.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: see above.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags)) };
    v
}

fn outl(port: u16, v: u32) {
    // SAFETY: see above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) };
}

fn rep_insb(port: u16, buf: &mut [u8]) {
    // SAFETY: see above; writes `buf.len()` bytes into `buf`.
    unsafe {
        asm!("rep insb", in("dx") port, inout("rdi") buf.as_mut_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack, preserves_flags))
    };
}

fn rep_outsb(port: u16, buf: &[u8]) {
    // SAFETY: see above; reads `buf.len()` bytes from `buf`.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") buf.as_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack, preserves_flags, readonly))
    };
}

fn rep_insl(port: u16, buf: &mut [u32]) {
    // SAFETY: see above; writes `buf.len()` dwords into `buf`.
    unsafe {
        asm!("rep insd", in("dx") port, inout("rdi") buf.as_mut_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack, preserves_flags))
    };
}

fn rep_outsl(port: u16, buf: &[u32]) {
    // SAFETY: see above; reads `buf.len()` dwords from `buf`.
    unsafe {
        asm!("rep outsd", in("dx") port, inout("rsi") buf.as_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack, preserves_flags, readonly))
    };
}

fn report(case: &str, expect: u64, got: &Text, ok: bool) -> bool {
    let mut e = Text::new();
    e.hex(expect);
    Out::new("pio")
        .str("case", case)
        .text("expect", e.as_bytes())
        .text("got", got.as_bytes())
        .str("result", if ok { "ok" } else { "fail" })
        .emit();
    ok
}

/// `got` as hex values separated by `,` (as many as fit).
fn values(got: impl Iterator<Item = u64>) -> Text {
    let mut t = Text::new();
    for (i, v) in got.enumerate() {
        if i > 0 {
            t.push(",");
        }
        t.hex(v);
    }
    t
}

fn insb_lsr() -> bool {
    let single = inb(COM1_LSR);
    let mut buf = [0x5Au8; 16];
    rep_insb(COM1_LSR, &mut buf);
    let ok = single != 0 && buf.iter().all(|&b| b == single);
    report(
        "rep_insb_com1_lsr",
        single as u64,
        &values(buf.iter().map(|&b| b as u64)),
        ok,
    )
}

fn outsb_scratch() -> bool {
    outb(COM1_SCRATCH, 0x11);
    rep_outsb(COM1_SCRATCH, &[0x22, 0x33, 0x44]);
    let got = inb(COM1_SCRATCH);
    report(
        "rep_outsb_com1_scratch",
        0x44,
        &values([got as u64].into_iter()),
        got == 0x44,
    )
}

fn insl_config() -> bool {
    outl(CONFIG_ADDRESS, HOST_BRIDGE_ID);
    let single = inl(CONFIG_DATA);
    let mut buf = [0u32; 2];
    rep_insl(CONFIG_DATA, &mut buf);
    let ok = buf == [single, single];
    report(
        "rep_insl_pci_config",
        single as u64,
        &values(buf.iter().map(|&v| v as u64)),
        ok,
    )
}

fn outsl_address() -> bool {
    outl(CONFIG_ADDRESS, 0);
    let last = HOST_BRIDGE_ID | 8;
    rep_outsl(CONFIG_ADDRESS, &[HOST_BRIDGE_ID | 4, last]);
    let got = inl(CONFIG_ADDRESS);
    report(
        "rep_outsl_pci_address",
        last as u64,
        &values([got as u64].into_iter()),
        got == last,
    )
}

/// Runs every case that applies; true when all passed.
pub fn run() -> bool {
    let mut ok = insb_lsr();
    ok &= outsb_scratch();
    // Mechanism #1 exists when the machine has PCI: its host bridge answers.
    outl(CONFIG_ADDRESS, HOST_BRIDGE_ID);
    if inl(CONFIG_DATA) == u32::MAX {
        Out::new("pio")
            .str("skipped", "pci_cases")
            .str("reason", "no_pci")
            .emit();
    } else {
        ok &= insl_config();
        ok &= outsl_address();
    }
    ok
}
