//! Driving veil's virtio devices with the `virtio-drivers` crate, at CPL3,
//! polling (no interrupts).
//!
//! `run` (mode `basic`, after the RAM test) finds every device
//! (discover.rs) and runs one workload per device: block write/verify,
//! net loopback echo, rng reads, a console line. `bench` (mode `bench`)
//! runs the block and net benchmarks instead (bench.rs).
//!
//! Memory: `reserve` carves one range out of e820 RAM, the highest one
//! that avoids the probe image, ACPI tables and initrd, and splits it into
//! the DMA pool (hal.rs) and the heap (heap.rs). In mode `basic` the RAM
//! test has finished with that memory by then.
//!
//! A virtio-iommu (iommu/) is set up before every other device, which then
//! reaches memory through it as the DMA policy (hal.rs) says.

mod bench;
mod blk;
mod console;
mod discover;
mod durability;
pub mod faults;
pub mod iommu;
mod mark;
pub mod net;
mod rng;
mod secure;
pub mod secure_checks;
mod transport;

use alloc::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use alloc::vec::Vec;
use core::ptr::NonNull;

use virtio_drivers::transport::{DeviceType, Transport};

use crate::acpi::{self, Acpi};
use crate::bootinfo::{param, BootInfo, E820_RAM};
use crate::hal::{self, DmaPolicy};
use crate::serial::Line;
use crate::{boot, heap};
use discover::Found;
pub use mark::DmaMark;
use transport::{Probed, Stats};

/// TSC ticks to wait for one completion before calling it a timeout
/// (~5–10 s).
pub const TIMEOUT: u64 = 20_000_000_000;

const MIB: u64 = 1 << 20;
/// DMA pool: virtqueues (and bounce buffers, with the lazy and bounce
/// policies).
const POOL_SIZE: u64 = 2 * MIB;
/// Where every device access stays in the pool (lazy: the workloads'
/// buffers live there; bounce: they are copied there), the pool grows by
/// the heap's size, up to what it can hold.
const POOL_MAX: u64 = 32 * MIB;
/// The heap takes a quarter of the free RAM, within these bounds.
const HEAP_MIN: u64 = 4 * MIB;
const HEAP_MAX: u64 = 48 * MIB;
/// Default seed of the block pattern ("veil").
pub const DEFAULT_SEED: u64 = 0x7665_696C;

/// What the workloads share: settings from the command line.
pub struct Settings<'a> {
    pub cmdline: &'a [u8],
    pub seed: u64,
}

impl Settings<'_> {
    /// A numeric `probe.<key>=` value, or `default`.
    pub fn num(&self, key: &str, default: u64) -> u64 {
        param(self.cmdline, key)
            .and_then(discover::parse_num)
            .unwrap_or(default)
    }
}

/// How a device is called in the output: `dev=blk0 transport=mmio`.
#[derive(Clone, Copy)]
pub struct Name {
    /// `blk`, `net`, `rng`, `console`, `other`.
    pub kind: &'static str,
    /// Per kind, in discovery order.
    pub index: u32,
    /// `mmio` or `pci`.
    pub bus: &'static str,
}

impl Name {
    /// `PROBE virtio dev=<kind><n> transport=<bus>`
    pub fn line(&self) -> Line {
        self.tag(Line::new("virtio"))
    }

    /// ` dev=<kind><n> transport=<bus>` added to `line`.
    pub fn tag(&self, line: Line) -> Line {
        let mut name = [0u8; 32];
        let k = self.kind.len();
        name[..k].copy_from_slice(self.kind.as_bytes());
        let mut buf = [0u8; 20];
        let index = crate::serial::digits(self.index as u64, 10, &mut buf);
        name[k..k + index.len()].copy_from_slice(index);
        line.text("dev", &name[..k + index.len()])
            .text("transport", self.bus.as_bytes())
    }
}

/// A device ready for its workload: its wrapped transport and its name.
pub struct Device {
    pub transport: Probed,
    pub stats: alloc::rc::Rc<Stats>,
    pub name: Name,
}

/// A driver could not be set up: report `result=fail reason=init error=..`.
pub fn init_failed(name: Name, e: &virtio_drivers::Error) -> bool {
    name.line()
        .word("result=fail reason=init")
        .text("error", error_name(e).as_bytes())
        .emit();
    false
}

/// The device cleared FEATURES_OK: report it. True when all is well.
pub fn check_features(name: Name, stats: &Stats) -> bool {
    if stats.refused.get() {
        name.line()
            .word("result=fail reason=features_refused")
            .hex("offered", stats.offered.get())
            .hex("accepted", stats.accepted.get())
            .emit();
        return false;
    }
    true
}

