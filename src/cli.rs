//! The command line: `veil run` and `veil bench`.

use crate::config::{ConfigFile, SizeValue};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "veil", version, about = "A minimal virtual machine monitor on Linux KVM")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM: a Linux kernel, or veil's built-in test guest when no --kernel is given.
    Run(Box<RunArgs>),
    /// Measure veil (boot time, memory overhead).
    Bench(BenchArgs),
    /// Write the built-in test guest (the probe ELF) to PATH, so that the same image can run under another VMM (e.g. QEMU, through its PVH note) for side-by-side benchmarks.
    ProbeElf(ProbeElfArgs),
}

#[derive(Args, Debug)]
pub struct ProbeElfArgs {
    /// Where to write the ELF (overwritten if it exists).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Kernel to boot: an x86-64 ELF vmlinux or a bzImage [default: the built-in test guest].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default for Linux: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Guest RAM: SIZE (e.g. 256M, 2G) or size=SIZE[,hugepages=on|off|auto][,file=PATH] [default: 256M, hugepages=auto].
    #[arg(long, value_name = "SIZE|OPTS")]
    pub memory: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u64>,
    /// Where the serial console goes: stdout, file=PATH or off [default: stdout].
    #[arg(long, value_name = "SINK")]
    pub serial: Option<String>,
    /// veil's own log level (to stderr) [default: warn].
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
    /// End the VM after SECS seconds with exit status 124.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// CPUID features to hide from the guest, comma separated (e.g. xsave,cx16).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub cpuid_hide: Option<Vec<String>>,
    /// How to enter the kernel: auto (PVH when the ELF has a PVH note, else the Linux 64-bit protocol), pvh, or linux64 [default: auto].
    #[arg(long, value_name = "PROTOCOL")]
    pub boot: Option<String>,
    /// DMA mode of every virtio device: bypass (guest-physical addresses), platform (VIRTIO_F_ACCESS_PLATFORM) or auto (bypass until the guest goes secure, then platform) [default: bypass].
    #[arg(long, value_name = "MODE")]
    pub dma: Option<String>,
    /// Add a virtio-iommu (on PCI, described by ACPI VIOT) that translates for every platform/auto device.
    #[arg(long)]
    pub iommu: bool,
    /// A virtio-blk disk: path=FILE[,readonly=on][,transport=mmio|pci][,dma=bypass|platform|auto][,insist=on]. Repeatable.
    #[arg(long, value_name = "OPTS")]
    pub disk: Vec<String>,
    /// A virtio-net NIC: tap=NAME or loopback, [,mac=52:54:..][,transport=..][,dma=..]. Repeatable.
    #[arg(long, value_name = "OPTS")]
    pub net: Vec<String>,
    /// A virtio-rng device [transport=..][,dma=..]. Repeatable.
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub rng: Vec<String>,
    /// A virtio-console (hvc0) [transport=..][,dma=..]. Repeatable.
    #[arg(long, value_name = "OPTS", num_args = 0..=1, default_missing_value = "")]
    pub console: Vec<String>,
    /// Per-thread seccomp filters: on, or off to debug a forbidden system call [default: on].
    #[arg(long, value_name = "on|off")]
    pub seccomp: Option<String>,
    /// Read settings from a JSON file; flags given as well override it.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Write run figures (exits, boot times, memory) as JSON to FILE on exit.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
}

impl RunArgs {
    /// Settings from the config file (if any), and the flags that override
    /// them, in the same form.
    pub fn sources(&self) -> Result<(ConfigFile, ConfigFile), String> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let flags = ConfigFile {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory: self.memory.clone().map(SizeValue::Text),
            log_level: None,
            cpus: self.cpus,
            serial: self.serial.clone(),
            timeout: self.timeout,
            cpuid_hide: self.cpuid_hide.clone(),
            boot: self.boot.clone(),
            seccomp: self.seccomp.clone(),
            dma: self.dma.clone(),
            iommu: self.iommu.then_some(true),
            disk: non_empty(&self.disk),
            net: non_empty(&self.net),
            rng: non_empty(&self.rng),
            console: non_empty(&self.console),
        };
        Ok((file, flags))
    }

    /// The log level: the flag, else the config file, else warn.
    pub fn log_level(&self, file: &ConfigFile) -> Result<LogLevel, String> {
        if let Some(l) = self.log_level {
            return Ok(l);
        }
        match &file.log_level {
            Some(s) => LogLevel::from_str(s, true).map_err(|_| format!("invalid log_level '{s}' in config file")),
            None => Ok(LogLevel::Warn),
        }
    }
}

