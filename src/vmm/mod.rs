//! The VM builder: turns a `VmConfig` into a running VM, and runs it until
//! the guest stops, fails or runs out of time.

mod devices;
mod irq;
mod loader;
mod memory;
mod port_io;
pub mod ultracall;
mod vcpu;
mod wakeup;

pub use loader::{detect_format, KernelFormat};
pub use memory::{GuestRam, HostViewProtection, MemoryReport};
pub use vcpu::unix_ns;

use crate::config::{BootProtocol, SerialOutput, VmConfig};
use crate::error::{Context, Error, Kind, Result};
use crate::sandbox::{Sandbox, ThreadKind};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vcpu::{ExitCounters, Start, Vcpu, VcpuShared};
use veil_arch::layout::*;
use veil_arch::regs::{boot_fpu, boot_msrs, boot_regs, set_lint_pins, set_long_mode, set_pvh_mode, EntryPoint};
use veil_devices::legacy::{AcpiSleepControl, DebugExit, Serial, SerialInput, SerialSink, I8042};
use veil_devices::{Bus, StopReason, StopSignal};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Default command line for a Linux kernel when the user gives none.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// KVM's TSS and identity-map pages (needed on Intel hosts), just below the
/// 4 GiB line and clear of every device.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub reason: StopReason,
    pub report: RunReport,
}

/// Figures about a run, written with `--metrics`.
#[derive(Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub stop: String,
    pub guest_status: Option<u8>,
    pub process_start_unix_ns: u64,
    pub first_entry_unix_ns: u64,
    pub exits_pio: u64,
    pub exits_mmio: u64,
    pub exits_unclaimed: u64,
    pub aps_woken: u64,
    pub ap_wakeups_ignored: u64,
    pub serial_lost_bytes: u64,
    /// Resident memory that is not guest RAM: VMM heap, stacks, code.
    pub rss_overhead_kib: u64,
    pub guest_ram_resident_kib: u64,
    /// Which file backs guest RAM and how much of it sits on 2 MiB pages.
    pub memory: MemoryReport,
    pub devices: std::collections::BTreeMap<String, devices::DeviceReport>,
    /// Private and shared pages, and the guest's ultracalls.
    pub secure: ultracall::SecureReport,
    /// CPU time (ns, from /proc schedstat) of each veil thread by name:
    /// `veil` (main loop), `vcpuN`, and one worker per device (`blk0`, ...).
    pub thread_cpu_ns: std::collections::BTreeMap<String, u64>,
}

pub struct Vm {
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    vcpus: Vec<Vcpu>,
    starts: Vec<Start>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<Serial>>,
    mailbox: Arc<Mutex<wakeup::WakeupMailbox>>,
    device_manager: devices::DeviceManager,
    stop: Arc<StopSignal>,
    timeout: Option<Duration>,
    started_unix_ns: u64,
    sandbox: Sandbox,
}

/// Puts the calling thread under its seccomp filter; a filter that cannot
/// go on ends veil rather than leave a thread unsandboxed.
fn enter_sandbox(sandbox: &Sandbox, kind: ThreadKind, name: &str) {
    if let Err(e) = sandbox.enter(kind, name) {
        eprintln!("veil: error: {e}");
        std::process::exit(Kind::Unavailable.exit_code());
    }
}

fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::new(
            Kind::Unavailable,
            "/dev/kvm does not exist: this host has no KVM (is the kvm module loaded?)",
        ),
        libc::EACCES | libc::EPERM => Error::new(
            Kind::Unavailable,
            "no permission to open /dev/kvm (add your user to the 'kvm' group)",
        ),
        _ => Error::new(Kind::Unavailable, format!("cannot open /dev/kvm: {e}")),
    })
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::new(Kind::Unavailable, format!("KVM: {what}: {e}"))
}

fn serial_sink(output: &SerialOutput) -> Result<SerialSink> {
    Ok(match output {
        SerialOutput::Stdout => SerialSink::Stdout,
        SerialOutput::Off => SerialSink::Off,
        SerialOutput::File(path) => SerialSink::File(File::create(path).context(Kind::NoInput, || {
            format!("cannot create serial output file {}", path.display())
        })?),
    })
}

