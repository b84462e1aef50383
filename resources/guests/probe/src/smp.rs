//! Waking the APs through the ACPI Multiprocessor Wakeup mailbox, and what
//! they run.
//!
//! For each AP the BSP prepares its TSS, writes the APIC ID (u32 at +4) and
//! the wake-up vector `probe_ap_start` (u64 at +8), then command = 1 (u16 at
//! +0), and polls until veil clears the command. The AP enters
//! `probe_ap_start` at CPL0 (boot.rs), switches to the probe's tables and
//! `iretq`s to `ap_main` at CPL3, which checksums the probe's code, adds to
//! a shared counter with `lock xadd`, marks itself done and spins.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::acpi::Acpi;
use crate::boot::{self, MAX_CPUS};
use crate::serial::Line;

/// `lock xadd`s per AP on the shared counter.
const ITERATIONS: u64 = 100_000;
/// TSC ticks to wait for veil to clear the mailbox command (~1–2 s).
const ACK_TIMEOUT: u64 = 4_000_000_000;
/// TSC ticks to wait for all APs to finish (~10–15 s: on a 2-core host,
/// 8 vCPUs share the CPUs and CPL0 code is emulated).
const DONE_TIMEOUT: u64 = 30_000_000_000;

const MAILBOX_COMMAND: u64 = 0;
const MAILBOX_APIC_ID: u64 = 4;
const MAILBOX_VECTOR: u64 = 8;
const COMMAND_WAKEUP: u16 = 1;

/// xAPIC ID register (the LAPIC sits at 0xFEE0_0000, docs/platform.md).
const LAPIC_ID_REG: u64 = 0xFEE0_0020;

/// What each AP reports, indexed by APIC ID. One cache line each.
#[repr(C, align(64))]
struct ApState {
    started: AtomicU32,
    done: AtomicU32,
    lapic_id: AtomicU32,
    checksum: AtomicU64,
}

static AP_STATE: [ApState; MAX_CPUS] = [const {
    ApState {
        started: AtomicU32::new(0),
        done: AtomicU32::new(0),
        lapic_id: AtomicU32::new(0),
        checksum: AtomicU64::new(0),
    }
}; MAX_CPUS];

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc is allowed at CPL3 (boot.rs clears CR4.TSD).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    ((hi as u64) << 32) | lo as u64
}

/// This CPU's APIC ID, from its Local APIC's ID register (xAPIC MMIO,
/// bits 31..24), which KVM's in-kernel LAPIC answers.
///
/// Not CPUID: on veil's KVM, CPUID at CPL3 runs natively and reports the
/// *host* CPU (its APIC ID is whichever host core the vCPU is on).
fn lapic_id() -> u32 {
    // SAFETY: the LAPIC page is identity-mapped; reading ID has no effect.
    unsafe { (LAPIC_ID_REG as *const u32).read_volatile() >> 24 }
}

/// `lock xadd`: add `v`, return the previous value.
fn xadd(counter: &AtomicU64, v: u64) -> u64 {
    let mut old = v;
    // SAFETY: an atomic read-modify-write of a valid AtomicU64.
    unsafe { asm!("lock xadd [{p}], {v}", p = in(reg) counter.as_ptr(), v = inout(reg) old, options(nostack)) };
    old
}

/// FNV-1a over `data`.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

/// The AP at CPL3. `apic_id` < MAX_CPUS (probe_ap_start checked it).
pub extern "C" fn ap_main(apic_id: u64) -> ! {
    let st = &AP_STATE[apic_id as usize];
    st.started.store(1, Ordering::Release);
    st.lapic_id.store(lapic_id(), Ordering::Relaxed);
    st.checksum.store(checksum(boot::readonly_image()), Ordering::Relaxed);
    let mut last = 0;
    for _ in 0..ITERATIONS {
        last = xadd(&COUNTER, 1);
    }
    core::hint::black_box(last);
    st.done.store(1, Ordering::Release);
    // No `hlt` at CPL3: spin until veil ends the VM.
    loop {
        core::hint::spin_loop();
    }
}

