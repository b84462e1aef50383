//! One thread per vCPU: enter the guest, route each exit to the bus, and
//! stop when the VM stops.

use crate::error::{Error, Kind};
use kvm_bindings::{
    kvm_mp_state, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use veil_arch::layout::ULTRACALL_PORT;
use veil_arch::regs::{boot_regs, set_long_mode, EntryPoint};
use veil_devices::{Bus, StopReason, StopSignal};

use super::port_io::PortAccess;
use super::ultracall::UltracallGate;

/// What every vCPU thread shares with the rest of the VM.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    /// Served before the port bus: ultracalls change registers, not just data.
    pub ultracall: UltracallGate,
    pub stop: Arc<StopSignal>,
    /// Set once the VM is stopping: a vCPU that sees it leaves its loop.
    pub exiting: AtomicBool,
    /// The first vCPU failure, reported as veil's error.
    pub failure: Mutex<Option<Error>>,
    pub counters: ExitCounters,
    pub cr3: u64,
    /// Wall-clock time (Unix ns) when the boot CPU first entered the guest.
    pub first_entry_unix_ns: AtomicU64,
    /// CPU time (ns) each vCPU thread used, recorded as it ends.
    pub vcpu_cpu_ns: Mutex<Vec<(u8, u64)>>,
}

/// Exits by kind, over all vCPUs.
#[derive(Default, Debug)]
pub struct ExitCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub unclaimed: AtomicU64,
}

impl VcpuShared {
    fn fail(&self, error: Error) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(error);
        }
        drop(slot);
        self.stop.request(StopReason::Failed);
    }
}

