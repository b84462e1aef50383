//! The probe's hands for `hostile`: volatile accesses to guest-physical
//! addresses (RAM shared with veil's device threads, and device registers),
//! a TSC deadline, small fixed-size text, and its own report lines.
//!
//! Everything here runs at CPL3 on identity-mapped user pages: an address
//! is its guest-physical address. Register accesses are plain `mov`s of the
//! register's width, which KVM decodes as MMIO exits.

use core::arch::asm;
use core::sync::atomic::{fence, Ordering};

// The helpers below take raw guest-physical addresses. Callers pass only
// addresses of probe-owned RAM below the identity map's end, or registers
// of devices found by discovery (virtio-mmio windows, ECAM, BARs): all
// identity-mapped at CPL3 (boot.rs maps 0-4 GiB and all RAM above).

pub fn rd8(a: u64) -> u8 {
    // SAFETY: see above; a mapped address of probe RAM or a register.
    unsafe { (a as *const u8).read_volatile() }
}
pub fn rd16(a: u64) -> u16 {
    // SAFETY: as rd8.
    unsafe { (a as *const u16).read_volatile() }
}
pub fn rd32(a: u64) -> u32 {
    // SAFETY: as rd8.
    unsafe { (a as *const u32).read_volatile() }
}
pub fn wr8(a: u64, v: u8) {
    // SAFETY: as rd8.
    unsafe { (a as *mut u8).write_volatile(v) }
}
pub fn wr16(a: u64, v: u16) {
    // SAFETY: as rd8.
    unsafe { (a as *mut u16).write_volatile(v) }
}
pub fn wr32(a: u64, v: u32) {
    // SAFETY: as rd8.
    unsafe { (a as *mut u32).write_volatile(v) }
}
/// RAM only (devices get 32-bit halves).
pub fn wr64(a: u64, v: u64) {
    // SAFETY: as rd8.
    unsafe { (a as *mut u64).write_volatile(v) }
}

/// Fill probe RAM `[a, a + len)` with `byte`.
pub fn fill(a: u64, len: u64, byte: u8) {
    for i in 0..len {
        wr8(a + i, byte);
    }
}

/// Everything written before is visible to the device threads (and the
/// compiler keeps it before what follows).
pub fn barrier() {
    fence(Ordering::SeqCst);
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc is allowed at CPL3 (boot.rs clears CR4.TSD).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    ((hi as u64) << 32) | lo as u64
}

/// TSC ticks to wait for a device to answer: ~3 s on this project's
/// 2.4 GHz machines, generous for a device thread that shares 2 CPUs with
/// the vCPU and other tests. Only a missing answer ever waits this long.
pub const ANSWER_TICKS: u64 = 8_000_000_000;

pub struct Deadline(u64);

impl Deadline {
    pub fn after(ticks: u64) -> Self {
        Deadline(rdtsc().saturating_add(ticks))
    }
    pub fn passed(&self) -> bool {
        rdtsc() > self.0
    }
}

/// A short text (device names, answers), cut at its capacity.
#[derive(Clone, Copy)]
pub struct Text {
    buf: [u8; 64],
    len: usize,
}

impl Text {
    pub const fn new() -> Self {
        Text { buf: [0; 64], len: 0 }
    }

    pub fn from(s: &str) -> Self {
        let mut t = Text::new();
        t.push(s);
        t
    }

    pub fn push_bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    pub fn push(&mut self, s: &str) -> &mut Self {
        self.push_bytes(s.as_bytes())
    }

    pub fn dec(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        self.push_bytes(crate::serial::digits(v, 10, &mut buf))
    }

    pub fn hex(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        self.push("0x").push_bytes(crate::serial::digits(v, 16, &mut buf))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

const COM1: u16 = 0x3F8;

/// One `PROBE hostile ...` line. Longer than serial::Line allows, because
/// a case line carries six fields; written to COM1 byte by byte, like
/// serial.rs does (no LSR polling).
pub struct Out {
    buf: [u8; 240],
    len: usize,
}

impl Out {
    pub fn new(topic: &str) -> Self {
        let mut o = Out { buf: [0; 240], len: 0 };
        o.put(b"PROBE");
        o.raw(b' ');
        o.put(b"hostile");
        if !topic.is_empty() {
            o.raw(b' ');
            o.put(topic.as_bytes());
        }
        o
    }

    /// One byte, leaving room for the newline.
    fn raw(&mut self, b: u8) {
        if self.len < self.buf.len() - 1 {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn put(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() - 1 {
                // Keep a line one line: no spaces or control bytes in values.
                self.buf[self.len] = match b {
                    b' ' => b'_',
                    0x21..=0x7E => b,
                    _ => b'?',
                };
                self.len += 1;
            }
        }
    }

    pub fn text(mut self, key: &str, v: &[u8]) -> Self {
        self.raw(b' ');
        self.put(key.as_bytes());
        self.put(b"=");
        self.put(v);
        self
    }

    pub fn str(self, key: &str, v: &str) -> Self {
        self.text(key, v.as_bytes())
    }

    pub fn dec(self, key: &str, v: u64) -> Self {
        let mut t = Text::new();
        t.dec(v);
        self.text(key, t.as_bytes())
    }

    pub fn hex(self, key: &str, v: u64) -> Self {
        let mut t = Text::new();
        t.hex(v);
        self.text(key, t.as_bytes())
    }

    pub fn emit(mut self) {
        self.buf[self.len] = b'\n';
        self.len += 1;
        for &b in &self.buf[..self.len] {
            // SAFETY: an `out` to COM1's THR; IOPL=3 and the TSS I/O bitmap
            // allow it at CPL3 (boot.rs).
            unsafe { asm!("out dx, al", in("dx") COM1, in("al") b, options(nomem, nostack, preserves_flags)) };
        }
    }
}
