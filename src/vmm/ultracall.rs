//! Ultracalls: the calls through which a guest turns its memory private and
//! shares pages back (docs/ultracall.md).
//!
//! `UltracallGate::call` is the whole ABI as a pure function of the function
//! number and arguments; `exit` feeds it from KVM exits and
//! `map_gpa_range` translates KVM_HC_MAP_GPA_RANGE into it.

mod counters;
mod exit;
mod map_gpa_range;

pub use counters::SecureReport;
pub use exit::enable_hypercall_exits;

use super::memory::HostViewProtection;
use counters::Counters;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use veil_devices::dma::{ShareError, SharedPages, PAGE_SIZE};

/// What QUERY answers in RSI.
pub const ABI_VERSION: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Function {
    Query = 1,
    Esm = 2,
    Share = 3,
    Unshare = 4,
}

impl Function {
    pub fn from_number(n: u32) -> Option<Function> {
        match n {
            1 => Some(Function::Query),
            2 => Some(Function::Esm),
            3 => Some(Function::Share),
            4 => Some(Function::Unshare),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Function::Query => "query",
            Function::Esm => "esm",
            Function::Share => "share",
            Function::Unshare => "unshare",
        }
    }
}

/// What a call answers in EAX. The numbers are the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    UnknownFunction = 1,
    Unaligned = 2,
    ZeroLength = 3,
    OutOfRange = 4,
    NotSecure = 5,
    AlreadySecure = 6,
    HostError = 7,
}

impl Status {
    /// Every refusal, in ABI order (index = status - 1).
    pub const REFUSALS: [Status; 7] = [
        Status::UnknownFunction,
        Status::Unaligned,
        Status::ZeroLength,
        Status::OutOfRange,
        Status::NotSecure,
        Status::AlreadySecure,
        Status::HostError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::UnknownFunction => "unknown_function",
            Status::Unaligned => "unaligned",
            Status::ZeroLength => "zero_length",
            Status::OutOfRange => "out_of_range",
            Status::NotSecure => "not_secure",
            Status::AlreadySecure => "already_secure",
            Status::HostError => "host_error",
        }
    }
}

/// QUERY's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryAnswer {
    pub secure: bool,
    pub private_pages: u64,
    pub shared_pages: u64,
    pub version: u64,
}