fn register_memory(vm_fd: &VmFd, ram: &GuestRam) -> Result<()> {
    for (slot, region) in ram.kvm_view.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::new(Kind::Software, format!("guest memory: {e}")))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the Vm
        // keeps alive for as long as the VM fd (and so KVM's use of it).
        unsafe { vm_fd.set_user_memory_region(desc) }.map_err(kvm_err("cannot register guest memory"))?;
    }
    Ok(())
}

impl Vm {
    /// Creates the VM, loads the guest and prepares every vCPU.
    pub fn build(config: &VmConfig, probe_elf: &[u8]) -> Result<Vm> {
        let started_unix_ns = unix_ns();
        let started = Instant::now();
        let hidden = veil_arch::cpuid::resolve_hidden(&config.cpuid_hide)
            .map_err(|e| Error::new(Kind::Usage, format!("--cpuid-hide: {e}")))?;
        let ram = GuestRam::new(&config.memory)?;

        // The guest image first, before any KVM resource: bad input fails
        // the same way on a host without KVM.
        let mem = &ram.kvm_view;
        let kernel = match &config.kernel {
            Some(path) => loader::load_kernel_file(mem, path)?,
            None => loader::load_kernel_bytes(mem, probe_elf, "the built-in test guest")?,
        };
        loader::check_fits(mem, &kernel)?;
        let pvh_entry = match (config.boot, kernel.pvh_entry) {
            (BootProtocol::Linux64, _) | (BootProtocol::Auto, None) => None,
            (_, Some(entry)) => Some(entry),
            (BootProtocol::Pvh, None) => {
                let what = config
                    .kernel
                    .as_ref()
                    .map_or_else(|| "the built-in test guest".to_string(), |p| p.display().to_string());
                return Err(Error::new(
                    Kind::Data,
                    format!("--boot pvh: kernel {what} has no PVH entry (no XEN_ELFNOTE_PHYS32_ENTRY note in an ELF)"),
                ));
            }
        };
        let initrd = match &config.initrd {
            Some(path) => Some(loader::load_initrd(mem, path, ram.size, &kernel)?),
            None => None,
        };
        let mut cmdline = match (&config.cmdline, &config.kernel) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => DEFAULT_LINUX_CMDLINE.to_string(),
            (None, None) => String::new(),
        };
        loader::check_cmdline(&cmdline)?;
        log::info!(
            "loaded {:?} kernel, entry {:#x}, end {:#x}, initrd {:?}, boot {}",
            kernel.format,
            kernel.entry,
            kernel.end,
            initrd,
            pvh_entry.map_or_else(|| "linux64".to_string(), |e| format!("pvh at {e:#x}"))
        );

