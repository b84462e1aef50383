//! PCI: bus 0 behind a host bridge, reached through configuration
//! mechanism #1 and ECAM, with its devices' BARs in an MMIO window; and the
//! virtio-pci transport, the PCI sibling of virtio-mmio.
//!
//! What the VMM wires (see each type for details):
//!
//! - a [`PciRoot`] over the BAR window it reserves for PCI, shared as
//!   `Arc<Mutex<PciRoot>>` by three bus devices: [`PciConfigIo`] on the I/O
//!   bus at 0xCF8 (8 ports), [`PciConfigMmio`] on the MMIO bus over the
//!   ECAM range, [`PciBarWindow`] on the MMIO bus over the BAR window;
//! - per virtio device, a [`VirtioPciInterrupt`] (MSI-X vectors: a GSI and
//!   an irqfd each, an [`MsiRouter`] that keeps the GSI routing table, and
//!   an INTx irqfd), the `VirtioState` created with it, a
//!   [`VirtioPciDevice`] over both, optionally an [`IoEventRegistry`] that
//!   places the queues' ioeventfds, then `PciRoot::add_device`.

pub mod bus;
pub mod config;
pub mod msix;
pub mod virtio_pci;

pub use bus::{HostBridge, PciBarWindow, PciConfigIo, PciConfigMmio, PciDevice, PciError, PciRoot};
pub use config::{ConfigSpace, PciIds};
pub use msix::{MsiMessage, MsiRouter, MsiVector};
pub use virtio_pci::{IoEventRegistry, VirtioPciDevice, VirtioPciError, VirtioPciInterrupt};

/// Stand-ins for the VMM's side, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{IoEventRegistry, MsiMessage, MsiRouter};
    use std::io;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    /// Records every route it is given.
    #[derive(Default)]
    pub struct MockRouter {
        calls: Mutex<Vec<(u32, Option<MsiMessage>)>>,
    }

    impl MockRouter {
        pub fn calls(&self) -> Vec<(u32, Option<MsiMessage>)> {
            self.calls.lock().unwrap().clone()
        }

        /// Where `gsi` is routed now.
        pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|(g, _)| *g == gsi)
                .and_then(|(_, m)| *m)
        }
    }

    impl MsiRouter for MockRouter {
        fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
            self.calls.lock().unwrap().push((gsi, message));
            Ok(())
        }
    }

    /// Keeps the registered addresses; refuses duplicates and unknown
    /// removals as KVM does.
    #[derive(Default)]
    pub struct MockIoEvents {
        pub registered: Mutex<Vec<u64>>,
    }

    impl IoEventRegistry for MockIoEvents {
        fn register(&self, addr: u64, _evt: &EventFd) -> io::Result<()> {
            let mut r = self.registered.lock().unwrap();
            if r.contains(&addr) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            r.push(addr);
            Ok(())
        }

        fn unregister(&self, addr: u64, _evt: &EventFd) -> io::Result<()> {
            let mut r = self.registered.lock().unwrap();
            let at = r
                .iter()
                .position(|&a| a == addr)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
            r.remove(at);
            Ok(())
        }
    }
}
