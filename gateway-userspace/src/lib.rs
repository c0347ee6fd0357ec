//! agentgate: a privileged-access gateway for AI agents.
//!
//! The request lifecycle, once, in the order the code follows it:
//!
//! 1. `redirect`: eBPF connect hooks rewrite a tagged process's `connect()` to
//!    the proxy listener and record its provenance.
//! 2. `proxy`: accept, look the peer up in the provenance map (no record: refuse),
//!    enrich from /proc (`provenance`), bind to an identity, and hand the
//!    `connection` to the resource's handler through the `protocol` seam.
//! 3. `policy`: decide on the resource; then, per command decoded by a
//!    `protocol` handler, the `gate` decides by policy, writes the record
//!    ahead, holds what needs a human (`approval`) and records the result;
//!    the handler renders its outcome in its own protocol.
//! 4. `mask`: rewrite sensitive fields in responses.
//! 5. `audit`: every step is a record in the hash-chained log, written ahead.
//!
//! Everything here fails closed unless its module doc says otherwise.
#![deny(unsafe_code)]

pub mod api;
pub mod approval;
pub mod audit;
pub mod binding;
pub mod cgroup;
pub mod config;
pub mod connection;
pub mod containment;
pub mod control;
pub mod daemon;
pub mod evidence;
pub mod gate;
pub mod identity;
pub mod keyfile;
pub mod mask;
pub mod policy;
pub mod protocol;
pub mod provenance;
pub mod proxy;
pub mod recording;
pub mod redirect;
pub mod sql;
pub mod sys;
pub mod time;
pub mod tls;
