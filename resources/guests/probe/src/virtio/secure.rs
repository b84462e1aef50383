//! `probe.secure=1`: after the pool is set up and before any device is,
//! enter secure mode (ESM, docs/ultracall.md) keeping only the DMA pool
//! shared. Devices then reach nothing else, so only a policy that keeps
//! every device access in the pool (lazy, bounce) can work; the others are
//! refused here rather than left to fail one request at a time.

use crate::hal;
use crate::serial::Line;
use crate::ultracall;

/// True when the probe is secure now with its pool shared (or was not
/// asked to be).
pub fn enter(cmdline: &[u8]) -> bool {
    if crate::bootinfo::param(cmdline, "probe.secure") != Some(b"1") {
        return true;
    }
    if !ultracall::require() {
        return false;
    }
    let policy = hal::chosen();
    let line = Line::new("secure").text("dma", policy.name().as_bytes());
    if !policy.pool_only() {
        line.word("result=fail reason=policy_reaches_beyond_the_pool").emit();
        return false;
    }
    let (base, len) = hal::pool_range();
    let status = ultracall::esm(base, len / ultracall::PAGE_SIZE);
    let line = line.hex("shared", base).dec("pages", len / ultracall::PAGE_SIZE);
    if status == ultracall::OK {
        line.word("esm=ok").emit();
        true
    } else {
        line.dec("esm", u64::from(status)).word("result=fail").emit();
        false
    }
}
