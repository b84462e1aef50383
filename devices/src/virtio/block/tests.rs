//! Tests of the block device: real descriptor chains built with
//! virtio-queue's mock driver in guest memory, served through the DMA view,
//! against a temporary image file (or a test backend that fails on demand).

use super::backend::DiskBackend;
use super::handler::{QueueWorker, S_IOERR, S_OK, S_UNSUPP};
use super::request::{Limits, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
use super::*;
use crate::dma::direct_view;
use crate::virtio::{ActiveQueue, DeviceMetrics, InterruptCause, VirtioInterrupt};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 4 << 20;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const DISK_SECTORS: u64 = 64;
const ALL_FEATURES: u64 =
    features::VERSION_1 | features::RING_INDIRECT_DESC | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_SEG_MAX | F_SIZE_MAX;

type Mem = GuestMemoryMmap<()>;

fn guest() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Byte `i` of the original image.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8 ^ (i / 512) as u8
}

fn image(sectors: u64) -> TempFile {
    let f = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..sectors * 512).map(pattern).collect();
    f.as_file().write_all(&bytes).unwrap();
    f
}

fn contents(f: &TempFile) -> Vec<u8> {
    let mut file = f.as_file();
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut v = Vec::new();
    file.read_to_end(&mut v).unwrap();
    v
}

fn original() -> Vec<u8> {
    (0..DISK_SECTORS * 512).map(pattern).collect()
}

fn block_on(f: &TempFile, readonly: bool) -> Block {
    let file = f.as_file().try_clone().unwrap();
    Block::new("blk-test".into(), file, readonly, "veil-disk-1".into()).unwrap()
}

#[derive(Default)]
struct Irq(Mutex<Vec<InterruptCause>>);

impl VirtioInterrupt for Irq {
    fn trigger(&self, cause: InterruptCause) -> std::io::Result<()> {
        self.0.lock().unwrap().push(cause);
        Ok(())
    }
}

impl Irq {
    fn causes(&self) -> Vec<InterruptCause> {
        self.0.lock().unwrap().clone()
    }
}

/// A disk in memory that counts flushes and fails every operation with EIO
/// while `failing`.
struct TestDisk {
    data: Mutex<Vec<u8>>,
    flushes: AtomicU64,
    /// (offset, length, punched) of each zeroing call.
    zeroed: Mutex<Vec<(u64, u64, bool)>>,
    failing: bool,
}

impl TestDisk {
    fn new(sectors: u64, failing: bool) -> Arc<TestDisk> {
        Arc::new(TestDisk {
            data: Mutex::new(vec![0; (sectors * 512) as usize]),
            flushes: AtomicU64::new(0),
            zeroed: Mutex::new(Vec::new()),
            failing,
        })
    }

    fn check(&self) -> io::Result<()> {
        if self.failing {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl DiskBackend for TestDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.check()?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, false)
    }
}

impl TestDisk {
    fn zero(&self, offset: u64, len: u64, punched: bool) -> io::Result<()> {
        self.check()?;
        self.zeroed.lock().unwrap().push((offset, len, punched));
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// The driver side: descriptor chains in guest memory, via the mock queue.
struct Driver<'a> {
    mem: &'a Mem,
    vq: MockSplitQueue<'a, Mem>,
    next_desc: u16,
    next_buf: u64,
}

/// One descriptor: address, length, device-writable.
type D = (u64, u32, bool);
/// Builds part of a test chain.
type Build = Box<dyn Fn(&mut Driver) -> D>;
/// Builds a whole test chain.
type BuildChain = Box<dyn Fn(&mut Driver) -> Vec<D>>;

impl<'a> Driver<'a> {
    fn new(mem: &'a Mem) -> Self {
        Driver {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(0), QSIZE),
            next_desc: 0,
            next_buf: 0x1_0000,
        }
    }

