//! From KVM exits to ultracalls: the port transport's registers, and turning
//! KVM_HC_MAP_GPA_RANGE exits on.

use super::map_gpa_range::KVM_HC_MAP_GPA_RANGE;
use super::UltracallGate;
use kvm_bindings::{kvm_enable_cap, KVM_CAP_EXIT_HYPERCALL, KVM_EXIT_IO_IN};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

/// Asks KVM to forward KVM_HC_MAP_GPA_RANGE (and only it) to veil, when KVM
/// can. Without it the guest gets -KVM_ENOSYS from KVM, which is all a guest
/// that uses the port transport needs.
pub fn enable_hypercall_exits(vm: &VmFd) {
    let wanted = 1u64 << KVM_HC_MAP_GPA_RANGE;
    let offered = vm.check_extension_int(Cap::ExitHypercall);
    if offered < 0 || (offered as u64) & wanted == 0 {
        log::debug!("KVM cannot forward KVM_HC_MAP_GPA_RANGE (KVM_CAP_EXIT_HYPERCALL = {offered})");
        return;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        args: [wanted, 0, 0, 0],
        ..Default::default()
    };
    match vm.enable_cap(&cap) {
        Ok(()) => log::debug!("KVM forwards KVM_HC_MAP_GPA_RANGE"),
        Err(e) => log::debug!("cannot enable KVM_CAP_EXIT_HYPERCALL: {e}"),
    }
}

/// The pending port access of the last exit, as KVM described it.
struct PortAccess {
    is_in: bool,
    size: u8,
    count: u32,
    /// The access's data in the vCPU's `kvm_run` mapping.
    data: *mut u8,
}

fn pending_port_access(fd: &mut VcpuFd) -> PortAccess {
    let run = fd.get_kvm_run();
    // SAFETY: the caller saw a KVM_EXIT_IO exit, so `io` is the union
    // member KVM filled; it holds plain integers only.
    let io = unsafe { run.__bindgen_anon_1.io };
    PortAccess {
        is_in: u32::from(io.direction) == KVM_EXIT_IO_IN,
        size: io.size,
        count: io.count,
        // In bounds, as KVM promises for `data_offset` (the same arithmetic
        // kvm-ioctls does to hand out the data of IoIn/IoOut).
        data: std::ptr::from_mut(run)
            .cast::<u8>()
            .wrapping_add(io.data_offset as usize),
    }
}

impl PortAccess {
    fn len(&self) -> usize {
        usize::from(self.size) * self.count as usize
    }

    /// Sets what the pending `in` reads.
    fn answer(&self, bytes: impl Iterator<Item = u8>) {
        for (i, b) in bytes.take(self.len()).enumerate() {
            // SAFETY: KVM reserved `size * count` bytes at `data` inside the
            // vCPU's kvm_run mapping, which lives as long as the VcpuFd; no
            // reference to those bytes exists while this writes them.
            unsafe { self.data.add(i).write(b) };
        }
    }
}

impl UltracallGate {
    /// Serves a KVM_EXIT_IO on the ultracall port: an `in eax` is a call,
    /// anything else a bad access. Errors are KVM's (registers unreadable).
    pub fn serve_port_exit(&self, fd: &mut VcpuFd, vcpu: u8) -> Result<(), kvm_ioctls::Error> {
        let access = pending_port_access(fd);
        if !access.is_in || access.size != 4 || access.count != 1 {
            let what = format!(
                "{} of {} x {} bytes",
                if access.is_in { "in" } else { "out" },
                access.count,
                access.size
            );
            self.bad_port_access(vcpu, &what);
            if access.is_in {
                access.answer(std::iter::repeat(0xff));
            }
            return Ok(());
        }
        let mut regs = fd.get_regs()?;
        let result = self.call(regs.rax as u32, [regs.rbx, regs.rcx, regs.rdx, regs.rsi]);
        if let Some(query) = result.query {
            // The `in` is still pending: the next KVM_RUN completes it and
            // moves RIP on (RIP must stay as it is for that). Upstream KVM
            // writes the data to EAX then; the development machines' KVM
            // keeps the RAX given here instead and drops the data. So RAX is
            // set to what the data says, and either way the guest gets it.
            [regs.rbx, regs.rcx, regs.rdx, regs.rsi] = query.registers();
            regs.rax = u64::from(result.status as u32);
            fd.set_regs(&regs)?;
        }
        access.answer((result.status as u32).to_le_bytes().into_iter());
        Ok(())
    }
}
