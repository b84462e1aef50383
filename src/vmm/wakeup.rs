//! The ACPI Multiprocessor Wakeup mailbox (ACPI 6.4 §5.2.12.19), trapped as
//! MMIO: the guest names an APIC ID and a vector, writes the wake-up
//! command, and veil starts that AP in long mode there. docs/platform.md
//! describes the protocol.

use std::sync::mpsc::Sender;
use veil_arch::regs::EntryPoint;
use veil_devices::BusDevice;

const COMMAND: usize = 0;
const APIC_ID: usize = 4;
const VECTOR: usize = 8;
const MAILBOX_LEN: usize = 16;
const COMMAND_WAKEUP: u16 = 1;

pub struct WakeupMailbox {
    regs: [u8; MAILBOX_LEN],
    /// Indexed by APIC ID; taken when that AP is woken.
    aps: Vec<Option<Sender<EntryPoint>>>,
    pub woken: u64,
    pub ignored: u64,
}

impl WakeupMailbox {
    /// `aps[i]` starts the vCPU with APIC ID `i` (None for the BSP).
    pub fn new(aps: Vec<Option<Sender<EntryPoint>>>) -> Self {
        Self {
            regs: [0; MAILBOX_LEN],
            aps,
            woken: 0,
            ignored: 0,
        }
    }

    fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        self.regs[at..at + N].try_into().expect("fixed in-range field")
    }

    fn wake(&mut self) {
        let apic_id = u32::from_le_bytes(self.field(APIC_ID));
        let vector = u64::from_le_bytes(self.field(VECTOR));
        let sender = usize::try_from(apic_id)
            .ok()
            .and_then(|i| self.aps.get_mut(i))
            .and_then(Option::take);
        match sender {
            Some(tx)
                if tx
                    .send(EntryPoint {
                        rip: vector,
                        rsp: 0,
                        rsi: 0,
                        rdi: u64::from(apic_id),
                    })
                    .is_ok() =>
            {
                self.woken += 1;
            }
            _ => {
                self.ignored += 1;
                log::warn!("wake-up mailbox: ignored wake-up of APIC ID {apic_id} (no such AP, or already running)");
            }
        }
    }
}

impl BusDevice for WakeupMailbox {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.regs.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = self.regs.get_mut(start + i) {
                *slot = b;
            }
        }
        if start < COMMAND + 2 && u16::from_le_bytes(self.field(COMMAND)) == COMMAND_WAKEUP {
            self.wake();
        }
        // The firmware's acknowledgement: the command reads back as 0.
        self.regs[COMMAND..COMMAND + 2].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn wakes_each_ap_once_and_acknowledges() {
        let (tx, rx) = channel();
        let mut mb = WakeupMailbox::new(vec![None, Some(tx)]);
        mb.write(APIC_ID as u64, &1u32.to_le_bytes());
        mb.write(VECTOR as u64, &0x9_8000u64.to_le_bytes());
        mb.write(0, &COMMAND_WAKEUP.to_le_bytes());
        assert_eq!(
            rx.try_recv().unwrap(),
            EntryPoint {
                rip: 0x9_8000,
                rsp: 0,
                rsi: 0,
                rdi: 1
            }
        );
        let mut cmd = [0xffu8; 2];
        mb.read(0, &mut cmd);
        assert_eq!(cmd, [0, 0]);
        // A second wake-up of the same AP, the BSP, or a missing one is ignored.
        mb.write(0, &COMMAND_WAKEUP.to_le_bytes());
        mb.write(APIC_ID as u64, &0u32.to_le_bytes());
        mb.write(0, &COMMAND_WAKEUP.to_le_bytes());
        mb.write(APIC_ID as u64, &77u32.to_le_bytes());
        mb.write(0, &COMMAND_WAKEUP.to_le_bytes());
        assert_eq!((mb.woken, mb.ignored), (1, 3));
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut mb = WakeupMailbox::new(vec![None]);
        mb.write(4090, &[1, 2, 3, 4, 5, 6, 7, 8]);
        mb.write(u64::MAX, &[1]);
        let mut d = [0xaau8; 8];
        mb.read(4092, &mut d);
        assert_eq!(d, [0; 8]);
    }
}