        // User input is all checked; now the host.
        log::debug!("guest image loaded");
        let kvm = open_kvm()?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::UserMemory, "user memory"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Pit2, "PIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::new(
                    Kind::Unavailable,
                    format!("KVM on this host lacks the {name} capability"),
                ));
            }
        }
        let max_vcpus = kvm.get_max_vcpus().min(usize::from(VmConfig::MAX_CPUS));
        if usize::from(config.cpus) > max_vcpus {
            return Err(Error::new(
                Kind::Usage,
                format!(
                    "--cpus {} is more than this host's KVM allows ({max_vcpus})",
                    config.cpus
                ),
            ));
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("cannot create VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("cannot set TSS address"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("cannot set identity map address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("cannot create in-kernel irqchip"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("cannot create PIT"))?;
        ultracall::enable_hypercall_exits(&vm_fd);
        log::debug!("VM created");
        register_memory(&vm_fd, &ram)?;
        log::debug!("guest memory registered");

        // Devices.
        let stop = Arc::new(StopSignal::new().context(Kind::Unavailable, || "cannot create eventfd".into())?);
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).context(Kind::Unavailable, || "cannot create eventfd".into())?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("cannot register the serial IRQ"))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_sink(&config.serial)?)));
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let bus_err = |e: veil_devices::bus::BusError| Error::new(Kind::Software, format!("device layout: {e}"));
        pio.insert(u64::from(COM1_PORT), 8, serial.clone()).map_err(bus_err)?;
        pio.insert(
            u64::from(I8042_DATA_PORT),
            5,
            Arc::new(Mutex::new(I8042::new(stop.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(DEBUG_EXIT_PORT),
            4,
            Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            2,
            Arc::new(Mutex::new(AcpiSleepControl::new(stop.clone()))),
        )
        .map_err(bus_err)?;
        let mut device_manager = devices::DeviceManager::new(ram.host_view.clone(), ram.shared.clone());
        devices::attach_configured(&mut device_manager, config, &vm_fd, &mut pio, &mut mmio)?;

        // Boot structures, now that the devices are known.
        if config.kernel.is_none() || cmdline.split_whitespace().any(|w| w == "acpi=off") {
            // The test guest, and Linux without ACPI, find virtio-mmio
            // devices on the command line; Linux with ACPI finds them in
            // the DSDT.
            for entry in &device_manager.cmdline_mmio {
                cmdline.push(' ');
                cmdline.push_str(entry);
            }
        }
        let cmdline_size = loader::write_cmdline(mem, cmdline.trim_start())?;
        let guest_err =
            |e: vm_memory::GuestMemoryError| Error::new(Kind::Data, format!("cannot write boot structures: {e}"));
        veil_arch::regs::write_boot_gdt(mem).map_err(guest_err)?;
        let cr3 = veil_arch::paging::write_identity_page_tables(mem).map_err(guest_err)?;
        let acpi = veil_arch::acpi::AcpiConfig {
            num_cpus: u32::from(config.cpus),
            wakeup_mailbox: WAKEUP_MAILBOX_ADDR,
            ioapic_addr: IOAPIC_ADDR,
            sleep_control_port: ACPI_SLEEP_CONTROL_PORT,
            sleep_status_port: ACPI_SLEEP_STATUS_PORT,
            serial: Some((COM1_PORT, COM1_IRQ)),
            virtio_mmio: device_manager.acpi_mmio.clone(),
            pci_ecam: device_manager.pci_ecam(),
            viot: device_manager.viot.clone(),
        };
        veil_arch::acpi::write_acpi_tables(
            mem,
            vm_memory::GuestAddress(ACPI_START),
            vm_memory::GuestAddress(ACPI_END),
            &acpi,
        )
        .map_err(|e| Error::new(Kind::Software, format!("cannot write ACPI tables: {e}")))?;
        let boot = veil_arch::boot_params::BootInfo {
            setup_header: kernel.setup_header,
            cmdline_size,
            initrd,
            rsdp_addr: ACPI_START,
            ram_size: ram.size,
        };
        veil_arch::boot_params::write_boot_params(mem, &boot).map_err(guest_err)?;
        if pvh_entry.is_some() {
            let info = veil_arch::pvh::PvhInfo {
                cmdline_addr: CMDLINE_ADDR,
                initrd,
                rsdp_addr: ACPI_START,
                ram_size: ram.size,
            };
            veil_arch::pvh::write_start_info(mem, &info)
                .map_err(|e| Error::new(Kind::Data, format!("cannot write the PVH start info: {e}")))?;
        }

        log::debug!("devices and boot structures ready");
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("cannot read supported CPUID"))?;
        let mut vcpus = Vec::new();
        let mut starts = Vec::new();
        let mut ap_senders = Vec::new();
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("cannot create vCPU"))?;
            let mut cpuid = supported_cpuid.clone();
            veil_arch::cpuid::filter_cpuid(&mut cpuid, id, config.cpus, &hidden);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("cannot set CPUID"))?;
            fd.set_msrs(&boot_msrs()).map_err(kvm_err("cannot set MSRs"))?;
            fd.set_fpu(&boot_fpu()).map_err(kvm_err("cannot set FPU state"))?;
            let mut lapic = fd.get_lapic().map_err(kvm_err("cannot read LAPIC"))?;
            set_lint_pins(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_err("cannot set LAPIC"))?;
            if id == 0 {
                let mut sregs = fd.get_sregs().map_err(kvm_err("cannot read sregs"))?;
                set_long_mode(&mut sregs, cr3);
                let regs = match pvh_entry {
                    // PVH: 32-bit protected mode, paging off, EBX = start info.
                    Some(rip) => {
                        set_pvh_mode(&mut sregs);
                        let mut regs = boot_regs(EntryPoint {
                            rip,
                            rsp: BOOT_STACK_TOP,
                            rsi: 0,
                            rdi: 0,
                        });
                        regs.rbx = PVH_START_INFO_ADDR;
                        regs
                    }
                    None => boot_regs(EntryPoint {
                        rip: kernel.entry,
                        rsp: BOOT_STACK_TOP,
                        rsi: ZERO_PAGE_ADDR,
                        rdi: 0,
                    }),
                };
                fd.set_sregs(&sregs).map_err(kvm_err("cannot set sregs"))?;
                fd.set_regs(&regs).map_err(kvm_err("cannot set registers"))?;
                starts.push(Start::Now);
                ap_senders.push(None);
            } else {
                let (tx, rx) = mpsc::channel();
                starts.push(Start::OnWakeup(rx));
                ap_senders.push(Some(tx));
            }
            vcpus.push(Vcpu { id, fd });
        }
        log::debug!("vCPUs ready");
        let mailbox = Arc::new(Mutex::new(wakeup::WakeupMailbox::new(ap_senders)));
        mmio.insert(WAKEUP_MAILBOX_ADDR, WAKEUP_MAILBOX_SIZE, mailbox.clone())
            .map_err(bus_err)?;

        let ultracall = ultracall::UltracallGate::new(ram.shared.clone(), ram.host_protection(), started);
        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            ultracall,
            stop: stop.clone(),
            exiting: AtomicBool::new(false),
            failure: Mutex::new(None),
            counters: ExitCounters::default(),
            cr3,
            first_entry_unix_ns: AtomicU64::new(0),
            vcpu_cpu_ns: Mutex::new(Vec::new()),
        });
        Ok(Vm {
            vm_fd,
            ram,
            vcpus,
            starts,
            shared,
            serial,
            mailbox,
            device_manager,
            stop,
            timeout: config.timeout_secs.map(Duration::from_secs_f64),
            started_unix_ns,
            sandbox: Sandbox::new(config.seccomp).map_err(|e| Error::new(Kind::Unavailable, e))?,
        })
    }

    /// Runs the VM to its end. Returns the stop reason, or veil's error for a
    /// vCPU failure or a timeout, and the run's figures, which it also
    /// writes to `metrics` at the end and whenever veil gets SIGUSR1.
    pub fn run(self, stdin: Option<File>, metrics: Option<PathBuf>) -> (Result<StopReason>, RunReport) {
        extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let Vm {
            vm_fd,
            ram,
            vcpus,
            starts,
            shared,
            serial,
            mailbox,
            device_manager,
            stop,
            timeout,
            started_unix_ns,
            sandbox,
        } = self;
        let reporter = Arc::new(Reporter {
            memory: ram.reporter(),
            shared: shared.clone(),
            mailbox,
            serial: serial.clone(),
            device_manager,
            started_unix_ns,
            path: metrics,
        });
        if let Err(e) = register_signal_handler(SIGRTMIN(), kick) {
            let error = Error::new(Kind::Unavailable, format!("cannot install the vCPU kick signal: {e}"));
            return (Err(error), RunReport::default());
        }
        veil_devices::virtio::worker::set_start_hook(Box::new(move |name| sandbox.enter(ThreadKind::Device, name)));
        log::debug!("spawning vCPU threads");
        let mut threads = Vec::new();
        let mut spawn_error = None;
        for (vcpu, start) in vcpus.into_iter().zip(starts) {
            let s = shared.clone();
            let name = format!("vcpu{}", vcpu.id);
            let thread_name = name.clone();
            match std::thread::Builder::new().name(name).spawn(move || {
                enter_sandbox(&sandbox, ThreadKind::Vcpu, &thread_name);
                vcpu.run(start, s)
            }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(Error::new(
                        Kind::Unavailable,
                        format!("cannot start a vCPU thread: {e}"),
                    ));
                    break;
                }
            }
        }
        let result = match spawn_error {
            Some(e) => Err(e),
            None => wait_for_stop(&stop, serial, stdin, timeout, reporter.clone(), &sandbox),
        };
        shared.exiting.store(true, Ordering::Release);
        stop_vcpus(&threads);
        let failure = shared.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
        let result = match (result, failure) {
            (Ok(_), Some(f)) => Err(f),
            (Ok(StopReason::Failed), None) => Err(Error::new(Kind::Software, "the VM failed")),
            (r, _) => r,
        };
        // Whatever ended the run, what the guest wrote reaches the disks
        // before veil reports and exits.
        reporter.device_manager.sync_disks();
        let report = reporter.snapshot(&result);
        reporter.write(&report);
        // vCPU threads that never came back may still use guest memory:
        // leave it (and the VM) mapped until the process exits.
        std::mem::forget(ram);
        std::mem::forget(vm_fd);
        (result, report)
    }
}

