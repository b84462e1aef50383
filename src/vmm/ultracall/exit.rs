//! From KVM exits to ultracalls: the port transport's registers, and turning
//! KVM_HC_MAP_GPA_RANGE exits on.

use super::map_gpa_range::KVM_HC_MAP_GPA_RANGE;
use super::UltracallGate;
use crate::vmm::port_io::PortAccess;
use kvm_bindings::{kvm_enable_cap, KVM_CAP_EXIT_HYPERCALL};
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

impl UltracallGate {
    /// Serves a KVM_EXIT_IO on the ultracall port: an `in eax` is a call,
    /// anything else a bad access. Errors are KVM's (registers unreadable).
    pub fn serve_port_exit(&self, fd: &mut VcpuFd, vcpu: u8) -> Result<(), kvm_ioctls::Error> {
        let access = PortAccess::pending(fd);
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