impl QueryAnswer {
    /// RBX, RCX, RDX, RSI as the guest gets them.
    pub fn registers(&self) -> [u64; 4] {
        [
            u64::from(self.secure),
            self.private_pages,
            self.shared_pages,
            self.version,
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UltracallResult {
    pub status: Status,
    /// Set for a successful QUERY only: no other call changes registers.
    pub query: Option<QueryAnswer>,
}

/// Serves ultracalls for one VM.
pub struct UltracallGate {
    pages: Arc<SharedPages>,
    host_view: HostViewProtection,
    /// When the VM was built: what "time since boot" in the ESM log counts from.
    vm_built: Instant,
    /// Held across each whole call, so that calls from several vCPUs (QUERY
    /// included) see and leave consistent states.
    one_call_at_a_time: Mutex<()>,
    counters: Counters,
}

impl UltracallGate {
    pub fn new(pages: Arc<SharedPages>, host_view: HostViewProtection, vm_built: Instant) -> UltracallGate {
        UltracallGate {
            pages,
            host_view,
            vm_built,
            one_call_at_a_time: Mutex::new(()),
            counters: Counters::default(),
        }
    }

    /// One ultracall: `function` from EAX, `args` from RBX, RCX, RDX, RSI.
    pub fn call(&self, function: u32, args: [u64; 4]) -> UltracallResult {
        let _one = self.one_call_at_a_time.lock().unwrap_or_else(PoisonError::into_inner);
        let known = Function::from_number(function);
        self.counters.count_call(known);
        let [gpa, npages, ..] = args;
        let outcome = match known {
            None => Err(Status::UnknownFunction),
            Some(Function::Query) => Ok(Some(self.query())),
            Some(Function::Esm) => self.enter_secure(gpa, npages).map(|()| None),
            Some(f @ (Function::Share | Function::Unshare)) => self.convert(f, gpa, npages).map(|()| None),
        };
        match outcome {
            Ok(query) => UltracallResult {
                status: Status::Ok,
                query,
            },
            Err(status) => {
                self.refused(function, known, &args, status);
                UltracallResult { status, query: None }
            }
        }
    }

    fn query(&self) -> QueryAnswer {
        let c = self.pages.counts();
        QueryAnswer {
            secure: c.secure,
            private_pages: c.private_pages,
            shared_pages: c.shared_pages,
            version: ABI_VERSION,
        }
    }

    fn enter_secure(&self, keep_gpa: u64, npages: u64) -> Result<(), Status> {
        if !keep_gpa.is_multiple_of(PAGE_SIZE) {
            return Err(Status::Unaligned);
        }
        let started = Instant::now();
        let result = self.pages.enter_secure(keep_gpa, npages, &self.host_view);
        if matches!(result, Ok(()) | Err(ShareError::Host(_))) {
            self.counters.count_esm(started.elapsed().as_nanos() as u64);
            // Secure even when the host view failed: the bits are what
            // devices check.
            let c = self.pages.counts();
            log::info!(
                "guest entered secure mode {:.3} s after boot: {} pages private, {} shared \
                 ({keep_gpa:#x} + {npages} pages kept); the transition took {:?}",
                self.vm_built.elapsed().as_secs_f64(),
                c.private_pages,
                c.shared_pages,
                started.elapsed()
            );
        }
        result.map_err(|e| self.status_of(Function::Esm, e))
    }

    fn convert(&self, f: Function, gpa: u64, npages: u64) -> Result<(), Status> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(Status::Unaligned);
        }
        if npages == 0 {
            return Err(Status::ZeroLength);
        }
        let started = Instant::now();
        let result = if f == Function::Share {
            self.pages.share(gpa, npages, &self.host_view)
        } else {
            self.pages.unshare(gpa, npages, &self.host_view)
        };
        let changed = result.map_err(|e| self.status_of(f, e))?;
        self.counters
            .count_conversion(f == Function::Share, npages, started.elapsed().as_nanos() as u64);
        log::debug!("ultracall {}: {gpa:#x} + {npages} pages ({changed} changed)", f.name());
        Ok(())
    }

    fn status_of(&self, f: Function, e: ShareError) -> Status {
        match e {
            ShareError::OutOfRange => Status::OutOfRange,
            ShareError::NotSecure => Status::NotSecure,
            ShareError::AlreadySecure => Status::AlreadySecure,
            ShareError::Host(why) => {
                log::error!(
                    "ultracall {}: cannot change the host view of guest RAM: {why}",
                    f.name()
                );
                Status::HostError
            }
        }
    }

    fn refused(&self, function: u32, known: Option<Function>, args: &[u64; 4], status: Status) {
        let n = self.counters.count_refusal(status);
        // HOST_ERROR was logged as veil's error already.
        if status != Status::HostError && self.counters.may_warn() {
            let [rbx, rcx, rdx, rsi] = args;
            log::warn!(
                "ultracall {}({function:#x}) rbx={rbx:#x} rcx={rcx:#x} rdx={rdx:#x} rsi={rsi:#x} refused: {} \
                 ({n} refusals so far)",
                known.map_or("unknown", Function::name),
                status.name(),
            );
        }
    }

    /// An access to the ultracall port that is not `in eax`: counted,
    /// logged, ignored.
    pub fn bad_port_access(&self, vcpu: u8, what: &str) {
        let n = self.counters.count_bad_port_access();
        if self.counters.may_warn() {
            log::warn!("vCPU {vcpu}: bad access to the ultracall port ({what}), ignored ({n} so far)");
        }
    }

    /// A KVM_EXIT_HYPERCALL: the value for its `ret`.
    pub fn hypercall(&self, nr: u64, args: [u64; 6]) -> u64 {
        self.counters.count_hypercall();
        match map_gpa_range::decode(nr, &args) {
            Ok(c) => map_gpa_range::ret(self.call(c.function as u32, [c.gpa, c.npages, 0, 0]).status),
            Err(ret) => {
                let n = self.counters.count_bad_hypercall();
                if self.counters.may_warn() {
                    log::warn!(
                        "hypercall {nr} a0={:#x} a1={:#x} a2={:#x} refused: ret {} ({n} so far)",
                        args[0],
                        args[1],
                        args[2],
                        ret as i64
                    );
                }
                ret
            }
        }
    }

    /// Page counts and call counters, for `--metrics`.
    pub fn report(&self) -> SecureReport {
        self.counters.report(self.pages.counts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;
    const RAM_PAGES: u64 = (16 * MIB) / PAGE_SIZE;

    /// A gate over 16 MiB of RAM whose host view (a real mapping) has only
    /// its first `mapped` bytes, so that host-view changes past them fail.
    fn gate_with_host_view(mapped: u64) -> UltracallGate {
        let pages = Arc::new(SharedPages::new(&[(0, 16 * MIB)]));
        let view = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mapped as usize)]).unwrap();
        UltracallGate::new(pages, HostViewProtection::new(view), Instant::now())
    }