    fn queue(&self, event_idx: bool) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_event_idx(event_idx);
        q
    }

    /// A buffer of `len` bytes, filled with `fill`.
    fn buf(&mut self, len: u32, fill: u8) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + u64::from(len) + 0x1ff) & !0x1ff;
        assert!(self.next_buf <= MEM_SIZE);
        self.mem
            .write_slice(&vec![fill; len as usize], GuestAddress(addr))
            .unwrap();
        addr
    }

    fn header(&mut self, kind: u32, sector: u64) -> D {
        let addr = self.buf(16, 0);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        (addr, 16, false)
    }

    /// A status byte, preset to 0xff so an untouched one shows.
    fn status(&mut self) -> D {
        (self.buf(1, 0xff), 1, true)
    }

    fn data_in(&mut self, len: u32) -> D {
        (self.buf(len, 0xee), len, true)
    }

    fn data_out(&mut self, bytes: &[u8]) -> D {
        let addr = self.buf(bytes.len() as u32, 0);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        (addr, bytes.len() as u32, false)
    }

    /// Puts a linked chain in the descriptor table and makes it available;
    /// returns its head.
    fn chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == descs.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&raw, head).unwrap();
        self.next_desc += descs.len() as u16;
        head
    }

    /// Writes raw descriptors at `index` without touching the available ring.
    fn put(&self, index: u16, desc: Descriptor) {
        self.vq.desc_table().store(index, RawDescriptor::from(desc)).unwrap();
    }

    /// Makes `head` available as is.
    fn offer(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// An indirect table of `descs` at `addr`, linked in order.
    fn indirect_table(&self, addr: u64, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            self.mem
                .write_obj(RawDescriptor::from(*d), GuestAddress(addr + 16 * i as u64))
                .unwrap();
        }
    }

    /// A FLUSH chain, made available; returns its head.
    fn flush(&mut self) -> u16 {
        let c = [self.header(T_FLUSH, 0), self.status()];
        self.chain(&c)
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Used entry `i`: (head, length).
    fn used(&self, i: u16) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn bytes(&self, d: D) -> Vec<u8> {
        let mut v = vec![0; d.1 as usize];
        self.mem.read_slice(&mut v, GuestAddress(d.0)).unwrap();
        v
    }
}

fn limits(acked: u64) -> Limits {
    Limits {
        max_descriptors: QUEUE_SIZE,
        indirect: acked & features::RING_INDIRECT_DESC != 0,
        seg_max: SEG_MAX as usize,
        size_max: SIZE_MAX,
    }
}

struct Setup {
    worker: QueueWorker,
    metrics: Arc<DeviceMetrics>,
    irq: Arc<Irq>,
}

fn setup(block: &Block, queue: Queue, mem: &Mem, acked: u64) -> Setup {
    let metrics = Arc::new(DeviceMetrics::default());
    let irq = Arc::new(Irq::default());
    let worker = QueueWorker::new(
        "blk-test".into(),
        block.disk.clone(),
        acked,
        limits(acked),
        0,
        queue,
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        direct_view(mem.clone()),
        irq.clone(),
        metrics.clone(),
        block.needs_reset_flag(),
    );
    Setup { worker, metrics, irq }
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Setup {
    fn run(&mut self) -> usize {
        self.worker.process_queue().expect("ring is fine")
    }
}

/// Runs one chain on a fresh queue over `block`; returns (status byte, used
/// length, metrics).
fn one(block: &Block, acked: u64, build: impl FnOnce(&mut Driver) -> Vec<D>) -> (u8, u32, Setup) {
    let mem = guest();
    let mut d = Driver::new(&mem);
    let descs = build(&mut d);
    let head = d.chain(&descs);
    let mut s = setup(block, d.queue(false), &mem, acked);
    assert_eq!(s.run(), 1);
    assert_eq!(d.used_idx(), 1);
    let (id, len) = d.used(0);
    assert_eq!(id, u32::from(head));
    let last = *descs.last().unwrap();
    let status = if last.2 && last.1 > 0 {
        d.byte(last.0 + u64::from(last.1) - 1)
    } else {
        0xff
    };
    (status, len, s)
}

#[test]
fn read_write_round_trip_across_segments() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let mem = guest();
    let mut d = Driver::new(&mem);
    let a: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..1024).map(|i| (i * 7) as u8).collect();
    let c = vec![0x5a; 512];
    let descs = [
        d.header(T_OUT, 3),
        d.data_out(&a),
        d.data_out(&b),
        d.data_out(&c),
        d.status(),
    ];
    let w = d.chain(&descs);
    let (r1, r2, rs) = (d.data_in(1536), d.data_in(512), d.status());
    let rh = d.header(T_IN, 3);
    let r = d.chain(&[rh, r1, r2, rs]);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    assert_eq!(s.run(), 2);

    let written: Vec<u8> = [a, b, c].concat();
    let mut expect = original();
    expect[3 * 512..7 * 512].copy_from_slice(&written);
    assert_eq!(contents(&f), expect);
    assert_eq!(d.byte(descs[4].0), S_OK);
    assert_eq!(d.used(0), (u32::from(w), 1));

    assert_eq!([d.bytes(r1), d.bytes(r2)].concat(), written);
    assert_eq!(d.byte(rs.0), S_OK);
    assert_eq!(d.used(1), (u32::from(r), 2048 + 1));
    assert_eq!(count(&s.metrics.requests), 2);
    assert_eq!(count(&s.metrics.bytes_read), 2048);
    assert_eq!(count(&s.metrics.bytes_written), 2048);
    assert_eq!(s.irq.causes(), vec![InterruptCause::Queue(0)]);
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    // Header and 512 bytes of data in one readable descriptor.
    let (status, len, _) = one(&block, ALL_FEATURES, |d| {
        let mut bytes = vec![0u8; 16 + 512];
        bytes[..4].copy_from_slice(&T_OUT.to_le_bytes());
        bytes[8..16].copy_from_slice(&5u64.to_le_bytes());
        bytes[16..].fill(0x42);
        vec![d.data_out(&bytes), d.status()]
    });
    assert_eq!((status, len), (S_OK, 1));
    assert!(contents(&f)[5 * 512..6 * 512].iter().all(|&x| x == 0x42));
    // Data and status in one writable descriptor.
    let mem = guest();
    let mut d = Driver::new(&mem);
    let h = d.header(T_IN, 1);
    let ds = d.data_in(513);
    d.chain(&[h, ds]);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    s.run();
    let got = d.bytes(ds);
    assert_eq!(&got[..512], &original()[512..1024]);
    assert_eq!(got[512], S_OK);
    assert_eq!(d.used(0).1, 513);
}

