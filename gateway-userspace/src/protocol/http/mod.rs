//! The HTTP handler for `http` and `https` resources (and the `openai`
//! profile on either): each request is a command the gate decides on by
//! method, host and path; responses are masked by the value detectors;
//! model calls are recorded (model, tokens, tool names) and their prompts
//! checked before they leave.
//!
//! - [`request`]: sans-IO checks of a request head (smuggling shapes, path
//!   tricks) and what the record keeps of it (query values and credentials out).
//! - [`body`]: content codings, detectors over JSON and text, event streams.
//! - [`openai`]: the model-call profile and prompt DLP.
//! - [`proxy`]: the I/O (hyper server toward the agent, client toward the
//!   upstream) and the request lifecycle.
//!
//! Fails closed everywhere its module docs say; see [`proxy`] for the order.

pub mod body;
pub mod openai;
pub mod proxy;
pub mod request;
