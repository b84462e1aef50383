//! KVM's interrupt routing table and ioeventfd registration, as the PCI
//! devices ask for them.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps it:
//! the PIC and IOAPIC pins KVM routes by default, plus one MSI route per
//! vector the guest has enabled.

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use veil_devices::pci::{IoEventRegistry, MsiMessage, MsiRouter};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are IOAPIC pins; MSI vectors get the ones above.
pub const FIRST_MSI_GSI: u32 = 24;
const IOAPIC_PINS: u32 = 24;

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
    e
}

fn msi(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi = kvm_irq_routing_msi {
        address_lo: m.address as u32,
        address_hi: (m.address >> 32) as u32,
        data: m.data,
        ..Default::default()
    };
    e
}

/// The routes KVM sets up with the in-kernel irqchip: GSI n is IOAPIC pin
/// n, and GSIs 0-15 also reach the PICs.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..16 {
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        if gsi != 2 {
            routes.push(irqchip(gsi, chip, pin));
        }
    }
    routes.extend((0..IOAPIC_PINS).map(|gsi| irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi)));
    routes
}

pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    fn table(msi_routes: &BTreeMap<u32, MsiMessage>) -> io::Result<KvmIrqRouting> {
        let mut entries = default_routes();
        entries.extend(msi_routes.iter().map(|(&gsi, &m)| msi(gsi, m)));
        KvmIrqRouting::from_entries(&entries).map_err(|e| io::Error::other(format!("routing table: {e:?}")))
    }
}

impl MsiRouter for GsiRouter {
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => routes.insert(gsi, m),
            None => routes.remove(&gsi),
        };
        let table = Self::table(&routes)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Registers PCI notify addresses as ioeventfds (any width, no datamatch).
pub struct KvmIoEvents(pub Arc<VmFd>);

impl IoEventRegistry for KvmIoEvents {
    fn register(&self, addr: u64, evt: &EventFd) -> io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, evt: &EventFd) -> io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_irqchip_routes_and_adds_msi() {
        let mut m = BTreeMap::new();
        m.insert(
            30,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x41,
            },
        );
        let t = GsiRouter::table(&m).unwrap();
        let entries = t.as_slice();
        assert_eq!(entries.len(), 15 + 24 + 1);
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI route just above.
        let msi = unsafe { last.u.msi };
        assert_eq!((msi.address_lo, msi.address_hi, msi.data), (0xfee0_1000, 0, 0x41));
        assert!(entries
            .iter()
            .any(|e| e.gsi == 23 && e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }
}