#[test]
fn flush_reaches_the_backend() {
    let disk = TestDisk::new(8, false);
    let block = Block::with_backend("t".into(), disk.clone(), false, String::new()).unwrap();
    let (status, len, _) = one(&block, ALL_FEATURES, |d| vec![d.header(T_FLUSH, 0), d.status()]);
    assert_eq!((status, len), (S_OK, 1));
    assert_eq!(disk.flushes.load(Ordering::Relaxed), 1);
    // A real file too.
    let f = image(DISK_SECTORS);
    let (status, _, _) = one(&block_on(&f, false), ALL_FEATURES, |d| {
        vec![d.header(T_FLUSH, 0), d.status()]
    });
    assert_eq!(status, S_OK);
}

#[test]
fn get_id_answers_the_nul_padded_id() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, true);
    let mem = guest();
    let mut d = Driver::new(&mem);
    let h = d.header(T_GET_ID, 0);
    let data = d.data_in(20);
    let st = d.status();
    d.chain(&[h, data, st]);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    s.run();
    assert_eq!(d.byte(st.0), S_OK);
    assert_eq!(d.bytes(data), b"veil-disk-1\0\0\0\0\0\0\0\0\0".to_vec());
    assert_eq!(d.used(0).1, 21);

    // Too small a buffer is refused.
    let (status, len, s) = one(&block, ALL_FEATURES, |d| {
        vec![d.header(T_GET_ID, 0), d.data_in(8), d.status()]
    });
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(count(&s.metrics.bad_requests), 1);
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    [&sector.to_le_bytes()[..], &sectors.to_le_bytes(), &flags.to_le_bytes()].concat()
}

#[test]
fn discard_and_write_zeroes_zero_their_ranges() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let mut expect = original();
    for (kind, segs, zeroed) in [
        (T_DISCARD, vec![segment(2, 2, 0)], vec![(2, 4)]),
        (T_WRITE_ZEROES, vec![segment(10, 3, 0)], vec![(10, 13)]),
        (
            T_WRITE_ZEROES,
            vec![segment(20, 1, 1), segment(30, 8, 0)],
            vec![(20, 21), (30, 38)],
        ),
    ] {
        let (status, len, _) = one(&block, ALL_FEATURES, |d| {
            vec![d.header(kind, 0), d.data_out(&segs.concat()), d.status()]
        });
        assert_eq!((status, len), (S_OK, 1), "type {kind}");
        for (start, end) in zeroed {
            expect[start * 512..end * 512].fill(0);
        }
        assert_eq!(contents(&f), expect, "type {kind}");
    }
}

#[test]
fn discard_punches_holes_and_write_zeroes_only_with_unmap() {
    let disk = TestDisk::new(64, false);
    let block = Block::with_backend("t".into(), disk.clone(), false, String::new()).unwrap();
    for (kind, segs) in [
        (T_DISCARD, vec![segment(1, 2, 0), segment(8, 1, 0)]),
        (T_WRITE_ZEROES, vec![segment(3, 1, 0), segment(4, 2, 1)]),
        // Zero sectors: nothing to do.
        (T_WRITE_ZEROES, vec![segment(5, 0, 0)]),
    ] {
        let (status, _, _) = one(&block, ALL_FEATURES, |d| {
            vec![d.header(kind, 0), d.data_out(&segs.concat()), d.status()]
        });
        assert_eq!(status, S_OK);
    }
    assert_eq!(
        *disk.zeroed.lock().unwrap(),
        vec![
            (512, 1024, true),
            (4096, 512, true),
            (1536, 512, false),
            (2048, 1024, true)
        ]
    );
}

