//! Finding the virtio devices: virtio-mmio windows from the command line
//! (`virtio_mmio.device=<size>@<addr>:<irq>[:<id>]`, as Linux reads them),
//! then virtio-pci functions on PCI bus 0 through the ECAM window that the
//! ACPI MCFG table gives (no MCFG: no PCI).
//!
//! veil assigns every BAR before the guest starts, so PCI discovery
//! allocates nothing: it hands the function to virtio-drivers'
//! `PciTransport`, then turns on memory decoding and bus mastering in the
//! command register.

use alloc::vec::Vec;
use core::ptr::NonNull;

use super::transport::{Inner, PciNotify};
use crate::hal::ProbeHal;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{Cam, Command, DeviceFunction, MmioCam, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport, VirtioPciError};

/// `virtio-pci` capability types (virtio 1.2 §4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const PCI_CAP_ID_VNDR: u8 = 0x09;

pub enum Bus {
    Mmio,
    Pci,
}

impl Bus {
    pub fn name(&self) -> &'static str {
        match self {
            Bus::Mmio => "mmio",
            Bus::Pci => "pci",
        }
    }
}

/// A device found.
pub struct Found {
    pub bus: Bus,
    /// MMIO window base, or PCI bus/device/function as bus << 8 | dev << 3 | fn.
    pub addr: u64,
    pub transport: Inner,
    /// PCI only: where its notifications go, if the capabilities say.
    pub notify: Option<PciNotify>,
}

/// A device that was announced but could not be set up.
pub struct Broken {
    pub bus: Bus,
    /// MMIO window base, or PCI bus/device/function as bus << 8 | dev << 3 | fn.
    pub addr: u64,
    pub reason: &'static str,
}

/// A number as Linux's `memparse` reads it: decimal or 0x-hex, with an
/// optional K, M or G suffix.
pub fn parse_num(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let (digits, radix) = match digits {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (digits, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        let d = (d as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    v.checked_mul(1 << shift)
}

/// `<size>@<addr>:<irq>[:<id>]` -> (size, addr).
fn parse_mmio_word(v: &[u8]) -> Option<(u64, u64)> {
    let at = v.iter().position(|&b| b == b'@')?;
    let size = parse_num(&v[..at])?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let addr = parse_num(&rest[..colon])?;
    let mut fields = rest[colon + 1..].split(|&b| b == b':');
    parse_num(fields.next()?)?; // the IRQ: the probe polls, but it must be there
    Some((size, addr))
}

/// Whether the command line or ACPI announce any device at all.
pub fn any(cmdline: &[u8], ecam: Option<u64>) -> bool {
    ecam.is_some() || mmio_words(cmdline).next().is_some()
}

fn mmio_words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    const KEY: &[u8] = b"virtio_mmio.device=";
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(KEY))
}

/// Every device: virtio-mmio ones first, in command-line order, then PCI
/// bus 0 in device/function order.
pub fn discover(cmdline: &[u8], ecam: Option<u64>, mapped_end: u64) -> (Vec<Found>, Vec<Broken>) {
    let mut found = Vec::new();
    let mut broken = Vec::new();

    for word in mmio_words(cmdline) {
        let Some((size, addr)) = parse_mmio_word(word) else {
            broken.push(Broken {
                bus: Bus::Mmio,
                addr: 0,
                reason: "bad_cmdline",
            });
            continue;
        };
        if addr == 0 || !addr.is_multiple_of(0x200) || size < 0x100 || addr.saturating_add(size) > mapped_end {
            broken.push(Broken {
                bus: Bus::Mmio,
                addr,
                reason: "bad_window",
            });
            continue;
        }
        let header = NonNull::new(addr as *mut VirtIOHeader).unwrap();
        // SAFETY: veil announced a virtio-mmio window of `size` bytes here;
        // it is identity-mapped and nothing else uses it.
        match unsafe { MmioTransport::new(header, size as usize) } {
            Ok(t) => found.push(Found {
                bus: Bus::Mmio,
                addr,
                transport: Inner::Mmio(t),
                notify: None,
            }),
            Err(_) => broken.push(Broken {
                bus: Bus::Mmio,
                addr,
                reason: "bad_header",
            }),
        }
    }

    if let Some(ecam) = ecam {
        scan_pci(ecam, &mut found, &mut broken);
    }
    (found, broken)
}

fn bdf(df: DeviceFunction) -> u64 {
    (df.bus as u64) << 8 | (df.device as u64) << 3 | df.function as u64
}

fn scan_pci(ecam: u64, found: &mut Vec<Found>, broken: &mut Vec<Broken>) {
    // SAFETY: MCFG says the ECAM window of segment 0 starts here (256 MiB,
    // identity-mapped MMIO below 4 GiB); only this root uses it.
    let cam = unsafe { MmioCam::new(ecam as *mut u8, Cam::Ecam) };
    let mut root = PciRoot::new(cam);
    for (df, info) in root.enumerate_bus(0) {
        if virtio_device_type(&info).is_none() {
            continue;
        }
        // The transport first, decoding second: PciTransport::new sizes
        // each BAR it uses (4 times per function), turning decoding off and
        // on around it if it was on; veil then moves the queues' ioeventfds
        // away and back each time (~7 ms a round here). With decoding off
        // it just sizes.
        let transport = PciTransport::new::<ProbeHal, _>(&mut root, df);
        let (_, command) = root.get_status_command(df);
        root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
        match transport {
            Ok(t) => found.push(Found {
                bus: Bus::Pci,
                addr: bdf(df),
                transport: Inner::Pci(t),
                notify: pci_notify(ecam, df),
            }),
            Err(e) => broken.push(Broken {
                bus: Bus::Pci,
                addr: bdf(df),
                reason: pci_error(&e),
            }),
        }
    }
}

fn pci_error(e: &VirtioPciError) -> &'static str {
    match e {
        VirtioPciError::InvalidDeviceId(_) => "device_id",
        VirtioPciError::InvalidVendorId(_) => "vendor_id",
        VirtioPciError::MissingCommonConfig => "no_common_cfg",
        VirtioPciError::MissingNotifyConfig => "no_notify_cfg",
        VirtioPciError::InvalidNotifyOffMultiplier(_) => "notify_multiplier",
        VirtioPciError::MissingIsrConfig => "no_isr_cfg",
        VirtioPciError::UnexpectedIoBar => "io_bar",
        VirtioPciError::BarNotAllocated(_) => "bar_not_allocated",
        VirtioPciError::BarOffsetOutOfRange => "bar_offset",
        VirtioPciError::Misaligned { .. } => "misaligned",
        VirtioPciError::Pci(_) => "pci",
    }
}

