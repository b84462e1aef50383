//! The VMMs a case runs on: veil itself, and QEMU as the peer. Each knows
//! how to start a case, which of its threads are vCPUs, what exit status
//! means success, and what it cannot run.

use super::harness::{Job, QemuDma, Workload};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// What a run needs besides the job: its scratch directory, the disk image
/// both peers use, and the UDP port of QEMU's echo socket.
pub struct RunFiles<'a> {
    pub dir: &'a Path,
    pub image: Option<&'a Path>,
    pub udp_port: u16,
}

pub trait Peer {
    fn name(&self) -> &'static str;
    /// Why this peer cannot run `job` at all (shown in the table), if so.
    fn unsupported(&self, job: &Job) -> Option<String>;
    /// The command that runs `job`, serial console on its stdout.
    fn command(&self, job: &Job, cmdline: &str, files: &RunFiles) -> Result<Command, String>;
    fn is_vcpu_thread(&self, name: &str) -> bool;
    fn succeeded(&self, status: ExitStatus) -> bool;
    /// Exits counted by the peer itself, when KVM's debugfs cannot be read.
    fn own_exits(&self, _pid: u32, _files: &RunFiles) -> Option<u64> {
        None
    }
}

pub struct Veil {
    pub exe: PathBuf,
}

impl Veil {
    /// The `--metrics` file of a run.
    pub fn metrics(files: &RunFiles) -> PathBuf {
        files.dir.join("veil-metrics.json")
    }
}

impl Peer for Veil {
    fn name(&self) -> &'static str {
        "veil"
    }

    fn unsupported(&self, _job: &Job) -> Option<String> {
        None
    }

    fn command(&self, job: &Job, cmdline: &str, files: &RunFiles) -> Result<Command, String> {
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "run",
            "--serial",
            "stdout",
            "--memory",
            job.memory(),
            "--timeout",
            "600",
        ]);
        if !cmdline.is_empty() {
            cmd.args(["--cmdline", cmdline]);
        }
        cmd.arg("--metrics").arg(Self::metrics(files));
        cmd.args(&job.veil_flags);
        match job.workload {
            Workload::Blk => {
                let image = files.image.ok_or("no disk image")?;
                cmd.arg("--disk")
                    .arg(format!("path={},transport={}", image.display(), job.transport));
            }
            Workload::Net => {
                cmd.arg("--net").arg(format!("loopback,transport={}", job.transport));
            }
            Workload::Boot | Workload::Esm | Workload::Mem => {}
        }
        Ok(cmd)
    }

    fn is_vcpu_thread(&self, name: &str) -> bool {
        name.starts_with("vcpu")
    }

    fn succeeded(&self, status: ExitStatus) -> bool {
        status.success()
    }

    /// veil's own counters: SIGUSR1 makes it write its metrics file.
    fn own_exits(&self, pid: u32, files: &RunFiles) -> Option<u64> {
        let metrics = Self::metrics(files);
        let _ = std::fs::remove_file(&metrics);
        Command::new("kill").args(["-USR1", &pid.to_string()]).status().ok()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&metrics) {
                let json: serde_json::Value = serde_json::from_str(&text).ok()?;
                return Some(json["exits_pio"].as_u64()? + json["exits_mmio"].as_u64()?);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        None
    }
}

/// QEMU on the probe ELF that `veil probe-elf` writes, booted through PVH.
pub struct Qemu {
    pub exe: PathBuf,
    /// The test guest as an ELF file.
    pub probe_elf: PathBuf,
}

impl Qemu {
    /// Finds QEMU and has veil write its test guest for it.
    pub fn prepare(qemu: &Path, veil: &Path, dir: &Path) -> Result<Qemu, String> {
        let version = Command::new(qemu)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
        if !version.status.success() {
            return Err(format!("{} --version failed ({})", qemu.display(), version.status));
        }
        let probe_elf = dir.join("probe.elf");
        let out = Command::new(veil)
            .arg("probe-elf")
            .arg(&probe_elf)
            .output()
            .map_err(|e| format!("cannot run veil probe-elf: {e}"))?;
        if !out.status.success() || !probe_elf.is_file() {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "veil probe-elf could not write the test guest for QEMU: {}",
                why.lines()
                    .next()
                    .unwrap_or("no output")
                    .trim()
                    .trim_start_matches("veil: error: ")
            ));
        }
        Ok(Qemu {
            exe: qemu.to_path_buf(),
            probe_elf,
        })
    }

    /// QEMU's version line, for the report.
    pub fn version(exe: &Path) -> Option<String> {
        let out = Command::new(exe).arg("--version").output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
    }
}