/// Builds `RunReport`s from the live VM, at the end or on demand.
struct Reporter {
    memory: memory::MemoryReporter,
    shared: Arc<VcpuShared>,
    mailbox: Arc<Mutex<wakeup::WakeupMailbox>>,
    serial: Arc<Mutex<Serial>>,
    device_manager: devices::DeviceManager,
    started_unix_ns: u64,
    path: Option<PathBuf>,
}

impl Reporter {
    /// `result` is None while the VM still runs.
    fn snapshot(&self, result: &Result<StopReason>) -> RunReport {
        self.build(Some(result))
    }

    fn build(&self, result: Option<&Result<StopReason>>) -> RunReport {
        let mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
        let c = &self.shared.counters;
        let (rss, shmem, hugetlb) = rss_kib();
        RunReport {
            stop: match result {
                None => "running".into(),
                Some(Ok(r)) => format!("{r:?}"),
                Some(Err(e)) => format!("error: {e}"),
            },
            guest_status: match result {
                Some(Ok(StopReason::DebugExit(s))) => Some(*s),
                _ => None,
            },
            process_start_unix_ns: self.started_unix_ns,
            first_entry_unix_ns: self.shared.first_entry_unix_ns.load(Ordering::Relaxed),
            exits_pio: c.pio.load(Ordering::Relaxed),
            exits_mmio: c.mmio.load(Ordering::Relaxed),
            exits_unclaimed: c.unclaimed.load(Ordering::Relaxed),
            aps_woken: mailbox.woken,
            ap_wakeups_ignored: mailbox.ignored,
            serial_lost_bytes: self.serial.lock().unwrap_or_else(|e| e.into_inner()).lost_bytes,
            rss_overhead_kib: rss.saturating_sub(shmem),
            // hugetlbfs pages are outside VmRSS; shmem ones inside it.
            guest_ram_resident_kib: shmem + hugetlb,
            memory: self.memory.report(),
            devices: self.device_manager.metrics(),
            secure: self.shared.ultracall.report(),
            thread_cpu_ns: {
                let mut t = thread_cpu_ns();
                for (id, ns) in self.shared.vcpu_cpu_ns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    t.insert(format!("vcpu{id}"), *ns);
                }
                t
            },
        }
    }

    fn write(&self, report: &RunReport) {
        let Some(path) = &self.path else { return };
        let json = serde_json::to_string_pretty(report).unwrap_or_default();
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, json + "\n").and_then(|()| std::fs::rename(&tmp, path)) {
            log::warn!("cannot write metrics to {}: {e}", path.display());
        }
    }
}

