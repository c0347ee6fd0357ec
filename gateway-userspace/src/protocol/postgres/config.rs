//! `[proxy.postgres]`: the Postgres handler's config section, parsed here
//! (not in `config.rs`). A bad value refuses to start, naming the file and line.

use serde::Deserialize;

/// `[proxy.postgres]`: what a Postgres client or server may send, and how
/// long it may take. Anything over a limit is a protocol error that ends the
/// connection (`08P01`); nothing over a limit is forwarded.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Largest startup packet, length word included.
    pub max_startup_bytes: usize,
    /// Largest SQL text in one `Query` or `Parse` (what the SQL parser sees).
    pub max_sql_bytes: usize,
    /// Largest body of any other message, either direction (`DataRow`,
    /// `CopyData`, `Bind`, ...).
    pub max_message_bytes: usize,
    /// From accept to a complete startup packet.
    pub startup_timeout_secs: u64,
    /// From the startup packet to the server's first `ReadyForQuery`.
    pub auth_timeout_secs: u64,
    /// A binary result value whose type cannot carry masked text, in a
    /// column that must be masked: `"null"` sends SQL NULL in its place,
    /// `"refuse"` fails the statement.
    pub unmaskable_binary: UnmaskableBinary,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnmaskableBinary {
    Null,
    Refuse,
}

impl Default for PostgresConfig {
    /// The handler's defaults (its own `Default`s agree; a test there checks).
    fn default() -> Self {
        Self {
            max_startup_bytes: 10 * 1024,
            max_sql_bytes: 1024 * 1024,
            max_message_bytes: 64 * 1024 * 1024,
            startup_timeout_secs: 30,
            auth_timeout_secs: 60,
            unmaskable_binary: UnmaskableBinary::Null,
        }
    }
}

impl PostgresConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(64..=1024 * 1024).contains(&self.max_startup_bytes) {
            return Err("max_startup_bytes must be between 64 and 1048576".into());
        }
        if !(1024..=crate::sql::MAX_SQL_LEN).contains(&self.max_sql_bytes) {
            return Err(format!(
                "max_sql_bytes must be between 1024 and {} (longer text is never parsed)",
                crate::sql::MAX_SQL_LEN
            ));
        }
        // Postgres itself accepts at most 1 GiB per message.
        if !(self.max_sql_bytes..=1 << 30).contains(&self.max_message_bytes) {
            return Err(
                "max_message_bytes must be at least max_sql_bytes and at most 1073741824".into(),
            );
        }
        if self.startup_timeout_secs == 0 || self.auth_timeout_secs == 0 {
            return Err("startup_timeout_secs and auth_timeout_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// The section in a whole config text, checked (errors carry line and column).
pub(super) fn check(text: &str) -> Result<(), String> {
    let Some(c) = super::super::section::<PostgresConfig>(text, "postgres")
        .map_err(|e| e.to_string().trim_end().to_owned())?
    else {
        return Ok(());
    };
    c.validate().map_err(|e| {
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with("[proxy.postgres]"))
            .map_or_else(String::new, |n| format!("line {}: ", n + 1));
        format!("{line}[proxy.postgres] {e}")
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn postgres_limits_are_read_and_checked() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[proxy.postgres]\nmax_sql_bytes = 4096\nunmaskable_binary = \"refuse\"\n",
        )
        .unwrap();
        let pg: PostgresConfig = c.proxy.handlers["postgres"].clone().try_into().unwrap();
        assert_eq!(pg.max_sql_bytes, 4096);
        assert_eq!(pg.max_message_bytes, 64 << 20, "the default");
        assert_eq!(pg.unmaskable_binary, UnmaskableBinary::Refuse);
        for bad in [
            "max_sql_bytes = 0",
            "max_sql_bytes = 2097152",
            "max_message_bytes = 2048",
            "auth_timeout_secs = 0",
            "max_sql = 1",
        ] {
            let err = Config::parse(Path::new("a.toml"), &format!("[proxy.postgres]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("a.toml: "), "{bad}: {err}");
            assert!(err.contains("line "), "{bad}: {err}");
        }
    }
}
