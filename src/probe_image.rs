//! veil's built-in test guest, the probe (resources/guests/probe), embedded
//! in the veil binary.

/// The probe's ELF image: a freestanding x86-64 kernel linked at 1 MiB and
/// entered by the Linux 64-bit boot protocol (docs/platform.md). It checks
/// the memory map, ACPI, every page of RAM and AP wake-up through the
/// mailbox, reports `PROBE ...` lines on COM1 and ends the VM through the
/// debug-exit port (0 = all passed, 1 = a check failed, 2 = unknown
/// `probe.mode`, 3 = crash). Built by build.rs.
pub const PROBE_ELF: &[u8] = include_bytes!(env!("VEIL_PROBE_ELF"));
