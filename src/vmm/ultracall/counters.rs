//! What the gate counts, and the `"secure"` object of `--metrics`.

use super::{Function, Status};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use veil_devices::dma::PageCounts;

/// Refusals and bad accesses logged before the log thins out to one in
/// `WARN_EVERY`: a guest cannot flood veil's log.
const WARN_FIRST: u64 = 16;
const WARN_EVERY: u64 = 1000;

/// Calls by function (index: function number, 0 = unknown) and refusals by
/// status (index: status).
#[derive(Debug, Default)]
pub(super) struct Counters {
    calls: [AtomicU64; 5],
    refused: [AtomicU64; 8],
    bad_port_accesses: AtomicU64,
    hypercalls: AtomicU64,
    bad_hypercalls: AtomicU64,
    /// Every warning-worthy event, for the rate limit.
    warnings: AtomicU64,
    /// What the transitions cost veil: ESM wall and CPU time, and time
    /// and pages of successful SHARE and UNSHARE calls.
    esm_ns: AtomicU64,
    share_ns: AtomicU64,
    share_pages: AtomicU64,
    unshare_ns: AtomicU64,
    unshare_pages: AtomicU64,
}

fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

impl Counters {
    pub(super) fn count_call(&self, f: Option<Function>) {
        bump(&self.calls[f.map_or(0, |f| f as usize)]);
    }

    /// Returns how many refusals there were, this one included.
    pub(super) fn count_refusal(&self, status: Status) -> u64 {
        bump(&self.refused[status as usize]);
        self.refused.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub(super) fn count_bad_port_access(&self) -> u64 {
        bump(&self.bad_port_accesses)
    }

    pub(super) fn count_hypercall(&self) {
        bump(&self.hypercalls);
    }

    pub(super) fn count_bad_hypercall(&self) -> u64 {
        bump(&self.bad_hypercalls)
    }

    /// Whether the warning about to be logged may be.
    pub(super) fn may_warn(&self) -> bool {
        let n = bump(&self.warnings);
        n <= WARN_FIRST || n.is_multiple_of(WARN_EVERY)
    }

    pub(super) fn count_esm(&self, ns: u64) {
        self.esm_ns.store(ns, Ordering::Relaxed);
    }

    pub(super) fn count_conversion(&self, share: bool, pages: u64, ns: u64) {
        let (t, p) = if share {
            (&self.share_ns, &self.share_pages)
        } else {
            (&self.unshare_ns, &self.unshare_pages)
        };
        t.fetch_add(ns, Ordering::Relaxed);
        p.fetch_add(pages, Ordering::Relaxed);
    }

    pub(super) fn report(&self, pages: PageCounts) -> SecureReport {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut calls = BTreeMap::new();
        calls.insert("unknown", load(&self.calls[0]));
        for f in [Function::Query, Function::Esm, Function::Share, Function::Unshare] {
            calls.insert(f.name(), load(&self.calls[f as usize]));
        }
        let refused = Status::REFUSALS
            .iter()
            .map(|&s| (s.name(), load(&self.refused[s as usize])))
            .collect();
        SecureReport {
            secure: pages.secure,
            private_pages: pages.private_pages,
            shared_pages: pages.shared_pages,
            calls,
            refused,
            bad_port_accesses: load(&self.bad_port_accesses),
            hypercalls: load(&self.hypercalls),
            bad_hypercalls: load(&self.bad_hypercalls),
            esm_ns: load(&self.esm_ns),
            share_ns: load(&self.share_ns),
            share_pages: load(&self.share_pages),
            unshare_ns: load(&self.unshare_ns),
            unshare_pages: load(&self.unshare_pages),
        }
    }
}

/// The guest's memory and its ultracalls, as `--metrics` shows them.
#[derive(Debug, Default, serde::Serialize)]
pub struct SecureReport {
    pub secure: bool,
    pub private_pages: u64,
    pub shared_pages: u64,
    /// Calls by function (`query`, `esm`, `share`, `unshare`, `unknown`),
    /// whatever their outcome, from either transport.
    pub calls: BTreeMap<&'static str, u64>,
    /// Refused calls by status name.
    pub refused: BTreeMap<&'static str, u64>,
    /// Accesses to the ultracall port other than `in eax`.
    pub bad_port_accesses: u64,
    /// KVM_HC_MAP_GPA_RANGE exits, and those that were malformed.
    pub hypercalls: u64,
    pub bad_hypercalls: u64,
    /// Time veil spent in the ESM call (0 before ESM). The call runs to
    /// completion on the calling vCPU's thread without blocking, so this
    /// is the VMM CPU time it cost too.
    pub esm_ns: u64,
    /// Time spent in successful SHARE / UNSHARE calls, and the pages they
    /// named.
    pub share_ns: u64,
    pub share_pages: u64,
    pub unshare_ns: u64,
    pub unshare_pages: u64,
}
