//! Virtio devices on the VM: where each one lives (MMIO window, IRQ), how
//! its notifications reach it (ioeventfd) and how it interrupts (irqfd).

use crate::config::VmConfig;
use crate::devices_config::{Common, DiskConfig, Transport};
use crate::error::{Error, Kind, Result};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use veil_arch::acpi::VirtioMmioDevice;
use veil_arch::layout::{DEVICE_GSIS, VIRTIO_MMIO_END, VIRTIO_MMIO_START};
use veil_devices::dma::{direct_view, DmaMode};
use veil_devices::virtio::block::Block;
use veil_devices::virtio::mmio::{MmioInterrupt, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
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
    vm: &VmFd,
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
    if !(config.nets.is_empty() && config.rngs.is_empty() && config.consoles.is_empty()) {
        return Err(Error::new(
            Kind::Usage,
            "virtio-net, virtio-rng and virtio-console are not available yet",
        ));
    }
    for (device, common) in devices {
        let dma = common.dma.unwrap_or(config.dma);
        match common.transport {
            Transport::Mmio => dm.attach_mmio(vm, mmio_bus, host_view, device, dma, common.insist)?,
            Transport::Pci => return Err(Error::new(Kind::Usage, "transport=pci is not available yet")),
        }
    }
    Ok(())
}
