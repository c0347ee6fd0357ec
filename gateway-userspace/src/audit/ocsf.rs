//! `audit export --format ocsf`: each record as one OCSF 1.3 event, so a SIEM
//! ingests the log without a custom parser.
//!
//! Mapping (the README's "Audit log" section documents it for SIEM teams):
//! - SQL (a record whose `action` carries `sql` or whose protocol is
//!   `postgres`) -> Datastore Activity (class 6005, category 6): statements by
//!   class (`read` -> Query, `write` -> Update, `ddl` -> Create, or Delete for
//!   a destructive statement, anything else -> Other), `connection.open` ->
//!   Connect; `query_info.query_string` is the statement as recorded (literals
//!   already redacted), `query_info.uid` its keyed hash.
//! - Everything else (HTTP, the control plane, approvals, containment,
//!   identity, daemon and log events) -> API Activity (class 6003): HTTP
//!   methods map to Create/Read/Update/Delete, other records to Other with
//!   `api.operation` = the record's kind.
//! - Both: `actor.user` (identity, its kind and groups), `actor.process`
//!   (pid, executable, redacted command line, uid), `device.hostname`,
//!   `dst_endpoint` (original destination), `disposition` (Allowed/Blocked,
//!   `security_control` profile), `status`, `metadata.uid` = the record hash and
//!   `metadata.sequence` = its seq, so every event points back to a record
//!   that `audit verify` and `audit prove` vouch for. Fields with no OCSF
//!   home (rule, approval, masking, result, cgroup, prev) go to
//!   `unmapped.agentgate`. Adds nothing the record does not hold (no values).
//!
//! The record's own line stays the evidence: OCSF output is a view for
//! correlation, not signed.

use serde_json::{Map, Value, json};

use super::record::{Kind, Record, parse_time};

/// OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.3.0";

const API_ACTIVITY: u64 = 6003;
const DATASTORE_ACTIVITY: u64 = 6005;

fn s<'a>(v: Option<&'a Value>, key: &str) -> Option<&'a str> {
    v?.get(key)?.as_str()
}

/// Whether a record is about SQL.
fn is_sql(rec: &Record) -> bool {
    let a = rec.action.as_ref();
    a.and_then(|a| a.get("sql")).is_some_and(|v| !v.is_null())
        || s(a, "protocol") == Some("postgres")
}

