//! Virtio devices on the VM: where each one lives (MMIO window, IRQ), how
//! its notifications reach it (ioeventfd) and how it interrupts (irqfd).

use super::irq::{GsiRouter, KvmIoEvents, FIRST_MSI_GSI};
use crate::config::VmConfig;
use crate::devices_config::{Common, DiskConfig, NetBackendConfig, Transport};
use crate::error::{Error, Kind, Result};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use veil_arch::acpi::{PciEcam, Viot, ViotIommu, ViotMmioEndpoint, ViotPciRange, VirtioMmioDevice};
use veil_arch::layout::{
    DEVICE_GSIS, PCI_BAR_END, PCI_BAR_START, PCI_CONFIG_PORT, PCI_ECAM_START, VIRTIO_MMIO_END, VIRTIO_MMIO_START,
};
use veil_devices::dma::{translated_view, DmaMode, DmaTranslation, SharedPages};
use veil_devices::legacy::SerialSink;
use veil_devices::pci::bus::CONFIG_IO_SIZE;
use veil_devices::pci::{
    IoEventRegistry, MsiVector, PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot, VirtioPciDevice, VirtioPciInterrupt,
};
use veil_devices::virtio::block::Block;
use veil_devices::virtio::console::Console;
use veil_devices::virtio::iommu::Iommu;
use veil_devices::virtio::mmio::{MmioInterrupt, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use veil_devices::virtio::net::{Net, NetBackend};
use veil_devices::virtio::rng::Rng;
use veil_devices::virtio::transport::{DmaViews, VirtioState};
use veil_devices::virtio::{DeviceMetrics, VirtioDevice};
use veil_devices::Bus;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// A device as the report and the logs see it.
pub struct AttachedDevice {
    pub name: String,
    pub transport: Transport,
    pub dma: DmaMode,
    pub metrics: Arc<DeviceMetrics>,
    /// Its identity translation and, behind a vIOMMU, its endpoint.
    translations: Vec<Arc<DmaTranslation>>,
}

/// How one device will reach guest memory.
pub struct DeviceDma {
    pub mode: DmaMode,
    /// Refuse drivers that do not accept ACCESS_PLATFORM.
    pub insist: bool,
    /// Its vIOMMU endpoint and the ID the guest knows it by.
    pub endpoint: Option<(u32, Arc<DmaTranslation>)>,
}

/// Endpoint ID of the virtio-mmio device in window `n` (PCI functions use
/// their BDF, which is below 0x10000).
pub fn mmio_endpoint_id(n: u64) -> u32 {
    0x1_0000 + n as u32
}

/// The virtio-iommu's own place: the first PCI slot, 00:01.0.
const IOMMU_BDF: u16 = 1 << 3;

/// Hands out MMIO windows and interrupt lines, and records what was placed.
pub struct DeviceManager {
    next_mmio: u64,
    free_gsis: std::slice::Iter<'static, u32>,
    next_msi_gsi: u32,
    /// The PCI root, created with the first PCI device.
    pci: Option<Arc<Mutex<PciRoot>>>,
    router: Option<Arc<GsiRouter>>,
    pub attached: Vec<AttachedDevice>,
    /// For the DSDT.
    pub acpi_mmio: Vec<VirtioMmioDevice>,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub cmdline_mmio: Vec<String>,
    /// The VIOT table, when a vIOMMU is present.
    pub viot: Option<Viot>,
    host_view: GuestMemoryMmap,
    shared: Arc<SharedPages>,
    /// Writable disk images, by device name, for `sync_disks`.
    pub writable_disks: Vec<(String, std::fs::File)>,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::new(Kind::Unavailable, format!("KVM: {what}: {e}"))
}

impl DeviceManager {
    /// Devices will reach guest RAM through `host_view`, gated by `shared`.
    pub fn new(host_view: GuestMemoryMmap, shared: Arc<SharedPages>) -> Self {
        Self {
            viot: None,
            host_view,
            shared,
            next_mmio: VIRTIO_MMIO_START,
            free_gsis: DEVICE_GSIS.iter(),
            next_msi_gsi: FIRST_MSI_GSI,
            pci: None,
            router: None,
            attached: Vec::new(),
            acpi_mmio: Vec::new(),
            cmdline_mmio: Vec::new(),
            writable_disks: Vec::new(),
        }
    }

    /// fdatasync of every writable disk image; a failure is logged.
    pub fn sync_disks(&self) {
        for (name, file) in &self.writable_disks {
            match file.sync_data() {
                Ok(()) => log::info!("{name}: disk image synced"),
                Err(e) => log::error!("{name}: cannot sync the disk image: {e}"),
            }
        }
    }

    pub fn allocate_gsi(&mut self) -> Result<u32> {
        self.free_gsis
            .next()
            .copied()
            .ok_or_else(|| Error::new(Kind::Usage, "too many devices: no interrupt lines left"))
    }

    /// Puts `device` on a virtio-mmio window of its own.
    pub fn attach_mmio(
        &mut self,
        vm: &VmFd,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        dma: DeviceDma,
    ) -> Result<()> {
        let base = self.next_mmio;
        if base + MMIO_WINDOW > VIRTIO_MMIO_END {
            return Err(Error::new(Kind::Usage, "too many virtio-mmio devices"));
        }
        let gsi = self.allocate_gsi()?;
        let name = device.name().to_string();
        let io = |e: std::io::Error| Error::new(Kind::Unavailable, format!("{name}: {e}"));
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(kvm("cannot register a device interrupt"))?;
        let interrupt = Arc::new(MmioInterrupt::new(irq));
        let metrics = Arc::new(DeviceMetrics::default());
        let n = (base - VIRTIO_MMIO_START) / MMIO_WINDOW;
        if let Some((id, _)) = &dma.endpoint {
            if *id != mmio_endpoint_id(n) {
                return Err(Error::new(
                    Kind::Software,
                    format!("{name}: endpoint {id:#x} is not its window's"),
                ));
            }
        }
        let (views, translations) = self.views(&name, &dma);
        let (mode, insist) = (dma.mode, dma.insist);
        let state = VirtioState::new(device, mode, insist, views, interrupt.clone(), metrics.clone()).map_err(io)?;
        for (queue, evt) in state.notify_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), queue as u32)
                .map_err(kvm("cannot register a queue notification"))?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(state, interrupt)));
        mmio_bus
            .insert(base, MMIO_WINDOW, transport)
            .map_err(|e| Error::new(Kind::Software, format!("device layout: {e}")))?;
        log::info!(
            "{name}: virtio-mmio at {base:#x}, IRQ {gsi}, DMA {mode:?}{}",
            describe_endpoint(&dma)
        );
        self.acpi_mmio.push(VirtioMmioDevice {
            base,
            size: MMIO_WINDOW,
            irq: gsi,
        });
        self.cmdline_mmio.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        if let Some((endpoint, _)) = &dma.endpoint {
            self.viot_mut()?.mmio_endpoints.push(ViotMmioEndpoint {
                base,
                endpoint: *endpoint,
            });
        }
        self.attached.push(AttachedDevice {
            name,
            transport: Transport::Mmio,
            dma: mode,
            metrics,
            translations,
        });
        self.next_mmio += MMIO_WINDOW;
        Ok(())
    }

    /// The ECAM segment for ACPI, if any device is on PCI.
    pub fn pci_ecam(&self) -> Option<PciEcam> {
        self.pci.as_ref().map(|_| PciEcam {
            base: PCI_ECAM_START,
            segment: 0,
            bus_start: 0,
            bus_end: 0,
            mmio32: (PCI_BAR_START, PCI_BAR_END - PCI_BAR_START),
            io: None,
        })
    }

    /// The PCI root, creating it (host bridge, config mechanism #1, ECAM
    /// and the BAR window) on first use.
    fn pci_root(&mut self, pio_bus: &mut Bus, mmio_bus: &mut Bus) -> Result<Arc<Mutex<PciRoot>>> {
        if let Some(root) = &self.pci {
            return Ok(root.clone());
        }
        let layout = |e: String| Error::new(Kind::Software, format!("PCI layout: {e}"));
        let root = PciRoot::new((PCI_BAR_START, PCI_BAR_END - PCI_BAR_START)).map_err(|e| layout(e.to_string()))?;
        let window = root.bar_window();
        let root = Arc::new(Mutex::new(root));
        pio_bus
            .insert(
                PCI_CONFIG_PORT,
                CONFIG_IO_SIZE,
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            )
            .map_err(|e| layout(e.to_string()))?;
        // Bus 0 only: one MiB of ECAM.
        mmio_bus
            .insert(
                PCI_ECAM_START,
                1 << 20,
                Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
            )
            .map_err(|e| layout(e.to_string()))?;
        mmio_bus
            .insert(
                window.0,
                window.1,
                Arc::new(Mutex::new(PciBarWindow::new(root.clone()))),
            )
            .map_err(|e| layout(e.to_string()))?;
        self.pci = Some(root.clone());
        Ok(root)
    }

    /// Puts `device` on the PCI bus as a virtio-pci function with one MSI-X
    /// vector per queue plus one for configuration changes, and INTx.
    pub fn attach_pci(
        &mut self,
        vm: &Arc<VmFd>,
        pio_bus: &mut Bus,
        mmio_bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        dma: DeviceDma,
    ) -> Result<()> {
        let root = self.pci_root(pio_bus, mmio_bus)?;
        let router = self
            .router
            .get_or_insert_with(|| Arc::new(GsiRouter::new(vm.clone())))
            .clone();
        let name = device.name().to_string();
        let io = |e: std::io::Error| Error::new(Kind::Unavailable, format!("{name}: {e}"));
        let intx_gsi = self.allocate_gsi()?;
        let intx = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        vm.register_irqfd(&intx, intx_gsi)
            .map_err(kvm("cannot register a device interrupt"))?;
        let mut vectors = Vec::new();
        for _ in 0..=device.queue_max_sizes().len() {
            let gsi = self.next_msi_gsi;
            self.next_msi_gsi += 1;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
            vm.register_irqfd(&irqfd, gsi)
                .map_err(kvm("cannot register an MSI-X vector"))?;
            vectors.push(MsiVector { gsi, irqfd });
        }
        let interrupt = Arc::new(VirtioPciInterrupt::new(vectors, router, intx));
        let metrics = Arc::new(DeviceMetrics::default());
        let (views, translations) = self.views(&name, &dma);
        let (mode, insist) = (dma.mode, dma.insist);
        let state = VirtioState::new(device, mode, insist, views, interrupt.clone(), metrics.clone()).map_err(io)?;
        let ioevents: Arc<dyn IoEventRegistry> = Arc::new(KvmIoEvents(vm.clone()));
        let function = VirtioPciDevice::new(state, interrupt, intx_gsi as u8, Some(ioevents))
            .map_err(|e| Error::new(Kind::Software, format!("{name}: {e}")))?;
        let slot = root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(Box::new(function))
            .map_err(|e| Error::new(Kind::Usage, format!("{name}: {e}")))?;
        log::info!(
            "{name}: virtio-pci at 00:{slot:02x}.0, INTx GSI {intx_gsi}, DMA {mode:?}{}",
            describe_endpoint(&dma)
        );
        if let Some((endpoint, _)) = &dma.endpoint {
            let bdf = u16::from(slot) << 3;
            if *endpoint != u32::from(bdf) {
                return Err(Error::new(
                    Kind::Software,
                    format!("{name}: endpoint {endpoint:#x} is not its BDF {bdf:#x}"),
                ));
            }
            self.viot_mut()?.pci_ranges.push(ViotPciRange {
                segment: 0,
                bdf_start: bdf,
                bdf_end: bdf,
                endpoint_start: u32::from(bdf),
            });
        }
        self.attached.push(AttachedDevice {
            name,
            transport: Transport::Pci,
            dma: mode,
            metrics,
            translations,
        });
        Ok(())
    }

    /// The views a device gets: guest-physical addresses always, IOVAs too
    /// when it has a vIOMMU endpoint; both gated by the shared pages.
    fn views(&self, name: &str, dma: &DeviceDma) -> (DmaViews, Vec<Arc<DmaTranslation>>) {
        let identity = Arc::new(DmaTranslation::identity(&self.shared, name));
        let mut translations = vec![identity.clone()];
        let translated = dma.endpoint.as_ref().map(|(_, t)| {
            translations.push(t.clone());
            translated_view(self.host_view.clone(), t.clone())
        });
        let views = DmaViews {
            direct: translated_view(self.host_view.clone(), identity),
            translated,
            shared: Some(self.shared.clone()),
        };
        (views, translations)
    }

    fn viot_mut(&mut self) -> Result<&mut Viot> {
        self.viot
            .as_mut()
            .ok_or_else(|| Error::new(Kind::Software, "a vIOMMU endpoint without a vIOMMU"))
    }

    /// Puts a virtio-iommu on PCI at 00:01.0 that translates for
    /// `endpoints`; call before any other PCI device is attached.
    fn attach_iommu(
        &mut self,
        vm: &Arc<VmFd>,
        pio_bus: &mut Bus,
        mmio_bus: &mut Bus,
        endpoints: Vec<(u32, Arc<DmaTranslation>)>,
    ) -> Result<()> {
        let count = endpoints.len();
        // Detached endpoints reach nothing until the guest says otherwise.
        let iommu = Iommu::new("iommu0", endpoints, false)
            .map_err(|e| Error::new(Kind::Unavailable, format!("iommu0: {e}")))?;
        self.viot = Some(Viot {
            iommu: ViotIommu::Pci {
                segment: 0,
                bdf: IOMMU_BDF,
            },
            pci_ranges: Vec::new(),
            mmio_endpoints: Vec::new(),
        });
        let dma = DeviceDma {
            mode: DmaMode::Bypass,
            insist: false,
            endpoint: None,
        };
        self.attach_pci(vm, pio_bus, mmio_bus, Box::new(iommu), dma)?;
        let placed = self.pci.as_ref().and_then(|root| {
            let root = root.lock().unwrap_or_else(|e| e.into_inner());
            root.device((IOMMU_BDF >> 3) as u8).map(|_| ())
        });
        if placed.is_none() {
            return Err(Error::new(Kind::Software, "iommu0 did not get PCI slot 1"));
        }
        log::info!("iommu0: virtio-iommu at 00:01.0 for {count} endpoint(s)");
        Ok(())
    }

    /// Every device's counters, by device name.
    pub fn metrics(&self) -> BTreeMap<String, DeviceReport> {
        self.attached
            .iter()
            .map(|d| {
                let mut counters: BTreeMap<String, u64> = d
                    .metrics
                    .snapshot()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                let sum = |f: fn(&DmaTranslation) -> u64| d.translations.iter().map(|t| f(t)).sum();
                counters.insert("dma_private_denied".into(), sum(DmaTranslation::private_denied));
                counters.insert("dma_translation_faults".into(), sum(DmaTranslation::faults));
                (
                    d.name.clone(),
                    DeviceReport {
                        transport: d.transport,
                        dma: d.dma,
                        counters,
                    },
                )
            })
            .collect()
    }
}

