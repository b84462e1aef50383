//! PC legacy devices: COM1, the i8042 reset line, the debug-exit port and the
//! ACPI sleep register.

mod platform_ports;
mod serial;

pub use platform_ports::{AcpiSleepControl, DebugExit, I8042};
pub use serial::{Serial, SerialInput, SerialSink};