#[test]
fn discard_and_write_zeroes_refuse_bad_segments() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    for (kind, seg, acked, want) in [
        // UNMAP is not for discard; unknown flags for neither.
        (T_DISCARD, segment(0, 1, 1), ALL_FEATURES, S_UNSUPP),
        (T_WRITE_ZEROES, segment(0, 1, 2), ALL_FEATURES, S_UNSUPP),
        // Features the driver did not accept.
        (T_DISCARD, segment(0, 1, 0), features::VERSION_1, S_UNSUPP),
        (T_WRITE_ZEROES, segment(0, 1, 0), features::VERSION_1, S_UNSUPP),
        // Past the end, and a partial segment.
        (T_DISCARD, segment(DISK_SECTORS - 1, 2, 0), ALL_FEATURES, S_IOERR),
        (T_WRITE_ZEROES, segment(u64::MAX / 512, 1, 0), ALL_FEATURES, S_IOERR),
        (T_DISCARD, segment(0, 1, 0)[..12].to_vec(), ALL_FEATURES, S_IOERR),
    ] {
        let (status, len, s) = one(&block, acked, |d| vec![d.header(kind, 0), d.data_out(&seg), d.status()]);
        assert_eq!((status, len), (want, 1), "type {kind} {seg:?}");
        assert_eq!(count(&s.metrics.bad_requests), 1);
    }
    assert_eq!(contents(&f), original());
}

#[test]
fn requests_past_the_end_fail_and_change_nothing() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    for (kind, sector) in [
        (T_OUT, DISK_SECTORS - 1),
        (T_OUT, DISK_SECTORS),
        (T_IN, DISK_SECTORS - 1),
        // sector * 512 + len overflows; sector * 512 overflows.
        (T_OUT, u64::MAX / 512),
        (T_IN, u64::MAX / 512),
        (T_OUT, u64::MAX),
    ] {
        let (status, len, s) = one(&block, ALL_FEATURES, |d| {
            let data = if kind == T_OUT {
                d.data_out(&[0x77; 1024])
            } else {
                d.data_in(1024)
            };
            vec![d.header(kind, sector), data, d.status()]
        });
        assert_eq!((status, len), (S_IOERR, 1), "type {kind} sector {sector}");
        assert_eq!(count(&s.metrics.bad_requests), 1);
        assert_eq!(count(&s.metrics.bytes_written), 0);
    }
    assert_eq!(contents(&f), original());
    // The last sector itself is fine.
    let (status, len, _) = one(&block, ALL_FEATURES, |d| {
        vec![d.header(T_IN, DISK_SECTORS - 1), d.data_in(512), d.status()]
    });
    assert_eq!((status, len), (S_OK, 513));
}

#[test]
fn read_only_disk_refuses_writes() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, true);
    assert_ne!(block.device_features() & F_RO, 0);
    assert_eq!(block.device_features() & (F_DISCARD | F_WRITE_ZEROES), 0);
    for kind in [T_OUT, T_DISCARD, T_WRITE_ZEROES] {
        let (status, len, s) = one(&block, ALL_FEATURES | F_RO, |d| {
            let data = if kind == T_OUT {
                d.data_out(&[0; 512])
            } else {
                d.data_out(&segment(0, 1, 0))
            };
            vec![d.header(kind, 0), data, d.status()]
        });
        assert_eq!((status, len), (S_IOERR, 1), "type {kind}");
        assert_eq!(count(&s.metrics.bad_requests), 1);
    }
    assert_eq!(contents(&f), original());
    let (status, len, _) = one(&block, F_RO, |d| vec![d.header(T_IN, 0), d.data_in(512), d.status()]);
    assert_eq!((status, len), (S_OK, 513));
}

#[test]
fn too_many_segments_is_an_error() {
    let f = image(4096);
    let block = block_on(&f, false);
    let mem = guest();
    let mut d = Driver::new(&mem);
    // 256 descriptors in an indirect table (the most it may hold), framed so
    // the data comes in SEG_MAX + 1 pieces: header and first data share a
    // descriptor.
    let mut first = vec![1u8; 16 + 512];
    first[..16].fill(0);
    first[..4].copy_from_slice(&T_OUT.to_le_bytes());
    let head = d.data_out(&first);
    let mut table = vec![Descriptor::new(head.0, head.1, F_NEXT, 1)];
    for i in 1..255u16 {
        let data = d.data_out(&[1; 512]);
        table.push(Descriptor::new(data.0, data.1, F_NEXT, i + 1));
    }
    let st = d.status();
    table.push(Descriptor::new(st.0, 1, F_WRITE, 0));
    assert_eq!(table.len(), usize::from(QUEUE_SIZE));
    d.indirect_table(0x8000, &table);
    d.put(0, Descriptor::new(0x8000, 16 * 256, F_INDIRECT, 0));
    d.offer(0);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    s.run();
    assert_eq!(d.byte(st.0), S_IOERR);
    assert_eq!(d.used(0), (0, 1));
    assert_eq!(count(&s.metrics.bad_requests), 1);
    let untouched: Vec<u8> = (0..4096 * 512).map(pattern).collect();
    assert!(contents(&f) == untouched, "nothing written");

    // One piece fewer is accepted: 254 segments.
    let mem = guest();
    let mut d = Driver::new(&mem);
    let h = d.header(T_OUT, 0);
    let mut table = vec![Descriptor::new(h.0, h.1, F_NEXT, 1)];
    for i in 1..255u16 {
        let data = d.data_out(&[1; 512]);
        table.push(Descriptor::new(data.0, data.1, F_NEXT, i + 1));
    }
    let st = d.status();
    table.push(Descriptor::new(st.0, 1, F_WRITE, 0));
    d.indirect_table(0x8000, &table);
    d.put(0, Descriptor::new(0x8000, 16 * 256, F_INDIRECT, 0));
    d.offer(0);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    s.run();
    assert_eq!(d.byte(st.0), S_OK);
    assert!(contents(&f)[..254 * 512].iter().all(|&x| x == 1));
}

