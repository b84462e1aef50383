//! Where virtio-net frames go and come from: the `Backend` trait, the
//! in-process loopback, and `NetBackend`, what a `Net` is built with.

use super::tap::Tap;
use super::MAX_FRAME_LEN;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::eventfd::EventFd;

/// A live connection to the host side of the link, owned by the device's
/// worker. Frames carry no virtio header: the device strips the guest's and
/// writes its own. Its fd is readable whenever `recv` has a frame.
pub trait Backend: AsRawFd + Send {
    /// Hands one frame from the guest to the host. `Ok(false)`: the host had
    /// no room and the frame was dropped.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;
    /// Takes the next frame for the guest into `buf` and returns its length,
    /// or `None` when there is none now. A frame longer than `buf` may be
    /// truncated to it.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}

/// Frames the guest transmits come straight back to its receive queue.
/// Needs no privileges; tests and benchmarks use it.
pub struct Loopback {
    frames: VecDeque<Vec<u8>>,
    capacity: usize,
    /// Buffers of frames already received, reused for the next ones.
    spare: Vec<Vec<u8>>,
    /// Readable (non-zero) exactly while `frames` is not empty.
    ready: EventFd,
}

impl Loopback {
    /// Default number of frames held while the guest has no receive buffer.
    pub const DEFAULT_CAPACITY: usize = 256;

    /// Holds at most `capacity` frames (at least one) while the guest has no
    /// receive buffer; more are dropped.
    pub fn new(capacity: usize) -> io::Result<Loopback> {
        Ok(Loopback {
            frames: VecDeque::new(),
            capacity: capacity.max(1),
            spare: Vec::new(),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Frames waiting for the guest.
    pub fn queued(&self) -> usize {
        self.frames.len()
    }
}

impl AsRawFd for Loopback {
    fn as_raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

impl Backend for Loopback {
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if self.frames.len() >= self.capacity {
            return Ok(false);
        }
        if frame.len() > MAX_FRAME_LEN {
            return Ok(false);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        self.frames.push_back(buf);
        if self.frames.len() == 1 {
            self.ready.write(1)?;
        }
        Ok(true)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(frame) = self.frames.pop_front() else {
            return Ok(None);
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        if self.spare.len() < self.capacity {
            self.spare.push(frame);
        }
        if self.frames.is_empty() {
            // Back to not readable; it cannot block, the counter is non-zero.
            let _ = self.ready.read();
        }
        Ok(Some(n))
    }
}

enum Kind {
    Tap(Tap),
    Loopback { capacity: usize },
}

/// The host side a `Net` device is built with. Each activation gets its own
/// `Backend` from it (`connect`): a duplicate of the tap fd, or a fresh, empty
/// loopback, so frames looped back before a reset do not survive it.
pub struct NetBackend(Kind);

impl NetBackend {
    /// Attaches to the TAP interface `ifname` (created if missing, which
    /// needs CAP_NET_ADMIN; see `Tap::open`).
    pub fn tap(ifname: &str) -> io::Result<NetBackend> {
        Tap::open(ifname).map(|t| NetBackend(Kind::Tap(t)))
    }

    /// Loops every transmitted frame back to the guest.
    pub fn loopback() -> NetBackend {
        Self::loopback_with_capacity(Loopback::DEFAULT_CAPACITY)
    }

    /// A loopback holding at most `capacity` frames for the guest.
    pub fn loopback_with_capacity(capacity: usize) -> NetBackend {
        NetBackend(Kind::Loopback { capacity })
    }

    /// The TAP interface name, if this is a TAP.
    pub fn tap_name(&self) -> Option<&str> {
        match &self.0 {
            Kind::Tap(t) => Some(t.name()),
            Kind::Loopback { .. } => None,
        }
    }

    /// A live backend for one activation of the device.
    pub fn connect(&self) -> io::Result<Box<dyn Backend>> {
        Ok(match &self.0 {
            Kind::Tap(t) => Box::new(t.try_clone()?),
            Kind::Loopback { capacity } => Box::new(Loopback::new(*capacity)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    fn readable(fd: &impl AsRawFd) -> bool {
        let ep = Epoll::new().unwrap();
        ep.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        ep.wait(0, &mut events).unwrap() == 1
    }

    #[test]
    fn loopback_is_fifo_bounded_and_readable_only_with_frames() {
        let mut lb = Loopback::new(2).unwrap();
        let mut buf = [0u8; 16];
        assert!(!readable(&lb));
        assert_eq!(lb.recv(&mut buf).unwrap(), None);
        assert!(lb.send(b"one").unwrap());
        assert!(lb.send(b"two!").unwrap());
        assert!(!lb.send(b"three").unwrap(), "third frame is over capacity");
        assert!(readable(&lb));
        assert_eq!(lb.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], b"one");
        assert!(readable(&lb));
        assert_eq!(lb.recv(&mut buf).unwrap(), Some(4));
        assert_eq!(&buf[..4], b"two!");
        assert!(!readable(&lb));
        assert_eq!(lb.queued(), 0);
    }

    #[test]
    fn each_connection_to_a_loopback_starts_empty() {
        let nb = NetBackend::loopback_with_capacity(4);
        let mut a = nb.connect().unwrap();
        assert!(a.send(b"frame").unwrap());
        let mut b = nb.connect().unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        assert_eq!(a.recv(&mut buf).unwrap(), Some(5));
        assert_eq!(nb.tap_name(), None);
    }
}