/// Writes the metrics file when veil gets SIGUSR1.
struct MetricsOnSignal {
    signals: std::os::unix::net::UnixStream,
    reporter: Arc<Reporter>,
}

impl MutEventSubscriber for MetricsOnSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut buf = [0u8; 16];
        let _ = std::io::Read::read(&mut self.signals, &mut buf);
        self.reporter.write(&self.reporter.build(None));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, vmm_sys_util::epoll::EventSet::IN)) {
            log::warn!("cannot watch SIGUSR1: {e:?}");
        }
    }
}

/// CPU time of each live thread of this process, by thread name. A name
/// shared by several threads (never, today) would add up.
fn thread_cpu_ns() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        *out.entry(name).or_insert(0) += vcpu::schedstat_ns(&dir.join("schedstat"));
    }
    out
}

/// (VmRSS, RssShmem, HugetlbPages) of this process in KiB. Guest RAM is a
/// shared file, so it shows as shared memory (or as hugetlb pages, which
/// VmRSS leaves out); everything else is veil's own overhead.
fn rss_kib() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssShmem:"), field("HugetlbPages:"))
}

/// Wakes the main loop when a device asks the VM to stop.
struct StopWatcher {
    stop: Arc<StopSignal>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.stop.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.stop.event(), vmm_sys_util::epoll::EventSet::IN)) {
            log::error!("cannot watch the stop event: {e:?}");
        }
    }
}