/// ` access_platform=1` when that was negotiated (with ` iommu=<policy>
/// endpoint=.. iommu_maps=..` when through the vIOMMU), and ` quirk=..`
/// for what the device did wrong without failing the workload.
pub fn annotate(line: Line, stats: &Stats) -> Line {
    let mut line = line;
    if stats.accepted.get() & transport::F_ACCESS_PLATFORM != 0 {
        line = line.word("access_platform=1");
    }
    if stats.translated.get() {
        line = line
            .text("iommu", hal::chosen().name().as_bytes())
            .hex("endpoint", u64::from(stats.endpoint.get().unwrap_or(0)));
        line = stats.mark.get().tag(line);
    } else if hal::chosen() == DmaPolicy::Bounce {
        line = stats.mark.get().tag_bounces(line);
    }
    if stats.ready_stuck.get() {
        line = line.word("quirk=ready_stuck");
    }
    line
}

fn kind_name(t: DeviceType) -> &'static str {
    match t {
        DeviceType::Block => "blk",
        DeviceType::Network => "net",
        DeviceType::EntropySource => "rng",
        DeviceType::Console => "console",
        _ => "other",
    }
}

/// A zeroed, page-aligned data buffer (`Vec<u8>` promises no alignment):
/// from the DMA pool when the DMA policy wants buffers there and it has
/// room, else from the heap.
pub struct Buf {
    ptr: NonNull<u8>,
    len: usize,
    /// Pool pages it holds; 0 for a heap buffer.
    pool_pages: usize,
}

impl Buf {
    pub fn new(len: usize) -> Buf {
        let pages = len.max(1).div_ceil(4096);
        if hal::chosen().buffers_in_pool() {
            if let Some(addr) = hal::pool_alloc(pages) {
                let ptr = NonNull::new(addr as *mut u8).unwrap();
                return Buf {
                    ptr,
                    len,
                    pool_pages: pages,
                };
            }
        }
        let layout = Layout::from_size_align(len.max(1), 4096).unwrap();
        // SAFETY: the layout is not zero-sized.
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(ptr) => Buf {
                ptr,
                len,
                pool_pages: 0,
            },
            None => handle_alloc_error(layout),
        }
    }

    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes that this Buf owns.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.pool_pages != 0 {
            hal::pool_free(self.addr(), self.pool_pages);
            return;
        }
        let layout = Layout::from_size_align(self.len.max(1), 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// The highest `size`-byte range of e820 RAM above 1 MiB and below
/// `limit`, aligned to `align`, that overlaps nothing in `skip`.
fn carve(info: &BootInfo, skip: &[(u64, u64)], limit: u64, size: u64, align: u64) -> Option<u64> {
    let mut best: Option<u64> = None;
    for e in info.e820().iter().filter(|e| e.kind == E820_RAM) {
        let lo = e.addr.max(MIB);
        let mut hi = e.end().min(limit);
        while hi >= lo + size {
            let start = (hi - size) & !(align - 1);
            if start < lo {
                break;
            }
            match skip.iter().find(|&&(s, t)| s < start + size && start < t) {
                Some(&(s, _)) => hi = s,
                None => {
                    best = best.max(Some(start));
                    break;
                }
            }
        }
    }
    best
}

/// Free RAM above 1 MiB that the probe may use, roughly (the keep-out
/// ranges are not subtracted: they are small).
fn free_ram(info: &BootInfo, limit: u64) -> u64 {
    info.e820()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.end().min(limit).saturating_sub(e.addr.max(MIB)))
        .sum()
}

/// Set up the DMA pool and the heap. None (and a line) when RAM is short.
fn reserve(info: &BootInfo, acpi: &Acpi) -> Option<(u64, u64)> {
    let limit = boot::mapped_end();
    let heap_size = (free_ram(info, limit) / 4).clamp(HEAP_MIN, HEAP_MAX) & !(MIB - 1);
    let pool_size = if hal::chosen().pool_only() {
        (POOL_SIZE + heap_size).min(POOL_MAX)
    } else {
        POOL_SIZE
    };
    // What must stay untouched: the probe itself, the initrd, the ACPI
    // tables (a fixed-size list: there is no heap yet).
    let mut keep = [(0u64, 0u64); 12];
    keep[0] = boot::image_range();
    keep[1] = info.ramdisk;
    for (slot, &r) in keep[2..].iter_mut().zip(acpi.regions()) {
        *slot = r;
    }
    let Some(base) = carve(info, &keep, limit, heap_size + pool_size, 2 * MIB) else {
        Line::new("virtio")
            .word("fail reason=no_memory")
            .hex("wanted", heap_size + pool_size)
            .emit();
        return None;
    };
    let pool = base + heap_size;
    heap::init(base, heap_size);
    hal::init_pool(pool, pool_size);
    Some((pool, base))
}

