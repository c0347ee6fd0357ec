//! The few system calls std and tokio do not wrap. The only module with `unsafe`.
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd};

/// `SO_NETNS_COOKIE` (Linux 5.14+): the network namespace cookie of a socket,
/// the same number `bpf_get_netns_cookie` returns in the kernel.
const SO_NETNS_COOKIE: libc::c_int = 71;

pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, an out pointer to a u64 and its exact length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The calling process's effective uid.
pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Restores the default SIGPIPE action (the Rust runtime ignores it), so a CLI
/// writing into a closed pipe (`agentgate audit export | head`) exits quietly
/// instead of panicking on EPIPE. For the command-line front end only: the
/// daemon keeps SIGPIPE ignored and handles EPIPE as an error.
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Sends a signal to a process.
pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if pid <= 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies a plain-old-data value out of the start of `bytes` (any alignment),
/// or `None` when there are too few bytes.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` is valid for any bit pattern, and the length was checked.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// Registers an eBPF ring buffer with the tokio reactor, for reading.
pub fn async_ring(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> io::Result<tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    // SAFETY: the ring buffer owns its map descriptor for as long as it
    // lives, and `as_raw_fd` always returns that same descriptor.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(Into::into)
}

/// A user account from the password database (`getpwnam_r`, so NSS sources
/// such as LDAP count too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    pub home: std::path::PathBuf,
}

/// Largest buffer the `*_r` lookups may ask for: a bound, not a limit real
/// entries reach (glibc's initial suggestion is 1 KiB).
const MAX_NSS_BUFFER: usize = 1 << 20;

/// Most supplementary groups read for one user (the kernel's `NGROUPS_MAX`).
const MAX_GROUPS: usize = 65_536;

/// Runs a reentrant NSS lookup (`getpwnam_r`, `getgrnam_r`) with a buffer
/// that grows while the call says it is too small. `call` returns the rc and,
/// on a hit, the value it read out of the buffer.
fn nss_lookup<T>(
    mut call: impl FnMut(&mut [u8]) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match call(&mut buf) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buf.len() < MAX_NSS_BUFFER => buf.resize(buf.len() * 4, 0),
            // Some NSS modules report "no such entry" as one of these.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (e, _) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The account named `name`; `Ok(None)` when there is none.
pub fn user_by_name(name: &str) -> io::Result<Option<User>> {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    nss_lookup(|buf| {
        // SAFETY: an all-zero `passwd` is a valid value (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name, an out struct, a buffer with its exact
        // length, and an out pointer; the strings the struct points to live in `buf`.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &raw mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut result,
            )
        };
        if rc != 0 || result.is_null() {
            return (rc, None);
        }
        // SAFETY: on success `pw_name` and `pw_dir` point to NUL-terminated
        // strings inside `buf`, which is still alive.
        let (user, home) = unsafe {
            (
                std::ffi::CStr::from_ptr(pwd.pw_name),
                std::ffi::CStr::from_ptr(pwd.pw_dir),
            )
        };
        let user = User {
            name: user.to_string_lossy().into_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: std::path::PathBuf::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(home.to_bytes()),
            ),
        };
        (0, Some(user))
    })
}

/// The id of the group named `name`; `Ok(None)` when there is none.
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    nss_lookup(|buf| {
        // SAFETY: an all-zero `group` is a valid value (null pointers, zero id).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_by_name`.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &raw mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut result,
            )
        };
        (rc, (rc == 0 && !result.is_null()).then_some(grp.gr_gid))
    })
}

/// The groups `initgroups(user, gid)` would give: `gid` and every group that
/// lists `user` as a member.
pub fn group_list(user: &str, gid: u32) -> io::Result<Vec<u32>> {
    let cname =
        std::ffi::CString::new(user).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: a NUL-terminated name, a buffer of `n` gids and a pointer to
        // `n`, which getgrouplist updates to the count it found.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &raw mut n) };
        let found = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(found.min(groups.len()));
            return Ok(groups);
        }
        if groups.len() >= MAX_GROUPS {
            return Err(io::Error::other(format!(
                "{user} is in more than {MAX_GROUPS} groups"
            )));
        }
        // glibc reports the count it needs; others only that it did not fit.
        let want = found.max(groups.len() * 2).min(MAX_GROUPS);
        groups.resize(want, 0);
    }
}

