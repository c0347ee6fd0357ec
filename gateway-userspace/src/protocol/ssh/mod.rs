//! SSH at L7 for `protocol = "ssh"` resources (the connection handler
//! lands with the protocol seam).
//!
//! - [`classify`]: the `exec` command's class, from a shell-aware lexer (sans-IO, fuzzed).
//! - [`keys`]: the proxy's host CA and host key, user certificates, the
//!   `known_hosts` block.

pub mod classify;
pub mod keys;