/// One device in `--metrics`.
#[derive(Debug, serde::Serialize)]
pub struct DeviceReport {
    pub transport: Transport,
    pub dma: DmaMode,
    pub counters: BTreeMap<String, u64>,
}

/// Opens a disk image as the user asked: read-only, or read-write.
fn open_disk(disk: &DiskConfig) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!disk.readonly)
        .open(&disk.path)
        .map_err(|e| {
            Error::new(
                Kind::NoInput,
                format!("cannot open disk image {}: {e}", disk.path.display()),
            )
        })
}

/// The disk image as the block device's backend.
#[cfg(not(feature = "fault-injection"))]
fn disk_backend(file: std::fs::File) -> Result<Arc<dyn veil_devices::virtio::block::backend::DiskBackend>> {
    Ok(Arc::new(file))
}

/// The disk image, failing the sectors `VEIL_INJECT_EIO=<first>+<count>`
/// names with EIO (test builds only).
#[cfg(feature = "fault-injection")]
fn disk_backend(file: std::fs::File) -> Result<Arc<dyn veil_devices::virtio::block::backend::DiskBackend>> {
    use veil_devices::virtio::block::backend::FailingRange;
    let Ok(spec) = std::env::var("VEIL_INJECT_EIO") else {
        return Ok(Arc::new(file));
    };
    let bad = || {
        Error::new(
            Kind::Usage,
            format!("VEIL_INJECT_EIO={spec}: want <first sector>+<sectors>"),
        )
    };
    let (first, count) = spec.split_once('+').ok_or_else(bad)?;
    let first: u64 = first.parse().map_err(|_| bad())?;
    let count: u64 = count.parse().map_err(|_| bad())?;
    log::warn!("fault injection: sectors {first}..{} fail with EIO", first + count);
    Ok(Arc::new(FailingRange {
        inner: Arc::new(file),
        start: first * 512,
        end: (first + count) * 512,
    }))
}

