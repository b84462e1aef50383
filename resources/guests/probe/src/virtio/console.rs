//! virtio-console: one line, `PROBE-CONSOLE hello from <transport>`, which
//! veil prints on its standard output.

use super::{annotate, check_features, error_name, init_failed, Device};
use crate::hal::ProbeHal;
use alloc::vec::Vec;
use virtio_drivers::device::console::VirtIOConsole;

pub fn workload(dev: Device) -> bool {
    let Device { transport, stats, name } = dev;
    let mut console = match VirtIOConsole::<ProbeHal, _>::new(transport) {
        Ok(c) => c,
        Err(e) => return init_failed(name, &e),
    };
    if !check_features(name, &stats) {
        return false;
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(b"PROBE-CONSOLE hello from ");
    msg.extend_from_slice(name.bus.as_bytes());
    msg.push(b'\n');
    let result = console.send_bytes(&msg);
    // Tear the driver down before reporting: `annotate` tells how it went.
    drop(console);
    let line = name
        .line()
        .dec("bytes", msg.len() as u64)
        .dec("requests", 1)
        .dec("notifies", stats.notifies.get());
    let line = annotate(line, &stats);
    match result {
        Ok(()) => {
            line.word("result=ok").emit();
            true
        }
        Err(e) => {
            line.word("result=fail")
                .text("reason", error_name(&e).as_bytes())
                .emit();
            false
        }
    }
}
