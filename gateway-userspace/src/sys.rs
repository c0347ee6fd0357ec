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

/// The account named `name`; `Ok(None)` when there is none.
pub fn user_by_name(name: &str) -> io::Result<Option<User>> {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 1024];
    loop {
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
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => {
                // SAFETY: on success `pw_name` and `pw_dir` point to NUL-terminated
                // strings inside `buf`, which is still alive.
                let (user, home) = unsafe {
                    (
                        std::ffi::CStr::from_ptr(pwd.pw_name),
                        std::ffi::CStr::from_ptr(pwd.pw_dir),
                    )
                };
                return Ok(Some(User {
                    name: user.to_string_lossy().into_owned(),
                    uid: pwd.pw_uid,
                    gid: pwd.pw_gid,
                    home: std::path::PathBuf::from(
                        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
                            home.to_bytes(),
                        ),
                    ),
                }));
            }
            libc::ERANGE if buf.len() < MAX_NSS_BUFFER => buf.resize(buf.len() * 4, 0),
            // Some NSS modules report "no such user" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The id of the group named `name`; `Ok(None)` when there is none.
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 1024];
    loop {
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
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if buf.len() < MAX_NSS_BUFFER => buf.resize(buf.len() * 4, 0),
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
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
