//! The platform devices through which a guest ends the VM, the console, and
//! what veil does with guests that misbehave — each through the real binary
//! and tiny hand-assembled guests.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn guest_args(path: &std::path::Path) -> Vec<String> {
    vec![
        "run".into(),
        "--kernel".into(),
        path.display().to_string(),
        "--memory".into(),
        "64M".into(),
    ]
}

fn run_guest(name: &str, code: &[u8], extra: &[&str]) -> Output {
    let path = write_guest(name, code);
    let mut args = guest_args(&path);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_veil(&refs, LIMIT)
}

#[test]
fn debug_exit_status_becomes_veils_exit_status() {
    if !kvm_available() {
        return;
    }
    let mut code = out8_dx(0x3f8, b'h');
    code.extend(out8_dx(0x3f8, b'\n'));
    code.extend(out8(0xf4, 42));
    code.extend(SPIN);
    let out = run_guest("debug-exit.elf", &code, &[]);
    assert_eq!(out.code, Some(42), "{}", out.stderr);
    assert_eq!(out.stdout, "h\n");
}

#[test]
fn i8042_reset_ends_the_vm_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut code = out8(0x64, 0xfe);
    code.extend(SPIN);
    let out = run_guest("reset.elf", &code, &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn acpi_s5_powers_off() {
    if !kvm_available() {
        return;
    }
    // SLP_TYP = 5, SLP_EN to the sleep control register at 0x600.
    let mut code = out8_dx(0x600, (5 << 2) | (1 << 5));
    code.extend(SPIN);
    let out = run_guest("poweroff.elf", &code, &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn serial_output_to_a_file() {
    if !kvm_available() {
        return;
    }
    let log = scratch("serial.txt");
    let mut code = out8_dx(0x3f8, b'Z');
    code.extend(out8(0xf4, 0));
    code.extend(SPIN);
    let arg = format!("file={}", log.display());
    let out = run_guest("serial-file.elf", &code, &["--serial", &arg]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "Z");
}

#[test]
fn serial_off_prints_nothing() {
    if !kvm_available() {
        return;
    }
    let mut code = out8_dx(0x3f8, b'Z');
    code.extend(out8(0xf4, 3));
    code.extend(SPIN);
    let out = run_guest("serial-off.elf", &code, &["--serial", "off"]);
    assert_eq!((out.code, out.stdout.as_str()), (Some(3), ""));
}

#[test]
fn a_guest_stuck_spinning_is_ended_by_the_timeout() {
    if !kvm_available() {
        return;
    }
    let out = run_guest("spin.elf", &SPIN, &["--timeout", "1"]);
    assert_eq!(out.code, Some(124), "{}", out.stderr);
    assert!(out.stderr.contains("did not finish within 1 s"), "{}", out.stderr);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("veil: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {}", out.stderr);
    // And where the vCPU was, to debug a stuck guest.
    assert!(out.stderr.contains("vCPU 0 was at RIP 0x200078"), "{}", out.stderr);
}

#[test]
fn a_crashing_guest_is_reported_with_its_rip() {
    if !kvm_available() {
        return;
    }
    // int3 with no IDT: a triple fault on ordinary KVM, an emulation
    // failure on the nested KVM of veil's CI. Either way veil reports the
    // failing vCPU and where it was.
    let out = run_guest("int3.elf", &[0xcc], &["--timeout", "20"]);
    assert_eq!(out.code, Some(70), "{}", out.stderr);
    assert!(out.stderr.contains("vCPU 0"), "{}", out.stderr);
    assert!(out.stderr.contains("RIP 0x200078"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

/// Asserts that `out` is veil's triple-fault verdict for `vcpu` at `rip`:
/// status 70 and one `veil: error:` line that names it.
fn assert_triple_fault(out: &Output, vcpu: u8, rip: &str) {
    assert_eq!(out.code, Some(70), "{}", out.stderr);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("veil: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {}", out.stderr);
    assert!(
        errors[0].contains(&format!("vCPU {vcpu}: triple fault")) && errors[0].contains(rip),
        "{}",
        out.stderr
    );
}

// These faults are emulated and delivered by this machine's KVM too, so
// they triple-fault (KVM_EXIT_SHUTDOWN) here just as on ordinary KVM.

#[test]
fn a_fault_through_a_zero_limit_idt_is_a_triple_fault() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code = [
        0x0f, 0x01, 0x1d, 0x02, 0, 0, 0, // lidt [rip+2]: the descriptor below
        0x0f, 0x0b,                      // ud2 at 0x20007f
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,    // IDT limit 0, base 0
    ];
    let out = run_guest("zero-idt.elf", &code, &["--timeout", "20"]);
    assert_triple_fault(&out, 0, "RIP 0x20007f");
}

#[test]
fn a_general_protection_fault_without_a_handler_is_a_triple_fault() {
    if !kvm_available() {
        return;
    }
    let mut code = vec![0x48, 0xb8]; // mov rax, a non-canonical address
    code.extend(0x8000_0000_0000_0000u64.to_le_bytes());
    code.extend([0x48, 0x8b, 0x00]); // mov rax, [rax] at 0x200082: #GP
    let out = run_guest("gp.elf", &code, &["--timeout", "20"]);
    assert_triple_fault(&out, 0, "RIP 0x200082");
}

#[test]
fn an_ap_woken_at_a_non_canonical_rip_is_a_triple_fault() {
    if !kvm_available() {
        return;
    }
    // BSP: wake APIC ID 1 at 0x8000_0000_0000_0000 through the mailbox, spin.
    #[rustfmt::skip]
    let mut code: Vec<u8> = vec![
        0x48, 0xbb, 0x00, 0x00, 0xb0, 0xfe, 0, 0, 0, 0,       // mov rbx, 0xfeb00000
        0xc7, 0x43, 0x04, 0x01, 0, 0, 0,                      // mov dword [rbx+4], 1
        0x48, 0xb8,                                           // mov rax, imm64
    ];
    code.extend(0x8000_0000_0000_0000u64.to_le_bytes());
    code.extend([0x48, 0x89, 0x43, 0x08]); // mov [rbx+8], rax
    code.extend([0x66, 0xc7, 0x03, 0x01, 0x00]); // mov word [rbx], 1
    code.extend(SPIN);
    let out = run_guest("wakeup-noncanonical.elf", &code, &["--cpus", "2", "--timeout", "20"]);
    assert_triple_fault(&out, 1, "RIP 0x8000000000000000");
}

#[test]
fn an_ap_is_started_through_the_wakeup_mailbox() {
    if !kvm_available() {
        return;
    }
    // BSP: mailbox.apic_id = 1, .vector = ap, .command = 1; wait for the
    // ack; spin. AP: print its APIC ID (from RDI), exit with status 9.
    #[rustfmt::skip]
    let bsp: Vec<u8> = vec![
        0x48, 0xbb, 0x00, 0x00, 0xb0, 0xfe, 0, 0, 0, 0,       // mov rbx, 0xfeb00000
        0xc7, 0x43, 0x04, 0x01, 0, 0, 0,                      // mov dword [rbx+4], 1
        0x48, 0x8d, 0x05, 0x11, 0, 0, 0,                      // lea rax, [rip+0x11] (ap)
        0x48, 0x89, 0x43, 0x08,                               // mov [rbx+8], rax
        0x66, 0xc7, 0x03, 0x01, 0x00,                         // mov word [rbx], 1
        0x66, 0x83, 0x3b, 0x00,                               // cmp word [rbx], 0
        0x75, 0xfa,                                           // jne cmp
        0xeb, 0xfe,                                           // jmp .
    ];
    let mut ap = vec![0x89, 0xf8, 0x04, b'0']; // mov eax, edi; add al, '0'
    ap.extend([0x66, 0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
    ap.extend(out8(0xf4, 9));
    ap.extend(SPIN);
    let mut code = bsp;
    code.extend(ap);
    let path = write_guest("wakeup.elf", &code);
    let p = path.display().to_string();
    let out = run_veil(
        &[
            "run",
            "--kernel",
            &p,
            "--cpus",
            "2",
            "--memory",
            "64M",
            "--timeout",
            "20",
        ],
        LIMIT,
    );
    assert_eq!(out.code, Some(9), "{}", out.stderr);
    assert_eq!(out.stdout, "1");
}

#[test]
fn metrics_are_written_on_sigusr1_and_at_exit() {
    if !kvm_available() {
        return;
    }
    let kernel = write_guest("metrics.elf", &SPIN);
    let metrics = scratch("metrics.json");
    let mut child = std::process::Command::new(veil_bin())
        .args(["run", "--memory", "64M", "--timeout", "20", "--metrics"])
        .arg(&metrics)
        .arg("--kernel")
        .arg(&kernel)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Ask until the file appears: veil installs its handler after boot set-up.
    let mut running = None;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::process::Command::new("kill")
            .args(["-USR1", &child.id().to_string()])
            .status();
        if let Ok(text) = std::fs::read_to_string(&metrics) {
            running = Some(text);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = running.expect("no metrics file after SIGUSR1");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["stop"], "running");
    assert!(json["first_entry_unix_ns"].as_u64().unwrap() >= json["process_start_unix_ns"].as_u64().unwrap());

    let mut code = out8(0xf4, 5);
    code.extend(SPIN);
    let out = run_guest("metrics-exit.elf", &code, &["--metrics", metrics.to_str().unwrap()]);
    assert_eq!(out.code, Some(5));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(json["guest_status"], 5);
    assert_eq!(json["exits_pio"], 1);
}
