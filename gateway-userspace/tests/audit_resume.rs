//! Start-up verifies from the last durable checkpoint, not from the log's
//! beginning; `audit verify` still reads everything, and a saved resume point
//! that does not fit the log means a full pass.

mod audit_common;

use agentgate::audit::{AuditError, AuditLog, Broken, verify_dir};
use audit_common::{TempLog, flip_value_byte, statement, write_log};

const RESUME: &str = "resume.json";

#[tokio::test]
async fn start_up_checks_from_the_last_checkpoint_and_audit_verify_checks_all() {
    let t = TempLog::new();
    write_log(t.cfg(), 60).await;
    assert!(t.dir.join(RESUME).exists(), "close saves a resume point");
    // Damage long before the last checkpoint: the daemon starts (it vouches
    // for what follows its last signed checkpoint), the verifier still names it.
    flip_value_byte(&t.dir, 17);
    let log = AuditLog::open(t.cfg())
        .await
        .expect("resumes at the last checkpoint");
    log.append(statement(60)).await.unwrap();
    log.close().await.unwrap();
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!((f.seq, f.what), (Some(17), Broken::Hash));
}

#[tokio::test]
async fn records_after_the_resume_point_are_checked_at_start_up() {
    let t = TempLog::new();
    let log = AuditLog::open(t.cfg()).await.unwrap();
    for i in 0..15 {
        log.append(statement(i)).await.unwrap();
    }
    // The cfg checkpoints every 10 records: a resume point at seq 10.
    let early = std::fs::read(t.dir.join(RESUME)).unwrap();
    for i in 15..30 {
        log.append(statement(i)).await.unwrap();
    }
    log.close().await.unwrap();
    // An older (valid) resume point: more to check, and it still opens.
    std::fs::write(t.dir.join(RESUME), &early).unwrap();
    let log = AuditLog::open(t.cfg())
        .await
        .expect("an earlier resume point fits");
    log.close().await.unwrap();
    // Damage after that point is found at open, whichever point is saved.
    std::fs::write(t.dir.join(RESUME), &early).unwrap();
    flip_value_byte(&t.dir, 13);
    let e = AuditLog::open(t.cfg()).await.unwrap_err();
    assert!(matches!(e, AuditError::Tampered { .. }), "{e}");
}

#[tokio::test]
async fn a_resume_point_that_does_not_fit_means_a_full_pass() {
    let t = TempLog::new();
    write_log(t.cfg(), 40).await;
    // Unreadable: a full pass, which succeeds on an intact log.
    std::fs::write(t.dir.join(RESUME), b"{not json").unwrap();
    open_and_close(&t).await;
    // Pointing at a record that is not the checkpoint it claims: a full pass.
    let mut r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.dir.join(RESUME)).unwrap()).unwrap();
    let last = r["segments"].as_array().unwrap().len() - 1;
    r["segments"][last]["valid_len"] = serde_json::json!(0);
    std::fs::write(t.dir.join(RESUME), serde_json::to_vec(&r).unwrap()).unwrap();
    open_and_close(&t).await;
    // And a full pass is a real one: early damage plus a useless resume point
    // is refused.
    std::fs::write(t.dir.join(RESUME), b"{not json").unwrap();
    flip_value_byte(&t.dir, 5);
    let e = AuditLog::open(t.cfg()).await.unwrap_err();
    assert!(matches!(e, AuditError::Tampered { .. }), "{e}");
}

/// Opens the log (the pass the test is about) and closes it again.
async fn open_and_close(t: &TempLog) {
    AuditLog::open(t.cfg())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}