/// Records that veil got SIGTERM or SIGINT, for the main loop to stop the VM.
struct TermOnSignal {
    signals: std::os::unix::net::UnixStream,
    signal: i32,
    got: Arc<std::sync::atomic::AtomicI32>,
}

impl MutEventSubscriber for TermOnSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut buf = [0u8; 16];
        let _ = std::io::Read::read(&mut self.signals, &mut buf);
        self.got.store(self.signal, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, vmm_sys_util::epoll::EventSet::IN)) {
            log::warn!("cannot watch signal {}: {e:?}", self.signal);
        }
    }
}

/// A non-blocking socket that becomes readable when `signal` arrives.
fn signal_pipe(signal: i32) -> std::io::Result<std::os::unix::net::UnixStream> {
    let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    tx.set_nonblocking(true)?;
    signal_hook::low_level::pipe::register(signal, tx)?;
    Ok(rx)
}

/// The main thread's loop: device events (host stdin) until the VM stops
/// or the timeout passes.
fn wait_for_stop(
    stop: &Arc<StopSignal>,
    serial: Arc<Mutex<Serial>>,
    stdin: Option<File>,
    timeout: Option<Duration>,
    reporter: Arc<Reporter>,
    sandbox: &Sandbox,
) -> Result<StopReason> {
    let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
        .map_err(|e| Error::new(Kind::Unavailable, format!("cannot create the event loop: {e:?}")))?;
    manager.add_subscriber(Box::new(StopWatcher { stop: stop.clone() }));
    let terminated = Arc::new(std::sync::atomic::AtomicI32::new(0));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        match signal_pipe(signal) {
            Ok(signals) => {
                manager.add_subscriber(Box::new(TermOnSignal {
                    signals,
                    signal,
                    got: terminated.clone(),
                }));
            }
            Err(e) => log::warn!("signal {signal} will not stop the VM cleanly: {e}"),
        }
    }
    if reporter.path.is_some() {
        let pair = std::os::unix::net::UnixStream::pair().and_then(|(rx, tx)| {
            rx.set_nonblocking(true)?;
            tx.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(signal_hook::consts::SIGUSR1, tx)?;
            Ok(rx)
        });
        match pair {
            Ok(signals) => {
                manager.add_subscriber(Box::new(MetricsOnSignal { signals, reporter }));
            }
            Err(e) => log::warn!("SIGUSR1 will not write metrics: {e}"),
        }
    }
    if let Some(input) = stdin {
        manager.add_subscriber(Box::new(SerialInput::new(serial, input)));
    }
    // Everything the loop watches is set up: from here on it only serves.
    enter_sandbox(sandbox, ThreadKind::Main, "main");
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        if let Some(reason) = stop.reason() {
            return Ok(reason);
        }
        let signal = terminated.load(Ordering::Acquire);
        if signal != 0 {
            let name = if signal == signal_hook::consts::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            log::warn!("got {name}: stopping the VM");
            return Err(Error::new(Kind::Terminated(signal), format!("stopped by {name}")));
        }
        let wait_ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
                    return Err(Error::new(
                        Kind::Timeout,
                        format!("the guest did not finish within {secs} s (--timeout)"),
                    ));
                }
                left.as_millis().clamp(1, 1000) as i32
            }
            None => 1000,
        };
        if let Err(e) = manager.run_with_timeout(wait_ms) {
            log::warn!("event loop: {e:?}");
        }
    }
}

/// Kicks every vCPU out of KVM_RUN until it notices the VM is exiting. A
/// vCPU that never comes back (a guest spinning inside KVM) is left behind:
/// the process exits around it.
fn stop_vcpus(threads: &[JoinHandle<()>]) {
    let give_up = Instant::now() + Duration::from_millis(500);
    while Instant::now() < give_up {
        let running: Vec<&JoinHandle<()>> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            return;
        }
        for t in running {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stuck = threads.iter().filter(|t| !t.is_finished()).count();
    log::warn!("{stuck} vCPU thread(s) did not leave KVM_RUN; exiting without them");
}
