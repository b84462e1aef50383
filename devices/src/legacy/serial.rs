//! COM1: a 16550-compatible UART from vm-superio, its output sink and the
//! host-stdin input path driven by event-manager.

use crate::bus::BusDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Where guest serial output goes.
pub enum SerialSink {
    Stdout,
    File(File),
    Off,
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::Stdout => {
                let mut out = io::stdout().lock();
                let n = out.write(buf)?;
                out.flush()?;
                Ok(n)
            }
            SerialSink::File(f) => f.write(buf),
            SerialSink::Off => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::Stdout => io::stdout().flush(),
            SerialSink::File(f) => f.flush(),
            SerialSink::Off => Ok(()),
        }
    }
}

/// Raises the UART's interrupt line: an eventfd that KVM injects as IRQ 4.
pub struct IrqLine(EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The 8250 on the port bus (8 ports).
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, SerialSink>,
    /// Bytes the guest wrote that could not be delivered to the sink.
    pub lost_bytes: u64,
}

impl Serial {
    /// `irq` must already be registered with KVM as an irqfd.
    pub fn new(irq: EventFd, sink: SerialSink) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqLine(irq), sink),
            lost_bytes: 0,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(b)) = (u8::try_from(offset), data.first_mut()) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            self.lost_bytes += 1;
            log::debug!("serial: write to offset {off} failed: {e:?}");
        }
    }
}

/// Forwards host stdin to the guest's UART.
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    input: File,
}

impl SerialInput {
    /// `input` is a duplicate of stdin (or any readable fd).
    pub fn new(serial: Arc<Mutex<Serial>>, input: File) -> Self {
        Self { serial, input }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let closed = events.event_set().intersects(EventSet::HANG_UP | EventSet::ERROR);
        let n = if events.event_set().contains(EventSet::IN) {
            self.input.read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n > 0 {
            self.serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(&buf[..n]);
        } else if closed || events.event_set().contains(EventSet::IN) {
            // End of input: stop watching it rather than spin on it.
            let _ = ops.remove(Events::new(&self.input, EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            log::warn!("serial: cannot watch stdin: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_sink_and_input_raises_irq() {
        let dir = std::env::temp_dir().join(format!("veil-serial-{}", std::process::id()));
        let file = File::create(&dir).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), SerialSink::File(file));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&dir).unwrap(), b"hi\n");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'x');
        std::fs::remove_file(dir).unwrap();
    }
}