fn describe_endpoint(dma: &DeviceDma) -> String {
    match &dma.endpoint {
        Some((id, _)) => format!(", vIOMMU endpoint {id:#x}"),
        None => String::new(),
    }
}

/// Creates and attaches every device the configuration names.
pub fn attach_configured(
    dm: &mut DeviceManager,
    config: &VmConfig,
    vm: &Arc<VmFd>,
    pio_bus: &mut Bus,
    mmio_bus: &mut Bus,
) -> Result<()> {
    let mut devices: Vec<(Box<dyn VirtioDevice>, &Common)> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("blk{i}");
        let id: String = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().chars().filter(char::is_ascii).take(20).collect())
            .unwrap_or_default();
        let file = open_disk(disk)?;
        if !disk.readonly {
            let dup = file
                .try_clone()
                .map_err(|e| Error::new(Kind::Unavailable, format!("disk image {}: {e}", disk.path.display())))?;
            dm.writable_disks.push((name.clone(), dup));
        }
        let block = Block::with_backend(name, disk_backend(file)?, disk.readonly, id)
            .map_err(|e| Error::new(Kind::Data, format!("disk image {}: {e}", disk.path.display())))?;
        devices.push((Box::new(block), &disk.common));
    }
    for (i, net) in config.nets.iter().enumerate() {
        let backend = match &net.backend {
            NetBackendConfig::Tap(ifname) => NetBackend::tap(ifname)
                .map_err(|e| Error::new(Kind::Unavailable, format!("cannot open TAP device {ifname}: {e}")))?,
            NetBackendConfig::Loopback => NetBackend::loopback(),
        };
        // Locally administered, unicast, and distinct per NIC.
        let mac = net
            .mac
            .unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(i as u8)]);
        devices.push((Box::new(Net::new(&format!("net{i}"), backend, mac)), &net.common));
    }
    for (i, rng) in config.rngs.iter().enumerate() {
        let name = format!("rng{i}");
        let device = Rng::new(&name).map_err(|e| {
            Error::new(
                Kind::Unavailable,
                format!("{name}: cannot open the host's entropy source: {e}"),
            )
        })?;
        devices.push((Box::new(device), &rng.common));
    }
    for (i, console) in config.consoles.iter().enumerate() {
        // The console writes where the serial port would; host input stays with the serial port.
        let sink = Box::new(SerialSink::Stdout);
        devices.push((
            Box::new(Console::new(&format!("console{i}"), sink, None)),
            &console.common,
        ));
    }
    // With a vIOMMU, every device not in bypass gets an endpoint whose ID
    // follows from where it will be placed: the vIOMMU takes PCI slot 1,
    // the others take the next slots and MMIO windows in order.
    let mut plans = Vec::new();
    let mut endpoints = Vec::new();
    let (mut next_slot, mut next_window) = (2u32, 0u64);
    for (device, common) in devices {
        let mode = common.dma.unwrap_or(config.dma);
        let id = match common.transport {
            Transport::Pci => {
                next_slot += 1;
                (next_slot - 1) << 3
            }
            Transport::Mmio => {
                next_window += 1;
                mmio_endpoint_id(next_window - 1)
            }
        };
        let endpoint = (config.iommu && mode != DmaMode::Bypass).then(|| {
            let t = Arc::new(DmaTranslation::gated_endpoint(&dm.shared, device.name()));
            endpoints.push((id, t.clone()));
            (id, t)
        });
        let dma = DeviceDma {
            mode,
            insist: common.insist,
            endpoint,
        };
        plans.push((device, common.transport, dma));
    }
    if config.iommu {
        dm.attach_iommu(vm, pio_bus, mmio_bus, endpoints)?;
    }
    for (device, transport, dma) in plans {
        match transport {
            Transport::Mmio => dm.attach_mmio(vm, mmio_bus, device, dma)?,
            Transport::Pci => dm.attach_pci(vm, pio_bus, mmio_bus, device, dma)?,
        }
    }
    Ok(())
}
