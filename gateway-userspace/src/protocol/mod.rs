//! Protocol handlers' sans-IO layers: decoders, encoders and pure session state.
//!
//! Nothing under this module touches a socket or tokio except each protocol's
//! `proxy` submodule (e.g. [`postgres::proxy`]): bytes go in, messages (or "need
//! more bytes") come out. The proxy loop owns I/O and drives these.

pub mod postgres;
pub mod ssh;
