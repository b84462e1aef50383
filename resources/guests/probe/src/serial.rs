//! Output on COM1 and the end of the VM, from CPL3 (IOPL=3).
//!
//! Every port access is an exit to the VMM (~60–110 µs on veil's KVM), so
//! bytes go straight to THR without polling LSR, and lines stay short.
//! Lines read `PROBE <topic> key=value ...`.

use core::arch::asm;

const COM1: u16 = 0x3F8;
const DEBUG_EXIT: u16 = 0xF4;

fn putb(b: u8) {
    // SAFETY: an `out` to COM1's THR; IOPL=3 allows it at CPL3.
    unsafe { asm!("out dx, al", in("dx") COM1, in("al") b, options(nomem, nostack, preserves_flags)) }
}

/// End the VM: veil exits with `status & 0xFF`.
pub fn exit(status: u32) -> ! {
    // SAFETY: a 4-byte `out` to the debug-exit port.
    unsafe { asm!("out dx, eax", in("dx") DEBUG_EXIT, in("eax") status, options(nomem, nostack, preserves_flags)) }
    // veil does not come back; should it, do nothing (no `hlt` at CPL3).
    loop {
        core::hint::spin_loop();
    }
}

/// One output line, built in a buffer and written with `emit`. Anything
/// beyond the buffer is cut.
/// `v` in base `radix` (10 or 16, lower-case), written into `buf`.
pub fn digits(mut v: u64, radix: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = buf.len();
    loop {
        n -= 1;
        buf[n] = b"0123456789abcdef"[(v % radix) as usize];
        v /= radix;
        if v == 0 {
            return &buf[n..];
        }
    }
}

pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// `PROBE <topic>`
    pub fn new(topic: &str) -> Self {
        let mut l = Line { buf: [0; 256], len: 0 };
        l.put(b"PROBE ");
        l.put(topic.as_bytes());
        l
    }

    fn put(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn key(&mut self, key: &str) {
        self.put(b" ");
        self.put(key.as_bytes());
        self.put(b"=");
    }

    /// ` word` (a flag such as `ok`).
    pub fn word(mut self, w: &str) -> Self {
        self.put(b" ");
        self.put(w.as_bytes());
        self
    }

    /// ` key=0x<hex>`
    pub fn hex(mut self, key: &str, v: u64) -> Self {
        self.key(key);
        self.put(b"0x");
        let mut buf = [0u8; 20];
        self.put(digits(v, 16, &mut buf));
        self
    }

    /// ` key=<decimal>`
    pub fn dec(mut self, key: &str, v: u64) -> Self {
        self.key(key);
        let mut buf = [0u8; 20];
        self.put(digits(v, 10, &mut buf));
        self
    }

    /// ` key=<text>`; bytes outside printable ASCII become `?`, spaces `_`.
    pub fn text(mut self, key: &str, v: &[u8]) -> Self {
        self.key(key);
        for &b in v.iter().take(40) {
            let c = match b {
                b' ' => b'_',
                0x21..=0x7E => b,
                _ => b'?',
            };
            self.put(&[c]);
        }
        self
    }

    /// Write the line and a newline to COM1.
    pub fn emit(mut self) {
        self.put(b"\n");
        // Keep the newline even when the line was cut.
        self.buf[self.len - 1] = b'\n';
        for &b in &self.buf[..self.len] {
            putb(b);
        }
    }
}