/// (class, activity id, activity name).
fn activity(rec: &Record) -> (u64, u64, &'static str) {
    let a = rec.action.as_ref();
    if is_sql(rec) {
        let (id, name) = match rec.kind {
            Kind::ConnectionOpen | Kind::SessionStart => (3, "Connect"),
            Kind::Statement | Kind::Decision | Kind::ApprovalRequested => {
                let destructive = a
                    .and_then(|a| a.get("destructive"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                match s(a, "class") {
                    Some("read") => (4, "Query"),
                    Some("write" | "ddl") if destructive => (7, "Delete"),
                    Some("write") => (2, "Update"),
                    Some("ddl") => (6, "Create"),
                    _ => (99, "Other"),
                }
            }
            _ => (99, "Other"),
        };
        return (DATASTORE_ACTIVITY, id, name);
    }
    let (id, name) = match s(a, "method").map(str::to_ascii_uppercase).as_deref() {
        Some("POST") => (1, "Create"),
        Some("GET" | "HEAD") => (2, "Read"),
        Some("PUT" | "PATCH") => (3, "Update"),
        Some("DELETE") => (4, "Delete"),
        _ => (99, "Other"),
    };
    (API_ACTIVITY, id, name)
}

/// One record as an OCSF event. `hash` is the record's hash (hex).
#[allow(clippy::too_many_lines)] // one block per OCSF object, in schema order
pub fn to_ocsf(rec: &Record, hash: &str) -> Value {
    let (class_uid, activity_id, activity_name) = activity(rec);
    let class_name = if class_uid == DATASTORE_ACTIVITY {
        "Datastore Activity"
    } else {
        "API Activity"
    };
    let verdict = s(rec.decision.as_ref(), "verdict");
    let denied = verdict == Some("deny");
    let failed = s(rec.result.as_ref(), "status").is_some_and(|st| st != "ok")
        || rec
            .result
            .as_ref()
            .and_then(|r| r.get("error"))
            .is_some_and(|e| !e.is_null());
    let (status_id, status) = if denied || failed {
        (2, "Failure")
    } else if rec.decision.is_some() || rec.result.is_some() {
        (1, "Success")
    } else {
        (0, "Unknown")
    };
    let mut ev = Map::new();
    ev.insert("category_uid".into(), json!(6));
    ev.insert("category_name".into(), json!("Application Activity"));
    ev.insert("class_uid".into(), json!(class_uid));
    ev.insert("class_name".into(), json!(class_name));
    ev.insert("activity_id".into(), json!(activity_id));
    ev.insert("activity_name".into(), json!(activity_name));
    ev.insert("type_uid".into(), json!(class_uid * 100 + activity_id));
    ev.insert(
        "type_name".into(),
        json!(format!("{class_name}: {activity_name}")),
    );
    ev.insert(
        "time".into(),
        json!(parse_time(&rec.time).map_or(0, |t| t.unix_timestamp_nanos() / 1_000_000)),
    );
    ev.insert("severity_id".into(), json!(if denied { 3 } else { 1 }));
    ev.insert(
        "severity".into(),
        json!(if denied { "Medium" } else { "Informational" }),
    );
    ev.insert("status_id".into(), json!(status_id));
    ev.insert("status".into(), json!(status));
    if let Some(v) = verdict {
        let (id, name) = match v {
            "allow" => (1, "Allowed"),
            "deny" => (2, "Blocked"),
            _ => (99, "Other"),
        };
        ev.insert("disposition_id".into(), json!(id));
        ev.insert("disposition".into(), json!(name));
    }
    ev.insert(
        "message".into(),
        json!(format!(
            "{}{}{}",
            rec.kind,
            rec.resource
                .as_deref()
                .map(|r| format!(" on {r}"))
                .unwrap_or_default(),
            verdict.map(|v| format!(": {v}")).unwrap_or_default()
        )),
    );
    ev.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": {"name": "agentgate", "vendor_name": "agentgate", "version": env!("CARGO_PKG_VERSION")},
            "profiles": ["security_control", "host"],
            "log_name": "agentgate-audit",
            "uid": hash,
            "sequence": rec.seq,
            "original_time": rec.time,
            "correlation_uid": rec.session_id,
        }),
    );
    let mut actor = Map::new();
    if let Some(i) = &rec.identity {
        let groups: Vec<Value> = i.groups.iter().map(|g| json!({"name": g})).collect();
        actor.insert(
            "user".into(),
            json!({"name": i.subject, "type": i.kind, "groups": groups}),
        );
    }
    if let Some(w) = &rec.workload {
        let name = w
            .exe
            .as_deref()
            .and_then(|e| e.rsplit('/').next())
            .unwrap_or("");
        actor.insert(
            "process".into(),
            json!({"pid": w.pid, "cmd_line": w.cmdline, "file": {"path": w.exe, "name": name, "type_id": 1}, "user": {"uid": w.uid.to_string()}}),
        );
    }
    ev.insert("actor".into(), Value::Object(actor));
    ev.insert(
        "device".into(),
        json!({"hostname": rec.host, "type_id": 1, "type": "Server"}),
    );
    ev.insert("src_endpoint".into(), json!({"hostname": rec.host}));
    if let Some(dst) = s(rec.action.as_ref(), "destination") {
        let (ip, port) = dst
            .rsplit_once(':')
            .map_or((dst, None), |(h, p)| (h, p.parse::<u16>().ok()));
        ev.insert(
            "dst_endpoint".into(),
            json!({"ip": ip.trim_start_matches('[').trim_end_matches(']'), "port": port, "svc_name": rec.resource}),
        );
    }
    let a = rec.action.as_ref();
    if class_uid == DATASTORE_ACTIVITY {
        ev.insert("type_id".into(), json!(1));
        ev.insert(
            "database".into(),
            json!({"name": s(a, "database").or(rec.resource.as_deref()), "type_id": 1, "type": "Relational"}),
        );
        if let Some(t) = a
            .and_then(|a| a.get("tables"))
            .and_then(Value::as_array)
            .and_then(|t| t.first())
            .and_then(Value::as_str)
        {
            ev.insert("table".into(), json!({"name": t}));
        }
        if let Some(sql) = s(a, "sql") {
            ev.insert(
                "query_info".into(),
                json!({"query_string": sql, "uid": s(a, "sql_hash")}),
            );
        }
    } else {
        ev.insert(
            "api".into(),
            json!({
                "operation": s(a, "method").map_or_else(|| rec.kind.as_str().to_owned(), str::to_owned),
                "service": {"name": rec.resource},
                "request": {"uid": rec.session_id},
            }),
        );
        if let Some(path) = s(a, "path") {
            ev.insert(
                "http_request".into(),
                json!({"http_method": s(a, "method"), "url": {"path": path}}),
            );
        }
    }
    ev.insert(
        "unmapped".into(),
        json!({"agentgate": {
            "kind": rec.kind,
            "connection_id": rec.connection_id,
            "cgroup": rec.workload.as_ref().and_then(|w| w.cgroup.clone()),
            "action": rec.action,
            "decision": rec.decision,
            "approval": rec.approval,
            "transform": rec.transform,
            "result": rec.result,
            "prev": rec.prev,
        }}),
    );
    Value::Object(ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{IdentityRef, Workload};

    fn rec(kind: Kind, action: Value) -> Record {
        Record {
            v: 1,
            seq: 7,
            time: "2026-01-01T00:00:01.500000000Z".into(),
            host: "gw".into(),
            kind,
            session_id: Some("conn-1".into()),
            connection_id: Some(1),
            identity: Some(IdentityRef {
                subject: "ann".into(),
                kind: "human".into(),
                groups: vec!["dba".into()],
            }),
            workload: Some(Workload {
                pid: 9,
                exe: Some("/usr/bin/psql".into()),
                cmdline: Some("psql -c <redacted: 8 bytes>".into()),
                uid: 1000,
                cgroup: Some("/a".into()),
            }),
            resource: Some("db".into()),
            action: Some(action),
            decision: Some(json!({"verdict": "deny", "rule": "r"})),
            transform: None,
            approval: None,
            result: None,
            prev: "00".into(),
        }
    }

    #[test]
    fn sql_is_datastore_activity_with_the_redacted_statement() {
        let r = rec(
            Kind::Statement,
            json!({"class": "ddl", "destructive": true, "sql": "DROP TABLE t", "sql_hash": "k", "tables": ["t"], "database": "prod"}),
        );
        let e = to_ocsf(&r, "abc");
        assert_eq!(e["class_uid"], 6005);
        assert_eq!(e["activity_id"], 7);
        assert_eq!(e["type_uid"], 600_507);
        assert_eq!(e["time"], 1_767_225_601_500_i64);
        assert_eq!(e["query_info"]["query_string"], "DROP TABLE t");
        assert_eq!(e["database"]["name"], "prod");
        assert_eq!(e["disposition"], "Blocked");
        assert_eq!(e["status"], "Failure");
        assert_eq!(e["actor"]["user"]["name"], "ann");
        assert_eq!(e["actor"]["process"]["file"]["name"], "psql");
        assert_eq!(e["metadata"]["uid"], "abc");
        assert_eq!(e["metadata"]["sequence"], 7);
        assert_eq!(e["unmapped"]["agentgate"]["decision"]["rule"], "r");
    }

    #[test]
    fn other_records_are_api_activity() {
        let e = to_ocsf(
            &rec(Kind::ControlRefused, json!({"request": "status"})),
            "h",
        );
        assert_eq!(e["class_uid"], 6003);
        assert_eq!(e["activity_id"], 99);
        assert_eq!(e["api"]["operation"], "control.refused");
        let get = to_ocsf(
            &rec(
                Kind::Statement,
                json!({"method": "get", "path": "/v1/models", "destination": "10.0.0.1:443"}),
            ),
            "h",
        );
        assert_eq!(get["activity_id"], 2);
        assert_eq!(get["http_request"]["url"]["path"], "/v1/models");
        assert_eq!(get["dst_endpoint"]["port"], 443);
    }
}
