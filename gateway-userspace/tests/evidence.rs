//! `agentgate evidence` end to end on a log written by the real writer: the
//! package validates against docs/evidence.schema.json, a cited record's proof
//! checks with `audit verify-proof`, and one flipped byte makes the command
//! fail while still writing a report that names the broken record at the top.

mod audit_common;

use std::path::Path;

use agentgate::audit::{AuditLog, IdentityRef, Kind, NewRecord, Workload};
use audit_common::{TempLog, agentgate, edit_byte};
use serde_json::{Value, json};

const FROM: &str = "2000-01-01T00:00:00Z";
const TO: &str = "2100-01-01T00:00:00Z";

fn contractor() -> IdentityRef {
    IdentityRef {
        subject: "contractor@bank".into(),
        kind: "human".into(),
        groups: vec!["contractors".into()],
    }
}

fn agent() -> Workload {
    Workload {
        pid: 4242,
        exe: Some("/usr/bin/python3".into()),
        cmdline: Some("python3 agent.py --token <redacted: 12 bytes>".into()),
        uid: 1000,
        cgroup: Some("/agentgate/exec-1".into()),
    }
}

fn conn(kind: Kind) -> NewRecord {
    NewRecord::new(kind)
        .session("conn-1")
        .connection(1)
        .identity(contractor())
        .workload(agent())
        .resource("customers-db")
}

/// A realistic session: login, connection, a masked read, a denied DROP
/// (rejected by an approver), an approved UPDATE, a refused escape route.
#[allow(clippy::too_many_lines)] // one scripted session, record by record
async fn write_session(log: &AuditLog) {
    let a = |r| log.append(r);
    a(NewRecord::new(Kind::DaemonStart)
        .workload(Workload::current_process())
        .action(json!({"fail_mode": "closed", "containment": {"hooks": [{"name": "ag_connect4", "attached": true}]}})))
    .await
    .unwrap();
    a(NewRecord::new(Kind::IdentityLogin)
        .identity(IdentityRef { kind: "oidc".into(), ..contractor() })
        .action(json!({"event": "login", "name": "contractor@bank", "subject": "c-123", "issuer": "https://idp.bank.example", "groups": ["contractors"], "method": "device"})))
    .await
    .unwrap();
    a(NewRecord::new(Kind::IdentityBind)
        .identity(IdentityRef { kind: "oidc".into(), ..contractor() })
        .action(json!({"event": "bind", "name": "contractor@bank", "cgroup": "/agentgate/exec-1", "kind": "exec"})))
    .await
    .unwrap();
    a(conn(Kind::ConnectionOpen)
        .action(json!({"destination": "10.0.0.5:5432", "protocol": "postgres"}))
        .decision(json!({"verdict": "allow", "rule": "contractor-read"})))
    .await
    .unwrap();
    a(conn(Kind::Statement)
        .action(json!({"class": "read", "sql": "SELECT * FROM customers LIMIT ?", "tables": ["customers"], "protocol": "postgres"}))
        .decision(json!({"verdict": "allow", "rule": "contractor-read", "reason": null})))
    .await
    .unwrap();
    a(conn(Kind::Statement)
        .action(json!({"phase": "completed", "protocol": "postgres"}))
        .transform(json!({"masking": {"columns": ["ssn", "card"], "detectors": ["email"], "values_masked": 9, "values_nulled": 0}}))
        .result(json!({"status": "ok", "rows": 3, "command": "SELECT 3"})))
    .await
    .unwrap();
    a(conn(Kind::ApprovalRequested)
        .action(json!({"class": "ddl", "sql": "DROP TABLE customers", "tables": ["customers"]}))
        .decision(json!({"verdict": "require_approval", "rule": "contractor-ddl"}))
        .approval(json!({"id": "apr-1", "approver_groups": ["dba"], "quorum": 1, "deadline": "2099-01-01T00:00:00Z"})))
    .await
    .unwrap();
    a(NewRecord::new(Kind::ApprovalDenied)
        .identity(IdentityRef { subject: "alice@bank".into(), kind: "approver".into(), groups: vec![] })
        .resource("customers-db")
        .approval(json!({"id": "apr-1", "approver": "alice@bank", "reason": "never drop production tables", "via": "control-socket"}))
        .action(json!({"requester": "contractor@bank", "summary": "DROP TABLE customers", "rule": "contractor-ddl"})))
    .await
    .unwrap();
    a(conn(Kind::Statement)
        .action(json!({"class": "ddl", "sql": "DROP TABLE customers", "tables": ["customers"]}))
        .decision(json!({"verdict": "deny", "rule": "contractor-ddl", "reason": "denied by alice@bank (never drop production tables)"}))
        .approval(json!({"id": "apr-1", "outcome": "denied", "by": "alice@bank", "reason": "never drop production tables"})))
    .await
    .unwrap();
    a(conn(Kind::ApprovalRequested)
        .action(json!({"class": "write", "sql": "UPDATE customers SET name = ? WHERE id = ?", "tables": ["customers"]}))
        .decision(json!({"verdict": "require_approval", "rule": "contractor-write"}))
        .approval(json!({"id": "apr-2", "approver_groups": ["dba"], "quorum": 1})))
    .await
    .unwrap();
    a(NewRecord::new(Kind::ApprovalGranted)
        .identity(IdentityRef { subject: "bob@bank".into(), kind: "approver".into(), groups: vec![] })
        .resource("customers-db")
        .approval(json!({"id": "apr-2", "approver": "bob@bank", "reason": "ticket CHG-7", "via": "control-socket"}))
        .action(json!({"requester": "contractor@bank", "summary": "UPDATE customers", "rule": "contractor-write"})))
    .await
    .unwrap();
    a(conn(Kind::Statement)
        .action(json!({"class": "write", "sql": "UPDATE customers SET name = ? WHERE id = ?", "tables": ["customers"]}))
        .decision(json!({"verdict": "allow", "rule": "contractor-write"}))
        .approval(json!({"id": "apr-2", "outcome": "granted", "approvers": ["bob@bank"]})))
    .await
    .unwrap();
    a(NewRecord::new(Kind::ContainmentRefused)
        .identity(contractor())
        .workload(agent())
        .action(json!({"call": "socket", "family": "unix", "route": "socket"}))
        .decision(json!({"verdict": "deny", "enforced_by": "seccomp"})))
    .await
    .unwrap();
    a(conn(Kind::ConnectionClose).result(json!({"bytes_up": 10, "bytes_down": 20})))
        .await
        .unwrap();
    a(NewRecord::new(Kind::IdentityUnbind)
        .identity(IdentityRef {
            kind: "oidc".into(),
            ..contractor()
        })
        .action(
            json!({"event": "unbind", "name": "contractor@bank", "cgroup": "/agentgate/exec-1"}),
        ))
    .await
    .unwrap();
    // Someone else's traffic: not in the report.
    a(NewRecord::new(Kind::Statement)
        .identity(IdentityRef {
            subject: "other".into(),
            kind: "label".into(),
            groups: vec![],
        })
        .resource("other-db")
        .action(json!({"class": "read", "sql": "SELECT 1"})))
    .await
    .unwrap();
}

