//! Counters of a running VMM process, read the same way for every peer:
//! per-thread CPU time from /proc/<pid>/task/*/schedstat (ns on CPU; the
//! utime+stime ticks of /proc/<pid>/task/*/stat when schedstat is missing),
//! split into vCPU and VMM threads by thread name, and exits to the VMM from
//! KVM's per-VM debugfs statistics (/sys/kernel/debug/kvm/<pid>-<fd>/).

use std::path::{Path, PathBuf};

/// One moment's counters of a VMM process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// CPU time of the vCPU threads, ns (guest time included).
    pub vcpu_ns: u64,
    /// CPU time of every other thread, ns.
    pub vmm_ns: u64,
    /// Port-I/O plus MMIO exits to the VMM, when they can be read.
    pub exits: Option<u64>,
}

/// Where KVM keeps its per-VM statistics.
pub const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";

/// True when KVM's statistics can be read (a kernel in lockdown, or a
/// sandbox, may show the files and refuse to read them).
fn debugfs_readable() -> bool {
    std::fs::read_to_string(Path::new(KVM_DEBUGFS).join("exits")).is_ok()
}

/// Mounts debugfs at /sys/kernel/debug if KVM's directory is not there yet.
/// True when the per-VM statistics can be read.
pub fn ensure_debugfs() -> bool {
    if Path::new(KVM_DEBUGFS).is_dir() {
        return debugfs_readable();
    }
    let _ = std::process::Command::new("mount")
        .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    debugfs_readable()
}

/// utime + stime (fields 14 and 15) of a /proc stat line, in clock ticks.
/// The command name (field 2) may hold spaces and parentheses, so fields
/// are counted from the last ')'.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn thread_ns(task: &Path) -> u64 {
    if let Ok(s) = std::fs::read_to_string(task.join("schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return ns;
        }
    }
    let ticks = std::fs::read_to_string(task.join("stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0);
    // USER_HZ is 100 on x86-64 Linux: one tick is 10 ms.
    ticks * 10_000_000
}

/// CPU time of `pid`'s threads, split by `is_vcpu(thread name)`.
pub fn thread_cpu(pid: u32, is_vcpu: &dyn Fn(&str) -> bool) -> (u64, u64) {
    let (mut vcpu, mut vmm) = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let ns = thread_ns(&dir);
        if is_vcpu(name.trim_end()) {
            vcpu += ns;
        } else {
            vmm += ns;
        }
    }
    (vcpu, vmm)
}

/// KVM's debugfs directories of `pid`'s VMs (named `<pid>-<vm fd>`).
pub fn vm_dirs(root: &Path, pid: u32) -> Vec<PathBuf> {
    let prefix = format!("{pid}-");
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// io_exits + mmio_exits summed over `pid`'s VMs, or None when KVM's
/// statistics for it cannot be read.
pub fn kvm_exits(root: &Path, pid: u32) -> Option<u64> {
    let dirs = vm_dirs(root, pid);
    if dirs.is_empty() {
        return None;
    }
    let mut sum = 0;
    for dir in dirs {
        for file in ["io_exits", "mmio_exits"] {
            let text = std::fs::read_to_string(dir.join(file)).ok()?;
            sum += text.trim().parse::<u64>().ok()?;
        }
    }
    Some(sum)
}

/// Resident set size of `pid`, KiB (VmRSS of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_the_name() {
        let line = "4242 (CPU 0/KVM) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 3 0 1 2 3";
        assert_eq!(stat_ticks(line), Some(267));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn debugfs_layout() {
        let root = std::env::temp_dir().join(format!("veil-kvmstat-{}", std::process::id()));
        let vm = root.join("77-12");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::create_dir_all(root.join("770-3")).unwrap();
        std::fs::write(vm.join("io_exits"), "40\n").unwrap();
        std::fs::write(vm.join("mmio_exits"), "2\n").unwrap();
        assert_eq!(kvm_exits(&root, 77), Some(42));
        // 770's VM has no counters: not readable rather than zero.
        assert_eq!(kvm_exits(&root, 770), None);
        assert_eq!(kvm_exits(&root, 78), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn own_threads_are_seen() {
        let (vcpu, vmm) = thread_cpu(std::process::id(), &|_| false);
        assert_eq!(vcpu, 0);
        assert!(vmm > 0);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