/// Bytes the workloads' buffers may come from (the bench keeps within
/// half of it).
pub fn buffer_room() -> u64 {
    if hal::chosen().buffers_in_pool() {
        hal::pool_range().1
    } else {
        heap::size()
    }
}

/// The DMA policy from `probe.dma=`; by default lazy if the ACPI tables
/// announce a vIOMMU (VIOT), else identity.
fn set_policy(cmdline: &[u8], acpi: &Acpi) -> bool {
    match param(cmdline, "probe.dma") {
        None => {
            if acpi.viot.is_some() {
                hal::set_policy(DmaPolicy::Lazy);
            }
            true
        }
        Some(name) => match DmaPolicy::parse(name) {
            Some(p) => {
                hal::set_policy(p);
                true
            }
            None => {
                Line::new("virtio")
                    .text("error", b"unknown_dma_policy")
                    .text("dma", name)
                    .emit();
                false
            }
        },
    }
}

/// Find the devices, wrap their transports, name them. Prints
/// `PROBE virtio count=...` and a line for each broken device; the bool is
/// false when any device could not be set up.
fn devices(info: &BootInfo, acpi: &Acpi) -> Option<(Vec<Device>, bool)> {
    if !set_policy(info.cmdline, acpi) {
        return None;
    }
    let (pool, heap_base) = reserve(info, acpi)?;
    if !secure::enter(info.cmdline) {
        return None;
    }
    let (mut found, broken) = discover::discover(info.cmdline, acpi.ecam, boot::mapped_end());
    // The vIOMMU is not one of the devices the workloads drive: it counts
    // (its own line follows), but it is set up here, before the others.
    let viommu = found
        .iter()
        .position(|f| f.transport.device_type() == DeviceType::IOMMU);
    let viommu = viommu.map(|i| found.remove(i));
    Line::new("virtio")
        .dec(
            "count",
            (found.len() + broken.len() + usize::from(viommu.is_some())) as u64,
        )
        .text("dma", hal::chosen().name().as_bytes())
        .hex("pool", pool)
        .hex("heap", heap_base)
        .emit();
    let cached_notify = param(info.cmdline, "probe.pci_notify") != Some(b"crate");
    let viot = acpi.viot.as_ref();
    let mut iommu_ok = true;
    if let Some(f) = viommu {
        let t = Probed::new(f.transport, f.notify, cached_notify, mmio_base(&f.bus, f.addr), None);
        iommu_ok = iommu::install(t, &f.bus, f.addr, viot);
        // Identity addresses through a vIOMMU need its bypass.
        if iommu_ok && !hal::chosen().translates() {
            iommu_ok = iommu::set_bypass(true);
            let result = if iommu_ok { "result=ok" } else { "result=fail" };
            Line::new("iommu").word("bypass=1").word(result).emit();
        }
    }
    if hal::chosen().translates() && !iommu::present() {
        Line::new("virtio")
            .text("error", b"no_iommu")
            .text("dma", hal::chosen().name().as_bytes())
            .emit();
        return None;
    }
    for b in &broken {
        Line::new("virtio")
            .word("dev=unknown")
            .text("transport", b.bus.name().as_bytes())
            .hex("addr", b.addr)
            .word("result=fail")
            .text("reason", b.reason.as_bytes())
            .emit();
    }
    let mut counts = [0u32; 5];
    let mut devs = Vec::new();
    for f in found {
        let Found {
            bus,
            addr,
            transport,
            notify,
        } = f;
        let endpoint = if iommu::present() {
            iommu::endpoint_of(viot, &bus, addr)
        } else {
            None
        };
        let t = Probed::new(transport, notify, cached_notify, mmio_base(&bus, addr), endpoint);
        let kind = kind_name(t.device_type());
        let slot = ["blk", "net", "rng", "console", "other"]
            .iter()
            .position(|&k| k == kind)
            .unwrap();
        devs.push(Device {
            stats: t.stats(),
            transport: t,
            name: Name {
                kind,
                index: counts[slot],
                bus: bus.name(),
            },
        });
        counts[slot] += 1;
    }
    Some((devs, broken.is_empty() && iommu_ok))
}

