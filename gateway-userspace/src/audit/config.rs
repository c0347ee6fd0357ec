//! `[audit]` configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::AuditError;

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// An append returns after the record is written and `fdatasync`ed.
    /// Concurrent appends share one fsync (group commit).
    #[default]
    Strict,
    /// An append returns after the record is written to the page cache; fsync
    /// runs every `batch_interval_ms`, in the background (appends do not wait
    /// for it). Loss window: a power cut or kernel crash can lose records
    /// acknowledged in the last `batch_interval_ms` plus one fsync (a crash of
    /// the daemon alone loses nothing). A batch holding a checkpoint
    /// is always fsynced before the checkpoint is exported.
    Batched,
}

/// `[audit]` in the daemon config. Unknown keys are rejected.
///
/// ```toml
/// [audit]
/// dir = "/var/lib/agentgate/audit"
/// state_dir = "/var/lib/agentgate"        # signing key; default: parent of dir
/// durability = "strict"                   # or "batched"
/// batch_interval_ms = 10
/// checkpoint_every_records = 1000
/// checkpoint_every_secs = 60
/// checkpoint_file = "/mnt/worm/agentgate-checkpoints.jsonl"
/// checkpoint_webhook = "http://siem.internal:8080/agentgate/checkpoint"
/// segment_max_bytes = 67108864
/// segment_max_age_secs = 86400
/// host = "gw-01"                          # default: the kernel hostname
/// retain_days = 365                       # PCI DSS 10.5.1: at least 12 months; default: keep all
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// Where the private signing key lives (mode 0600). `None`: the parent of `dir`.
    pub state_dir: Option<PathBuf>,
    pub durability: Durability,
    pub batch_interval_ms: u64,
    pub checkpoint_every_records: u64,
    pub checkpoint_every_secs: u64,
    /// Appended with one checkpoint per line (meant to be another mount or host).
    pub checkpoint_file: Option<PathBuf>,
    /// `http://host:port/path`: each checkpoint is `POST`ed as JSON (plain HTTP/1.1,
    /// no TLS; put a local relay in front of anything remote).
    pub checkpoint_webhook: Option<String>,
    pub segment_max_bytes: u64,
    pub segment_max_age_secs: u64,
    pub host: Option<String>,
    /// The daemon deletes whole segments whose records are all older than
    /// this many days (hourly; each deletion is a `retention` record).
    /// `None`: keep everything.
    pub retain_days: Option<u32>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: PathBuf::from("/var/lib/agentgate/audit"),
            state_dir: None,
            durability: Durability::Strict,
            batch_interval_ms: 10,
            checkpoint_every_records: 1000,
            checkpoint_every_secs: 60,
            checkpoint_file: None,
            checkpoint_webhook: None,
            segment_max_bytes: 64 << 20,
            segment_max_age_secs: 86_400,
            host: None,
            retain_days: None,
        }
    }
}

impl AuditConfig {
    /// A default config writing to `dir`.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        AuditConfig {
            dir: dir.into(),
            ..AuditConfig::default()
        }
    }

    /// The directory holding the private signing key.
    pub fn key_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            self.dir
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        })
    }

    /// Rejects values outside the supported ranges (no silent clamping).
    pub fn validate(&self) -> Result<(), AuditError> {
        let bad = |reason: String| Err(AuditError::Config { reason });
        if self.dir.as_os_str().is_empty() {
            return bad("audit.dir is empty".into());
        }
        if !(1..=10_000).contains(&self.batch_interval_ms) {
            return bad(format!(
                "audit.batch_interval_ms = {} (allowed 1..=10000)",
                self.batch_interval_ms
            ));
        }
        if !(1..=10_000_000).contains(&self.checkpoint_every_records) {
            return bad(format!(
                "audit.checkpoint_every_records = {} (allowed 1..=10000000)",
                self.checkpoint_every_records
            ));
        }
        if !(1..=86_400).contains(&self.checkpoint_every_secs) {
            return bad(format!(
                "audit.checkpoint_every_secs = {} (allowed 1..=86400)",
                self.checkpoint_every_secs
            ));
        }
        if !(4096..=(1 << 40)).contains(&self.segment_max_bytes) {
            return bad(format!(
                "audit.segment_max_bytes = {} (allowed 4096..=2^40)",
                self.segment_max_bytes
            ));
        }
        if self.segment_max_age_secs == 0 {
            return bad("audit.segment_max_age_secs = 0 (must be at least 1)".into());
        }
        if let Some(url) = &self.checkpoint_webhook {
            super::sink::parse_http_url(url).map_err(|reason| AuditError::Config {
                reason: format!("audit.checkpoint_webhook: {reason}"),
            })?;
        }
        if let Some(days) = self.retain_days
            && !(1..=36_500).contains(&days)
        {
            return bad(format!(
                "audit.retain_days = {days} (allowed 1..=36500; omit it to keep everything)"
            ));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || host.len() > 255)
        {
            return bad("audit.host must be 1..=255 bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_section_and_rejects_unknown_keys() {
        let c: AuditConfig =
            toml::from_str("dir = \"/x\"\ndurability = \"batched\"\nbatch_interval_ms = 5\n")
                .unwrap();
        assert_eq!(c.durability, Durability::Batched);
        assert_eq!(c.key_dir(), PathBuf::from("/"));
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<AuditConfig>("dri = \"/x\"\n").is_err());
        let zero: AuditConfig = toml::from_str("checkpoint_every_records = 0\n").unwrap();
        assert!(zero.validate().is_err());
        let pci: AuditConfig = toml::from_str("retain_days = 365\n").unwrap();
        assert_eq!(pci.retain_days, Some(365));
        assert!(pci.validate().is_ok());
        let none: AuditConfig = toml::from_str("retain_days = 0\n").unwrap();
        assert!(none.validate().is_err());
    }
}
