//! Pieces the fuzz targets share: a small guest memory, a split virtqueue
//! laid out in it from fuzz bytes, and an independent walk of the chains
//! the driver offered, to tell which bytes the device may write.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use veil_devices::virtio::{
    features, ActivateError, Activation, ActiveQueue, InterruptCause, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of every target: 128 KiB (every input copies and compares
/// it, so it is kept small).
pub const MEM_SIZE: u64 = 0x2_0000;
/// Where buffers go; below it are the rings.
pub const DATA_START: u64 = 0x1_0000;
pub const QUEUE_SIZE: u16 = 16;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Reads fuzz bytes front to back; zeros once they run out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

thread_local! {
    // One mapping serves every input: mapping and faulting in fresh RAM
    // per input cost more than most inputs' device work.
    static RAM: GuestMemoryMmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest RAM");
    static DATA: RefCell<Vec<u8>> = RefCell::new(vec![0; (MEM_SIZE - DATA_START) as usize]);
}

static ZEROS: [u8; MEM_SIZE as usize] = [0; MEM_SIZE as usize];

/// The target's guest RAM, all zeros, as a fresh mapping would be.
pub fn guest() -> GuestMemoryMmap {
    let mem = RAM.with(GuestMemoryMmap::clone);
    mem.write_slice(&ZEROS, GuestAddress(0)).unwrap();
    mem
}

/// One queue's rings, at `base` (desc), `base + 0x400` (avail),
/// `base + 0x800` (used).
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Rings {
    pub fn at(base: u64) -> Rings {
        Rings {
            desc: base,
            avail: base + 0x400,
            used: base + 0x800,
        }
    }

    /// The used ring's bytes: the device may write these.
    pub fn used_range(&self) -> (u64, u64) {
        (self.used, self.used + 6 + 8 * u64::from(QUEUE_SIZE))
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    pub fn active(&self, index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: self.queue(),
            notify: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Descriptors and avail entries from `input`: mostly well-formed
    /// (addresses in the data area, `next` in the table), sometimes not.
    /// Returns the number of chains offered.
    pub fn fill(&self, mem: &GuestMemoryMmap, input: &mut Input, max_len: u32) -> u16 {
        for i in 0..u64::from(QUEUE_SIZE) {
            let shape = input.u8();
            let addr = if shape & 0x80 != 0 {
                input.u64()
            } else {
                DATA_START + (u64::from(input.u16()) * 16) % (MEM_SIZE - DATA_START)
            };
            let len = if shape & 0x40 != 0 {
                input.u32()
            } else {
                u32::from(input.u16()) % max_len.max(1)
            };
            let flags = if shape & 0x20 != 0 {
                input.u16()
            } else {
                u16::from(shape & 7)
            };
            let next = if shape & 0x10 != 0 {
                input.u16()
            } else {
                u16::from(input.u8()) % QUEUE_SIZE
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_obj(d, GuestAddress(self.desc + 16 * i)).unwrap();
        }
        let chains = u16::from(input.u8() % (QUEUE_SIZE as u8 + 1));
        let mut ring = [0u8; 2 * QUEUE_SIZE as usize];
        for slot in ring.chunks_mut(2) {
            let head = u16::from(input.u8()) % (QUEUE_SIZE + 2);
            slot.copy_from_slice(&head.to_le_bytes());
        }
        mem.write_slice(&ring, GuestAddress(self.avail + 4)).unwrap();
        mem.write_obj(0u16, GuestAddress(self.avail)).unwrap();
        mem.write_obj(chains, GuestAddress(self.avail + 2)).unwrap();
        chains
    }

    /// The writable bytes of the chain at `head`, as the spec has the
    /// driver lay it out, and the address of its last writable byte; `None`
    /// if the chain is malformed. `ranges` gets every writable buffer,
    /// `tables` every indirect table the walk read.
    ///
    /// A chain is at most as long as its table (the spec's bound, and
    /// virtio-queue's); an indirect table counts at most 1024 entries here.
    pub fn walk(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        ranges: &mut Vec<(u64, u64)>,
        tables: &mut Vec<(u64, u64)>,
    ) -> Option<(u64, Option<u64>)> {
        // One read per descriptor: this walk is the oracle of every input.
        let desc = |table: u64, i: u64| -> Option<(u64, u32, u16, u16)> {
            let d: [u8; 16] = mem.read_obj(GuestAddress(table.checked_add(16 * i)?)).ok()?;
            let le16 = |o: usize| u16::from_le_bytes([d[o], d[o + 1]]);
            Some((
                u64::from_le_bytes(d[..8].try_into().unwrap()),
                u32::from_le_bytes(d[8..12].try_into().unwrap()),
                le16(12),
                le16(14),
            ))
        };
        let mut total = 0u64;
        let mut table = self.desc;
        let mut entries = u64::from(QUEUE_SIZE);
        let mut budget = entries + 1;
        let mut i = u64::from(head);
        let mut last = None;
        // Once: an indirect table may even be the descriptor table itself.
        let mut indirect = false;
        loop {
            if i >= entries || budget == 0 {
                return None;
            }
            budget -= 1;
            let (addr, len, flags, next) = desc(table, i)?;
            if flags & F_INDIRECT != 0 && !indirect {
                indirect = true;
                tables.push((addr, addr.saturating_add(u64::from(len))));
                table = addr;
                entries = u64::from(len / 16);
                budget = entries.min(1024) + 1;
                i = 0;
                continue;
            }
            if flags & F_WRITE != 0 {
                ranges.push((addr, addr.saturating_add(u64::from(len))));
                total += u64::from(len);
                if len > 0 {
                    last = addr.checked_add(u64::from(len) - 1);
                }
            }
            if flags & F_NEXT == 0 {
                return Some((total, last));
            }
            i = u64::from(next);
        }
    }

    /// The used entries the device wrote since `from`: (id, len).
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        (0..u64::from(idx.min(QUEUE_SIZE)))
            .map(|i| {
                let at = self.used + 4 + 8 * i;
                (
                    mem.read_obj(GuestAddress(at)).unwrap(),
                    mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }
}

/// Fills `[DATA_START, MEM_SIZE)` with `pattern` repeated (or zeros).
pub fn fill_data(mem: &GuestMemoryMmap, pattern: &[u8]) {
    DATA.with(|buf| {
        let mut buf = buf.borrow_mut();
        let n = pattern.len().min(buf.len());
        buf[..n].copy_from_slice(&pattern[..n]);
        if n == 0 {
            buf.fill(0);
        } else {
            // Doubling copies keep the period: `filled` stays a multiple of `n`.
            let mut filled = n;
            while filled < buf.len() {
                let c = filled.min(buf.len() - filled);
                buf.copy_within(..c, filled);
                filled += c;
            }
        }
        mem.write_slice(&buf, GuestAddress(DATA_START)).unwrap();
    })
}

pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

/// Every byte that changed between `before` and now lies in `allowed`.
pub fn assert_writes_within(mem: &GuestMemoryMmap, before: &[u8], allowed: &[(u64, u64)]) {
    let mut now = [0u8; 4096];
    for (c, was) in before.chunks(now.len()).enumerate() {
        let base = (c * now.len()) as u64;
        let now = &mut now[..was.len()];
        mem.read_slice(now, GuestAddress(base)).unwrap();
        if was == now {
            continue;
        }
        for (i, _) in was.iter().zip(now.iter()).enumerate().filter(|(_, (a, b))| a != b) {
            let at = base + i as u64;
            assert!(
                allowed.iter().any(|&(s, e)| s <= at && at < e),
                "the device wrote {at:#x}, outside every writable buffer and the used ring"
            );
        }
    }
}

/// Counts interrupts; never fails.
#[derive(Default)]
pub struct Irq(pub AtomicUsize);

impl VirtioInterrupt for Irq {
    fn trigger(&self, _cause: InterruptCause) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// What the driver offered on one queue, read before the device runs (a
/// device write into a descriptor table must not change the judgement).
pub struct Offer {
    /// Writable buffers of every offered chain, and the used ring.
    pub allowed: Vec<(u64, u64)>,
    /// Each offered head and its writable bytes (`None`: malformed).
    pub heads: Vec<(u16, Option<u64>)>,
    /// Each offered head's last writable byte, where a status goes.
    pub last: Vec<Option<u64>>,
    /// What the device reads to find the chains: the descriptor table, the
    /// available ring and every indirect table.
    pub tables: Vec<(u64, u64)>,
}

impl Offer {
    pub fn read(mem: &GuestMemoryMmap, rings: &Rings, offered: u16) -> Offer {
        let mut allowed = vec![rings.used_range()];
        let mut tables = vec![
            (rings.desc, rings.desc + 16 * u64::from(QUEUE_SIZE)),
            (rings.avail, rings.avail + 4 + 2 * u64::from(QUEUE_SIZE)),
        ];
        let mut heads = Vec::new();
        let mut last = Vec::new();
        // A head offered twice is the same chain: walk it once.
        let mut walked = std::collections::HashMap::new();
        for i in 0..u64::from(offered) {
            let at = GuestAddress(rings.avail + 4 + 2 * (i % u64::from(QUEUE_SIZE)));
            let head: u16 = mem.read_obj(at).unwrap();
            let walk = *walked
                .entry(head)
                .or_insert_with(|| rings.walk(mem, head, &mut allowed, &mut tables));
            heads.push((head, walk.map(|w| w.0)));
            last.push(walk.and_then(|w| w.1));
        }
        Offer {
            allowed,
            heads,
            last,
            tables,
        }
    }

    /// Whether the device may legitimately write into what `other`'s
    /// chains are read from (its tables), or put data into its used ring.
    /// Then a later chain is whatever the device's earlier writes made it,
    /// and judging it by what was offered before would be wrong (one RX
    /// frame landing in the next chain's indirect table, say): such inputs
    /// are still run, but their writes and used entries are not checked
    /// against the offer.
    pub fn rewrites(&self, other: &Offer) -> bool {
        let overlap = |(s, e): (u64, u64), (ts, te): (u64, u64)| s < te && ts < e;
        // `allowed[0]` is this offer's used ring, the rest its buffers.
        let (&used, buffers) = self.allowed.split_first().expect("the used ring");
        let other_used = other.allowed[0];
        other.tables.iter().any(|&t| overlap(used, t))
            || buffers
                .iter()
                .any(|&b| overlap(b, other_used) || other.tables.iter().any(|&t| overlap(b, t)))
    }

    /// Each used entry names an offered head, with a length no larger
    /// than that chain's writable bytes. Returns the used entries.
    pub fn check_used(&self, mem: &GuestMemoryMmap, rings: &Rings) -> Vec<(u32, u32)> {
        let used = rings.used(mem);
        assert!(used.len() <= self.heads.len(), "more used entries than chains offered");
        for &(id, len) in &used {
            let Some(&(_, writable)) = self.heads.iter().find(|(h, _)| u32::from(*h) == id) else {
                panic!("used id {id} was never offered");
            };
            if let Some(w) = writable {
                assert!(
                    u64::from(len) <= w,
                    "used length {len} > {w} writable bytes (chain {id})"
                );
            }
        }
        used
    }

    /// The last writable byte of the chain with head `id`, if well-formed.
    pub fn status_at(&self, id: u32) -> Option<u64> {
        let i = self.heads.iter().position(|(h, _)| u32::from(*h) == id)?;
        self.last[i]
    }
}

/// Host protection that changes nothing: fuzzing checks the bits only.
pub struct NoHost;

impl veil_devices::dma::HostProtection for NoHost {
    fn set_accessible(&self, _gpa: u64, _len: u64, _accessible: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// Activations seen: (queues, acked features); `None` after a reset.
pub type Log = Arc<Mutex<Vec<Option<(Vec<u16>, u64)>>>>;

/// A device behind a transport target: records its activations, has a
/// 16-byte writable config space and two queues.
pub struct Stub {
    log: Log,
    config: [u8; 16],
}

impl Stub {
    pub fn new(log: Log) -> Stub {
        Stub { log, config: [0; 16] }
    }
}

impl VirtioDevice for Stub {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> &str {
        "stub0"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.config.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some(end) = (offset as usize).checked_add(data.len()) else {
            return false;
        };
        match self.config.get_mut(offset as usize..end) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        // Activation comes with DRIVER_OK after FEATURES_OK only.
        let offered = self.device_features() | features::ACCESS_PLATFORM;
        assert_eq!(a.acked_features & !offered, 0, "acked features never offered");
        assert!(a.acked_features & features::VERSION_1 != 0);
        let queues: Vec<u16> = a.queues.iter().map(|q| q.index).collect();
        assert!(queues.iter().all(|&i| i < 2));
        self.log.lock().unwrap().push(Some((queues, a.acked_features)));
        Ok(())
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().push(None);
    }
}

/// Activations and resets alternate: never two activations in a row.
pub fn check_activations(log: &Log) {
    let mut active = false;
    for e in log.lock().unwrap().iter() {
        match e {
            Some(_) => {
                assert!(!active, "activated twice without a reset");
                active = true;
            }
            None => active = false,
        }
    }
}