#[test]
fn too_large_a_segment_is_an_error() {
    let f = image(4096);
    let block = block_on(&f, false);
    let (status, len, s) = one(&block, ALL_FEATURES, |d| {
        vec![d.header(T_IN, 0), d.data_in(SIZE_MAX + 512), d.status()]
    });
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(count(&s.metrics.bad_requests), 1);
    assert_eq!(count(&s.metrics.bytes_written), 0);
    // size_max itself is fine, and goes through the bounded buffer.
    let (status, len, _) = one(&block, ALL_FEATURES, |d| {
        vec![d.header(T_IN, 0), d.data_in(SIZE_MAX), d.status()]
    });
    assert_eq!((status, len), (S_OK, SIZE_MAX + 1));
}

#[test]
fn data_must_be_whole_sectors_in_the_right_direction() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let cases: Vec<(u32, Build)> = vec![
        (T_IN, Box::new(|d| d.data_in(500))),
        (T_OUT, Box::new(|d| d.data_out(&[3; 700]))),
        // A read into a device-readable buffer.
        (T_IN, Box::new(|d| d.data_out(&[3; 512]))),
    ];
    for (kind, data) in cases {
        let (status, len, s) = one(&block, ALL_FEATURES, |d| {
            let data = data(d);
            vec![d.header(kind, 0), data, d.status()]
        });
        assert_eq!((status, len), (S_IOERR, 1), "type {kind}");
        assert_eq!(count(&s.metrics.bad_requests), 1);
    }
    // A write from a device-writable buffer, which must not be read.
    let (status, _, s) = one(&block, ALL_FEATURES, |d| {
        vec![d.header(T_OUT, 0), d.data_in(512), d.status()]
    });
    assert_eq!(status, S_IOERR);
    assert_eq!(count(&s.metrics.bytes_read), 0);
    // A readable descriptor after a writable one.
    let (status, _, s) = one(&block, ALL_FEATURES, |d| {
        vec![d.header(T_IN, 0), d.data_in(512), d.data_out(&[0; 512]), d.status()]
    });
    assert_eq!(status, S_IOERR);
    assert_eq!(count(&s.metrics.bad_descriptors), 1);
    assert_eq!(contents(&f), original());
}

#[test]
fn short_header_or_missing_status_returns_the_chain_empty() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let cases: Vec<BuildChain> = vec![
        // 15 bytes of header.
        Box::new(|d| {
            let (a, _, _) = d.header(T_IN, 0);
            vec![(a, 15, false), d.data_in(512), d.status()]
        }),
        // Nothing writable at the end.
        Box::new(|d| vec![d.header(T_OUT, 0), d.data_out(&[0; 512])]),
        // A writable descriptor of zero bytes at the end.
        Box::new(|d| {
            let (a, _, _) = d.status();
            vec![d.header(T_FLUSH, 0), (a, 0, true)]
        }),
        // The status byte outside guest memory: the write is not done.
        Box::new(|d| vec![d.header(T_OUT, 0), d.data_out(&[9; 512]), (MEM_SIZE, 1, true)]),
    ];
    for (i, build) in cases.iter().enumerate() {
        let mem = guest();
        let mut d = Driver::new(&mem);
        let descs = build(&mut d);
        d.chain(&descs);
        let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
        assert_eq!(s.run(), 1, "case {i}");
        assert_eq!(d.used(0), (0, 0), "case {i}");
        assert_eq!(count(&s.metrics.bad_descriptors), 1, "case {i}");
        if let Some(&(a, 1, true)) = descs.last().filter(|l| l.0 < MEM_SIZE) {
            assert_eq!(d.byte(a), 0xff, "case {i}: status untouched");
        }
    }
    assert_eq!(contents(&f), original());
}

#[test]
fn descriptor_loop_is_cut_and_the_queue_goes_on() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let mem = guest();
    let mut d = Driver::new(&mem);
    let h = d.header(T_IN, 0);
    let st = d.status();
    // 0 -> 1 -> 0 -> ...
    d.put(0, Descriptor::new(h.0, 16, F_NEXT, 1));
    d.put(1, Descriptor::new(st.0, 1, F_WRITE | F_NEXT, 0));
    d.offer(0);
    d.next_desc = 2;
    let good = d.flush();
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    assert_eq!(s.run(), 2);
    assert_eq!(d.used(0), (0, 0));
    assert_eq!(d.byte(st.0), 0xff);
    assert_eq!(d.used(1), (u32::from(good), 1));
    assert_eq!(count(&s.metrics.bad_descriptors), 1);
    assert_eq!(count(&s.metrics.requests), 2);
    assert!(!block.needs_reset());
}

