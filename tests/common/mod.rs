//! Shared by the integration tests: run the real `veil` binary with a hard
//! timeout, check for KVM, and build tiny guest ELFs.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

pub fn veil_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veil"))
}

/// True if this machine can run VMs. Without /dev/kvm a test may skip,
/// except in CI, where a missing KVM is a failure.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have /dev/kvm: this test needs KVM"
    );
    eprintln!("SKIPPED: this machine has no /dev/kvm");
    false
}

/// Runs `veil` with `args`, killing it (and so every vCPU thread) if it
/// outlives `limit`, which is a test failure.
pub fn run_veil(args: &[&str], limit: Duration) -> Output {
    run_command(Command::new(veil_bin()).args(args), limit)
}

pub fn run_command(cmd: &mut Command, limit: Duration) -> Output {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            panic!("veil did not finish within {limit:?} and was killed; output so far:\n{stdout}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.code(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// A file in a per-test scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("veil-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A minimal x86-64 ELF executable: `code` loaded and entered at `0x200000`.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x20_0000;
    const HDR: usize = 64 + 56;
    let mut f = vec![0u8; HDR];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&(BASE + HDR as u64).to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[16..24].copy_from_slice(&BASE.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&BASE.to_le_bytes()); // p_paddr
    let size = (HDR + code.len()) as u64;
    ph[32..40].copy_from_slice(&size.to_le_bytes());
    ph[40..48].copy_from_slice(&size.to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// Machine code: `out imm8, al` of `value` to 8-bit `port` (mov al, v; out p, al).
pub fn out8(port: u8, value: u8) -> Vec<u8> {
    vec![0xb0, value, 0xe6, port]
}

/// Machine code: `mov dx, port; mov al, value; out dx, al`.
pub fn out8_dx(port: u16, value: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, value, 0xee]
}

/// `jmp .`: spin forever.
pub const SPIN: [u8; 2] = [0xeb, 0xfe];

pub fn write_guest(name: &str, code: &[u8]) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, tiny_elf(code)).unwrap();
    path
}

/// A network namespace of the test's own holding a TAP device `vtap0` at
/// 10.0.2.1/24, deleted on drop. None (after saying why) where namespaces
/// cannot be made; CI runs as root and must be able to.
pub struct TapNamespace {
    pub name: String,
    /// The TAP's MAC address, as `ip link` prints it.
    pub mac: String,
}

fn ip(args: &[&str]) -> Option<std::process::Output> {
    Command::new("ip")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
}

impl TapNamespace {
    pub fn create(tag: &str) -> Option<TapNamespace> {
        let name = format!("veil-{tag}-{}", std::process::id());
        if ip(&["netns", "add", &name]).is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root and must be able to create network namespaces"
            );
            eprintln!("SKIPPED: cannot create a network namespace (not root?)");
            return None;
        }
        // From here on, dropping `ns` deletes the namespace again.
        let mut ns = TapNamespace {
            name: name.clone(),
            mac: String::new(),
        };
        let n = name.as_str();
        let ok = ip(&["-n", n, "tuntap", "add", "dev", "vtap0", "mode", "tap"]).is_some()
            && ip(&["-n", n, "addr", "add", "10.0.2.1/24", "dev", "vtap0"]).is_some()
            && ip(&["-n", n, "link", "set", "vtap0", "up"]).is_some();
        assert!(ok, "cannot set up vtap0 in {n}");
        let link =
            ip(&["-n", n, "-o", "link", "show", "vtap0"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        ns.mac = link
            .unwrap_or_default()
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or("")
            .to_string();
        assert_eq!(ns.mac.len(), 17, "no MAC for vtap0");
        Some(ns)
    }

    /// `veil` run inside the namespace.
    pub fn veil(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(veil_bin());
        cmd
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.name]);
    }
}

/// The seed of the test guest's block pattern (resources/guests/probe/README.md).
pub const PROBE_SEED: u64 = 0x7665_696c;

/// Whether `sector` (512 bytes) holds the probe's pattern for sector number
/// `s` and `seed`: word i is `(seed ^ (s << 16) ^ i) * 0x9E3779B97F4A7C15`.
pub fn sector_holds_pattern(sector: &[u8], seed: u64, s: u64) -> bool {
    sector.chunks_exact(8).enumerate().all(|(i, w)| {
        u64::from_le_bytes(w.try_into().unwrap()) == (seed ^ (s << 16) ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}

/// Sectors of `image` that do not hold the pattern of `PROBE_SEED`.
pub fn sectors_without_pattern(image: &[u8]) -> usize {
    image
        .chunks_exact(512)
        .enumerate()
        .filter(|(s, sector)| !sector_holds_pattern(sector, PROBE_SEED, *s as u64))
        .count()
}

/// `veil run` arguments for the test guest with one device of each kind on
/// `transport` (disk `disk`, loopback NIC, rng, console) and its metrics
/// written to `metrics`.
pub fn every_device_args(transport: &str, disk: &Path, metrics: &Path) -> Vec<String> {
    let t = format!("transport={transport}");
    let mut args: Vec<String> = ["run", "--memory", "128M", "--timeout", "90"]
        .map(String::from)
        .to_vec();
    for (flag, value) in [
        ("--disk", format!("path={},{t}", disk.display())),
        ("--net", format!("loopback,{t}")),
        ("--rng", t.clone()),
        ("--console", t.clone()),
        ("--metrics", metrics.display().to_string()),
    ] {
        args.push(flag.to_string());
        args.push(value);
    }
    args
}