fn non_empty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Boot times and memory overhead: the test guest over --runs runs, and a Linux kernel over --linux-runs if --kernel is given.
    Boot(BootBenchArgs),
    /// virtio-blk throughput through the test guest: 4 KiB random and 64 KiB / 1 MiB sequential reads and writes.
    Blk(DeviceBenchArgs),
    /// virtio-net frames per second and MB/s through the loopback backend.
    Net(DeviceBenchArgs),
    /// Block and net workloads in every DMA setup (bypass, platform, vIOMMU lazy/strict, secure), and ESM's cost.
    Dma(DmaBenchArgs),
    /// Secure guests: block I/O through bounce pages and the vIOMMU after ESM, against bypass, and ESM/SHARE/UNSHARE costs.
    Secure(HarnessArgs),
    /// Time to write every page of guest RAM (the test guest's default run) at 256 MiB and 1 GiB, whole process, optionally against QEMU's default memory.
    Mem(HarnessArgs),
    /// Every case (boot, mem, blk, net, dma, secure), interleaved run by run, optionally against QEMU: Markdown, JSON, SVG.
    All(HarnessArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BootBenchArgs {
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Extra `veil run` flags for the Linux boots, e.g. "--cpuid-hide kvm_pv_send_ipi".
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub linux_flags: Option<String>,
    /// Text on the serial console that marks the Linux guest as booted.
    #[arg(long, default_value = "VEIL-LINUX-UP")]
    pub marker: String,
    #[arg(long, default_value_t = 3)]
    pub linux_runs: u32,
    #[command(flatten)]
    pub compare: CompareArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DeviceBenchArgs {
    /// Transports to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "mmio,pci")]
    pub transport: Vec<String>,
    /// DMA mode of the device (bypass or platform).
    #[arg(long, default_value = "bypass")]
    pub dma: String,
    /// MiB moved per block case.
    #[arg(long, default_value_t = 32)]
    pub mib: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    pub qd: u32,
    /// Frames per net case.
    #[arg(long, default_value_t = 20000)]
    pub frames: u64,
    #[command(flatten)]
    pub compare: CompareArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DmaBenchArgs {
    /// Workloads: blk, net, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "blk,net")]
    pub kind: Vec<String>,
    /// Transports to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "mmio,pci")]
    pub transport: Vec<String>,
    /// Only these setups (default: all), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub setup: Vec<String>,
    /// MiB moved per block case.
    #[arg(long, default_value_t = 16)]
    pub mib: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    pub qd: u32,
    /// Frames per net case.
    #[arg(long, default_value_t = 5000)]
    pub frames: u64,
    /// Guest RAM sizes at which to measure ESM (none: skip), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    pub esm_memory: Vec<String>,
    #[command(flatten)]
    pub compare: CompareArgs,
}

/// Asks a single-group benchmark for the harness's output instead of its
/// own table: the same group run against a peer and/or as JSON and charts
/// (as `veil bench all --only GROUP`).
#[derive(Args, Debug, Clone, Default)]
pub struct CompareArgs {
    /// Run every case on this peer VMM too (qemu), through the harness of `veil bench all`.
    #[arg(long, value_name = "PEER")]
    pub peer: Option<String>,
    /// The QEMU binary for --peer qemu.
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Write the results as JSON to FILE (through the harness).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write SVG charts into DIR (through the harness).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}

impl CompareArgs {
    /// The harness's arguments for these, or None to print the group's own
    /// table as before.
    pub fn harness(&self, runs: u32, mib: u64, qd: u32, frames: u64) -> Option<HarnessArgs> {
        if self.peer.is_none() && self.json.is_none() && self.plot.is_none() {
            return None;
        }
        Some(HarnessArgs {
            peer: self.peer.clone(),
            qemu: self.qemu.clone().unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            runs,
            only: Vec::new(),
            mib,
            qd,
            frames,
            esm_memory: vec!["256M".into()],
            case_timeout: 300,
            json: self.json.clone(),
            plot: self.plot.clone(),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct HarnessArgs {
    /// Run every case on this peer VMM too (qemu).
    #[arg(long, value_name = "PEER")]
    pub peer: Option<String>,
    /// The QEMU binary for --peer qemu.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Runs per case and peer.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Only these groups (boot, mem, blk, net, dma, secure), comma separated [default: all].
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// MiB moved per block case.
    #[arg(long, default_value_t = 8)]
    pub mib: u64,
    /// Block requests in flight.
    #[arg(long, default_value_t = 1)]
    pub qd: u32,
    /// Frames per net case.
    #[arg(long, default_value_t = 2000)]
    pub frames: u64,
    /// Guest RAM sizes at which to measure ESM (256M, 512M, 1G, 2G, 4G), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "256M")]
    pub esm_memory: Vec<String>,
    /// Seconds one VMM process may take before the case fails.
    #[arg(long, default_value_t = 300)]
    pub case_timeout: u64,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write SVG charts into DIR.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}
