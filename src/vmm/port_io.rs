//! A KVM_EXIT_IO as KVM describes it: direction, element size, element
//! count and the data in the vCPU's `kvm_run` mapping.
//!
//! A string instruction (`rep insb/insw/insl`, `rep outs*`) reaches the VMM
//! as one exit carrying `count` elements of `size` bytes. On hardware each
//! element is its own bus cycle, so this is where the exit is split: the
//! bus, and every device on it, only ever sees single accesses.

use kvm_bindings::KVM_EXIT_IO_IN;
use kvm_ioctls::VcpuFd;
use veil_devices::Bus;

/// The pending port access of the last exit.
pub struct PortAccess {
    pub port: u16,
    pub is_in: bool,
    pub size: u8,
    pub count: u32,
    /// The access's data in the vCPU's `kvm_run` mapping.
    data: *mut u8,
}

impl PortAccess {
    /// The access of the exit KVM_RUN just returned; call only after a
    /// KVM_EXIT_IO.
    pub fn pending(fd: &mut VcpuFd) -> PortAccess {
        let run = fd.get_kvm_run();
        // SAFETY: the caller saw a KVM_EXIT_IO exit, so `io` is the union
        // member KVM filled; it holds plain integers only.
        let io = unsafe { run.__bindgen_anon_1.io };
        PortAccess {
            port: io.port,
            is_in: u32::from(io.direction) == KVM_EXIT_IO_IN,
            size: io.size,
            count: io.count,
            // In bounds, as KVM promises for `data_offset` (the same
            // arithmetic kvm-ioctls does to hand out the data of IoIn/IoOut).
            data: std::ptr::from_mut(run)
                .cast::<u8>()
                .wrapping_add(io.data_offset as usize),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.size) * self.count as usize
    }

    /// Sets what the pending `in` reads.
    pub fn answer(&self, bytes: impl Iterator<Item = u8>) {
        for (i, b) in bytes.take(self.len()).enumerate() {
            // SAFETY: KVM reserved `size * count` bytes at `data` inside the
            // vCPU's kvm_run mapping, which lives as long as the VcpuFd; no
            // reference to those bytes exists while this writes them.
            unsafe { self.data.add(i).write(b) };
        }
    }

    /// Serves the access on `bus`, one element at a time, in order; false
    /// when no device claims the port.
    pub fn serve(&self, bus: &Bus) -> bool {
        // SAFETY: as in `answer`; this is the only reference to the bytes
        // while it lives, and it does not outlive the call.
        let data = unsafe { std::slice::from_raw_parts_mut(self.data, self.len()) };
        serve_elements(bus, u64::from(self.port), self.is_in, usize::from(self.size), data)
    }
}

/// `data` as `data.len() / size` accesses of `size` bytes to `port`.
fn serve_elements(bus: &Bus, port: u64, is_in: bool, size: usize, data: &mut [u8]) -> bool {
    let mut claimed = true;
    for element in data.chunks_exact_mut(size.max(1)) {
        claimed &= if is_in {
            bus.read(port, element)
        } else {
            bus.write(port, element)
        };
    }
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use veil_devices::BusDevice;

    /// Counts up on every read; records every write.
    #[derive(Default)]
    struct Counter {
        next: u8,
        writes: Vec<Vec<u8>>,
    }

    impl BusDevice for Counter {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
            self.next += 1;
            data[0] = self.next;
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.writes.push(data.to_vec());
        }
    }

    fn bus() -> (Bus, Arc<Mutex<Counter>>) {
        let dev = Arc::new(Mutex::new(Counter::default()));
        let mut bus = Bus::new();
        bus.insert(0x10, 4, dev.clone()).unwrap();
        (bus, dev)
    }

    #[test]
    fn a_string_input_is_one_read_per_element() {
        let (bus, _) = bus();
        let mut data = [0xaa; 8];
        assert!(serve_elements(&bus, 0x10, true, 2, &mut data));
        assert_eq!(data, [1, 0, 2, 0, 3, 0, 4, 0]);
    }

    #[test]
    fn a_string_output_is_one_write_per_element() {
        let (bus, dev) = bus();
        let mut data = [1, 2, 3, 4, 5, 6, 7, 8];
        assert!(serve_elements(&bus, 0x10, false, 4, &mut data));
        assert_eq!(dev.lock().unwrap().writes, [vec![1, 2, 3, 4], vec![5, 6, 7, 8]]);
    }

    #[test]
    fn an_unclaimed_port_reads_all_ones() {
        let (bus, _) = bus();
        let mut data = [0; 4];
        assert!(!serve_elements(&bus, 0x80, true, 1, &mut data));
        assert_eq!(data, [0xff; 4]);
    }
}