#[test]
fn bad_indirect_tables_are_refused() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    // (table length, nested, acked features)
    let cases = [
        (16 * 3, true, ALL_FEATURES),                            // nested
        (16 * (u32::from(QUEUE_SIZE) + 1), false, ALL_FEATURES), // too large
        (16 * 3 - 8, false, ALL_FEATURES),                       // not whole
        (0, false, ALL_FEATURES),                                // empty
        (16 * 3, false, features::VERSION_1),                    // not negotiated
    ];
    for (i, &(len, nested, acked)) in cases.iter().enumerate() {
        let mem = guest();
        let mut d = Driver::new(&mem);
        let h = d.header(T_FLUSH, 0);
        let st = d.status();
        // The nested table holds a well-formed FLUSH.
        let first = if nested {
            Descriptor::new(0x9000, 32, F_INDIRECT, 0)
        } else {
            Descriptor::new(h.0, 16, F_NEXT, 1)
        };
        d.indirect_table(
            0x8000,
            &[
                first,
                Descriptor::new(h.0, 0, F_NEXT, 2),
                Descriptor::new(st.0, 1, F_WRITE, 0),
            ],
        );
        d.indirect_table(
            0x9000,
            &[
                Descriptor::new(h.0, 16, F_NEXT, 1),
                Descriptor::new(st.0, 1, F_WRITE, 0),
            ],
        );
        d.put(0, Descriptor::new(0x8000, len, F_INDIRECT, 0));
        d.offer(0);
        let mut s = setup(&block, d.queue(false), &mem, acked);
        s.run();
        assert_eq!(d.used(0), (0, 0), "case {i}");
        assert_eq!(d.byte(st.0), 0xff, "case {i}");
        assert_eq!(count(&s.metrics.bad_descriptors), 1, "case {i}");
    }
    // The same table, well formed, works.
    let mem = guest();
    let mut d = Driver::new(&mem);
    let h = d.header(T_IN, 2);
    let data = d.data_in(512);
    let st = d.status();
    d.indirect_table(
        0x8000,
        &[
            Descriptor::new(h.0, 16, F_NEXT, 1),
            Descriptor::new(data.0, 512, F_WRITE | F_NEXT, 2),
            Descriptor::new(st.0, 1, F_WRITE, 0),
        ],
    );
    d.put(0, Descriptor::new(0x8000, 48, F_INDIRECT, 0));
    d.offer(0);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    s.run();
    assert_eq!(d.byte(st.0), S_OK);
    assert_eq!(d.bytes(data), original()[1024..1536].to_vec());
    assert_eq!(d.used(0), (0, 513));
}

#[test]
fn buffers_outside_guest_memory_fail_with_ioerr() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    for data in [
        (MEM_SIZE - 256, 512, true),  // runs off the end
        (MEM_SIZE + 4096, 512, true), // entirely outside
        (u64::MAX - 255, 512, true),  // wraps around
        (MEM_SIZE - 256, 512, false),
    ] {
        let kind = if data.2 { T_IN } else { T_OUT };
        let (status, len, s) = one(&block, ALL_FEATURES, |d| vec![d.header(kind, 0), data, d.status()]);
        assert_eq!((status, len), (S_IOERR, 1), "{data:?}");
        assert_eq!(count(&s.metrics.bad_descriptors), 1);
        assert_eq!(count(&s.metrics.bytes_written), 0);
    }
    // A header outside memory.
    let (status, len, s) = one(&block, ALL_FEATURES, |d| vec![(MEM_SIZE - 8, 16, false), d.status()]);
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(count(&s.metrics.bad_descriptors), 1);
    assert_eq!(contents(&f), original());
}

#[test]
fn unknown_request_type_is_unsupported() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    for kind in [2, 10, 14, 0x8000_0000] {
        let (status, len, s) = one(&block, ALL_FEATURES, |d| {
            vec![d.header(kind, 0), d.data_in(512), d.status()]
        });
        assert_eq!((status, len), (S_UNSUPP, 1), "type {kind}");
        assert_eq!(count(&s.metrics.bad_requests), 1);
    }
}

#[test]
fn host_io_errors_become_ioerr() {
    let disk = TestDisk::new(8, true);
    let block = Block::with_backend("t".into(), disk, false, String::new()).unwrap();
    for kind in [T_IN, T_OUT, T_FLUSH, T_WRITE_ZEROES] {
        let (status, len, s) = one(&block, ALL_FEATURES, |d| {
            let data = match kind {
                T_IN => d.data_in(512),
                T_OUT => d.data_out(&[1; 512]),
                T_WRITE_ZEROES => d.data_out(&segment(0, 1, 0)),
                _ => return vec![d.header(kind, 0), d.status()],
            };
            vec![d.header(kind, 0), data, d.status()]
        });
        assert_eq!((status, len), (S_IOERR, 1), "type {kind}");
        assert_eq!(count(&s.metrics.io_errors), 1, "type {kind}");
    }
}

