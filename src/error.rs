//! veil's errors and the process exit status each one maps to.
//!
//! A guest that ends through the debug-exit port chooses veil's exit status
//! (0-63 by convention); veil's own failures use the sysexits.h codes above
//! that range, and a timeout uses 124 as timeout(1) does.

use std::fmt;

/// Which kind of failure, which decides the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A flag or config value is malformed or out of range.
    Usage,
    /// A file the user named does not exist or cannot be read.
    NoInput,
    /// A file or size was readable but unusable: unrecognised kernel, an
    /// initrd that does not fit, too little or too much memory.
    Data,
    /// The host cannot run VMs: no /dev/kvm, no permission, a missing
    /// capability.
    Unavailable,
    /// The VM failed while running: vCPU internal error, failed entry,
    /// an exit veil does not handle, an I/O error on the host side.
    Software,
    /// The guest did not finish within `--timeout`.
    Timeout,
    /// veil got this signal (SIGTERM, SIGINT) and stopped the VM, its
    /// disks flushed.
    Terminated(i32),
}

impl Kind {
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage => 64,
            Kind::Data => 65,
            Kind::NoInput => 66,
            Kind::Unavailable => 69,
            Kind::Software => 70,
            Kind::Timeout => 124,
            Kind::Terminated(signal) => 128 + signal,
        }
    }
}

/// A failure with a one-line, user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for mapping a lower-level error into a veil error of `kind`,
/// with context in front of the cause.
pub trait Context<T> {
    fn context(self, kind: Kind, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, kind: Kind, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(kind, format!("{}: {e}", what())))
    }
}
