//! `[proxy.mysql]`: the `MySQL` handler's config section, parsed here (not
//! in `config.rs`). A bad value refuses to start with the file and line.

use serde::Deserialize;

/// `[proxy.mysql]`: what a client or server may send, and how long a login
/// may take. Anything over a limit ends the connection with an `ERR`
/// packet; nothing over a limit is forwarded.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MysqlConfig {
    /// Largest packet (16 MiB chunks joined), either direction.
    pub max_packet_bytes: usize,
    /// Largest SQL text in one `COM_QUERY` or `COM_STMT_PREPARE`.
    pub max_sql_bytes: usize,
    /// From the client's connect until the server accepts its login.
    pub handshake_timeout_secs: u64,
}

impl Default for MysqlConfig {
    /// The handler's defaults (its own `Default`s agree; a test checks).
    fn default() -> Self {
        Self {
            max_packet_bytes: 64 * 1024 * 1024,
            max_sql_bytes: 1024 * 1024,
            handshake_timeout_secs: 30,
        }
    }
}

impl MysqlConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1024..=crate::sql::MAX_SQL_LEN).contains(&self.max_sql_bytes) {
            return Err(format!(
                "max_sql_bytes must be between 1024 and {} (longer text is never parsed)",
                crate::sql::MAX_SQL_LEN
            ));
        }
        // MySQL's own max_allowed_packet tops out at 1 GiB.
        if !(self.max_sql_bytes..=1 << 30).contains(&self.max_packet_bytes) {
            return Err(
                "max_packet_bytes must be at least max_sql_bytes and at most 1073741824".into(),
            );
        }
        if self.handshake_timeout_secs == 0 {
            return Err("handshake_timeout_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// The section in a whole config text, checked (errors carry line and column).
pub(super) fn check(text: &str) -> Result<(), String> {
    let Some(c) = super::super::section::<MysqlConfig>(text, "mysql")
        .map_err(|e| e.to_string().trim_end().to_owned())?
    else {
        return Ok(());
    };
    c.validate().map_err(|e| {
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with("[proxy.mysql]"))
            .map_or_else(String::new, |n| format!("line {}: ", n + 1));
        format!("{line}[proxy.mysql] {e}")
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::Config, protocol::mysql::proxy::MySettings};

    #[test]
    fn mysql_limits_are_read_checked_and_default_to_the_handlers() {
        let d = MysqlConfig::default();
        let s = MySettings::default();
        assert_eq!(d.max_packet_bytes, s.limits.max_packet);
        assert_eq!(d.max_sql_bytes, s.limits.max_sql_len);
        assert_eq!(d.handshake_timeout_secs, s.handshake_timeout.as_secs());
        let c =
            Config::parse(Path::new("a.toml"), "[proxy.mysql]\nmax_sql_bytes = 4096\n").unwrap();
        let my: MysqlConfig = c.proxy.handlers["mysql"].clone().try_into().unwrap();
        assert_eq!(my.max_sql_bytes, 4096);
        for bad in [
            "max_sql_bytes = 0",
            "max_packet_bytes = 2048",
            "handshake_timeout_secs = 0",
            "max_packet = 1",
        ] {
            let err = Config::parse(Path::new("a.toml"), &format!("[proxy.mysql]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("line "), "{bad}: {err}");
        }
    }
}