    fn gate() -> UltracallGate {
        gate_with_host_view(16 * MIB)
    }

    fn status(g: &UltracallGate, f: u32, gpa: u64, npages: u64) -> Status {
        g.call(f, [gpa, npages, 0, 0]).status
    }

    fn query(g: &UltracallGate) -> QueryAnswer {
        let r = g.call(1, [0; 4]);
        assert_eq!(r.status, Status::Ok);
        r.query.expect("QUERY answers registers")
    }

    const ORDINARY: QueryAnswer = QueryAnswer {
        secure: false,
        private_pages: 0,
        shared_pages: RAM_PAGES,
        version: 1,
    };

    fn secure_with(shared: u64) -> QueryAnswer {
        QueryAnswer {
            secure: true,
            private_pages: RAM_PAGES - shared,
            shared_pages: shared,
            version: 1,
        }
    }

    #[test]
    fn query_before_and_after_esm() {
        let g = gate();
        assert_eq!(query(&g), ORDINARY);
        assert_eq!(query(&g).registers(), [0, 0, RAM_PAGES, 1]);
        assert_eq!(status(&g, 2, 0x10_0000, 16), Status::Ok);
        assert_eq!(query(&g), secure_with(16));
        assert_eq!(query(&g).registers(), [1, RAM_PAGES - 16, 16, 1]);
    }

    #[test]
    fn only_query_answers_registers() {
        let g = gate();
        assert_eq!(g.call(2, [0, 0, 0, 0]).query, None);
        assert_eq!(g.call(3, [0, 1, 0, 0]).query, None);
        assert_eq!(g.call(9, [0; 4]).query, None);
    }

    #[test]
    fn unknown_functions() {
        let g = gate();
        for f in [0, 5, 0x100, u32::MAX] {
            assert_eq!(status(&g, f, 0, 1), Status::UnknownFunction, "function {f:#x}");
        }
        assert_eq!(query(&g), ORDINARY);
    }

    #[test]
    fn share_and_unshare_before_esm_are_refused() {
        let g = gate();
        assert_eq!(status(&g, 3, 0x10_0000, 1), Status::NotSecure);
        assert_eq!(status(&g, 4, 0x10_0000, 1), Status::NotSecure);
        // The gate's own checks come first.
        assert_eq!(status(&g, 3, 0x10_0800, 1), Status::Unaligned);
        assert_eq!(status(&g, 4, 0x10_0000, 0), Status::ZeroLength);
        // Then SharedPages': not secure before out of range.
        assert_eq!(status(&g, 3, 64 * MIB, 1), Status::NotSecure);
        assert_eq!(query(&g), ORDINARY);
    }

    #[test]
    fn bad_esms_leave_the_vm_ordinary() {
        let g = gate();
        for (gpa, npages, expected) in [
            (0x10_0800, 16, Status::Unaligned),
            (0x10_0800, 0, Status::Unaligned),
            (16 * MIB, 1, Status::OutOfRange),
            (16 * MIB - PAGE_SIZE, 2, Status::OutOfRange),
            (0xc000_0000, 1, Status::OutOfRange),
            (!0xfff, 2, Status::OutOfRange),
            (0x10_0000, u64::MAX / PAGE_SIZE + 2, Status::OutOfRange),
        ] {
            assert_eq!(status(&g, 2, gpa, npages), expected, "ESM {gpa:#x} + {npages}");
            assert_eq!(query(&g), ORDINARY);
        }
    }

    #[test]
    fn esm_with_nothing_kept_and_a_second_esm() {
        let g = gate();
        assert_eq!(status(&g, 2, 0, 0), Status::Ok);
        assert_eq!(query(&g), secure_with(0));
        assert_eq!(status(&g, 2, 0x10_0000, 16), Status::AlreadySecure);
        assert_eq!(
            status(&g, 2, 64 * MIB, 1),
            Status::AlreadySecure,
            "already secure comes first"
        );
        assert_eq!(query(&g), secure_with(0));
    }

    #[test]
    fn bad_conversions_after_esm_change_nothing() {
        let g = gate();
        assert_eq!(status(&g, 2, 0x10_0000, 16), Status::Ok);
        for f in [3, 4] {
            for (gpa, npages, expected) in [
                (0x20_0000, 0, Status::ZeroLength),
                (0x20_0010, 1, Status::Unaligned),
                (16 * MIB, 1, Status::OutOfRange),
                (16 * MIB - PAGE_SIZE, 2, Status::OutOfRange),
                (!0xfff, 2, Status::OutOfRange),
                (0, u64::MAX / PAGE_SIZE + 1, Status::OutOfRange),
            ] {
                assert_eq!(status(&g, f, gpa, npages), expected, "{f}: {gpa:#x} + {npages}");
            }
        }
        assert_eq!(query(&g), secure_with(16));
    }

