//! Issue 17's scenario end to end: a real agent on the `OpenAI` Agents SDK
//! (`openai-agents` from `PyPI`, tests/agent/agent.py) runs under
//! `agentgate exec --identity contractor@bank`, an identity verified by the test
//! `OpenID` provider (npm `oidc-provider`, logged in with `agentgate login` through
//! the provider's device-flow pages). Its model is a scripted OpenAI-compatible
//! stub on loopback, reached through the gateway; its tool queries a real
//! `PostgreSQL` with psycopg. Then `agentgate evidence` must tell exactly that
//! story, `audit verify` must pass, and one changed byte must be reported at the
//! top of the report. The report is opened in headless Chromium (playwright-core).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    agent::{self, lines_of, next_request, utc},
    pg::PgServer,
    run_ok,
};
use serde_json::Value;

const OIDC_PORT: u16 = 18080;
const STUB_PORT: u16 = 18400;
const AGENT: &str = "contractor@bank";
const REJECT_REASON: &str = "dropping customers is not in the change plan (CHG-1042)";

fn repo_tests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn oidc_dir() -> PathBuf {
    repo_tests().join("oidc")
}

/// Reads and writes go to the contractor; writes and DDL wait for an approver
/// in `approvers`; the model stub is a resource the contractor may connect to.
fn policy() -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "customers-db"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
default_action = "deny"

[[resource]]
name = "model-stub"
protocol = "tcp"
addresses = ["127.0.0.1:{STUB_PORT}"]
default_action = "deny"

[[rule]]
name = "contractor-reads"
identities = ["{AGENT}"]
resources = ["customers-db"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}

[[rule]]
name = "contractor-changes-need-approval"
identities = ["{AGENT}"]
resources = ["customers-db"]
action = "require_approval"
match = {{ sql = ["write", "ddl"] }}
approval = {{ approver_groups = ["approvers"], timeout = "60s" }}

[[rule]]
name = "contractor-may-use-the-model"
identities = ["{AGENT}"]
resources = ["model-stub"]
action = "allow"

[masking]
detectors = ["all"]

[[masking.column]]
columns = ["customers.ssn", "customers.card"]
strategy = "keep_last4"

[[masking.column]]
columns = ["customers.email"]
strategy = "redact"
"#
    )
}

