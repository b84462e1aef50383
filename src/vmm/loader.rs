//! Putting a kernel, its initrd and its command line into guest memory.

use crate::error::{Context, Error, Kind, Result};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, KernelLoader};
use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;
use veil_arch::boot_params::initrd_limit;
use veil_arch::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The 64-bit entry of a bzImage is this far past its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    pub end: u64,
    pub setup_header: Option<setup_header>,
    /// The 32-bit PVH entry from the ELF's XEN_ELFNOTE_PHYS32_ENTRY note.
    pub pvh_entry: Option<u64>,
}

/// Recognises the kernel format from its first bytes.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    const ELF_MAGIC: &[u8] = b"\x7fELF";
    const ELFCLASS64: u8 = 2;
    const EM_X86_64: u16 = 62;
    if head.starts_with(ELF_MAGIC) {
        let class_ok = head.get(4) == Some(&ELFCLASS64);
        let machine = head.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]]));
        return (class_ok && machine == Some(EM_X86_64)).then_some(KernelFormat::Elf);
    }
    // A bzImage carries "HdrS" at 0x202 and the 0xAA55 boot flag at 0x1FE.
    let hdrs = head.get(0x202..0x206) == Some(b"HdrS");
    let boot_flag = head.get(0x1fe..0x200) == Some(&[0x55, 0xaa]);
    (hdrs && boot_flag).then_some(KernelFormat::BzImage)
}

fn load_image<R: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    image: &mut R,
    what: &str,
) -> Result<LoadedKernel> {
    let mut head = vec![0u8; 0x400];
    let n = image
        .read(&mut head)
        .context(Kind::NoInput, || format!("cannot read {what}"))?;
    head.truncate(n);
    let format = detect_format(&head).ok_or_else(|| {
        Error::new(
            Kind::Data,
            format!("{what} is not a recognised kernel (expected an x86-64 ELF vmlinux or a bzImage)"),
        )
    })?;
    image
        .seek(SeekFrom::Start(0))
        .context(Kind::NoInput, || format!("cannot read {what}"))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => loader::Elf::load(mem, None, image, himem),
        KernelFormat::BzImage => loader::BzImage::load(mem, None, image, himem),
    }
    .map_err(|e| {
        Error::new(
            Kind::Data,
            format!("cannot load {what}: {e} (does it fit in guest memory?)"),
        )
    })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    let end = match format {
        KernelFormat::Elf => result.kernel_end,
        KernelFormat::BzImage => result.kernel_load.0 + result.kernel_end,
    };
    let pvh_entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(addr)) => Some(addr.0),
        _ => None,
    };
    Ok(LoadedKernel {
        format,
        entry,
        end,
        setup_header: result.setup_header,
        pvh_entry,
    })
}

/// Loads the kernel file at `path`.
pub fn load_kernel_file(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file = File::open(path).context(Kind::NoInput, || format!("cannot open kernel {}", path.display()))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::new(
            Kind::NoInput,
            format!("kernel {} is a directory", path.display()),
        ));
    }
    load_image(mem, &mut file, &format!("kernel {}", path.display()))
}

/// Loads a kernel image held in memory (the built-in test guest).
pub fn load_kernel_bytes(mem: &GuestMemoryMmap, bytes: &[u8], what: &str) -> Result<LoadedKernel> {
    load_image(mem, &mut Cursor::new(bytes), what)
}

/// Places the initrd as high as it may go in low RAM, above the kernel;
/// returns its address and size.
pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path, ram_size: u64, kernel: &LoadedKernel) -> Result<(u64, u32)> {
    let mut file = File::open(path).context(Kind::NoInput, || format!("cannot open initrd {}", path.display()))?;
    let size = file
        .metadata()
        .context(Kind::NoInput, || format!("cannot read initrd {}", path.display()))?
        .len();
    let limit = initrd_limit(ram_size, kernel.setup_header.as_ref());
    let floor = kernel.end.max(HIMEM_START).div_ceil(PAGE) * PAGE;
    let addr = limit
        .checked_sub(size)
        .map(|a| a / PAGE * PAGE)
        .filter(|&a| a >= floor && size <= u64::from(u32::MAX));
    let Some(addr) = addr else {
        return Err(Error::new(
            Kind::Data,
            format!(
                "initrd {} ({} MiB) does not fit in guest memory between the kernel end ({:#x}) and {:#x}; give the VM more --memory",
                path.display(),
                size.div_ceil(1 << 20),
                floor,
                limit
            ),
        ));
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .context(Kind::NoInput, || format!("cannot read initrd {}", path.display()))?;
    Ok((addr, size as u32))
}

/// A command line must fit its page with its NUL, and hold no other NUL.
pub fn check_cmdline(cmdline: &str) -> Result<()> {
    if cmdline.len() >= CMDLINE_MAX_SIZE || cmdline.contains('\0') {
        return Err(Error::new(
            Kind::Usage,
            format!("the kernel command line must be shorter than {CMDLINE_MAX_SIZE} bytes and contain no NUL"),
        ));
    }
    Ok(())
}

/// Writes the NUL-terminated command line; returns its length with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32> {
    check_cmdline(cmdline)?;
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .context(Kind::Data, || "cannot write the command line".into())?;
    Ok(bytes.len() as u32)
}

/// Guest RAM must hold at least the kernel and the page above it.
pub fn check_fits(mem: &GuestMemoryMmap, kernel: &LoadedKernel) -> Result<()> {
    if mem.address_in_range(GuestAddress(kernel.end)) {
        Ok(())
    } else {
        Err(Error::new(
            Kind::Data,
            format!(
                "the kernel ends at {:#x}, past the end of guest memory; give the VM more --memory",
                kernel.end
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_header(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn formats_are_recognised() {
        assert_eq!(detect_format(&elf_header(2, 62)), Some(KernelFormat::Elf));
        assert_eq!(detect_format(&elf_header(1, 62)), None, "32-bit ELF");
        assert_eq!(detect_format(&elf_header(2, 183)), None, "aarch64 ELF");
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn garbage_is_a_data_error_not_a_panic() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let err = load_kernel_bytes(&mem, &[0u8; 100], "blob").unwrap_err();
        assert_eq!(err.kind, Kind::Data);
        // A valid-looking ELF header whose program headers point nowhere.
        let mut elf = elf_header(2, 62);
        elf[5] = 1; // little endian
        elf[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&3u16.to_le_bytes()); // e_phnum, none present
        assert_eq!(load_kernel_bytes(&mem, &elf, "short").unwrap_err().kind, Kind::Data);
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_cmdline(&mem, "console=ttyS0").unwrap(), 14);
        let b: u8 = mem.read_obj(GuestAddress(CMDLINE_ADDR + 13)).unwrap();
        assert_eq!(b, 0);
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
    }
}
