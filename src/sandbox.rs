//! Per-thread seccomp filters: each of veil's threads may make only the
//! system calls its job needs once it has been set up.
//!
//! A filter is installed by the thread itself, after everything that needs
//! privileges or the file system (KVM fds, guest RAM mappings, image files,
//! TAP devices) was done and before it handles anything from the guest.
//! Filters stack: a device worker is spawned by the vCPU thread that saw
//! DRIVER_OK, so it runs under the vCPU filter and its own, and may make a
//! call only if both allow it. A call no filter allows raises SIGSYS, whose
//! handler prints one line naming the thread and the call and ends veil
//! with status 71.
//!
//! Arguments are checked where that is cheap and closes a real door: a
//! vCPU thread (and so a device worker) may make only KVM ioctls (type
//! 0xAE), device workers none at all; `prctl` only names a thread or sets
//! no_new_privs; `tgkill` reaches only veil's own threads.

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::BTreeMap;

/// Exit status after a forbidden system call (EX_OSERR).
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 71;

/// The roles veil's threads play.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: serial input, signals, timeout, metrics.
    Main,
    /// KVM_RUN and the exits it hands back; activates devices.
    Vcpu,
    /// A virtio device's worker: its queues and its backend.
    Device,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
        }
    }

    pub fn parse(s: &str) -> Option<ThreadKind> {
        match s {
            "main" => Some(ThreadKind::Main),
            "vcpu" => Some(ThreadKind::Vcpu),
            "device" => Some(ThreadKind::Device),
            _ => None,
        }
    }
}

/// What every thread does: memory management by the allocator, locks,
/// waiting on fds, logging to stderr, signals, and ending itself.
const EVERY_THREAD: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_fcntl,
    // Signal handlers (SIGUSR1, SIGTERM) forward the signal to the event
    // loop by send(2) on a socket pair, on whichever thread took it.
    libc::SYS_sendto,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A device worker: its backend's I/O (image files, TAP, host entropy).
const DEVICE: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_getrandom,
];

/// A vCPU thread: besides KVM_RUN (an ioctl), it starts and stops device
/// workers at DRIVER_OK and reset, so it needs what a new thread does
/// (including putting it under its own filter), and everything a worker
/// needs (workers inherit this filter).
const VCPU: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_seccomp,
];

/// The main thread: it also writes `--metrics` (a new file renamed over the
/// old one) from what /proc says of veil's threads, kicks vCPU threads with
/// a signal, and restores the terminal.
const MAIN: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_getdents64,
    // The event loop reads forwarded signals from its end of the pair.
    libc::SYS_recvfrom,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // Terminal modes at exit, and whatever KVM requests the metrics need.
    libc::SYS_ioctl,
    libc::SYS_rt_sigaction,
    libc::SYS_getrandom,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
];

