//! Ports through which the guest ends the VM.

use crate::bus::BusDevice;
use crate::stop::{StopReason, StopSignal};
use std::sync::Arc;

/// Writing `v` (1, 2 or 4 bytes) ends the VM with status `v & 0xff`.
pub struct DebugExit {
    stop: Arc<StopSignal>,
}

impl DebugExit {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        Self { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            self.stop.request(StopReason::DebugExit(data[0]));
        }
    }
}

/// The i8042 keyboard controller, for its CPU-reset command only. Spans
/// ports 0x60..=0x64; the status register reads as "nothing to read".
pub struct I8042 {
    device: vm_superio::I8042Device<ResetTrigger>,
}

/// Turns the controller's reset line into a stop request.
pub struct ResetTrigger(Arc<StopSignal>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(StopReason::Reset);
        Ok(())
    }
}

impl I8042 {
    /// Offset of the command/status port from the data port.
    const COMMAND_OFFSET: u64 = 4;

    pub fn new(stop: Arc<StopSignal>) -> Self {
        Self {
            device: vm_superio::I8042Device::new(ResetTrigger(stop)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 | Self::COMMAND_OFFSET => self.device.read(offset as u8),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0 | Self::COMMAND_OFFSET, Some(&value)) = (offset, data.first()) {
            let Ok(()) = self.device.write(offset as u8, value);
        }
    }
}

/// The hardware-reduced ACPI sleep control register (FADT): writing
/// SLP_EN with SLP_TYP = 5 (the DSDT's `\_S5`) powers the VM off.
pub struct AcpiSleepControl {
    stop: Arc<StopSignal>,
}

impl AcpiSleepControl {
    const SLP_EN: u8 = 1 << 5;
    const SLP_TYP_SHIFT: u8 = 2;
    const SLP_TYP_MASK: u8 = 0x7;
    pub const S5_TYPE: u8 = 5;

    pub fn new(stop: Arc<StopSignal>) -> Self {
        Self { stop }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Neither the control nor the status register has anything to say.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let sleep_type = (value >> Self::SLP_TYP_SHIFT) & Self::SLP_TYP_MASK;
        if offset == 0 && value & Self::SLP_EN != 0 && sleep_type == Self::S5_TYPE {
            self.stop.request(StopReason::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_reports_low_byte() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut dev = DebugExit::new(stop.clone());
        dev.write(0, &0x1234u32.to_le_bytes());
        assert_eq!(stop.reason(), Some(StopReason::DebugExit(0x34)));
    }

    #[test]
    fn i8042_reset_command_stops_the_vm() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut dev = I8042::new(stop.clone());
        dev.write(4, &[0xd1]);
        assert_eq!(stop.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(stop.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn sleep_control_needs_slp_en_and_s5() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut dev = AcpiSleepControl::new(stop.clone());
        dev.write(0, &[AcpiSleepControl::S5_TYPE << 2]);
        dev.write(0, &[(3 << 2) | (1 << 5)]);
        dev.write(1, &[(5 << 2) | (1 << 5)]);
        assert_eq!(stop.reason(), None);
        dev.write(0, &[(5 << 2) | (1 << 5)]);
        assert_eq!(stop.reason(), Some(StopReason::PowerOff));
    }
}