/// Ask veil to start AP `apic_id` at `vector`; true once it acknowledged.
fn wake(mailbox: u64, apic_id: u32, vector: u64) -> bool {
    let mb = mailbox as *mut u8;
    // SAFETY: the mailbox is MMIO that veil traps, identity-mapped.
    unsafe {
        mb.add(MAILBOX_APIC_ID as usize).cast::<u32>().write_volatile(apic_id);
        mb.add(MAILBOX_VECTOR as usize).cast::<u64>().write_volatile(vector);
        mb.add(MAILBOX_COMMAND as usize)
            .cast::<u16>()
            .write_volatile(COMMAND_WAKEUP);
    }
    let deadline = rdtsc() + ACK_TIMEOUT;
    loop {
        // SAFETY: as above. Each read is an exit to veil.
        if unsafe { mb.add(MAILBOX_COMMAND as usize).cast::<u16>().read_volatile() } == 0 {
            return true;
        }
        if rdtsc() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// Wake every enabled CPU of the MADT but this one, wait for them and
/// report. True when all of them did their work right.
pub fn run(acpi: &Acpi) -> bool {
    if acpi.cpus <= 1 {
        return true;
    }
    let me = lapic_id();
    let aps = acpi.apic_ids().iter().filter(|&&id| id != me).count() + acpi.cpus.saturating_sub(MAX_CPUS);
    let mut ok = acpi.cpus <= MAX_CPUS;
    if aps == 0 {
        return ok;
    }
    let Some(mailbox) = acpi.mailbox.as_ref().map(|m| m.addr) else {
        Line::new("smp").word("error=no_mailbox").emit();
        return false;
    };
    let expected_sum = checksum(boot::readonly_image());

    let mut woken = [false; MAX_CPUS];
    for &id in acpi.apic_ids().iter().filter(|&&id| id != me) {
        if id as usize >= MAX_CPUS {
            Line::new("ap").dec("id", id as u64).word("fail reason=no_slot").emit();
            ok = false;
            continue;
        }
        boot::prepare_ap(id);
        if wake(mailbox, id, boot::ap_entry()) {
            woken[id as usize] = true;
        } else {
            Line::new("ap").dec("id", id as u64).word("fail reason=no_ack").emit();
            ok = false;
        }
    }

    let all_done = || (0..MAX_CPUS).all(|i| !woken[i] || AP_STATE[i].done.load(Ordering::Acquire) != 0);
    let deadline = rdtsc() + DONE_TIMEOUT;
    while !all_done() && rdtsc() < deadline {
        core::hint::spin_loop();
    }

    let mut done = 0;
    for id in (0..MAX_CPUS).filter(|&i| woken[i]) {
        let st = &AP_STATE[id];
        let line = Line::new("ap").dec("id", id as u64);
        let lapic = st.lapic_id.load(Ordering::Relaxed);
        let reason = if st.started.load(Ordering::Acquire) == 0 {
            Some("not_started")
        } else if st.done.load(Ordering::Acquire) == 0 {
            Some("timeout")
        } else if lapic != id as u32 {
            // veil started a vCPU whose LAPIC is not the one asked for.
            Some("lapic_id")
        } else if st.checksum.load(Ordering::Relaxed) != expected_sum {
            Some("checksum")
        } else {
            None
        };
        let line = if reason == Some("lapic_id") {
            line.dec("lapic_id", lapic as u64)
        } else {
            line
        };
        match reason {
            None => {
                done += 1;
                line.word("ok").emit();
            }
            Some(r) => {
                ok = false;
                line.word("fail").text("reason", r.as_bytes()).emit();
            }
        }
    }

    let counter = COUNTER.load(Ordering::Acquire);
    let counter_ok = counter == done * ITERATIONS;
    ok &= counter_ok;
    Line::new("smp")
        .dec("aps", aps as u64)
        .dec("done", done)
        .dec("counter", counter)
        .dec("expected", done * ITERATIONS)
        .word(if ok { "ok" } else { "fail" })
        .emit();
    ok
}
