//! Secure mode for `probe.mode=secure` (virtio/secure_checks.rs): ESM
//! keeping the whole DMA pool shared (the virtqueues, request headers and
//! bounce pages live there) while everything else (heap, stacks, the probe
//! itself) becomes private, out of every device's reach.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::hal;
use crate::serial::Line;
use crate::ultracall::{self as uc, PAGE_SIZE};

/// Devices set up from now on are not offered indirect descriptors.
static DIRECT_ONLY: AtomicBool = AtomicBool::new(false);

pub fn set_direct_only() {
    DIRECT_ONLY.store(true, Ordering::Relaxed);
}

pub fn direct_only() -> bool {
    DIRECT_ONLY.load(Ordering::Relaxed)
}

/// ESM keeping the DMA pool shared; prints `PROBE secure esm status=<s>
/// private=<n> shared=<n>` (the counts from QUERY afterwards). True when
/// the call succeeded.
pub fn enter() -> bool {
    if !uc::require() {
        return false;
    }
    let (base, len) = hal::pool_range();
    let status = uc::esm(base, len / PAGE_SIZE);
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