fn build_log() -> TempLog {
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.checkpoint_every_records = 5;
    cfg.checkpoint_file = Some(t.tmp.path().join("exported-checkpoints.jsonl"));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let log = AuditLog::open(cfg).await.unwrap();
        write_session(&log).await;
        log.checkpoint().await.unwrap();
        log.close().await.unwrap();
    });
    t
}

fn evidence(dir: &Path, out: &Path) -> std::process::Output {
    agentgate()
        .args([
            "evidence",
            "--identity",
            "contractor@bank",
            "--from",
            FROM,
            "--to",
            TO,
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/evidence.schema.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn answers(report: &Value) -> Vec<(String, String)> {
    report["attestations"][0]["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["answer"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario: build, check, tamper, check again
fn the_package_validates_proves_and_reports_tampering_at_the_top() {
    let log = build_log();
    let out = log.tmp.path().join("evidence");
    let run = evidence(&log.dir, &out);
    assert!(run.status.success(), "{run:?}");
    // The checkpoints exported off the host match the log.
    let with_cp = agentgate()
        .args([
            "evidence",
            "--identity",
            "contractor@bank",
            "--from",
            FROM,
            "--to",
            TO,
        ])
        .arg("--dir")
        .arg(&log.dir)
        .arg("--out")
        .arg(log.tmp.path().join("evidence-cp"))
        .arg("--checkpoint")
        .arg(log.tmp.path().join("exported-checkpoints.jsonl"))
        .output()
        .unwrap();
    assert!(with_cp.status.success(), "{with_cp:?}");
    let cp: Value = serde_json::from_slice(
        &std::fs::read(log.tmp.path().join("evidence-cp/evidence.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cp["integrity"]["older_checkpoints"]["consistent"], true);
    assert!(
        cp["integrity"]["older_checkpoints"]["checked"]
            .as_u64()
            .unwrap()
            > 0
    );

    // evidence.json against the schema in the repo.
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("evidence.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&report)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(report["integrity"]["intact"], true);
    assert_eq!(
        answers(&report),
        [
            ("q1", "no"),
            ("q2", "no"),
            ("q3", "no"),
            ("q4", "yes"),
            ("q5", "no")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert_eq!(report["masking"]["values_masked"], 9);
    assert_eq!(report["masking"]["fields"]["ssn"]["by"], "rule");
    assert_eq!(report["masking"]["fields"]["email"]["by"], "detector");
    assert_eq!(report["identities"][0]["verified"], true);
    assert_eq!(
        report["identities"][0]["issuer"],
        "https://idp.bank.example"
    );
    assert_eq!(report["identities"][0]["oidc_subject"], "c-123");
    let approvals = report["approvals"]["items"].as_array().unwrap();
    assert_eq!(approvals.len(), 2);
    assert_eq!(approvals[0]["outcome"], "denied");
    assert_eq!(approvals[0]["approvers"][0], "alice@bank");
    assert_eq!(approvals[1]["outcome"], "granted");
    assert_eq!(approvals[1]["uses"], 1);
    assert_eq!(
        report["denials"]["items"][0]["what"],
        "DROP TABLE customers"
    );
    assert_eq!(report["containment"]["by_kind"]["containment.refused"], 1);
    assert_eq!(report["commands"]["total"], 3);
    assert_eq!(report["commands"]["by_decision"]["allow after approval"], 1);
    assert_eq!(report["commands"]["by_decision"]["deny"], 1);
    let text = serde_json::to_string(&report).unwrap();
    assert!(
        !text.contains("other-db"),
        "another identity's traffic leaked into the report"
    );

    // Every cited record has a proof; one checks on its own.
    let records = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    assert!(
        report["unproven"].as_array().unwrap().is_empty(),
        "{}",
        report["unproven"]
    );
    let lines: Vec<&str> = records.lines().collect();
    assert!(lines.len() >= 10, "{} cited", lines.len());
    let masked_seq = report["attestations"][0]["answers"][0]["records"]["items"][0]["seq"]
        .as_u64()
        .unwrap();
    let line = lines
        .iter()
        .find(|l| serde_json::from_str::<Value>(l).unwrap()["seq"] == masked_seq)
        .expect("the attestation's record is in records.jsonl");
    let proof = log.tmp.path().join("proof.json");
    std::fs::write(&proof, line).unwrap();
    let check = agentgate()
        .args(["audit", "verify-proof"])
        .arg(&proof)
        .arg("--key")
        .arg(log.dir.join("audit-signing.pub"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(
        html.contains("id=attestation") && html.contains("<svg"),
        "no attestation or timeline"
    );
    assert!(
        !html.contains("src=") && !html.contains("<link"),
        "external assets"
    );

    // One byte of a segment flipped: exit 1, the report names the record at the top.
    let target = audit_common::lines(&log.dir)
        .into_iter()
        .find(|l| l.bytes.windows(10).any(|w| w == b"DROP TABLE"))
        .unwrap()
        .seq;
    edit_byte(&log.dir, target, b"DROP TABLE", 0, |b| *b = b'd');
    let out2 = log.tmp.path().join("evidence-tampered");
    let run = evidence(&log.dir, &out2);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let html = std::fs::read_to_string(out2.join("index.html")).unwrap();
    let banner = html.find("class='banner bad'").expect("a red banner");
    let attestation = html.find("id=attestation").unwrap();
    assert!(banner < attestation, "the failure is not at the top");
    assert!(
        html[banner..attestation].contains(&format!("seq {target} ")),
        "{}",
        &html[banner..attestation]
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out2.join("evidence.json")).unwrap()).unwrap();
    assert!(validator.is_valid(&report));
    assert_eq!(report["integrity"]["intact"], false);
    assert_eq!(report["integrity"]["failure"]["seq"], target);
    assert_eq!(answers(&report)[2], ("q3".to_owned(), "yes".to_owned()));
    assert!(
        report["integrity"]["after_break"]["lines"]
            .as_u64()
            .unwrap()
            > 0
    );
}

/// Retention deleted the oldest segments: verify and evidence still pass,
/// the deletion is reported as retention (not tampering), and cited records
/// after it are still proven (from the retention anchor).
#[test]
fn retention_is_reported_as_such_and_proofs_still_check() {
    let log = TempLog::new();
    let mut cfg = log.cfg();
    cfg.checkpoint_every_records = 5;
    cfg.segment_max_bytes = 4096;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let l = AuditLog::open(cfg).await.unwrap();
        for _ in 0..3 {
            write_session(&l).await;
        }
        let r = l
            .retain(time::OffsetDateTime::now_utc() + time::Duration::days(1))
            .await
            .unwrap();
        assert!(!r.deleted_segments.is_empty(), "nothing deleted");
        write_session(&l).await;
        l.checkpoint().await.unwrap();
        l.close().await.unwrap();
    });
    let verify = agentgate()
        .args(["audit", "verify", "--dir"])
        .arg(&log.dir)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    let out = log.tmp.path().join("evidence");
    let run = evidence(&log.dir, &out);
    assert!(run.status.success(), "{run:?}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("evidence.json")).unwrap()).unwrap();
    assert!(
        jsonschema::validator_for(&schema())
            .unwrap()
            .is_valid(&report)
    );
    assert_eq!(report["integrity"]["intact"], true);
    assert!(report["integrity"]["first_seq"].as_u64().unwrap() > 0);
    let gaps = report["integrity"]["gaps"]["items"].as_array().unwrap();
    assert!(gaps.iter().any(|g| g["kind"] == "retention"), "{gaps:#?}");
    assert!(
        report["unproven"].as_array().unwrap().is_empty(),
        "{}",
        report["unproven"]
    );
    let records = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    let line = records.lines().last().unwrap();
    let proof = log.tmp.path().join("proof.json");
    std::fs::write(&proof, line).unwrap();
    let check = agentgate()
        .args(["audit", "verify-proof"])
        .arg(&proof)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // `audit prove` shares the proof code: it proves records after retention too.
    let first = report["integrity"]["first_seq"].as_u64().unwrap();
    let prove = agentgate()
        .args(["audit", "prove", "--seq", &(first + 1).to_string(), "--dir"])
        .arg(&log.dir)
        .output()
        .unwrap();
    assert!(prove.status.success(), "{prove:?}");
    std::fs::write(&proof, &prove.stdout).unwrap();
    let check = agentgate()
        .args(["audit", "verify-proof"])
        .arg(&proof)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

/// `audit export --format ocsf`: one event per record the jsonl export gives,
/// SQL as Datastore Activity, the rest as API Activity, each naming its record.
#[test]
fn ocsf_export_has_one_event_per_record() {
    let log = build_log();
    let export = |format: &str| {
        let out = agentgate()
            .args([
                "audit",
                "export",
                "--format",
                format,
                "--identity",
                "contractor@bank",
                "--dir",
            ])
            .arg(&log.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let jsonl = export("jsonl");
    let ocsf = export("ocsf");
    assert_eq!(jsonl.lines().count(), ocsf.lines().count());
    for (raw, ev) in jsonl.lines().zip(ocsf.lines()) {
        let rec: Value = serde_json::from_str(raw).unwrap();
        let ev: Value = serde_json::from_str(ev).unwrap();
        assert_eq!(ev["metadata"]["uid"], rec["hash"]);
        assert_eq!(ev["metadata"]["sequence"], rec["seq"]);
        let class = ev["class_uid"].as_u64().unwrap();
        let sql = rec["action"]["sql"].is_string();
        assert_eq!(
            class,
            if sql || rec["action"]["protocol"] == "postgres" {
                6005
            } else {
                6003
            },
            "{ev}"
        );
        assert_eq!(
            ev["type_uid"].as_u64().unwrap(),
            class * 100 + ev["activity_id"].as_u64().unwrap()
        );
    }
    assert!(ocsf.contains("\"query_string\":\"DROP TABLE customers\""));
}