/// Wall-clock nanoseconds; comparable across processes, which is what a
/// benchmark timing veil from outside needs.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// CPU time (ns) a thread has run, from the first field of its
/// /proc/.../schedstat; 0 if it cannot be read.
pub fn schedstat_ns(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time (ns) the calling thread has run: the same figure as its
/// schedstat, without opening a file (which its seccomp filter forbids).
pub fn this_thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How a vCPU begins running.
pub enum Start {
    /// The boot CPU: already in its entry state.
    Now,
    /// An application processor: waits for its wake-up from the mailbox.
    OnWakeup(mpsc::Receiver<EntryPoint>),
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: KVM filled the `internal` member of the union for this exit
    // reason; we only read plain integers from it.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!("suberror {}, data {:x?}", internal.suberror, &internal.data[..n])
}

fn rip(fd: &VcpuFd) -> String {
    fd.get_regs()
        .map_or_else(|_| "unknown".into(), |r| format!("{:#x}", r.rip))
}

impl Vcpu {
    fn enter(&mut self, entry: EntryPoint, cr3: u64) -> Result<(), Error> {
        let io = |e: kvm_ioctls::Error| {
            Error::new(
                Kind::Software,
                format!("vCPU {}: cannot set its start state: {e}", self.id),
            )
        };
        let mut sregs = self.fd.get_sregs().map_err(io)?;
        set_long_mode(&mut sregs, cr3);
        self.fd.set_sregs(&sregs).map_err(io)?;
        self.fd.set_regs(&boot_regs(entry)).map_err(io)?;
        if self.id != 0 {
            // An AP left alone waits for INIT/SIPI in the in-kernel LAPIC.
            self.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(io)?;
        }
        Ok(())
    }

    /// Runs until the VM stops; failures land in `shared.failure`.
    pub fn run(mut self, start: Start, shared: Arc<VcpuShared>) {
        if let Start::OnWakeup(rx) = start {
            let Ok(entry) = rx.recv() else { return };
            log::info!("vCPU {} woken at {:#x}", self.id, entry.rip);
            if let Err(e) = self.enter(entry, shared.cr3) {
                shared.fail(e);
                return;
            }
        }
        if self.id == 0 {
            shared.first_entry_unix_ns.store(unix_ns(), Ordering::Relaxed);
            log::debug!("entering the guest");
        }
        while !shared.exiting.load(Ordering::Acquire) {
            if let Err(e) = self.step(&shared) {
                shared.fail(e);
                return;
            }
            if shared.stop.reason().is_some() {
                break;
            }
        }
        // Where each vCPU was when the VM stopped: the first clue when a
        // guest hangs or times out.
        // Stopped by the timeout (no stop reason): say where it was, loudly.
        if shared.stop.reason().is_none() {
            log::warn!("vCPU {} was at RIP {} when the VM was stopped", self.id, rip(&self.fd));
        } else {
            log::info!("vCPU {} stopped at RIP {}", self.id, rip(&self.fd));
        }
        let cpu_ns = this_thread_cpu_ns();
        shared
            .vcpu_cpu_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.id, cpu_ns));
    }

    fn step(&mut self, shared: &VcpuShared) -> Result<(), Error> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(()),
            Err(e) => return Err(Error::new(Kind::Software, format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        let c = &shared.counters;
        match exit {
            VcpuExit::IoIn(ULTRACALL_PORT, _) | VcpuExit::IoOut(ULTRACALL_PORT, _) => {
                c.pio.fetch_add(1, Ordering::Relaxed);
                shared
                    .ultracall
                    .serve_port_exit(&mut self.fd, id)
                    .map_err(|e| Error::new(Kind::Software, format!("vCPU {id}: ultracall: {e}")))?;
            }
            VcpuExit::Hypercall(call) => *call.ret = shared.ultracall.hypercall(call.nr, call.args),
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {
                c.pio.fetch_add(1, Ordering::Relaxed);
                // A string instruction is one exit of many elements: the bus
                // gets them one by one (port_io.rs).
                let access = PortAccess::pending(&mut self.fd);
                if !access.serve(&shared.pio) {
                    c.unclaimed.fetch_add(1, Ordering::Relaxed);
                    log::debug!("vCPU {id}: access to unclaimed port {:#x}", access.port);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                c.mmio.fetch_add(1, Ordering::Relaxed);
                if !shared.mmio.write(addr, data) {
                    c.unclaimed.fetch_add(1, Ordering::Relaxed);
                    log::debug!("vCPU {id}: write to unclaimed MMIO {addr:#x}");
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                c.mmio.fetch_add(1, Ordering::Relaxed);
                if !shared.mmio.read(addr, data) {
                    c.unclaimed.fetch_add(1, Ordering::Relaxed);
                }
            }
            VcpuExit::Intr => {}
            VcpuExit::Hlt => {
                // Only without an in-kernel LAPIC; veil always has one.
                return Err(Error::new(
                    Kind::Software,
                    format!("vCPU {id}: unexpected HLT exit at RIP {}", rip(&self.fd)),
                ));
            }
            VcpuExit::Shutdown => {
                log::warn!(
                    "vCPU {id}: triple fault at RIP {}: treating it as a reset",
                    rip(&self.fd)
                );
                shared.stop.request(StopReason::Reset);
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => shared.stop.request(StopReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => shared.stop.request(StopReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    return Err(Error::new(Kind::Software, format!("vCPU {id}: guest reported a crash")))
                }
                other => {
                    return Err(Error::new(
                        Kind::Software,
                        format!("vCPU {id}: unknown system event {other}"),
                    ))
                }
            },
            VcpuExit::InternalError => {
                let detail = internal_error_detail(&mut self.fd);
                return Err(Error::new(
                    Kind::Software,
                    format!("vCPU {id}: KVM internal error ({detail}) at RIP {}", rip(&self.fd)),
                ));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(Error::new(
                    Kind::Software,
                    format!(
                        "vCPU {id}: VM entry failed (hardware reason {reason:#x}, cpu {cpu}) at RIP {}",
                        rip(&self.fd)
                    ),
                ));
            }
            other => {
                let what = format!("{other:?}");
                return Err(Error::new(
                    Kind::Software,
                    format!("vCPU {id}: unhandled exit {what} at RIP {}", rip(&self.fd)),
                ));
            }
        }
        Ok(())
    }
}