/// A 32-bit read of `df`'s configuration space.
fn cfg_read(ecam: u64, df: DeviceFunction, offset: u8) -> u32 {
    let at = ecam + (bdf(df) << 12) + (offset & 0xFC) as u64;
    // SAFETY: inside the ECAM window (bus 0, 4 KiB per function).
    unsafe { (at as *const u32).read_volatile() }
}

/// The address a memory BAR decodes, None for an I/O BAR.
fn bar_address(ecam: u64, df: DeviceFunction, bar: u8) -> Option<u64> {
    if bar > 5 {
        return None;
    }
    let low = cfg_read(ecam, df, 0x10 + 4 * bar);
    if low & 1 != 0 {
        return None;
    }
    let high = if (low >> 1) & 3 == 2 && bar < 5 {
        cfg_read(ecam, df, 0x10 + 4 * (bar + 1)) as u64
    } else {
        0
    };
    Some(high << 32 | (low & !0xF) as u64)
}

/// Where `df`'s common configuration and notify region are, from its
/// vendor capabilities (virtio 1.2 §4.1.4): the first of each type.
fn pci_notify(ecam: u64, df: DeviceFunction) -> Option<PciNotify> {
    if cfg_read(ecam, df, 0x04) & (1 << 20) == 0 {
        return None; // no capability list
    }
    let mut common = None;
    let mut notify = None;
    let mut at = (cfg_read(ecam, df, 0x34) & 0xFC) as u8;
    // At most 48 capabilities fit in 256 bytes: a loop is a broken list.
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        let head = cfg_read(ecam, df, at);
        let (id, next, cfg_type) = (head as u8, (head >> 8) as u8 & 0xFC, (head >> 24) as u8);
        if id == PCI_CAP_ID_VNDR {
            let bar = cfg_read(ecam, df, at + 4) as u8;
            let offset = cfg_read(ecam, df, at + 8) as u64;
            let length = cfg_read(ecam, df, at + 12) as u64;
            match cfg_type {
                CAP_COMMON_CFG if common.is_none() => {
                    common = bar_address(ecam, df, bar).map(|b| b + offset);
                }
                CAP_NOTIFY_CFG if notify.is_none() => {
                    let multiplier = cfg_read(ecam, df, at + 16);
                    notify = bar_address(ecam, df, bar).map(|b| (b + offset, length, multiplier));
                }
                _ => {}
            }
        }
        at = next;
    }
    let (common, (base, len, multiplier)) = (common?, notify?);
    Some(PciNotify {
        common,
        base,
        len,
        multiplier,
    })
}
