//! `probe.secure=1`: the guest enters secure mode (docs/ultracall.md)
//! after its devices are found and before its workloads run, keeping the
//! whole DMA pool shared. The virtqueues live there, and so do the bounce
//! pages of the lazy and bounce policies, so those policies keep working;
//! everything else (heap, stacks, the probe itself) becomes private, out of
//! every device's reach.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::bootinfo::param;
use crate::hal;
use crate::serial::Line;
use crate::ultracall::{self as uc, PAGE_SIZE};

/// Set once ESM succeeded: the vIOMMU's own Hal must then bounce too.
static SECURE: AtomicBool = AtomicBool::new(false);

pub fn is_secure() -> bool {
    SECURE.load(Ordering::Relaxed)
}

/// Devices set up from now on are not offered indirect descriptors.
static DIRECT_ONLY: AtomicBool = AtomicBool::new(false);

pub fn set_direct_only() {
    DIRECT_ONLY.store(true, Ordering::Relaxed);
}

pub fn direct_only() -> bool {
    DIRECT_ONLY.load(Ordering::Relaxed)
}

/// Whether the command line asks for it.
pub fn wanted(cmdline: &[u8]) -> bool {
    param(cmdline, "probe.secure") == Some(b"1")
}

/// ESM keeping the DMA pool shared; prints `PROBE secure esm status=<s>
/// private=<n> shared=<n>` (the counts from QUERY afterwards). True when
/// the call succeeded.
pub fn enter() -> bool {
    let (base, len) = hal::pool_range();
    let status = uc::esm(base, len / PAGE_SIZE);
    if status == uc::OK {
        SECURE.store(true, Ordering::Relaxed);
    }
    let line = Line::new("secure").word("esm").dec("status", status as u64);
    match uc::query() {
        Ok(s) => line
            .dec("private", s.private_pages)
            .dec("shared", s.shared_pages)
            .emit(),
        Err(q) => line.dec("query_status", q as u64).emit(),
    }
    status == uc::OK
}
