//! What a block device stores its sectors in: a raw image file, or anything
//! else that can do positioned reads and writes.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// Largest buffer of zeros written at once when a backend has to zero a
/// range by hand.
const ZERO_CHUNK: u64 = 1 << 20;

/// Storage behind a block device. Every method is positioned (no shared
/// file offset), so the device can use it from its worker thread.
pub trait DiskBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; running into the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset`; they read as zeros afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes `len` bytes at `offset`, keeping them allocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Zeroes a range by writing buffers of zeros, for storage that cannot do
/// it in one call.
pub fn write_zeroes_by_hand(backend: &dyn DiskBackend, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range wraps around"))?;
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64);
        backend.write_all_at(&zeros[..n as usize], offset)?;
        offset += n;
    }
    Ok(())
}

fn fallocate_or_write(file: &File, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(file, mode, true, offset, len) {
        Ok(()) => Ok(()),
        Err(e) => {
            let e = io::Error::from_raw_os_error(e.errno());
            if e.kind() == io::ErrorKind::Unsupported {
                // The file system cannot do it: zeros reach the same result.
                write_zeroes_by_hand(file, offset, len)
            } else {
                Err(e)
            }
        }
    }
}

impl DiskBackend for File {
    fn size(&self) -> io::Result<u64> {
        // Seeking to the end also works for block devices, whose metadata
        // reports no length.
        let mut file = self;
        file.seek(SeekFrom::End(0))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate_or_write(self, FallocateMode::PunchHole, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate_or_write(self, FallocateMode::ZeroRange, offset, len)
    }
}

/// A backend that fails every read and write touching the byte range
/// `[start, end)` with EIO and passes everything else to `inner`: a disk
/// with bad sectors, for fault tests.
#[cfg(any(test, feature = "fault-injection"))]
pub struct FailingRange {
    pub inner: std::sync::Arc<dyn DiskBackend>,
    pub start: u64,
    pub end: u64,
}

#[cfg(any(test, feature = "fault-injection"))]
impl FailingRange {
    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset.saturating_add(len as u64);
        if offset < self.end && end > self.start {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "fault-injection"))]
impl DiskBackend for FailingRange {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.inner.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len as usize)?;
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len as usize)?;
        self.inner.write_zeroes(offset, len)
    }
}