/// A disk with bad sectors (the fault-injection backend): requests that
/// touch them get IOERR and count as io_errors; the sectors beside them
/// still read and write.
#[test]
fn bad_sectors_fail_only_their_requests() {
    let disk = TestDisk::new(8, false);
    let backend = Arc::new(super::backend::FailingRange {
        inner: disk.clone(),
        start: 2 * 512,
        end: 3 * 512,
    });
    let block = Block::with_backend("t".into(), backend, false, String::new()).unwrap();
    for (kind, sector, want) in [
        (T_OUT, 1, S_OK),
        (T_OUT, 2, S_IOERR),
        (T_IN, 2, S_IOERR),
        (T_OUT, 3, S_OK),
        (T_IN, 1, S_OK),
        (T_FLUSH, 0, S_OK),
    ] {
        let (status, _, s) = one(&block, ALL_FEATURES, |d| {
            let data = match kind {
                T_IN => d.data_in(512),
                T_OUT => d.data_out(&[7; 512]),
                _ => return vec![d.header(kind, 0), d.status()],
            };
            vec![d.header(kind, sector), data, d.status()]
        });
        assert_eq!(status, want, "type {kind} sector {sector}");
        assert_eq!(count(&s.metrics.io_errors), u64::from(want == S_IOERR));
    }
    let data = disk.data.lock().unwrap();
    assert!(data[512..1024].iter().all(|&b| b == 7));
    assert!(
        data[1024..1536].iter().all(|&b| b == 0),
        "the bad sector was not written"
    );
    assert!(data[1536..2048].iter().all(|&b| b == 7));
}

#[test]
fn head_outside_the_table_is_dropped() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let mem = guest();
    let mut d = Driver::new(&mem);
    d.offer(QSIZE + 3);
    let good = d.flush();
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    assert_eq!(s.run(), 1);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (u32::from(good), 1));
    assert_eq!(count(&s.metrics.bad_descriptors), 1);
}

#[test]
fn event_idx_suppresses_and_requests_interrupts() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let acked = ALL_FEATURES | features::RING_EVENT_IDX;
    let mem = guest();
    let mut d = Driver::new(&mem);
    // used_event sits right after the available ring.
    let used_event = d.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    let avail_event = d.vq.used_addr().0 + 4 + 8 * u64::from(QSIZE);
    mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    d.flush();
    let mut s = setup(&block, d.queue(true), &mem, acked);
    s.run();
    assert_eq!(d.used_idx(), 1);
    assert!(s.irq.causes().is_empty(), "driver wants an interrupt after 6");
    // The device asks to be notified of the next chain.
    assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);

    // Five more: the used index passes used_event + 1 = 6.
    for _ in 0..5 {
        d.flush();
    }
    s.run();
    assert_eq!(d.used_idx(), 6);
    assert_eq!(s.irq.causes(), vec![InterruptCause::Queue(0)]);
    assert_eq!(count(&s.metrics.interrupts), 1);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 6);
}

#[test]
fn unreadable_ring_stops_the_queue_and_asks_for_reset() {
    let f = image(DISK_SECTORS);
    let block = block_on(&f, false);
    let mem = guest();
    let mut d = Driver::new(&mem);
    d.flush();
    // The driver claims more chains than the queue holds.
    d.vq.avail().idx().store(QSIZE + 1);
    let mut s = setup(&block, d.queue(false), &mem, ALL_FEATURES);
    assert!(s.worker.process_queue().is_err());
    s.worker.serve();
    assert!(block.needs_reset());
    assert_eq!(count(&s.metrics.needs_reset), 1);
    assert_eq!(s.irq.causes(), vec![InterruptCause::Config]);
    assert_eq!(d.used_idx(), 0);
    // Further notifications are ignored until a reset.
    d.vq.avail().idx().store(1);
    s.worker.serve();
    assert_eq!(d.used_idx(), 0);
    assert_eq!(count(&s.metrics.needs_reset), 1);
}