    #[test]
    fn share_is_idempotent_and_unshare_undoes_it() {
        let g = gate();
        assert_eq!(status(&g, 2, 0x10_0000, 16), Status::Ok);
        assert_eq!(status(&g, 3, 0x20_0000, 4), Status::Ok);
        assert_eq!(query(&g), secure_with(20));
        assert_eq!(status(&g, 3, 0x20_0000, 4), Status::Ok);
        assert_eq!(query(&g), secure_with(20), "sharing twice counts once");
        assert_eq!(status(&g, 3, 0x10_0000, 20), Status::Ok, "overlapping the kept range");
        assert_eq!(query(&g), secure_with(24));
        assert_eq!(status(&g, 4, 0x20_0000, 4), Status::Ok);
        assert_eq!(status(&g, 4, 0x20_0000, 4), Status::Ok, "unsharing twice is fine too");
        assert_eq!(query(&g), secure_with(20));
        assert_eq!(status(&g, 4, 0x40_0000, 8), Status::Ok, "unsharing private pages");
        assert_eq!(query(&g), secure_with(20), "changes nothing");
    }

    #[test]
    fn a_host_view_that_cannot_change_is_a_host_error() {
        // The host view ends at 8 MiB, RAM at 16 MiB.
        let g = gate_with_host_view(8 * MIB);
        assert_eq!(status(&g, 2, 0x10_0000, 16), Status::HostError);
        // The gate is secure all the same: devices check the bits.
        assert_eq!(query(&g), secure_with(16));
        assert_eq!(status(&g, 3, 12 * MIB, 1), Status::HostError);
        assert_eq!(query(&g), secure_with(16), "a failed SHARE shares nothing");
        assert_eq!(status(&g, 3, 4 * MIB, 1), Status::Ok);
        assert_eq!(query(&g), secure_with(17));
    }

    #[test]
    fn counters_count_calls_and_refusals() {
        let g = gate();
        status(&g, 1, 0, 0);
        status(&g, 7, 0, 0);
        status(&g, 3, 0, 1);
        status(&g, 2, 0x800, 1);
        status(&g, 2, 0, 1);
        status(&g, 2, 0, 1);
        status(&g, 4, 0, 0);
        g.bad_port_access(0, "test");
        let r = g.report();
        assert!(r.secure);
        assert_eq!((r.private_pages, r.shared_pages), (RAM_PAGES - 1, 1));
        assert_eq!(r.calls["query"], 1);
        assert_eq!(r.calls["unknown"], 1);
        assert_eq!(r.calls["esm"], 3);
        assert_eq!(r.calls["share"], 1);
        assert_eq!(r.calls["unshare"], 1);
        assert_eq!(r.refused["unknown_function"], 1);
        assert_eq!(r.refused["not_secure"], 1);
        assert_eq!(r.refused["unaligned"], 1);
        assert_eq!(r.refused["already_secure"], 1);
        assert_eq!(r.refused["zero_length"], 1);
        assert_eq!(r.refused["host_error"], 0);
        assert_eq!(r.bad_port_accesses, 1);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["refused"]["out_of_range"], 0);
        assert_eq!(json["secure"], true);
    }

    #[test]
    fn map_gpa_range_converts_pages_of_a_secure_guest() {
        let g = gate();
        let call = |gpa: u64, npages: u64, attrs: u64| g.hypercall(12, [gpa, npages, attrs, 0, 0, 0]) as i64;
        assert_eq!(call(0x20_0000, 1, 0), -1, "before ESM: -KVM_EPERM");
        assert_eq!(status(&g, 2, 0, 0), Status::Ok);
        assert_eq!(call(0x20_0000, 512, 1), 0, "decrypted, 2 MiB hint: 512 pages shared");
        assert_eq!(query(&g), secure_with(512));
        assert_eq!(call(0x20_0000, 2, 0x10), 0, "encrypted: unshared");
        assert_eq!(query(&g), secure_with(510));
        assert_eq!(call(0x20_0000, u64::MAX, 0), -22, "length overflows");
        assert_eq!(call(16 * MIB, 1, 0), -22, "outside RAM");
        assert_eq!(call(0x20_0000, 1, 0x20), -22, "reserved attribute bit");
        assert_eq!(g.hypercall(11, [0; 6]) as i64, -1000);
        assert_eq!(query(&g), secure_with(510));
        let r = g.report();
        assert_eq!(r.hypercalls, 7);
        assert_eq!((r.calls["share"], r.calls["unshare"]), (4, 1));
    }
}
