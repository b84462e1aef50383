//! Arbitrary config-space and BAR accesses on a virtio-pci function
//! (common cfg, notify, ISR, device cfg, MSI-X table and PBA) with a
//! recording device behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use veil_devices::dma::{direct_view, DmaMode};
use veil_devices::pci::config::valid_access;
use veil_devices::pci::virtio_pci::BarLayout;
use veil_devices::pci::{MsiMessage, MsiRouter, MsiVector, PciDevice, VirtioPciDevice, VirtioPciInterrupt};
use veil_devices::virtio::transport::VirtioState;
use veil_devices::virtio::{status, DeviceMetrics};
use veil_fuzz::{check_activations, guest, Input, Log, Stub};
use vmm_sys_util::eventfd::EventFd;

struct Router;

impl MsiRouter for Router {
    fn set_route(&self, _gsi: u32, _message: Option<MsiMessage>) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest();
    let log: Log = Arc::default();
    let mode = if input.u8() & 1 != 0 {
        DmaMode::Platform
    } else {
        DmaMode::Bypass
    };
    let vectors: Vec<MsiVector> = (0..3)
        .map(|i| MsiVector {
            gsi: 24 + i,
            irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        })
        .collect();
    let interrupt = Arc::new(VirtioPciInterrupt::new(
        vectors,
        Arc::new(Router),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let state = VirtioState::new(
        Box::new(Stub::new(log.clone())),
        mode,
        false,
        direct_view(mem.clone()),
        interrupt.clone(),
        Arc::new(DeviceMetrics::default()),
    )
    .unwrap();
    let mut dev = VirtioPciDevice::new(state, interrupt, 5, None).unwrap();
    let layout = BarLayout::new(2, 3);
    while !input.is_empty() {
        let op = input.u8();
        let len = [1usize, 2, 4, 8][usize::from(op >> 6)];
        let write = op & 0x20 != 0;
        if op & 0x10 != 0 {
            // Config space, through the bus's own access check.
            let offset = usize::from(input.u16() & 0xfff);
            let len = len.min(4);
            if !valid_access(offset, len) {
                continue;
            }
            if write {
                let v = input.u32().to_le_bytes();
                dev.write_config(offset, &v[..len]);
            } else {
                let mut b = [0u8; 4];
                dev.read_config(offset, &mut b[..len]);
            }
        } else {
            // BAR 0: aimed at a region, or anywhere.
            let regions = [
                layout.common.offset,
                layout.isr.offset,
                layout.device.offset,
                layout.notify.offset,
                layout.msix_table.map_or(0, |r| r.offset),
                layout.msix_pba.map_or(0, |r| r.offset),
            ];
            let at = u64::from(input.u16());
            let offset = if op & 8 != 0 {
                at
            } else {
                regions[usize::from(op & 7) % regions.len()] + (at & 0x3f)
            };
            if write {
                let v = input.u64().to_le_bytes();
                dev.write_bar(0, offset, &v[..len]);
            } else {
                let mut b = [0u8; 8];
                dev.read_bar(0, offset, &mut b[..len]);
            }
        }
        // Reads and writes never panic; the state machine's rules hold.
        let mut s = [0u8];
        dev.read_bar(0, layout.common.offset + 0x14, &mut s);
        if s[0] & status::DRIVER_OK != 0 {
            assert!(
                s[0] & status::FEATURES_OK != 0,
                "DRIVER_OK without FEATURES_OK: {:#x}",
                s[0]
            );
        }
    }
    check_activations(&log);
});
