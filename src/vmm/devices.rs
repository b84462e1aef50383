//! Virtio devices on the VM: where each one lives (MMIO window, IRQ), how
//! its notifications reach it (ioeventfd) and how it interrupts (irqfd).

use super::irq::{GsiRouter, KvmIoEvents, FIRST_MSI_GSI};
use crate::config::VmConfig;
use crate::devices_config::{Common, DiskConfig, NetBackendConfig, Transport};
use crate::error::{Error, Kind, Result};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use veil_arch::acpi::{PciEcam, VirtioMmioDevice};
use veil_arch::layout::{
    DEVICE_GSIS, PCI_BAR_END, PCI_BAR_START, PCI_CONFIG_PORT, PCI_ECAM_START, VIRTIO_MMIO_END, VIRTIO_MMIO_START,
};
use veil_devices::dma::{direct_view, DmaMode};
use veil_devices::legacy::SerialSink;
use veil_devices::pci::bus::CONFIG_IO_SIZE;
use veil_devices::pci::{
    IoEventRegistry, MsiVector, PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot, VirtioPciDevice, VirtioPciInterrupt,
};
use veil_devices::virtio::block::Block;
use veil_devices::virtio::console::Console;
use veil_devices::virtio::mmio::{MmioInterrupt, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use veil_devices::virtio::net::{Net, NetBackend};
use veil_devices::virtio::rng::Rng;
use veil_devices::virtio::transport::VirtioState;
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
}

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
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::new(Kind::Unavailable, format!("KVM: {what}: {e}"))
}

impl DeviceManager {
    pub fn new() -> Self {
        Self {
            next_mmio: VIRTIO_MMIO_START,
            free_gsis: DEVICE_GSIS.iter(),
            next_msi_gsi: FIRST_MSI_GSI,
            pci: None,
            router: None,
            attached: Vec::new(),
            acpi_mmio: Vec::new(),
            cmdline_mmio: Vec::new(),
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
        host_view: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        dma: DmaMode,
        insist: bool,
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
        let state = VirtioState::new(
            device,
            dma,
            insist,
            direct_view(host_view.clone()),
            interrupt.clone(),
            metrics.clone(),
        )
        .map_err(io)?;
        for (queue, evt) in state.notify_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), queue as u32)
                .map_err(kvm("cannot register a queue notification"))?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(state, interrupt)));
        mmio_bus
            .insert(base, MMIO_WINDOW, transport)
            .map_err(|e| Error::new(Kind::Software, format!("device layout: {e}")))?;
        log::info!("{name}: virtio-mmio at {base:#x}, IRQ {gsi}, DMA {dma:?}");
        self.acpi_mmio.push(VirtioMmioDevice {
            base,
            size: MMIO_WINDOW,
            irq: gsi,
        });
        self.cmdline_mmio.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.attached.push(AttachedDevice {
            name,
            transport: Transport::Mmio,
            dma,
            metrics,
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
    #[allow(clippy::too_many_arguments)]
    pub fn attach_pci(
        &mut self,
        vm: &Arc<VmFd>,
        pio_bus: &mut Bus,
        mmio_bus: &mut Bus,
        host_view: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        dma: DmaMode,
        insist: bool,
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
        let state = VirtioState::new(
            device,
            dma,
            insist,
            direct_view(host_view.clone()),
            interrupt.clone(),
            metrics.clone(),
        )
        .map_err(io)?;
        let ioevents: Arc<dyn IoEventRegistry> = Arc::new(KvmIoEvents(vm.clone()));
        let function = VirtioPciDevice::new(state, interrupt, intx_gsi as u8, Some(ioevents))
            .map_err(|e| Error::new(Kind::Software, format!("{name}: {e}")))?;
        let slot = root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(Box::new(function))
            .map_err(|e| Error::new(Kind::Usage, format!("{name}: {e}")))?;
        log::info!("{name}: virtio-pci at 00:{slot:02x}.0, INTx GSI {intx_gsi}, DMA {dma:?}");
        self.attached.push(AttachedDevice {
            name,
            transport: Transport::Pci,
            dma,
            metrics,
        });
        Ok(())
    }

    /// Every device's counters, by device name.
    pub fn metrics(&self) -> BTreeMap<String, DeviceReport> {
        self.attached
            .iter()
            .map(|d| {
                let counters = d
                    .metrics
                    .snapshot()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
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

/// Creates and attaches every device the configuration names.
pub fn attach_configured(
    dm: &mut DeviceManager,
    config: &VmConfig,
    vm: &Arc<VmFd>,
    pio_bus: &mut Bus,
    mmio_bus: &mut Bus,
    host_view: &GuestMemoryMmap,
) -> Result<()> {
    let mut devices: Vec<(Box<dyn VirtioDevice>, &Common)> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("blk{i}");
        let id: String = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().chars().filter(char::is_ascii).take(20).collect())
            .unwrap_or_default();
        let block = Block::new(name, open_disk(disk)?, disk.readonly, id)
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
    for (device, common) in devices {
        let dma = common.dma.unwrap_or(config.dma);
        match common.transport {
            Transport::Mmio => dm.attach_mmio(vm, mmio_bus, host_view, device, dma, common.insist)?,
            Transport::Pci => dm.attach_pci(vm, pio_bus, mmio_bus, host_view, device, dma, common.insist)?,
        }
    }
    Ok(())
}
