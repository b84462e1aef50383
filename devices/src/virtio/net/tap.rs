//! A TAP interface as a virtio-net backend.
//!
//! The interface is opened with `IFF_TAP | IFF_NO_PI` and deliberately
//! without `IFF_VNET_HDR`: the device offers no offloads, so a
//! virtio_net_hdr would carry nothing. The device strips the guest's header
//! on transmit and writes its own (all zero, num_buffers 1) on receive, the
//! same as for the loopback. Without a vnet header the kernel also keeps
//! checksum and segmentation offloads off on the interface, so every read is
//! one complete Ethernet frame of at most MTU + 14 (+ 4 for a VLAN tag) bytes.

use super::backend::Backend;
use std::ffi::c_short;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

const TUNTAP: std::os::raw::c_uint = 0x54; // 'T'
                                           // The kernel declares it with `int` as the size although it takes an ifreq.
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, std::os::raw::c_int);

/// `struct ifreq` as TUNSETIFF uses it: the name, then the flags at the
/// start of the 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: c_short,
    _rest: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// An open TAP interface: a non-blocking fd carrying whole Ethernet frames.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `ifname`, creating it if it does not
    /// exist (which needs CAP_NET_ADMIN; attaching to an existing
    /// persistent TAP owned by the caller does not). A name with `%d` lets
    /// the kernel pick the number; `name()` tells which it picked.
    pub fn open(ifname: &str) -> io::Result<Tap> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid TAP name {ifname:?}: 1 to {} bytes, no NUL", libc::IFNAMSIZ - 1),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as c_short,
            _rest: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a
        // live 40-byte `struct ifreq` that outlives the call; the kernel
        // reads the name and flags from it and writes the final name back.
        // The return value is checked below.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("cannot attach to TAP {ifname}: {e}")));
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(libc::IFNAMSIZ);
        Ok(Tap {
            file,
            name: String::from_utf8_lossy(&req.name[..len]).into_owned(),
        })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same interface (a duplicated fd).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        match self.file.write(frame) {
            Ok(n) if n == frame.len() => Ok(true),
            Ok(n) => Err(io::Error::other(format!(
                "short write to TAP: {n} of {} bytes",
                frame.len()
            ))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "sixteen-chars-xx", "a\0b"] {
            let e = Tap::open(name).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }

    #[test]
    fn tunsetiff_number_matches_the_kernel() {
        // _IOW('T', 202, int) in <linux/if_tun.h>.
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
    }
}