/// Makes `command`'s child drop to `uid`, `gid` and supplementary `groups`
/// right before it executes the program (setgroups, setgid, then setuid: the
/// order in which each call is still allowed). The parent keeps its own
/// credentials. If any call fails the program is not run and spawning fails.
///
/// std's `CommandExt::uid` cannot be combined with supplementary groups on
/// stable (it clears them, and `pre_exec` hooks run after it), so all three
/// are set here.
pub fn drop_privileges_on_exec(
    command: &mut std::process::Command,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
) {
    use std::os::unix::process::CommandExt as _;
    let hook = move || -> io::Result<()> {
        // SAFETY: only async-signal-safe system calls on data owned by the
        // closure (no allocation): the child between fork and exec.
        unsafe {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook makes only async-signal-safe calls (see above).
    unsafe {
        command.pre_exec(hook);
    }
}

/// Seccomp for agents started by `agentgate exec`: the socket families a
/// tagged process may create, enforced in the process itself, for kernels
/// where the BPF LSM hooks cannot load. Refused calls are not failed by the
/// filter but handed to a supervisor (the `exec` process) through a seccomp
/// listener; the supervisor answers `EPERM` (never "continue", so there is
/// no check-then-use race) and reports the attempt. If the supervisor is
/// gone, the kernel fails those calls with `ENOSYS`: closed either way.
pub mod seccomp {
    use std::{
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    };

    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_USER_NOTIF: u32 = 0x7fc0_0000;
    const RET_ERRNO: u32 = 0x0005_0000;

    /// The calls the filter looks at.
    pub const SYS_SOCKET: i32 = libc::SYS_socket as i32;
    pub const SYS_SOCKETPAIR: i32 = libc::SYS_socketpair as i32;
    /// `io_uring` can make and connect sockets without those system calls.
    pub const SYS_IO_URING_SETUP: i32 = libc::SYS_io_uring_setup as i32;

    /// A classic BPF seccomp program.
    #[derive(Debug, Clone)]
    pub struct Filter(Vec<libc::sock_filter>);

    fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }

    fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        }
    }

    fn load(offset: u32) -> libc::sock_filter {
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
    }

    fn ret(v: u32) -> libc::sock_filter {
        stmt(libc::BPF_RET | libc::BPF_K, v)
    }

    /// `seccomp_data` offsets: nr 0, arch 4, args[i] 16 + 8i (the low word
    /// on little-endian machines, the whole of an `int` argument).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const fn arg(i: u32) -> u32 {
        16 + 8 * i
    }

    impl Filter {
        /// Sockets: inet and inet6 (the kernel hooks decide their use),
        /// route netlink, and Unix sockets only if `unix_sockets` (the
        /// kernel checks their paths); `socketpair` of Unix stream and
        /// seqpacket sockets (already connected, they reach nothing else);
        /// no `io_uring`. Everything else goes to the supervisor. Calls of
        /// another ABI (x32, 32-bit compat) fail with `EPERM`.
        pub fn sockets(unix_sockets: bool) -> Self {
            let notify = ret(RET_USER_NOTIF);
            let allow = ret(RET_ALLOW);
            let mut p = vec![
                load(ARCH),
                jeq(AUDIT_ARCH, 1, 0),
                ret(RET_ERRNO | libc::EPERM as u32),
                load(NR),
            ];
            #[cfg(target_arch = "x86_64")]
            {
                // x32 system calls carry this bit.
                p.push(stmt(
                    libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                    0x4000_0000,
                ));
                p.last_mut().expect("just pushed").jf = 1;
                p.push(ret(RET_ERRNO | libc::EPERM as u32));
            }
            // Dispatch on the call.
            p.extend([
                jeq(SYS_SOCKET as u32, 4, 0),
                jeq(SYS_SOCKETPAIR as u32, 13, 0),
                jeq(SYS_IO_URING_SETUP as u32, 1, 0),
                allow,
                notify,
                // socket(family, type, protocol)
                load(arg(0)),
                jeq(libc::AF_INET as u32, 5, 0),
                jeq(libc::AF_INET6 as u32, 4, 0),
                jeq(libc::AF_UNIX as u32, 4, 0),
                jeq(libc::AF_NETLINK as u32, 0, 4),
                load(arg(2)),
                jeq(libc::NETLINK_ROUTE as u32, 0, 2),
                allow,
                if unix_sockets { allow } else { notify },
                notify,
                // socketpair(family, type, protocol, sv)
                load(arg(0)),
                jeq(libc::AF_UNIX as u32, 0, 5),
            ]);
            if unix_sockets {
                p.extend([allow, allow, allow, allow, allow, notify]);
            } else {
                p.extend([
                    load(arg(1)),
                    stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0xf),
                    jeq(libc::SOCK_STREAM as u32, 1, 0),
                    jeq(libc::SOCK_SEQPACKET as u32, 0, 1),
                    allow,
                    notify,
                ]);
            }
            Self(p)
        }
    }

    /// In the child, between fork and exec (after the privilege drop):
    /// enters a Landlock domain (see [`super::landlock`]), installs `filter`
    /// with a listener and sends the listener over `channel`, then closes
    /// both. Only async-signal-safe calls.
    ///
    /// # Safety
    /// Call only in a freshly forked child (a `pre_exec` hook): it sets
    /// `no_new_privs` and a seccomp filter on the calling thread for good.
    pub unsafe fn install_in_child(filter: &Filter, channel: RawFd) -> io::Result<()> {
        let prog = libc::sock_fprog {
            len: filter.0.len() as u16,
            filter: filter.0.as_ptr().cast_mut(),
        };
        // SAFETY: plain system calls with valid arguments; `prog` outlives them.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            super::landlock::enter_domain()?;
            let listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &raw const prog,
            );
            if listener < 0 {
                return Err(io::Error::last_os_error());
            }
            let listener = listener as RawFd;
            let sent = send_fd_raw(channel, listener);
            libc::close(listener);
            libc::close(channel);
            sent
        }
    }

    /// Sends one descriptor with `SCM_RIGHTS` (no allocation).
    unsafe fn send_fd_raw(socket: RawFd, fd: RawFd) -> io::Result<()> {
        // Room for one cmsghdr and one int, aligned.
        let mut control = [0u64; 4];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr is plain data; zeroed is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        // SAFETY: msg_control points at a buffer of msg_controllen bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
            if libc::sendmsg(socket, &raw const msg, 0) != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Receives the listener the child sent (`None`: the child sent none,
    /// e.g. it failed before installing the filter).
    pub fn recv_listener(socket: &std::os::unix::net::UnixStream) -> io::Result<Option<OwnedFd>> {
        let mut control = [0u64; 4];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: as in send_fd_raw.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: msg describes buffers owned here.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: the kernel filled msg_control; the macros walk it within bounds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                return Ok(None);
            }
            let fd = libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned();
            Ok(Some(OwnedFd::from_raw_fd(fd)))
        }
    }

    /// What the filter answers for a call (`nr`, `args`) of this machine's
    /// ABI: a test interpreter of the classic BPF subset the filter uses.
    #[cfg(test)]
    fn decide(filter: &Filter, nr: i32, args: [u64; 6]) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                NR => nr as u32,
                ARCH => AUDIT_ARCH,
                o => args[((o - 16) / 8) as usize] as u32,
            }
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = filter.0[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => acc = word(i.k),
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= i.k,
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += usize::from(if acc == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => {
                    pc += usize::from(if acc >= i.k { i.jt } else { i.jf });
                }
                c => panic!("instruction {c:#x} not interpreted"),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn socket(f: &Filter, family: i32, ty: i32, proto: i32) -> u32 {
            decide(
                f,
                SYS_SOCKET,
                [family as u64, ty as u64, proto as u64, 0, 0, 0],
            )
        }

        fn pair(f: &Filter, family: i32, ty: i32) -> u32 {
            decide(f, SYS_SOCKETPAIR, [family as u64, ty as u64, 0, 0, 0, 0])
        }

        #[test]
        fn without_kernel_unix_checks_unix_sockets_go_to_the_supervisor() {
            let f = Filter::sockets(false);
            assert_eq!(socket(&f, libc::AF_INET, libc::SOCK_STREAM, 0), RET_ALLOW);
            assert_eq!(socket(&f, libc::AF_INET6, libc::SOCK_DGRAM, 0), RET_ALLOW);
            assert_eq!(
                socket(&f, libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
                RET_ALLOW
            );
            assert_eq!(
                socket(&f, libc::AF_NETLINK, libc::SOCK_RAW, 9),
                RET_USER_NOTIF
            );
            assert_eq!(
                socket(&f, libc::AF_UNIX, libc::SOCK_STREAM, 0),
                RET_USER_NOTIF
            );
            assert_eq!(
                socket(&f, libc::AF_PACKET, libc::SOCK_RAW, 0),
                RET_USER_NOTIF
            );
            assert_eq!(
                socket(&f, libc::AF_VSOCK, libc::SOCK_STREAM, 0),
                RET_USER_NOTIF
            );
            assert_eq!(
                socket(&f, libc::AF_BLUETOOTH, libc::SOCK_STREAM, 0),
                RET_USER_NOTIF
            );
            assert_eq!(
                pair(&f, libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC),
                RET_ALLOW
            );
            assert_eq!(pair(&f, libc::AF_UNIX, libc::SOCK_SEQPACKET), RET_ALLOW);
            assert_eq!(
                pair(&f, libc::AF_UNIX, libc::SOCK_DGRAM),
                RET_USER_NOTIF,
                "a datagram pair can be reconnected anywhere"
            );
            assert_eq!(pair(&f, libc::AF_INET, libc::SOCK_STREAM), RET_USER_NOTIF);
            assert_eq!(decide(&f, SYS_IO_URING_SETUP, [0; 6]), RET_USER_NOTIF);
            assert_eq!(decide(&f, libc::SYS_connect as i32, [0; 6]), RET_ALLOW);
            assert_eq!(decide(&f, libc::SYS_read as i32, [0; 6]), RET_ALLOW);
            // The family is an int: the upper half of the register is ignored.
            assert_eq!(
                decide(
                    &f,
                    SYS_SOCKET,
                    [(1 << 32) | libc::AF_INET as u64, 1, 0, 0, 0, 0]
                ),
                RET_ALLOW
            );
        }

        #[test]
        fn with_kernel_unix_checks_unix_sockets_are_made() {
            let f = Filter::sockets(true);
            assert_eq!(socket(&f, libc::AF_UNIX, libc::SOCK_DGRAM, 0), RET_ALLOW);
            assert_eq!(pair(&f, libc::AF_UNIX, libc::SOCK_DGRAM), RET_ALLOW);
            assert_eq!(
                socket(&f, libc::AF_VSOCK, libc::SOCK_STREAM, 0),
                RET_USER_NOTIF
            );
            assert_eq!(pair(&f, libc::AF_INET, libc::SOCK_STREAM), RET_USER_NOTIF);
        }

        #[cfg(target_arch = "x86_64")]
        #[test]
        fn x32_calls_are_refused() {
            let f = Filter::sockets(true);
            assert_eq!(
                decide(
                    &f,
                    0x4000_0000 | SYS_SOCKET,
                    [libc::AF_INET as u64, 1, 0, 0, 0, 0]
                ),
                RET_ERRNO | libc::EPERM as u32
            );
        }
    }

    /// A refused call, as the supervisor sees it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Notification {
        pub id: u64,
        /// The calling thread, as the supervisor's pid namespace sees it.
        pub pid: u32,
        pub nr: i32,
        pub args: [u64; 6],
    }

    /// Waits up to `timeout_ms` for a refused call (`Ok(None)`: none came).
    pub fn receive(listener: &OwnedFd, timeout_ms: i32) -> io::Result<Option<Notification>> {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if ready == 0 || pfd.revents & libc::POLLIN == 0 {
            if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "no process uses the filter",
                ));
            }
            return Ok(None);
        }
        // SAFETY: seccomp_notif is plain data; RECV fills it (the kernel
        // wants it zeroed first).
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the ioctl writes one seccomp_notif into `n`.
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &raw mut n,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            // ENOENT: the caller died before we read it.
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(Notification {
            id: n.id,
            pid: n.pid,
            nr: n.data.nr,
            args: n.data.args,
        }))
    }

    /// Fails the refused call with `errno`.
    pub fn refuse(listener: &OwnedFd, id: u64, errno: i32) -> io::Result<()> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error: -errno,
            flags: 0,
        };
        // SAFETY: the ioctl reads one seccomp_notif_resp.
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &raw mut resp,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            // ENOENT: the caller died meanwhile; nothing to answer.
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Makes `command`'s child install `filter` (after any privilege drop
/// registered before) and send its listener over `channel`.
pub fn seccomp_on_exec(
    command: &mut std::process::Command,
    filter: seccomp::Filter,
    channel: std::os::fd::RawFd,
) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: install_in_child makes only async-signal-safe calls on data
    // the closure owns, in the forked child.
    unsafe {
        command.pre_exec(move || seccomp::install_in_child(&filter, channel));
    }
}

