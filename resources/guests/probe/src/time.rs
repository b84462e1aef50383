//! Time at CPL3: the TSC, and its rate measured against the PIT.
//!
//! CPUID cannot tell the TSC rate here (at CPL3 it reports the host CPU),
//! so `tsc_hz` counts TSC ticks across PIT channel 2 one-shots of ~20 ms,
//! polling port 0x61 (bit 5 = OUT2) for the end. Most measurements agree
//! within 0.01 %; now and then the vCPU is held up while it polls and sees
//! the end late (up to 25 % too long, seen here). So it takes seven and
//! keeps the two that agree best.

use core::arch::asm;

/// PIT input clock.
const PIT_HZ: u64 = 1_193_182;
/// Count for ~20 ms (the counter is 16 bits: at most ~55 ms).
const PIT_COUNT: u16 = 23_864;
/// Measurements.
const ROUNDS: usize = 7;
const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
const SPEAKER: u16 = 0x61;
/// Give up waiting for OUT2 after this many TSC ticks (~5–10 s).
const PIT_TIMEOUT: u64 = 20_000_000_000;

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc is allowed at CPL3 (boot.rs clears CR4.TSD).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    ((hi as u64) << 32) | lo as u64
}

fn outb(port: u16, v: u8) {
    // SAFETY: IOPL=3 lets CPL3 reach the PIT ports.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

/// TSC ticks per second, measured against PIT channel 2; None when the
/// PIT does not count.
pub fn tsc_hz() -> Option<u64> {
    let mut hz = [0u64; ROUNDS];
    for h in &mut hz {
        *h = one_shot()?;
    }
    hz.sort_unstable();
    // The closest neighbours in sorted order, and their mean.
    let best = (0..ROUNDS - 1).min_by_key(|&i| hz[i + 1] - hz[i]).unwrap();
    Some((hz[best] + hz[best + 1]) / 2)
}

/// One measurement: TSC ticks per second over one PIT one-shot.
fn one_shot() -> Option<u64> {
    // Gate channel 2 on (bit 0), speaker data off (bit 1).
    let gate = inb(SPEAKER);
    outb(SPEAKER, (gate & !0x02) | 0x01);
    // Channel 2, low then high byte, mode 0 (OUT2 goes high at zero),
    // binary.
    outb(PIT_CMD, 0b1011_0000);
    outb(PIT_CH2, PIT_COUNT as u8);
    outb(PIT_CH2, (PIT_COUNT >> 8) as u8);
    // Counting starts with the high byte written.
    let start = rdtsc();
    // In mode 0 OUT2 is low until the count runs out, ~20 ms from now. If
    // port 0x61 shows it high at once (or reads as all-ones), the VMM does
    // not model OUT2 there (QEMU microvm has no speaker port): no rate
    // rather than a wrong one.
    let first = inb(SPEAKER);
    if first == 0xFF || first & 0x20 != 0 {
        outb(SPEAKER, gate);
        return None;
    }
    let end = loop {
        let out2 = inb(SPEAKER) & 0x20 != 0;
        let now = rdtsc();
        if out2 {
            break now;
        }
        if now - start > PIT_TIMEOUT {
            outb(SPEAKER, gate);
            return None;
        }
    };
    outb(SPEAKER, gate);
    Some((end - start) * PIT_HZ / PIT_COUNT as u64)
}