impl Peer for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn unsupported(&self, job: &Job) -> Option<String> {
        match &job.qemu {
            QemuDma::Unsupported(why) => Some(why.to_string()),
            _ => None,
        }
    }

    fn command(&self, job: &Job, cmdline: &str, files: &RunFiles) -> Result<Command, String> {
        let pci = job.transport == "pci";
        // microvm with ACPI (the probe needs it) and a PIT (its TSC
        // calibration), its virtio-mmio transports virtio 1.x.
        let machine = if pci {
            "q35,accel=kvm"
        } else {
            "microvm,accel=kvm,acpi=on,pic=off,pit=on,rtc=off,isa-serial=on"
        };
        let mut cmd = Command::new(&self.exe);
        cmd.args(["-M", machine]);
        if !pci {
            cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
        }
        // This machine's KVM refuses QEMU's write of IA32_ARCH_CAPABILITIES.
        cmd.args(["-cpu", "host,-arch-capabilities", "-m", job.memory(), "-smp", "1"]);
        cmd.args(["-name", "veil-peer,debug-threads=on"]);
        cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"]);
        cmd.arg("-kernel").arg(&self.probe_elf);
        // microvm describes its virtio-mmio transports in the DSDT only:
        // name the first (the top one, which QEMU fills first) for the probe.
        let with_devices = if pci || matches!(job.workload, Workload::Boot | Workload::Mem) {
            cmdline.to_string()
        } else {
            format!("{cmdline} virtio_mmio.device=512@0xfeb02e00:0")
        };
        cmd.args(["-append", &with_devices]);
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
        let platform = match job.qemu {
            QemuDma::Bypass => "",
            QemuDma::Platform | QemuDma::Iommu => ",iommu_platform=on",
            QemuDma::Unsupported(_) => return Err("unsupported".into()),
        };
        if matches!(job.qemu, QemuDma::Iommu) {
            cmd.args(["-device", "virtio-iommu-pci"]);
        }
        let suffix = if pci { "pci" } else { "device" };
        let pci_opts = if pci { ",disable-legacy=on" } else { "" };
        match job.workload {
            Workload::Blk => {
                let image = files.image.ok_or("no disk image")?;
                // veil's disks go through the host page cache (no O_DIRECT),
                // and so does QEMU's writeback cache mode.
                cmd.arg("-drive").arg(format!(
                    "id=d0,file={},format=raw,if=none,cache=writeback",
                    image.display()
                ));
                cmd.args(["-device", &format!("virtio-blk-{suffix},drive=d0{pci_opts}{platform}")]);
            }
            Workload::Net => {
                let p = files.udp_port;
                cmd.args([
                    "-netdev",
                    &format!("socket,id=n0,udp=127.0.0.1:{p},localaddr=127.0.0.1:{p}"),
                ]);
                cmd.args(["-device", &format!("virtio-net-{suffix},netdev=n0{pci_opts}{platform}")]);
            }
            Workload::Boot | Workload::Mem => {}
            Workload::Esm => return Err("QEMU has no ultracalls".into()),
        }
        Ok(cmd)
    }

    fn is_vcpu_thread(&self, name: &str) -> bool {
        name.starts_with("CPU ") && name.ends_with("/KVM")
    }

    /// isa-debug-exit turns the guest's status v into (v << 1) | 1.
    fn succeeded(&self, status: ExitStatus) -> bool {
        status.code() == Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names() {
        let q = Qemu {
            exe: "qemu".into(),
            probe_elf: "p".into(),
        };
        assert!(q.is_vcpu_thread("CPU 0/KVM"));
        assert!(!q.is_vcpu_thread("qemu-system-x86"));
        let v = Veil { exe: "veil".into() };
        assert!(v.is_vcpu_thread("vcpu1"));
        assert!(!v.is_vcpu_thread("blk0"));
    }

    #[test]
    fn qemu_status_from_debug_exit() {
        use std::os::unix::process::ExitStatusExt;
        let q = Qemu {
            exe: "qemu".into(),
            probe_elf: "p".into(),
        };
        assert!(q.succeeded(ExitStatus::from_raw(1 << 8)));
        assert!(!q.succeeded(ExitStatus::from_raw(3 << 8)));
        assert!(!q.succeeded(ExitStatus::from_raw(0)));
    }
}