/// A Landlock domain for agents started by `exec`. It restricts no file
/// access an agent needs (only making block devices, which needs root), but
/// a process in a domain may not ptrace, read or write the memory of, or take
/// descriptors (`pidfd_getfd`) from processes outside it: an agent running as
/// a user cannot drive that user's untagged processes (a shell, say) to open
/// connections for it. Where the kernel supports it (ABI 6), connecting to
/// abstract Unix sockets made outside the domain, and signalling processes
/// outside it, are refused too. A kernel without Landlock runs the agent
/// without it (what Yama's ptrace scope gives, if on, still applies).
pub mod landlock {
    use std::io;

    const SYS_CREATE_RULESET: libc::c_long = 444;
    const SYS_RESTRICT_SELF: libc::c_long = 446;
    const CREATE_RULESET_VERSION: u32 = 1;
    const ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
    const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
    const SCOPE_SIGNAL: u64 = 1 << 1;

    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }

    /// The kernel's Landlock ABI version, 0 when it has none.
    pub fn abi() -> u32 {
        // SAFETY: the version query takes no ruleset.
        let v = unsafe {
            libc::syscall(
                SYS_CREATE_RULESET,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        u32::try_from(v).unwrap_or(0)
    }

    /// Puts the calling thread (and what it starts) in a new domain. Needs
    /// `no_new_privs`. Async-signal-safe: system calls only.
    pub fn enter_domain() -> io::Result<()> {
        let abi = abi();
        if abi == 0 {
            return Ok(());
        }
        let attr = RulesetAttr {
            handled_access_fs: ACCESS_FS_MAKE_BLOCK,
            handled_access_net: 0,
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            } else {
                0
            },
        };
        // The struct grew with the ABI: pass the size this kernel knows.
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` is valid for `size` bytes; the fd is closed below.
        unsafe {
            let fd = libc::syscall(SYS_CREATE_RULESET, &raw const attr, size, 0u32);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = fd as libc::c_int;
            let rc = libc::syscall(SYS_RESTRICT_SELF, fd, 0u32);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// `INET_DIAG_CGROUP_ID` (Linux 5.9+): the cgroup v2 id a TCP socket was
/// created in, as an attribute of a `sock_diag` answer.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// What the kernel says about one TCP socket (see [`tcp_socket_diag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketDiag {
    /// The cgroup (v2 id) the socket was created in.
    pub cgroup: u64,
    /// The socket's inode: `/proc/PID/fd/N` links read `socket:[inode]`.
    pub inode: u32,
}

/// The TCP socket in this network namespace whose local end is `local` and
/// remote end is `remote`, asked of the kernel with `sock_diag`
/// (`NETLINK_SOCK_DIAG`, an exact lookup). `Ok(None)`: no such socket; an
/// error when the kernel does not report cgroups.
pub fn tcp_socket_diag(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> io::Result<Option<SocketDiag>> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let family = match (local, remote) {
        (std::net::SocketAddr::V4(_), std::net::SocketAddr::V4(_)) => libc::AF_INET,
        (std::net::SocketAddr::V6(_), std::net::SocketAddr::V6(_)) => libc::AF_INET6,
        _ => return Err(io::ErrorKind::InvalidInput.into()),
    };
    let addr = |a: std::net::SocketAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match a.ip() {
            std::net::IpAddr::V4(ip) => out[..4].copy_from_slice(&ip.octets()),
            std::net::IpAddr::V6(ip) => out.copy_from_slice(&ip.octets()),
        }
        out
    };
    // struct nlmsghdr (16) + struct inet_diag_req_v2 (56).
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(family as u8);
    req.push(libc::IPPROTO_TCP as u8);
    req.push(0); // idiag_ext
    req.push(0);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&local.port().to_be_bytes());
    req.extend_from_slice(&remote.port().to_be_bytes());
    req.extend_from_slice(&addr(local));
    req.extend_from_slice(&addr(remote));
    req.extend_from_slice(&0u32.to_ne_bytes()); // interface
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    debug_assert_eq!(req.len(), 72);

    // SAFETY: plain integers; the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid fd and a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // SAFETY: zeroed sockaddr_nl is the kernel's address (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: a valid fd, the request buffer and its length, the address and its size.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: a valid fd and a buffer of the given length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_diag_cgroup(&buf[..n as usize])
}

