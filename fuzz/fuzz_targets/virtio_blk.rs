//! Arbitrary descriptor chains and block requests through the block
//! request handler, in each DMA view: bypass, translated by a vIOMMU
//! endpoint with one mapping, and shared pages only after a partial ESM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use veil_devices::dma::{direct_view, translated_view, DmaMapping, DmaTranslation, SharedPages};
use veil_devices::virtio::block::backend::DiskBackend;
use veil_devices::virtio::block::handler::{Disk, QueueWorker};
use veil_devices::virtio::block::request::Limits;
use veil_devices::virtio::{features, DeviceMetrics};
use veil_fuzz::{
    assert_writes_within, fill_data, guest, snapshot, Input, Irq, NoHost, Offer, Rings, DATA_START, MEM_SIZE,
};
use vm_memory::{Bytes, GuestAddress, Permissions};
use vmm_sys_util::eventfd::EventFd;

const DISK_SECTORS: u64 = 128;

struct RamDisk(Mutex<Vec<u8>>);

impl RamDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > (DISK_SECTORS * 512) as usize {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..end)
    }
}

impl DiskBackend for RamDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(DISK_SECTORS * 512)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let r = self.range(offset, len)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest();
    let setup = input.u8();
    let view = match setup % 3 {
        0 => direct_view(mem.clone()),
        1 => {
            // IOVA == GPA over the whole RAM but for one hole.
            let t = Arc::new(DmaTranslation::new());
            let hole = DATA_START + u64::from(input.u8() % 0x0f) * 0x1000;
            let m = [
                DmaMapping {
                    iova: 0,
                    last: hole - 1,
                    phys: 0,
                    perm: Permissions::ReadWrite,
                },
                DmaMapping {
                    iova: hole + 0x1000,
                    last: MEM_SIZE - 1,
                    phys: hole + 0x1000,
                    perm: if setup & 8 != 0 {
                        Permissions::Read
                    } else {
                        Permissions::ReadWrite
                    },
                },
            ];
            t.show_domain(false, m.iter());
            translated_view(mem.clone(), t)
        }
        _ => {
            // Secure: the rings' pages and part of the data stay shared.
            let pages = Arc::new(SharedPages::new(&[(0, MEM_SIZE)]));
            let keep = 4 + u64::from(input.u8() % 28);
            pages.enter_secure(0, keep, &NoHost).unwrap();
            let t = Arc::new(DmaTranslation::identity(&pages, "blk0"));
            translated_view(mem.clone(), t)
        }
    };
    let acked = features::VERSION_1
        | if setup & 4 != 0 {
            features::RING_INDIRECT_DESC
        } else {
            0
        };
    let disk = Arc::new(Disk {
        backend: Arc::new(RamDisk(Mutex::new(vec![0x5a; (DISK_SECTORS * 512) as usize]))),
        capacity: DISK_SECTORS,
        readonly: setup & 16 != 0,
        id: *b"fuzz-disk-0000000000",
    });
    let rings = Rings::at(0);
    let metrics = Arc::new(DeviceMetrics::default());
    let limits = Limits {
        max_descriptors: 16,
        indirect: acked & features::RING_INDIRECT_DESC != 0,
        seg_max: 8,
        size_max: 0x4000,
    };
    let mut worker = QueueWorker::new(
        "blk0".into(),
        disk,
        acked,
        limits,
        0,
        rings.queue(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        view,
        Arc::new(Irq::default()),
        metrics,
        Arc::new(AtomicBool::new(false)),
    );
    let offered = rings.fill(&mem, &mut input, 0x1200);
    fill_data(&mem, input.0);
    let offer = Offer::read(&mem, &rings, offered);
    let before = snapshot(&mem);
    let _ = worker.process_queue();
    if offer.rewrites(&offer) {
        return;
    }
    assert_writes_within(&mem, &before, &offer.allowed);
    let used = offer.check_used(&mem, &rings);
    if let [(id, len)] = used[..] {
        if len > 0 {
            if let Some(at) = offer.status_at(id) {
                let status: u8 = mem.read_obj(GuestAddress(at)).unwrap();
                assert!(status <= 2, "status byte {status}");
            }
        }
    }
});
