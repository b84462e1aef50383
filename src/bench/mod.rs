//! `veil bench`: veil's benchmarks.
//!
//! - `boot`, `blk`, `net`, `dma`: the single-peer benchmarks, each printing
//!   one table (`boot.rs`, `device.rs`, `dma.rs`);
//! - `secure` and `all`: the harness, which runs a list of cases on veil and
//!   optionally on a peer VMM (QEMU), interleaved run by run, and reports
//!   medians, spread, ratios, exits and CPU per request as Markdown, JSON and
//!   SVG: the case list (`harness.rs`), how each VMM is started (`peer.rs`),
//!   how counters are read from /proc and KVM's debugfs (`sample.rs`), the
//!   statistics (`stats.rs`) and the output (`report.rs`).

pub mod boot;
pub mod device;
pub mod dma;
pub mod harness;
pub mod peer;
pub mod report;
pub mod sample;
pub mod stats;

pub use boot::boot;

use std::path::PathBuf;
use std::process::ExitCode;

/// veil's own executable, which every benchmark runs as `veil run`.
pub fn veil_exe() -> Result<PathBuf, ExitCode> {
    std::env::current_exe().map_err(|e| {
        eprintln!("veil: error: cannot find veil's own executable: {e}");
        ExitCode::from(69)
    })
}