/// The cgroup id and inode in a `sock_diag` answer (one message).
fn parse_diag_cgroup(msg: &[u8]) -> io::Result<Option<SocketDiag>> {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag answer");
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    let msg = msg.get(..len).ok_or_else(bad)?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = u32_at(msg, 16).ok_or_else(bad)? as i32;
        return match -errno {
            0 | libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad());
    }
    // struct nlmsghdr (16) + struct inet_diag_msg (72: idiag_inode last),
    // then attributes.
    let inode = u32_at(msg, 16 + 68).ok_or_else(bad)?;
    let mut at = 16 + 72;
    while at + 4 <= msg.len() {
        let alen = u16_at(msg, at).ok_or_else(bad)? as usize;
        let atype = u16_at(msg, at + 2).ok_or_else(bad)? & 0x3fff;
        if alen < 4 {
            return Err(bad());
        }
        if atype == INET_DIAG_CGROUP_ID {
            let v = msg.get(at + 4..at + 12).ok_or_else(bad)?;
            let cgroup = u64::from_ne_bytes(v.try_into().map_err(|_| bad())?);
            return Ok(Some(SocketDiag { cgroup, inode }));
        }
        at += (alen + 3) & !3;
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the kernel names no cgroup for sockets (INET_DIAG_CGROUP_ID needs Linux 5.9+)",
    ))
}

/// Whether this process holds the socket with `inode` (one of its
/// descriptors links to `socket:[inode]`). An error when /proc/self/fd
/// cannot be read.
pub fn holds_socket(inode: u32) -> io::Result<bool> {
    let want = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        // A descriptor closed since the listing has no link: not the one.
        if std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
            return Ok(true);
        }
    }
    Ok(false)
}
