//! How a device asks for the whole VM to stop.

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// ACPI S5 power off.
    PowerOff,
    /// i8042 reset.
    Reset,
    /// The test guest wrote its status to the debug-exit port.
    DebugExit(u8),
    /// veil itself failed (a vCPU error); the VMM holds the details.
    Failed,
}

/// Shared by every device that can stop the VM and by the thread that waits
/// for it. The first request wins; later ones are ignored.
pub struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    event: EventFd,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn request(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            // An eventfd write only fails when the counter would overflow,
            // which means a stop is already pending.
            let _ = self.event.write(1);
        }
    }

    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Becomes readable once a stop was requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_signals() {
        let s = StopSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(StopReason::DebugExit(7));
        s.request(StopReason::PowerOff);
        assert_eq!(s.reason(), Some(StopReason::DebugExit(7)));
        assert_eq!(s.event().read().unwrap(), 1);
    }
}
