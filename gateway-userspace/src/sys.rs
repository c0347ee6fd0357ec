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