#[test]
fn worker_thread_serves_notifications_until_reset() {
    let f = image(DISK_SECTORS);
    let mut block = block_on(&f, false);
    let mem = guest();
    let mut d = Driver::new(&mem);
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Irq::default());
    let metrics = Arc::new(DeviceMetrics::default());
    block
        .activate(Activation {
            mem: direct_view(mem.clone()),
            queues: vec![ActiveQueue {
                index: 0,
                queue: d.queue(false),
                notify: notify.try_clone().unwrap(),
            }],
            interrupt: irq.clone(),
            acked_features: ALL_FEATURES,
            metrics: metrics.clone(),
        })
        .unwrap();

    let data = d.data_in(1024);
    let st = d.status();
    let h = d.header(T_IN, 4);
    d.chain(&[h, data, st]);
    notify.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while irq.causes().is_empty() {
        assert!(Instant::now() < deadline, "no interrupt from the worker");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(irq.causes(), vec![InterruptCause::Queue(0)]);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 1025));
    assert_eq!(d.byte(st.0), S_OK);
    assert_eq!(d.bytes(data), original()[4 * 512..6 * 512].to_vec());
    assert_eq!(count(&metrics.requests), 1);

    // After a reset, notifications reach nobody.
    block.reset();
    d.flush();
    notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(), 1);
    assert_eq!(notify.read().unwrap(), 1, "nobody consumed it");
}

#[test]
fn activation_needs_exactly_the_request_queue() {
    let f = image(DISK_SECTORS);
    let mut block = block_on(&f, false);
    let mem = guest();
    let result = block.activate(Activation {
        mem: direct_view(mem),
        queues: Vec::new(),
        interrupt: Arc::new(Irq::default()),
        acked_features: ALL_FEATURES,
        metrics: Arc::default(),
    });
    assert!(matches!(result, Err(ActivateError::Invalid(_))));
}

#[test]
fn config_space_reads_at_any_offset_and_width() {
    let f = image(DISK_SECTORS);
    let mut block = block_on(&f, false);
    fn read_from(block: &Block, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0xaa; len];
        block.read_config(off, &mut v);
        v
    }
    let read = |off, len| read_from(&block, off, len);
    assert_eq!(read(0, 8), DISK_SECTORS.to_le_bytes().to_vec());
    assert_eq!(read(0, 4), (DISK_SECTORS as u32).to_le_bytes().to_vec());
    assert_eq!(read(0, 1), vec![DISK_SECTORS as u8]);
    assert_eq!(read(1, 2), vec![0, 0]);
    assert_eq!(read(8, 4), SIZE_MAX.to_le_bytes().to_vec());
    assert_eq!(read(12, 4), SEG_MAX.to_le_bytes().to_vec());
    assert_eq!(read(20, 4), BLK_SIZE.to_le_bytes().to_vec());
    assert_eq!(read(36, 4), DISCARD_MAX_SECTORS.to_le_bytes().to_vec());
    assert_eq!(read(40, 4), DISCARD_MAX_SEG.to_le_bytes().to_vec());
    assert_eq!(read(44, 4), 1u32.to_le_bytes().to_vec());
    assert_eq!(read(48, 4), WRITE_ZEROES_MAX_SECTORS.to_le_bytes().to_vec());
    assert_eq!(read(52, 4), WRITE_ZEROES_MAX_SEG.to_le_bytes().to_vec());
    assert_eq!(read(56, 1), vec![1]);
    // Straddling the end, past it, far past it.
    assert_eq!(read(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read(60, 4), vec![0; 4]);
    assert_eq!(read(u64::MAX, 4), vec![0; 4]);
    assert!(!block.write_config(0, &[1, 2, 3, 4]));
    assert_eq!(read_from(&block, 0, 8), DISK_SECTORS.to_le_bytes().to_vec());

    let ro = block_on(&f, true);
    let mut v = [0xaa; 24];
    ro.read_config(36, &mut v);
    assert_eq!(v, [0; 24], "no discard limits on a read-only disk");
}

#[test]
fn features_follow_the_mode() {
    let f = image(DISK_SECTORS);
    let rw = block_on(&f, false);
    let base = features::VERSION_1
        | features::RING_INDIRECT_DESC
        | features::RING_EVENT_IDX
        | F_SEG_MAX
        | F_SIZE_MAX
        | F_BLK_SIZE
        | F_FLUSH;
    assert_eq!(rw.device_features(), base | F_DISCARD | F_WRITE_ZEROES);
    assert_eq!(block_on(&f, true).device_features(), base | F_RO);
    assert_eq!(rw.device_type(), 2);
    assert_eq!(rw.queue_max_sizes(), &[256]);
    assert_eq!(rw.capacity(), DISK_SECTORS);
}

#[test]
fn constructor_refuses_odd_images_and_ids() {
    let f = TempFile::new().unwrap();
    f.as_file().write_all(&[0; 1000]).unwrap();
    let err = Block::new("blk0".into(), f.as_file().try_clone().unwrap(), false, "x".into())
        .err()
        .unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("512"), "{err}");

    let f = image(1);
    for id in ["123456789012345678901", "disk\u{e9}"] {
        let file = f.as_file().try_clone().unwrap();
        assert!(Block::new("blk0".into(), file, false, id.into()).is_err(), "{id}");
    }
    let file = f.as_file().try_clone().unwrap();
    assert!(Block::new("blk0".into(), file, false, "12345678901234567890".into()).is_ok());
}
