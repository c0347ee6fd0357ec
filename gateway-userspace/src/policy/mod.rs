//! Policy: which identities may do what on which resources, and what is masked.
//!
//! Loaded from a directory of TOML files (format: `policies/README.md`),
//! validated with every error reported as `file:line:column: message`, and held
//! in a [`PolicyStore`] that reloads atomically. Fails closed: an invalid policy
//! never loads (the old one stays in force on reload), unknown destinations and
//! resources are denied, and anything not allowed by a rule gets the resource's
//! default action, `deny` unless the policy says otherwise. Matching semantics
//! are documented in [`decide`](self::decide) and the README.

pub mod archive;
mod decide;
pub mod diff;
pub mod field_test;
pub mod glob;
mod load;
mod model;
mod set;
mod store;

pub use archive::{ArchiveError, PolicyArchive};
pub use decide::{Candidate, Explanation};
pub use load::{
    MAX_APPROVAL_TIMEOUT, MAX_GRANT_WINDOW, MAX_POLICY_FILE_BYTES, MAX_POLICY_FILES, MAX_QUORUM,
    PolicyError, PolicyErrors, load_dir, load_str, unix_allow,
};
pub use model::{
    Action, ActionKind, AddressPattern, ApprovalSpec, CgroupBinding, Conditions, Credential,
    Decision, GrantScope, HttpProfile, PromptDlp, Protocol, Resource, Rule, RuleAction,
    SSH_CLASSES, Subject, TlsMode, UnixAllow, UnknownDestination, UpstreamTls, Verdict,
};
pub use set::{DNS_LOOKUP_TIMEOUT, DnsAnswer, PolicySet};
pub use store::{FileStamp, PolicyStore, ReloadOutcome, WatchEvent, WatchOptions, watch};