/// The device `name` found afresh, with a new transport: for a check that
/// must set a device up from scratch after resetting it (its old driver
/// and transport dropped first). Discovery runs again, so every other
/// device it finds is dropped here, which resets it: only for modes that
/// drive nothing else at the time. No vIOMMU endpoint (`secure` has none).
pub fn rediscover(info: &BootInfo, acpi: &Acpi, name: Name) -> Option<Device> {
    let (found, _) = discover::discover(info.cmdline, acpi.ecam, boot::mapped_end());
    let cached_notify = param(info.cmdline, "probe.pci_notify") != Some(b"crate");
    // Named as `devices` names them: per kind, in discovery order.
    let mut index = 0;
    for f in found {
        if kind_name(f.transport.device_type()) != name.kind {
            continue;
        }
        if index != name.index {
            index += 1;
            continue;
        }
        if f.bus.name() != name.bus {
            return None;
        }
        let t = Probed::new(f.transport, f.notify, cached_notify, mmio_base(&f.bus, f.addr), None);
        return Some(Device {
            stats: t.stats(),
            transport: t,
            name,
        });
    }
    None
}

fn mmio_base(bus: &discover::Bus, addr: u64) -> Option<u64> {
    matches!(bus, discover::Bus::Mmio).then_some(addr)
}

fn settings(info: &BootInfo) -> Settings<'_> {
    let s = Settings {
        cmdline: info.cmdline,
        seed: 0,
    };
    Settings {
        seed: s.num("probe.seed", DEFAULT_SEED),
        ..s
    }
}

/// Mode `basic`: every device's workload. True when all passed (and when
/// there are no devices).
pub fn run(info: &BootInfo, acpi: &Acpi) -> bool {
    if !discover::any(info.cmdline, acpi.ecam) {
        return true;
    }
    let Some((devs, mut ok)) = devices(info, acpi) else {
        return false;
    };
    let settings = settings(info);
    for dev in devs {
        ok &= match dev.name.kind {
            "blk" => blk::workload(dev, &settings),
            "net" => net::workload(dev, &settings),
            "rng" => rng::workload(dev),
            "console" => console::workload(dev),
            _ => {
                dev.name
                    .line()
                    .dec("id", dev.transport.device_type() as u64)
                    .word("result=skipped")
                    .emit();
                true
            }
        };
    }
    ok & iommu::report(false)
}

/// Mode `bench`: the block and/or net benchmark (`probe.bench=blk|net|all`,
/// default all) on the first device of each kind.
pub fn bench(info: &BootInfo) -> bool {
    let acpi = acpi::parse(info);
    let Some((devs, _)) = devices(info, &acpi) else {
        return false;
    };
    bench::run(devs, &settings(info))
}

/// Mode `durability`: numbered blocks in batches, each batch flushed
/// (durability.rs), on the first block device.
pub fn durability(info: &BootInfo) -> bool {
    let acpi = acpi::parse(info);
    let Some((devs, _)) = devices(info, &acpi) else {
        return false;
    };
    durability::run(devs, &settings(info))
}

/// Mode `netflood`: `probe.net_frames` (default 20000) frames out of the
/// first net device, progress every 500, then `probe.idle_ms` (default
/// 0) of doing nothing; for the TAP-removal test.
pub fn netflood(info: &BootInfo) -> bool {
    let acpi = acpi::parse(info);
    let Some((devs, _)) = devices(info, &acpi) else {
        return false;
    };
    let s = settings(info);
    let Some(dev) = devs.into_iter().find(|d| d.name.kind == "net") else {
        Line::new("netflood").word("error=no_net_device").emit();
        return false;
    };
    let mut rig = match net::Rig::new(dev.transport) {
        Ok(r) => r,
        Err(e) => return init_failed(dev.name, &e),
    };
    let result = rig.flood(s.num("probe.net_frames", 20_000), 500);
    let hz = crate::time::tsc_hz().unwrap_or(2_000_000_000);
    let until = crate::time::rdtsc() + s.num("probe.idle_ms", 0) * hz / 1000;
    while crate::time::rdtsc() < until {
        core::hint::spin_loop();
    }
    let line = dev.name.tag(Line::new("netflood"));
    match result {
        Ok(n) => {
            line.dec("sent", n).word("result=ok").emit();
            true
        }
        Err(r) => {
            line.word("result=fail").text("reason", r.as_bytes()).emit();
            false
        }
    }
}

/// Short names of virtio-drivers' errors, for `reason=`.
pub fn error_name(e: &virtio_drivers::Error) -> &'static str {
    use virtio_drivers::Error as E;
    match e {
        E::QueueFull => "queue_full",
        E::NotReady => "not_ready",
        E::WrongToken => "wrong_token",
        E::AlreadyUsed => "queue_in_use",
        E::InvalidParam => "invalid_param",
        E::DmaError => "dma_alloc",
        E::IoError => "io_error",
        E::Unsupported => "unsupported",
        E::ConfigSpaceTooSmall => "config_too_small",
        E::ConfigSpaceMissing => "config_missing",
        E::SocketDeviceError(_) => "socket",
    }
}