/// The system calls a thread of `kind` may make.
pub fn allowed(kind: ThreadKind) -> Vec<libc::c_long> {
    let own: &[libc::c_long] = match kind {
        ThreadKind::Main => MAIN,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Device => DEVICE,
    };
    let mut all: Vec<libc::c_long> = EVERY_THREAD.iter().chain(own).copied().collect();
    if kind == ThreadKind::Vcpu {
        all.extend_from_slice(DEVICE);
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// A 32- or 64-bit comparison of argument `arg`.
fn arg(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, len, op, value).map_err(|e| format!("bad seccomp condition: {e}"))
}

/// The calls of `kind` that are allowed only with some arguments.
fn argument_rules(kind: ThreadKind) -> Result<Vec<(libc::c_long, Vec<SeccompRule>)>, String> {
    use SeccompCmpArgLen::{Dword, Qword};
    let rule = |conds| SeccompRule::new(conds).map_err(|e| format!("bad seccomp rule: {e}"));
    Ok(match kind {
        ThreadKind::Vcpu => vec![
            // _IOC_TYPE of the request: KVM's 0xAE, on the VM and vCPU fds.
            (
                libc::SYS_ioctl,
                vec![rule(vec![arg(1, Dword, SeccompCmpOp::MaskedEq(0xff00), 0xae00)?])?],
            ),
            // A new worker names itself, then its filter wants no_new_privs.
            (
                libc::SYS_prctl,
                vec![
                    rule(vec![arg(0, Dword, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
                    rule(vec![arg(0, Dword, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)?])?,
                ],
            ),
        ],
        // Kicks go to veil's own threads only.
        ThreadKind::Main => vec![(
            libc::SYS_tgkill,
            vec![rule(vec![arg(0, Qword, SeccompCmpOp::Eq, std::process::id() as u64)?])?],
        )],
        ThreadKind::Device => Vec::new(),
    })
}

fn program(kind: ThreadKind) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind).into_iter().map(|nr| (nr, Vec::new())).collect();
    for (nr, conditional) in argument_rules(kind)? {
        rules.insert(nr, conditional);
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("cannot build the {} seccomp filter: {e}", kind.name()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("cannot compile the {} seccomp filter: {e}", kind.name()))
}

thread_local! {
    /// This thread's name for the SIGSYS message, fixed before its filter
    /// goes on (reading it in the handler makes no system call).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// How veil sandboxes its threads: off for debugging, and a self-test that
/// makes one kind of thread break its filter on purpose.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sandbox {
    pub enabled: bool,
    /// `VEIL_SECCOMP_SELFTEST=main|vcpu|device`: that thread kind makes a
    /// forbidden call right after its filter is on (for tests only).
    pub selftest: Option<ThreadKind>,
}

impl Sandbox {
    /// Also installs the process's SIGSYS handler, so that no thread needs
    /// sigaction(2) once filtered.
    pub fn new(enabled: bool) -> Result<Sandbox, String> {
        let selftest = std::env::var("VEIL_SECCOMP_SELFTEST")
            .ok()
            .and_then(|s| ThreadKind::parse(&s));
        if enabled {
            install_sigsys_handler()?;
        }
        Ok(Sandbox { enabled, selftest })
    }

    /// Puts the calling thread, named `name`, under the filter of `kind`.
    pub fn enter(&self, kind: ThreadKind, name: &str) -> Result<(), String> {
        let mut label = [0u8; 16];
        let n = name.len().min(label.len());
        label[..n].copy_from_slice(&name.as_bytes()[..n]);
        THREAD_NAME.with(|c| c.set(label));
        if self.enabled {
            let prog = program(kind)?;
            apply_filter(&prog).map_err(|e| format!("cannot install the {} seccomp filter: {e}", kind.name()))?;
        }
        if self.selftest == Some(kind) {
            log::warn!("VEIL_SECCOMP_SELFTEST: thread {name} makes a forbidden system call");
            // SAFETY: socket(2) takes no pointers; a descriptor it might
            // return (filters off) is closed at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: fd was just returned by socket(2) and is owned here.
                unsafe { libc::close(fd) };
            }
        }
        Ok(())
    }
}

/// Byte offset of `si_syscall` in a SIGSYS siginfo_t on x86-64: after
/// si_signo, si_errno, si_code, padding and the 8-byte `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS with
    // SA_SIGINFO; si_syscall is an i32 at this offset.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
    let label = THREAD_NAME.with(|c| c.get());
    let mut msg = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < msg.len() {
                msg[len] = b;
                len += 1;
            }
        }
    };
    put(b"veil: error: seccomp: thread ");
    put(label.split(|&b| b == 0).next().unwrap_or(&[]));
    put(b" made forbidden system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b"; run with --seccomp off to debug\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed in
    // every filter; msg outlives the call.
    unsafe {
        libc::write(2, msg.as_ptr() as *const libc::c_void, len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; we set the handler, SA_SIGINFO
    // and an empty mask before passing it to sigaction(2).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_may_do_only_what_the_vcpu_thread_that_spawns_them_may() {
        let vcpu = allowed(ThreadKind::Vcpu);
        for nr in allowed(ThreadKind::Device) {
            assert!(vcpu.contains(&nr), "syscall {nr} is allowed for devices but not vCPUs");
        }
    }

    #[test]
    fn device_workers_make_no_ioctl_and_vcpus_only_kvm_ones() {
        assert!(!allowed(ThreadKind::Device).contains(&libc::SYS_ioctl));
        let vcpu = argument_rules(ThreadKind::Vcpu).unwrap();
        assert!(vcpu
            .iter()
            .any(|(nr, rules)| *nr == libc::SYS_ioctl && rules.len() == 1));
        assert!(
            !allowed(ThreadKind::Vcpu).contains(&libc::SYS_ioctl),
            "unconditional ioctl for vCPUs"
        );
    }

    #[test]
    fn no_thread_may_start_programs_or_open_sockets() {
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Device] {
            let list = allowed(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_fork,
                libc::SYS_ptrace,
            ] {
                assert!(!list.contains(&nr), "{kind:?} allows {nr}");
            }
        }
        assert!(!allowed(ThreadKind::Device).contains(&libc::SYS_openat));
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_openat));
    }

    #[test]
    fn every_filter_compiles() {
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Device] {
            assert!(!program(kind).unwrap().is_empty());
        }
    }
}
