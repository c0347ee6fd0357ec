//! `[audit] retain_days`: the daemon deletes whole segments older than the
//! limit, once at start and then hourly.
//!
//! Deletion goes through [`AuditLog::retain`], which only removes closed
//! segments already covered by a checkpoint, and writes (and fsyncs) a signed
//! `retention` record naming the anchor the verifier continues from before it
//! deletes anything: verification keeps passing, and `audit verify` and
//! `agentgate evidence` report the deletion as retention, not tampering.
//! Fails safe: an error deletes nothing and is retried at the next hour.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use super::AuditLog;

const EVERY: Duration = Duration::from_hours(1);

/// The cut-off: records at or after it are kept.
pub fn keep_after(now: OffsetDateTime, days: u32) -> OffsetDateTime {
    now - time::Duration::days(i64::from(days))
}

/// Applies `retain_days` until `shutdown` turns true.
pub async fn enforce_retention(log: AuditLog, days: u32, shutdown: watch::Receiver<bool>) {
    run(log, days, shutdown, OffsetDateTime::now_utc).await;
}

/// [`enforce_retention`] with the clock as an input (tests move it forward).
async fn run(
    log: AuditLog,
    days: u32,
    mut shutdown: watch::Receiver<bool>,
    now: impl Fn() -> OffsetDateTime,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match log.retain(keep_after(now(), days)).await {
            Ok(r) if r.deleted_segments.is_empty() => {}
            Ok(r) => tracing::info!(
                event = "audit.retention",
                segments = r.deleted_segments.len(),
                first_seq = r.first_seq,
                until = r.last_plus_one,
                retain_days = days,
                "audit: deleted segments older than the retention limit"
            ),
            Err(e) => {
                tracing::error!(error = %e, retain_days = days, "audit: retention failed; nothing deleted, retrying in an hour");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, Kind, NewRecord, list_segments, verify_dir};

    /// Two days on, with `retain_days = 1`: old segments go, the log verifies.
    #[tokio::test]
    async fn deletes_old_segments_and_the_log_still_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let mut cfg = AuditConfig::with_dir(&dir);
        cfg.segment_max_bytes = 4096;
        cfg.checkpoint_every_records = 5;
        let log = AuditLog::open(cfg).await.unwrap();
        for i in 0..60u64 {
            let r = NewRecord::new(Kind::Statement)
                .resource("db")
                .action(serde_json::json!({"sql": "SELECT ?", "n": i}));
            log.append(r).await.unwrap();
        }
        log.checkpoint().await.unwrap();
        let before = list_segments(&dir).unwrap().len();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(log.clone(), 1, shutdown, || {
            OffsetDateTime::now_utc() + time::Duration::days(2)
        }));
        let mut after = before;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = list_segments(&dir).unwrap().len();
            if after < before {
                break;
            }
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        log.close().await.unwrap();
        assert!(after < before, "{before} segments before, {after} after");
        let report = verify_dir(&dir, None).expect("verifies after retention");
        assert!(report.first_seq > 0);
    }

    #[test]
    fn twelve_months_back() {
        let now = time::macros::datetime!(2026-12-04 12:00 UTC);
        assert_eq!(
            keep_after(now, 365),
            time::macros::datetime!(2025-12-04 12:00 UTC)
        );
    }
}
