//! A file on a private tmpfs mounted `huge=always`: shared memory on 2 MiB
//! pages on hosts whose `shmem_enabled` is `never` and that have no
//! hugetlbfs pool, with no host configuration.
//!
//! A child process makes its own user and mount namespace (as any user may,
//! where unprivileged user namespaces are allowed), mounts the tmpfs there,
//! creates an unnamed file on it and hands the descriptor back over a
//! socket. The mount lives on with the file after the child exits; nobody
//! else can see it or open the file.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Where the child mounts the tmpfs, inside its own namespace: the first
/// directory that exists.
const MOUNT_POINTS: [&std::ffi::CStr; 3] = [c"/tmp", c"/mnt", c"/dev"];

/// Everything the child needs, prepared before the fork: after it, in a
/// process that may have threads, the child only makes system calls.
struct ChildPlan {
    user_namespace: bool,
    uid_map: CString,
    gid_map: CString,
    options: CString,
    size: libc::off_t,
}

/// Which step of the child failed, reported with its errno.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Step {
    Unshare = 1,
    IdMap,
    Private,
    Mount,
    Create,
    Size,
}

impl Step {
    fn describe(code: u32) -> &'static str {
        match code {
            1 => "cannot create a user and mount namespace",
            2 => "cannot map the user into its namespace",
            3 => "cannot make the mount namespace private",
            4 => "cannot mount a tmpfs with huge=always",
            5 => "cannot create a file on the private tmpfs",
            6 => "cannot size the file on the private tmpfs",
            _ => "the helper process failed",
        }
    }
}

/// An unnamed file of `size` bytes on a private `huge=always` tmpfs.
pub fn create(size: u64) -> Result<File, String> {
    const HUGE: u64 = 2 << 20;
    // SAFETY: getuid/getgid/geteuid only read the caller's credentials.
    let (uid, gid, euid) = unsafe { (libc::getuid(), libc::getgid(), libc::geteuid()) };
    let plan = ChildPlan {
        // root can mount in a new mount namespace alone; anyone else needs
        // a user namespace to hold CAP_SYS_ADMIN in.
        user_namespace: euid != 0,
        uid_map: CString::new(format!("0 {uid} 1")).map_err(|e| e.to_string())?,
        gid_map: CString::new(format!("0 {gid} 1")).map_err(|e| e.to_string())?,
        options: CString::new(format!(
            "huge=always,size={},nr_inodes=8,mode=0700",
            size.div_ceil(HUGE) * HUGE
        ))
        .map_err(|e| e.to_string())?,
        size: libc::off_t::try_from(size).map_err(|_| "guest RAM too large".to_string())?,
    };
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child runs only `child_main`, which makes system calls on
    // data prepared above and never returns (it ends with _exit), so no lock
    // another thread held at the fork is ever needed in it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        use std::os::fd::AsRawFd;
        child_main(&plan, theirs.as_raw_fd());
    }
    drop(theirs);
    let received = receive(&ours);
    let mut status = 0;
    // SAFETY: `pid` is our own child; waiting for it only reaps it.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    received
}

/// The child: namespaces, mount, file, send. Never returns.
fn child_main(plan: &ChildPlan, sock: RawFd) -> ! {
    let (code, errno) = match make_file(plan) {
        Ok(fd) => {
            send(sock, 0, 0, Some(fd));
            (0, 0)
        }
        Err((step, errno)) => (step as u32, errno),
    };
    if code != 0 {
        send(sock, code, errno, None);
    }
    // SAFETY: _exit ends the child without running the parent's atexit
    // handlers or destructors.
    unsafe { libc::_exit(0) }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes `data` to the file at `path` with plain system calls.
fn write_file(path: &std::ffi::CStr, data: &std::ffi::CStr) -> Result<(), i32> {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    let bytes = data.to_bytes();
    // SAFETY: `bytes` is valid for its length; `fd` is open.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    let err = errno();
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if n == bytes.len() as isize {
        Ok(())
    } else {
        Err(err)
    }
}

fn make_file(plan: &ChildPlan) -> Result<RawFd, (Step, i32)> {
    let flags = if plan.user_namespace {
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS
    } else {
        libc::CLONE_NEWNS
    };
    // SAFETY: unshare only changes this (single-threaded) child's namespaces.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err((Step::Unshare, errno()));
    }
    if plan.user_namespace {
        write_file(c"/proc/self/uid_map", &plan.uid_map).map_err(|e| (Step::IdMap, e))?;
        write_file(c"/proc/self/setgroups", c"deny").map_err(|e| (Step::IdMap, e))?;
        write_file(c"/proc/self/gid_map", &plan.gid_map).map_err(|e| (Step::IdMap, e))?;
    }
    // SAFETY: the arguments are NUL-terminated strings or null, as mount
    // takes them; this only changes the child's own namespace, so that the
    // tmpfs below never shows in the host's.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err((Step::Private, errno()));
    }
    let mut last = (Step::Mount, libc::ENOENT);
    for target in MOUNT_POINTS {
        // SAFETY: as above; the tmpfs is mounted in the child's namespace.
        let rc = unsafe {
            libc::mount(
                c"veil-ram".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                plan.options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            last = (Step::Mount, errno());
            continue;
        }
        // SAFETY: `target` is NUL-terminated; O_TMPFILE makes a file with no name.
        let fd = unsafe { libc::open(target.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
        if fd < 0 {
            return Err((Step::Create, errno()));
        }
        // SAFETY: `fd` is the file just created.
        if unsafe { libc::ftruncate(fd, plan.size) } != 0 {
            return Err((Step::Size, errno()));
        }
        return Ok(fd);
    }
    Err(last)
}

/// Sends (code, errno) and, on success, the file descriptor.
fn send(sock: RawFd, code: u32, err: i32, fd: Option<RawFd>) {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&code.to_ne_bytes());
    payload[4..].copy_from_slice(&err.to_ne_bytes());
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // Room for one cmsghdr with one fd, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at
    // live buffers of the stated sizes.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `control` is big enough for one header and one fd
        // (checked by `space` fitting below), and CMSG_FIRSTHDR points into it.
        unsafe {
            debug_assert!(space <= std::mem::size_of_val(&control));
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` describes valid buffers; a failure shows in the parent
    // as a closed socket.
    unsafe { libc::sendmsg(sock, &msg, 0) };
}

/// The parent's side: the file, or why the child could not make it.
fn receive(sock: &OwnedFd) -> Result<File, String> {
    use std::os::fd::AsRawFd;
    let mut payload = [0u8; 8];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n != payload.len() as isize {
        return Err("the helper process ended without an answer".into());
    }
    let code = u32::from_ne_bytes(payload[..4].try_into().unwrap_or_default());
    let err = i32::from_ne_bytes(payload[4..].try_into().unwrap_or_default());
    if code != 0 {
        return Err(format!(
            "{}: {}",
            Step::describe(code),
            std::io::Error::from_raw_os_error(err)
        ));
    }
    // SAFETY: recvmsg filled `msg`; CMSG_FIRSTHDR checks msg_controllen
    // and returns null when there is no header.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: a non-null `cmsg` points into `control`, written by the kernel.
    let fd = unsafe {
        if cmsg.is_null() || (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err("the helper process sent no file".into());
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>())
    };
    // SAFETY: SCM_RIGHTS installed `fd` in this process for us alone.
    Ok(unsafe { File::from_raw_fd(fd) })
}