/// Opens `index.html` in headless Chromium (tests/oidc/screenshot.mjs), saves a
/// PNG next to it, returns what the page showed.
fn screenshot(index: &Path) -> (Value, PathBuf) {
    let png = index.with_file_name("report.png");
    let out = Command::new("node")
        .arg(oidc_dir().join("screenshot.mjs"))
        .arg(index)
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "screenshot failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    (seen, png)
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, told in order
fn a_real_agent_run_is_told_by_the_evidence_package() {
    let started = Instant::now();
    agent::python();
    assert!(
        oidc_dir().join("node_modules/playwright-core").is_dir(),
        "tests/oidc/node_modules is incomplete: run `cargo xtask setup`"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "no /usr/bin/chromium: run `cargo xtask setup`"
    );
    let extra = format!(
        "\n[identity]\nissuer = \"http://127.0.0.1:{OIDC_PORT}\"\nclient_id = \"agentgate-cli\"\n"
    );
    let mut env = Env::prepare(
        "agentev",
        DaemonOptions {
            extra,
            policies: vec![("agent.toml".into(), policy())],
            // Signed checkpoints every second: the package's proofs need one.
            audit_extra: "checkpoint_every_secs = 1".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    let raw: Vec<String> = pg
        .admin_sql("SELECT email, ssn FROM customers WHERE id <= 3")
        .unwrap()
        .lines()
        .flat_map(|l| l.split('|').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert_eq!(raw.len(), 6);

    let mut c = env.netns.command("node");
    c.arg("provider.mjs")
        .current_dir(oidc_dir())
        .env("OIDC_PORT", OIDC_PORT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut provider = Proc::spawn("oidc-provider", c).unwrap();
    assert!(provider.read_line().unwrap().contains("issuer"));

    let transcript = env.state.join("model-transcript.jsonl");
    let stub = agent::model_stub(&env, STUB_PORT, &transcript, None);

    env.start_daemon().unwrap();
    let from = utc(-2);
    env.login(AGENT);
    env.login("bob");

    // The agent, as an ordinary user, tagged as the verified contractor.
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let mut agent = agent::spawn_agent(&env, "nobody", AGENT, STUB_PORT, &url);

    // The DROP is held; bob rejects it with a reason.
    let drop_req = next_request(&env, &mut agent);
    assert_eq!(drop_req["requester"]["identity"], AGENT, "{drop_req}");
    assert!(
        drop_req["summary"].as_str().unwrap().contains("DROP TABLE"),
        "{drop_req}"
    );
    let drop_id = drop_req["id"].as_str().unwrap().to_owned();
    run_ok(&mut env.agentgate(&[
        "approvals",
        "reject",
        &drop_id,
        "--as",
        "bob",
        "--reason",
        REJECT_REASON,
    ]))
    .unwrap();
    // The UPDATE is held; bob approves it.
    let update = next_request(&env, &mut agent);
    assert!(
        update["summary"].as_str().unwrap().contains("UPDATE"),
        "{update}"
    );
    let update_id = update["id"].as_str().unwrap().to_owned();
    assert_ne!(update_id, drop_id);
    run_ok(&mut env.agentgate(&["approvals", "approve", &update_id, "--as", "bob"])).unwrap();

    let out = agent::wait_agent(&mut agent, Duration::from_mins(1));
    let (stdout, stderr) = (out.0.clone(), out.1.clone());
    assert!(out.2, "the agent failed:\n{stdout}\n{stderr}");
    // The exec cgroup is released once the agent is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !env
        .audit_records()
        .unwrap()
        .iter()
        .any(|r| r["kind"] == "identity.unbind")
    {
        assert!(
            Instant::now() < deadline,
            "the exec cgroup was never unbound"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let to = utc(2);

    // What the agent's tool saw, call by call.
    let calls: Vec<Value> = lines_of(&stdout)
        .into_iter()
        .filter(|v| v["tool"] == "query")
        .collect();
    assert_eq!(calls.len(), 3, "{stdout}\n{stderr}");
    let rows = calls[0]["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{}", calls[0]);
    assert_eq!(rows[0]["ssn"], "***-**-1001", "{}", calls[0]);
    assert_eq!(rows[0]["card"], "************1111", "{}", calls[0]);
    assert!(
        rows[0]["email"].as_str().unwrap().contains("REDACTED"),
        "{}",
        calls[0]
    );
    assert_eq!(calls[1]["ok"], false, "{}", calls[1]);
    assert_eq!(calls[1]["sqlstate"], "42501", "{}", calls[1]);
    assert!(
        calls[1]["error"].as_str().unwrap().contains(REJECT_REASON),
        "{}",
        calls[1]
    );
    assert_eq!(calls[2]["ok"], true, "{}", calls[2]);
    assert_eq!(calls[2]["status"], "UPDATE 1", "{}", calls[2]);
    assert!(lines_of(&stdout).iter().any(|v| v.get("final").is_some()));
    // The database agrees: the table is there, customer 2 was credited.
    assert_eq!(
        pg.admin_sql("SELECT balance FROM customers WHERE id = 2")
            .unwrap()
            .trim(),
        "121.0"
    );
    // The model saw only masked values.
    let model_saw = fs::read_to_string(&transcript).unwrap();
    assert_eq!(model_saw.lines().count(), 4, "{model_saw}");
    for value in &raw {
        assert!(
            !model_saw.contains(value.as_str()),
            "raw value reached the model"
        );
        assert!(
            !stdout.contains(value.as_str()),
            "raw value reached the agent"
        );
    }

    // The model traffic went through the gateway, attributed to the contractor.
    let records = env.audit_records().unwrap();
    let to_model: Vec<&Value> = records
        .iter()
        .filter(|r| r["resource"] == "model-stub")
        .collect();
    assert!(
        to_model.iter().any(|r| r["identity"]["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{AGENT} (http://127.0.0.1:{OIDC_PORT}#")))
            && r["identity"]["kind"] == "human"),
        "no connection record names the model stub: {to_model:?}"
    );

    // The evidence package.
    let pkg = env.state.join("evidence");
    let run = agent::evidence(&env, AGENT, &from, &to, &pkg);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value =
        serde_json::from_slice(&fs::read(pkg.join("evidence.json")).unwrap()).unwrap();
    let att = &report["attestations"][0];
    assert_eq!(att["identity"], AGENT);
    let answers: Vec<&str> = att["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["answer"].as_str().unwrap())
        .collect();
    // No protected value unmasked, nothing unauthorized, no gap, the gateway in
    // force; the contractor's sign-in is still held by the daemon at the end.
    assert_eq!(answers, ["no", "no", "no", "yes", "yes"], "{att:#}");
    assert!(
        att["answers"][4]["records"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["kind"] == "identity.login"),
        "{att:#}"
    );
    // Q3's "no" rests on the integrity section (verify result, signed
    // checkpoints); every other answer links the records behind it.
    assert!(report["integrity"]["checkpoints"].as_u64().unwrap() >= 1);
    assert_eq!(report["integrity"]["intact"], true);
    for a in att["answers"].as_array().unwrap() {
        if a["id"] == "q3" {
            continue;
        }
        assert!(
            !a["records"]["items"].as_array().unwrap().is_empty(),
            "an answer without records: {a:#}"
        );
    }
    let m = &report["masking"];
    assert!(m["values_masked"].as_u64().unwrap() >= 9, "{m:#}");
    assert_eq!(m["columns_unmasked"], 0, "{m:#}");
    for field in ["ssn", "card", "email"] {
        assert!(
            m["fields"]
                .as_object()
                .unwrap()
                .keys()
                .any(|k| k.contains(field)),
            "{field} not counted: {m:#}"
        );
    }
    let identity = report["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.to_string().contains(AGENT))
        .expect("the contractor's identity");
    assert!(
        identity.to_string().contains("127.0.0.1:18080"),
        "verified by the provider: {identity:#}"
    );
    let approvals = report["approvals"]["items"].as_array().unwrap();
    let by_id = |id: &str| {
        approvals
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {approvals:#?}"))
    };
    let dropped = by_id(&drop_id);
    assert_eq!(dropped["outcome"], "denied", "{dropped:#}");
    assert_eq!(dropped["approvers"][0], "bob", "{dropped:#}");
    assert_eq!(dropped["reasons"][0], REJECT_REASON, "{dropped:#}");
    assert!(
        dropped["summary"]
            .as_str()
            .unwrap()
            .contains("DROP TABLE customers")
    );
    // bob as the daemon verified him: OIDC issuer and subject, human, via the CLI.
    let verified_bob = format!("bob (http://127.0.0.1:{OIDC_PORT}#bob) [human, via cli]");
    for a in [dropped, by_id(&update_id)] {
        assert!(
            a["votes"][0].as_str().unwrap().contains(&verified_bob),
            "{a:#}"
        );
    }
    let updated = by_id(&update_id);
    assert_eq!(updated["outcome"], "granted", "{updated:#}");
    assert_eq!(updated["approvers"][0], "bob", "{updated:#}");
    assert_eq!(updated["uses"], 1, "{updated:#}");
    assert!(
        report["resources"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "model-stub"),
        "the model stub is a resource accessed"
    );
    let html = fs::read_to_string(pkg.join("index.html")).unwrap();
    assert!(html.contains(REJECT_REASON));

    // The page as an examiner opens it.
    let (seen, png) = screenshot(&pkg.join("index.html"));
    assert!(seen["heading"].as_str().unwrap().contains(AGENT), "{seen}");
    assert_eq!(seen["banner_bad"], false, "{seen}");
    assert_eq!(
        seen["attestation"][0][1],
        serde_json::json!(answers.iter().map(|a| a.to_uppercase()).collect::<Vec<_>>()),
        "{seen}"
    );
    for s in ["attestation", "masking", "approvals", "timeline"] {
        assert!(
            seen["sections"].as_array().unwrap().iter().any(|x| x == s),
            "{seen}"
        );
    }
    assert_eq!(seen["svg"], 1, "the timeline is drawn: {seen}");
    let png_bytes = fs::read(&png).unwrap();
    assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png_bytes.len() > 30_000,
        "a near-empty page: {} bytes",
        png_bytes.len()
    );
    if let Ok(dest) = std::env::var("AGENTGATE_SAVE_SCREENSHOT") {
        fs::copy(&png, dest).unwrap();
    }

    let audit_dir = env.state.join("audit").display().to_string();
    run_ok(&mut env.agentgate(&["audit", "verify", "--dir", &audit_dir])).unwrap();

    // One byte of a segment changed: verify fails, the report says which record.
    env.kill_daemon();
    let (segment, line_start, line) = find_line(&env.state.join("audit"), b"DROP TABLE");
    let seq = serde_json::from_slice::<Value>(&line).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let pos = line_start + line.windows(10).position(|w| w == b"DROP TABLE").unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    bytes[pos] = b'd';
    fs::write(&segment, bytes).unwrap();
    let verify = env
        .agentgate(&["audit", "verify", "--dir", &audit_dir])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1), "{verify:?}");
    let tampered = env.state.join("evidence-tampered");
    let run = agent::evidence(&env, AGENT, &from, &to, &tampered);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let html = fs::read_to_string(tampered.join("index.html")).unwrap();
    let banner = html.find("id=not-intact").expect("a red banner");
    let attestation = html.find("id=attestation").unwrap();
    assert!(banner < attestation, "the failure is not at the top");
    assert!(
        html[banner..attestation].contains(&format!("seq {seq} ")),
        "{}",
        &html[banner..attestation]
    );
    let (seen, _) = screenshot(&tampered.join("index.html"));
    assert_eq!(seen["banner_bad"], true, "{seen}");
    assert!(
        seen["banner"]
            .as_str()
            .unwrap()
            .contains(&format!("seq {seq} ")),
        "{seen}"
    );
    drop(stub);
    drop(provider);
    eprintln!("scenario took {:.1} s", started.elapsed().as_secs_f64());
}

/// The first line of the log containing `needle`: its segment, its offset there, its bytes.
fn find_line(dir: &Path, needle: &[u8]) -> (PathBuf, usize, Vec<u8>) {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    segments.sort();
    for s in segments {
        let bytes = fs::read(&s).unwrap();
        let mut start = 0;
        for line in bytes.split(|b| *b == b'\n') {
            if line.windows(needle.len()).any(|w| w == needle) {
                return (s, start, line.to_vec());
            }
            start += line.len() + 1;
        }
    }
    panic!("no line with {needle:?}");
}
