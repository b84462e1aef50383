//! Arbitrary register reads and writes on a virtio-mmio transport, with a
//! device behind it that records its activations: feature negotiation,
//! queue set-up (QueueReady included), status transitions, notify, config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use veil_devices::dma::{direct_view, DmaMode};
use veil_devices::virtio::mmio::{MmioInterrupt, MmioTransport};
use veil_devices::virtio::transport::VirtioState;
use veil_devices::virtio::{status, DeviceMetrics};
use veil_devices::BusDevice;
use veil_fuzz::{check_activations, guest, Input, Log, Stub};
use vmm_sys_util::eventfd::EventFd;

/// virtio-mmio registers (virtio 1.2 §4.2.2) the input picks from.
const REGS: [u64; 25] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050, 0x060, 0x064, 0x070,
    0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100, 0x104,
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest();
    let log: Log = Arc::default();
    let device = Box::new(Stub::new(log.clone()));
    let mode = if input.u8() & 1 != 0 {
        DmaMode::Platform
    } else {
        DmaMode::Bypass
    };
    let interrupt = Arc::new(MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let state = VirtioState::new(
        device,
        mode,
        false,
        direct_view(mem.clone()),
        interrupt.clone(),
        Arc::new(DeviceMetrics::default()),
    )
    .unwrap();
    let mut t = MmioTransport::new(state, interrupt);
    while !input.is_empty() {
        let op = input.u8();
        let offset = if op & 0x40 != 0 {
            u64::from(input.u16())
        } else {
            REGS[usize::from(op & 0x3f) % REGS.len()]
        };
        let len = [4, 1, 2, 8][usize::from(op >> 7) * 2 + usize::from(input.u8() & 1)];
        if op & 0x20 != 0 {
            let mut b = vec![0u8; len];
            t.read(offset, &mut b);
            if offset == 0 && len == 4 {
                assert_eq!(b, b"virt");
            }
        } else {
            let v = input.u64().to_le_bytes();
            t.write(offset, &v[..len]);
        }
        let s = t.state().status();
        // FEATURES_OK only with VERSION_1 acked; DRIVER_OK only after
        // FEATURES_OK; FAILED or NEEDS_RESET never cleared but by reset.
        if s & status::DRIVER_OK != 0 {
            assert!(s & status::FEATURES_OK != 0, "DRIVER_OK without FEATURES_OK: {s:#x}");
        }
    }
    check_activations(&log);
});
