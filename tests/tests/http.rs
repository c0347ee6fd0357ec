//! The HTTP handler end to end: real clients (curl, Python requests, Node
//! fetch, the `openai` SDK) run tagged under `agentgate exec`, which makes
//! them trust the local CA; real HTTPS servers (Python's http.server behind
//! TLS with a test CA made by openssl) log every request they receive, so a
//! test proves what never arrived. One daemon for the whole file.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use agentgate_e2e::{DaemonOptions, Env, Proc, run_ok, scripts_dir};
use serde_json::Value;

const SSN: &str = "123-45-6789";
/// A value no detector knows: only the `[[masking.json]]` rule protects it.
const PASSPORT: &str = "X93P0417";
/// A value only the policy's protected values file names (keyed fingerprints).
const ACCOUNT: &str = "ACCT-99417-BRAVO";

struct World {
    env: Env,
    /// The API (resource `api`): its port and request log.
    api: u16,
    api_log: PathBuf,
    /// An upstream whose certificate no anchor of the resource trusts.
    bad: u16,
    /// A pinned client's upstream (`intercept = false`).
    pinned: u16,
    /// The model stubs: masking DLP, and refusing DLP.
    model: u16,
    model_log: PathBuf,
    model_refuse: u16,
    model_refuse_log: PathBuf,
    certs: PathBuf,
    /// The WebSocket echo upstream (resource `ws`) and its log.
    ws: u16,
    ws_log: PathBuf,
    _procs: Vec<Proc>,
}

// The daemon and servers live for the whole file; tests run one at a time
// on it (the harness may run them in parallel: the lock serialises them).
static WORLD: OnceLock<std::sync::Mutex<World>> = OnceLock::new();

fn sh(cmd: &str) {
    run_ok(Command::new("sh").arg("-c").arg(cmd)).unwrap();
}

/// A test CA and two server certificates (upstream.test and 127.0.0.1), and
/// an unrelated self-signed one.
fn make_certs(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "cd {d} && \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=upstream-test-ca 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=upstream.test 2>/dev/null && \
         printf 'subjectAltName=DNS:upstream.test,DNS:model.test,IP:127.0.0.1\\n' > san.ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile san.ext 2>/dev/null && \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout bad.key -out bad.pem -days 2 -subj /CN=upstream.test -addext subjectAltName=DNS:upstream.test 2>/dev/null"
    ));
}

#[allow(clippy::too_many_lines)] // the policy text, one resource and rule after another
fn policy(certs: &Path, [api, bad, pinned, model, model_refuse, ws]: [u16; 6]) -> String {
    let ca = certs.join("ca.pem");
    let ca = ca.display();
    let protected = certs.join("protected-values.txt");
    fs::write(
        &protected,
        format!("# accounts under legal hold\n{ACCOUNT}\n"),
    )
    .unwrap();
    let protected = protected.display();
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "api"
protocol = "https"
addresses = ["127.0.0.1:{api}"]
default_action = "deny"
tls = {{ ca_file = "{ca}" }}

[[resource]]
name = "bad-upstream"
protocol = "https"
addresses = ["127.0.0.1:{bad}"]
default_action = "allow"
tls = {{ ca_file = "{ca}" }}

[[resource]]
name = "pinned"
protocol = "https"
addresses = ["127.0.0.1:{pinned}"]
default_action = "allow"
intercept = false

[[resource]]
name = "model"
protocol = "https"
addresses = ["127.0.0.1:{model}"]
default_action = "allow"
profile = "openai"
tls = {{ ca_file = "{ca}" }}

[[resource]]
name = "model-strict"
protocol = "https"
addresses = ["127.0.0.1:{model_refuse}"]
default_action = "allow"
profile = "openai"
prompt_dlp = "refuse"
tls = {{ ca_file = "{ca}" }}

[[resource]]
name = "ws"
protocol = "https"
addresses = ["127.0.0.1:{ws}"]
default_action = "deny"
tls = {{ ca_file = "{ca}" }}

[[rule]]
name = "ws-echo"
identities = ["demo"]
resources = ["ws"]
action = "allow"
match = {{ http_methods = ["WEBSOCKET"], http_paths = ["/echo"] }}

[[rule]]
name = "ws-pages"
identities = ["demo"]
resources = ["ws"]
action = "allow"
match = {{ http_methods = ["GET"] }}

[[rule]]
name = "api-reads"
identities = ["demo"]
resources = ["api"]
action = "allow"
match = {{ http_methods = ["GET"] }}

[[rule]]
name = "api-updates"
identities = ["demo"]
resources = ["api"]
action = "allow"
match = {{ http_methods = ["PUT"] }}

[[rule]]
name = "api-orders-need-approval"
identities = ["demo"]
resources = ["api"]
action = "require_approval"
match = {{ http_methods = ["POST"], http_paths = ["/orders*"] }}
approval = {{ approver_groups = ["approvers"], timeout = "3s" }}

[[rule]]
name = "api-payments"
identities = ["demo"]
resources = ["api"]
action = "allow"
match = {{ http_methods = ["POST"], http_paths = ["/payments"] }}

[[rule]]
name = "api-big-payments-held"
identities = ["demo"]
resources = ["api"]
action = "require_approval"
match = {{ http_methods = ["POST"], http_paths = ["/payments"], http_json = ["$.amount > 10000", "$.force == true"] }}
approval = {{ approver_groups = ["approvers"], timeout = "30s" }}

[[rule]]
name = "api-no-forced-reads"
identities = ["demo"]
resources = ["api"]
action = "deny"
match = {{ http_methods = ["GET"], http_query = ["force == true"] }}

[[rule]]
name = "api-no-deletes"
identities = ["demo"]
resources = ["api"]
action = "deny"
match = {{ http_methods = ["DELETE"] }}

[masking]
detectors = ["all"]
detector_resources = ["api", "model", "model-strict"]
protected_values_file = "{protected}"

[[masking.json]]
paths = ["$.customers[*].passport"]
strategy = "keep_last4"
resources = ["api"]
"#
    )
}

fn start_upstream(env: &Env, certs: &Path, cert: &str, log: &Path) -> (Proc, u16) {
    let mut c = env.netns.command("python3");
    c.arg(scripts_dir().join("https_upstream.py"))
        .arg("--cert")
        .arg(certs.join(format!("{cert}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{cert}.key")))
        .arg("--log")
        .arg(log)
        .stdout(Stdio::piped());
    let mut p = Proc::spawn("https upstream", c).unwrap();
    let port = p.read_line().unwrap().trim().parse().unwrap();
    (p, port)
}

fn start_model(env: &Env, certs: &Path, log: &Path) -> (Proc, u16) {
    let stub = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/model_stub.py");
    let mut c = env.netns.command("python3");
    c.arg(stub)
        .arg("--port")
        .arg("0")
        .arg("--transcript")
        .arg(log)
        .arg("--tls-cert")
        .arg(certs.join("srv.pem"))
        .arg("--tls-key")
        .arg(certs.join("srv.key"))
        .stdout(Stdio::piped());
    let mut p = Proc::spawn("model stub", c).unwrap();
    let port = p.read_line().unwrap().trim().parse().unwrap();
    (p, port)
}

fn world() -> std::sync::MutexGuard<'static, World> {
    let w = WORLD.get_or_init(|| {
        let mut env = Env::prepare(
            "http",
            DaemonOptions {
                extra: "\n[proxy.http]\nheader_timeout_secs = 2\nmax_inspect_bytes = 65536\n\n[approvals]\nallow_labels = true\n".into(),
                labels: vec![("alice".into(), vec!["approvers".into()])],
                policies: Vec::new(),
                ..DaemonOptions::default()
            },
        )
        .unwrap();
        let certs = env.state.join("certs");
        fs::create_dir_all(&certs).unwrap();
        make_certs(&certs);
        let api_log = env.state.join("api.log");
        let (p1, api) = start_upstream(&env, &certs, "srv", &api_log);
        let (p2, bad) = start_upstream(&env, &certs, "bad", &env.state.join("bad.log"));
        let (p3, pinned) = start_upstream(&env, &certs, "srv", &env.state.join("pinned.log"));
        let model_log = env.state.join("model.jsonl");
        let (p4, model) = start_model(&env, &certs, &model_log);
        let model_refuse_log = env.state.join("model-refuse.jsonl");
        let (p5, model_refuse) = start_model(&env, &certs, &model_refuse_log);
        let ws_log = env.state.join("ws.log");
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/.venv/bin/python");
        assert!(
            venv.exists(),
            "tests/agent/.venv is missing: run `cargo xtask setup`"
        );
        let mut c = env.netns.command(venv);
        c.arg(scripts_dir().join("ws_echo.py"))
            .arg("--cert")
            .arg(certs.join("srv.pem"))
            .arg("--key")
            .arg(certs.join("srv.key"))
            .arg("--log")
            .arg(&ws_log)
            .stdout(Stdio::piped());
        let mut p6 = Proc::spawn("websocket echo", c).unwrap();
        let ws = p6.read_line().unwrap().trim().parse().unwrap();
        fs::write(
            env.state.join("policy/http.toml"),
            policy(&certs, [api, bad, pinned, model, model_refuse, ws]),
        )
        .unwrap();
        env.start_daemon().unwrap();
        std::sync::Mutex::new(World {
            env,
            api,
            api_log,
            bad,
            pinned,
            model,
            model_log,
            model_refuse,
            model_refuse_log,
            certs,
            ws,
            ws_log,
            _procs: vec![p1, p2, p3, p4, p5, p6],
        })
    });
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// curl, tagged, resolving the test names to loopback.
fn curl(w: &World, args: &[&str]) -> Output {
    let mut c = vec![
        "curl".to_owned(),
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "--resolve".into(),
        format!("upstream.test:{}:127.0.0.1", w.api),
        "--resolve".into(),
        format!("upstream.test:{}:127.0.0.1", w.bad),
        "--resolve".into(),
        format!("upstream.test:{}:127.0.0.1", w.pinned),
    ];
    c.extend(args.iter().map(|s| (*s).to_owned()));
    let words: Vec<&str> = c.iter().map(String::as_str).collect();
    w.env.exec("demo", &words).output().unwrap()
}

fn api_log(w: &World) -> String {
    fs::read_to_string(&w.api_log).unwrap_or_default()
}

fn records(w: &World) -> Vec<Value> {
    w.env.audit_records().unwrap()
}

fn url(w: &World, path: &str) -> String {
    format!("https://upstream.test:{}{path}", w.api)
}

#[test]
#[allow(clippy::too_many_lines)] // every body shape against one world, checked as a user would
fn reads_are_masked_in_every_shape_and_the_chain_is_the_agentgate_ca() {
    let w = world();
    // Plain JSON with Content-Length; curl trusts the gateway through CURL_CA_BUNDLE.
    let out = curl(&w, &["-v", &url(&w, "/customers")]);
    let (body, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{err}");
    assert!(!body.contains(SSN) && !body.contains("4111 1111"), "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["customers"][0]["name"], "Ada", "other fields untouched");
    assert_eq!(
        v["customers"][0]["passport"], "****0417",
        "the JSON path rule's field, kept last 4"
    );
    assert!(
        err.contains("issuer: O=agentgate; CN=agentgate local CA"),
        "{err}"
    );
    let len_line = err
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("< content-length"))
        .unwrap();
    assert!(
        len_line.ends_with(&body.len().to_string()),
        "Content-Length recomputed: {len_line} vs {}",
        body.len()
    );
    // gzip (decoded, masked, encoded again) and chunked, through Python requests.
    let script = format!(
        "import requests, json\n\
         r = requests.get({gz:?}, headers={{'Accept-Encoding': 'gzip'}}, timeout=20)\n\
         c = requests.get({ch:?}, timeout=20)\n\
         print(json.dumps({{'gz_enc': r.headers.get('Content-Encoding'), 'gz': r.text, 'ch': c.text, 'status': [r.status_code, c.status_code]}}))\n",
        gz = url(&w, "/customers?gzip=1"),
        ch = url(&w, "/customers/chunked"),
    );
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/.venv/bin/python");
    assert!(
        venv.exists(),
        "tests/agent/.venv is missing: run `cargo xtask setup`"
    );
    let mut cmd = w.env.exec("demo", &[venv.to_str().unwrap(), "-c", &script]);
    cmd.env("PYTHONPATH", "");
    let out = run_with_hosts(&w, &cmd);
    let v: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["status"], serde_json::json!([200, 200]));
    assert_eq!(
        v["gz_enc"], "gzip",
        "re-encoded in the coding the upstream chose"
    );
    for k in ["gz", "ch"] {
        let b = v[k].as_str().unwrap();
        assert!(
            b.contains("Ada") && !b.contains(SSN) && !b.contains(PASSPORT),
            "{k}: {b}"
        );
        assert!(b.contains("****7781"), "{k}: {b}");
    }
    // br and zstd: decoded, masked, encoded again (curl decodes them itself).
    for enc in ["br", "zstd"] {
        let out = curl(
            &w,
            &[
                "--compressed",
                "-D",
                "-",
                &url(&w, &format!("/customers?enc={enc}")),
            ],
        );
        let t = text(&out.stdout);
        assert!(
            t.to_ascii_lowercase()
                .contains(&format!("content-encoding: {enc}")),
            "{enc} kept: {t}"
        );
        assert!(
            t.contains("Ada")
                && t.contains("****0417")
                && !t.contains(SSN)
                && !t.contains(PASSPORT),
            "{enc}: {t}"
        );
    }
    // A coding the handler cannot read is refused by rule (502), not passed silently.
    let out = curl(
        &w,
        &[
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            &url(&w, "/customers?enc=x-unknown"),
        ],
    );
    assert_eq!(text(&out.stdout), "502");
    // Server-sent events, streamed.
    let out = curl(&w, &["-N", &url(&w, "/stream")]);
    let body = text(&out.stdout);
    assert!(
        body.contains("data: [DONE]") && !body.contains(SSN),
        "{body}"
    );
    // A binary body cannot be inspected while masking applies: refused (502), recorded.
    let out = curl(
        &w,
        &["-w", "%{http_code}", "-o", "/dev/null", &url(&w, "/image")],
    );
    assert_eq!(text(&out.stdout), "502");
    // The records: masked counts and paths, never the value.
    let recs = records(&w);
    let all = serde_json::to_string(&recs).unwrap();
    assert!(
        !all.contains(SSN) && !all.contains(PASSPORT),
        "no raw protected value in the log"
    );
    let by_rule: Vec<&Value> = recs
        .iter()
        .filter(|r| r["transform"]["json_rules"]["$.customers[*].passport"] == 2)
        .collect();
    assert!(
        by_rule.len() >= 5,
        "plain, gzip, chunked, br and zstd each name the rule and count: {by_rule:#?}"
    );
    assert!(
        recs.iter().any(|r| r["transform"]["uninspectable"]
            .as_str()
            .is_some_and(|u| u.contains("x-unknown"))
            && r["transform"]["passed"] == false),
        "the unreadable coding is recorded as refused"
    );
    assert!(all.contains("$.customers[1].passport"));
    let masked: Vec<&Value> = recs
        .iter()
        .filter(|r| r["transform"]["masked"]["us_ssn"].as_u64().is_some())
        .collect();
    assert!(masked.len() >= 4, "{masked:#?}");
    assert!(
        all.contains("$.customers[0].ssn"),
        "the JSON path of the masked field is recorded"
    );
}

/// Runs a tagged command with /etc/hosts-free name resolution: Python and
/// Node take the name from the URL, so the names map through a hosts file
/// bind-mounted for the command.
fn run_with_hosts(w: &World, cmd: &Command) -> Output {
    let hosts = w.env.state.join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost upstream.test model.test\n").unwrap();
    // unshare a mount namespace just for this command, with our hosts file.
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    let mut c = Command::new("unshare");
    c.arg("--mount").arg("sh").arg("-c").arg(format!(
        "mount --bind {} /etc/hosts && exec \"$@\"",
        hosts.display()
    ));
    c.arg("sh").arg(prog).args(args);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c.output().unwrap()
}

#[test]
fn denied_delete_never_arrives_and_a_held_post_runs_once_approved() {
    let w = world();
    let before = api_log(&w);
    let out = curl(
        &w,
        &[
            "-X",
            "DELETE",
            "-w",
            "\n%{http_code}",
            &url(&w, "/customers/1"),
        ],
    );
    let t = text(&out.stdout);
    let (body, code) = t.rsplit_once('\n').unwrap();
    assert_eq!(code, "403");
    let p: Value = serde_json::from_str(body).unwrap();
    assert_eq!(p["rule"], "api-no-deletes");
    assert_eq!(p["status"], 403);
    assert!(
        !api_log(&w)[before.len()..].contains("DELETE"),
        "the DELETE never reached the upstream"
    );
    // PUT is allowed and arrives.
    let out = curl(
        &w,
        &["-X", "PUT", "-d", "{\"a\":1}", &url(&w, "/customers/2")],
    );
    assert!(
        text(&out.stdout).contains("\"method\": \"PUT\""),
        "{}",
        text(&out.stdout)
    );
    // A POST to /orders is held; the client waits; approved, it runs once.
    let mut c = w.env.exec(
        "demo",
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--resolve",
            &format!("upstream.test:{}:127.0.0.1", w.api),
            "-d",
            "{\"sku\":7}",
            &url(&w, "/orders"),
        ],
    );
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let held = c.spawn().unwrap();
    let id = wait_pending(&w);
    assert!(
        !api_log(&w).contains("POST /orders"),
        "not forwarded while held"
    );
    run_ok(
        &mut w
            .env
            .agentgate(&["approvals", "approve", &id, "--as", "alice"]),
    )
    .unwrap();
    let out = held.wait_with_output().unwrap();
    assert!(
        text(&out.stdout).contains("\"method\": \"POST\""),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(api_log(&w).matches("POST /orders").count(), 1);
    // Unanswered, it expires after the rule's 3 s: 403 naming the reason, never forwarded.
    let t0 = Instant::now();
    let out = curl(
        &w,
        &["-d", "{}", "-w", "\n%{http_code}", &url(&w, "/orders/2")],
    );
    let t = text(&out.stdout);
    let (body, code) = t.rsplit_once('\n').unwrap();
    assert_eq!(code, "403", "{t}");
    assert!(t0.elapsed() >= Duration::from_secs(3));
    let p: Value = serde_json::from_str(body).unwrap();
    assert!(p["detail"].as_str().unwrap().contains("expired"), "{p}");
    assert!(!api_log(&w).contains("POST /orders/2"));
    // The records: the denial, the approval, query values redacted.
    let recs = records(&w);
    assert!(recs.iter().any(|r| r["decision"]["rule"] == "api-no-deletes" && r["action"]["method"] == "DELETE"));
    assert!(
        recs.iter()
            .any(|r| r["approval"]["outcome"] == "approved" && r["action"]["path"] == "/orders")
    );
}

#[test]
fn query_and_json_body_rules_decide_and_a_held_request_whose_client_leaves_never_runs() {
    let w = world();
    let code_and_body = |args: &[&str]| {
        let mut a = vec!["-w", "\n%{http_code}"];
        a.extend_from_slice(args);
        let t = text(&curl(&w, &a).stdout);
        let (body, code) = t.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    let json = ["-H", "Content-Type: application/json", "-d"];
    // A small payment is allowed and arrives.
    let (code, _) = code_and_body(&[
        json[0],
        json[1],
        json[2],
        "{\"amount\": 50}",
        &url(&w, "/payments"),
    ]);
    assert_eq!(code, "200");
    assert_eq!(api_log(&w).matches("POST /payments").count(), 1);
    // A body the rule cannot read (form data, over the limit) is refused: 403, never arrives.
    let (code, body) = code_and_body(&["-d", "amount=20000", &url(&w, "/payments")]);
    assert_eq!(code, "403", "{body}");
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["rule"], "agentgate:http-body-unreadable", "{p}");
    let big = format!("{{\"amount\": 1, \"pad\": \"{}\"}}", "x".repeat(70_000));
    let (code, body) = code_and_body(&[json[0], json[1], json[2], &big, &url(&w, "/payments")]);
    assert_eq!(code, "403", "over max_inspect_bytes: {body}");
    // Query: `force=true` (also percent-encoded) is denied before the upstream.
    for q in ["/customers?force=true", "/customers?page=1&for%63e=tru%65"] {
        let (code, body) = code_and_body(&[&url(&w, q)]);
        assert_eq!(code, "403", "{q}: {body}");
        assert!(body.contains("api-no-forced-reads"), "{body}");
    }
    assert!(!api_log(&w).contains("force"), "no forced read arrived");
    // A large payment (the amount quoted, as a string) is held; the client
    // gives up after 3 s: the request is cancelled and never runs.
    let mut c = w.env.exec(
        "demo",
        &[
            "curl",
            "-sS",
            "--max-time",
            "3",
            "--resolve",
            &format!("upstream.test:{}:127.0.0.1", w.api),
            "-H",
            "Content-Type: application/json",
            "-d",
            "{\"amount\": \"25000\"}",
            &url(&w, "/payments"),
        ],
    );
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let held = c.spawn().unwrap();
    let id = wait_pending(&w);
    let _ = held.wait_with_output().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let cancelled = loop {
        let recs = records(&w);
        if let Some(r) = recs.iter().find(|r| {
            r["kind"] == "statement"
                && r["approval"]["id"] == id.as_str()
                && r["approval"]["outcome"] == "cancelled"
        }) {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no cancelled record for {id} after the client left"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(cancelled["result"]["status"], "not_run", "{cancelled}");
    assert_eq!(cancelled["decision"]["rule"], "api-big-payments-held");
    assert!(
        records(&w)
            .iter()
            .any(|r| r["kind"] == "approval.cancelled"),
        "the broker recorded the cancellation"
    );
    assert_eq!(
        api_log(&w).matches("POST /payments").count(),
        1,
        "only the small payment ever arrived"
    );
    let pending = run_ok(&mut w.env.agentgate(&["approvals", "list", "--json"])).unwrap();
    assert!(
        !text(&pending.stdout).contains(&id),
        "the request is no longer pending"
    );
}

#[test]
fn websocket_upgrades_are_relayed_or_refused_by_rule() {
    let w = world();
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/.venv/bin/python");
    let script = format!(
        r#"
import json
from websockets.sync.client import connect
from websockets.exceptions import InvalidStatus
out = {{}}
# No permessage-deflate: the counts below are the bytes sent.
with connect("wss://upstream.test:{port}/echo", compression=None) as ws:
    got = []
    for m in ["hello", "x" * 100000]:
        ws.send(m)
        got.append(ws.recv() == m)
    out["echo"] = got
for path in ["/admin", "/page"]:
    try:
        with connect("wss://upstream.test:{port}" + path) as ws:
            out[path] = "open"
    except InvalidStatus as e:
        out[path] = e.response.status_code
        out[path + "_rule"] = json.loads(e.response.body)["rule"]
print(json.dumps(out))
"#,
        port = w.ws
    );
    let mut cmd = w.env.exec("demo", &[venv.to_str().unwrap(), "-c", &script]);
    cmd.env("PYTHONPATH", "");
    let out = run_with_hosts(&w, &cmd);
    let v: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["echo"], serde_json::json!([true, true]), "{v}");
    // No rule allows /admin; `GET` rules do not open a WebSocket.
    assert_eq!(v["/admin"], 403, "{v}");
    assert_eq!(v["/page"], 403, "{v}");
    assert_eq!(v["/page_rule"], "default:resource:ws", "{v}");
    let log = fs::read_to_string(&w.ws_log).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("OPEN"))
            .collect::<Vec<_>>(),
        ["OPEN /echo"],
        "refused upgrades never reached the upstream: {log}"
    );
    // The tunnel's record: method, counts each way, how it ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        if let Some(r) = records(&w)
            .into_iter()
            .find(|r| r["resource"] == "ws" && r["transform"]["tunnel"] == "WEBSOCKET")
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no tunnel record");
        std::thread::sleep(Duration::from_millis(200));
    };
    let t = &done["transform"];
    assert!(
        t["to_upstream"].as_u64().unwrap() > 100_000 && t["to_client"].as_u64().unwrap() > 100_000,
        "{t}"
    );
    assert_eq!(t["ended"], "closed", "{t}");
    assert_eq!(done["action"]["method"], "WEBSOCKET");
}

fn wait_pending(w: &World) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = run_ok(&mut w.env.agentgate(&["approvals", "list", "--json"])).unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(r) = v.as_array().and_then(|a| a.first()) {
            return r["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no request became pending");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_upstream_certificates_are_refused_and_pinned_clients_are_relayed() {
    let w = world();
    let out = curl(
        &w,
        &[
            "-w",
            "\n%{http_code}",
            &format!("https://upstream.test:{}/x", w.bad),
        ],
    );
    let t = text(&out.stdout);
    assert!(t.ends_with("502"), "{t}");
    assert!(
        t.contains("invalid peer certificate") || t.contains("UnknownIssuer"),
        "a clear error: {t}"
    );
    assert!(
        fs::read_to_string(w.env.state.join("bad.log"))
            .unwrap_or_default()
            .is_empty()
    );
    // A client that pins the upstream's own CA: relayed unopened.
    let ca = w.certs.join("ca.pem");
    let out = curl(
        &w,
        &[
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://upstream.test:{}/customers", w.pinned),
        ],
    );
    assert!(
        text(&out.stdout).contains(SSN),
        "relayed as is (no interception): {}",
        text(&out.stderr)
    );
    let recs = records(&w);
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "connection.open" && r["resource"] == "pinned")
    );
    assert!(
        !recs
            .iter()
            .any(|r| r["kind"] == "statement" && r["resource"] == "pinned"),
        "recorded as a connection only"
    );
    // Node's fetch trusts the gateway through NODE_EXTRA_CA_CERTS.
    let js = format!(
        "fetch({:?}).then(r => r.text()).then(t => console.log(t))",
        url(&w, "/customers")
    );
    let out = run_with_hosts(&w, &w.env.exec("demo", &["node", "-e", &js]));
    let t = text(&out.stdout);
    assert!(
        t.contains("Ada") && !t.contains(SSN),
        "{t}{}",
        text(&out.stderr)
    );
}

#[test]
fn hostile_requests_are_refused_before_the_upstream() {
    let w = world();
    let before = api_log(&w).len();
    let script = format!(
        r#"
import socket, ssl, time, json
ctx = ssl.create_default_context()
def conn():
    s = socket.create_connection(("127.0.0.1", {port}), timeout=10)
    return ctx.wrap_socket(s, server_hostname="upstream.test")
def ask(raw):
    s = conn(); s.sendall(raw)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b: break
            out += b
            if b"\r\n\r\n" in out: break
    except Exception as e:
        out += repr(e).encode()
    s.close()
    return out.split(b"\r\n")[0].decode(errors="replace")
res = {{}}
# CL.TE smuggling: a DELETE hidden after a chunked body that Content-Length covers.
s = conn()
s.sendall(b"PUT /customers/3 HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE /customers/1 HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
smuggled = b""
try:
    while True:
        b = s.recv(65536)
        if not b: break
        smuggled += b
except Exception as e:
    smuggled += repr(e).encode()
res["cl_te_responses"] = smuggled.count(b"HTTP/1.1 ")
res["cl_te_first"] = smuggled.split(b"\r\n")[0].decode(errors="replace")
res["obs_fold"] = ask(b"GET /customers HTTP/1.1\r\nHost: upstream.test\r\nX-A: a\r\n b\r\n\r\n")
res["bare_cr"] = ask(b"GET /customers HTTP/1.1\r\nHost: upstream.test\rX: y\r\n\r\n")
res["big_header"] = ask(b"GET /customers HTTP/1.1\r\nHost: upstream.test\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
res["dotdot"] = ask(b"GET /customers/../orders HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
s = conn(); s.sendall(b"GET /customers HTTP/1.1\r\nHost: upst")
t = time.time(); s.settimeout(10)
try:
    got = s.recv(100)
except Exception as e:
    got = repr(e).encode()
res["slowloris_cut_after"] = round(time.time() - t, 1)
print(json.dumps(res))
"#,
        port = w.api
    );
    let out = w
        .env
        .exec("demo", &["python3", "-c", &script])
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    // Conflicting framing is read as RFC 9112 says (chunked wins, the
    // length is dropped, the connection closes after the answer): the
    // request is framed anew toward the upstream and the hidden DELETE is
    // never parsed.
    assert_eq!(v["cl_te_first"], "HTTP/1.1 200 OK", "{v}");
    assert_eq!(
        v["cl_te_responses"], 1,
        "one answer, then the connection closed: {v}"
    );
    for k in ["obs_fold", "bare_cr", "dotdot"] {
        assert!(
            v[k].as_str().unwrap().starts_with("HTTP/1.1 400"),
            "{k}: {v}"
        );
    }
    assert!(
        v["big_header"]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 431")
            || v["big_header"].as_str().unwrap().is_empty(),
        "{v}"
    );
    let cut = v["slowloris_cut_after"].as_f64().unwrap();
    assert!(
        cut < 5.0,
        "a slow head is cut at header_timeout_secs (2 s): {cut}"
    );
    let reached = api_log(&w)[before..].to_owned();
    assert_eq!(
        reached, "PUT /customers/3\n",
        "nothing else reached the upstream"
    );
}

#[test]
#[allow(clippy::too_many_lines)] // masked, refused by detector, refused by fingerprint, then the records
fn model_calls_are_recorded_and_prompts_with_an_ssn_are_masked_or_refused() {
    let w = world();
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent/.venv/bin/python");
    assert!(
        venv.exists(),
        "tests/agent/.venv is missing: run `cargo xtask setup`"
    );
    let call = |port: u16, leaked: &str| {
        format!(
            r#"
import json, openai
c = openai.OpenAI(base_url="https://model.test:{port}/v1", api_key="dummy-not-a-key", max_retries=0)
try:
    r = c.chat.completions.create(model="stub-model", messages=[
        {{"role": "user", "content": "look up customer 1"}},
        {{"role": "assistant", "content": None, "tool_calls": [{{"id": "call_1", "type": "function", "function": {{"name": "query", "arguments": "{{}}"}}}}]}},
        {{"role": "tool", "tool_call_id": "call_1", "content": "name Ada, {leaked}"}}],
        tools=[{{"type": "function", "function": {{"name": "query", "parameters": {{"type": "object", "properties": {{"sql": {{"type": "string"}}}}}}}}}}])
    print(json.dumps({{"ok": True, "model": r.model, "tokens": r.usage.total_tokens}}))
except openai.APIStatusError as e:
    print(json.dumps({{"ok": False, "status": e.status_code, "message": str(e)}}))
"#
        )
    };
    let out = run_with_hosts(
        &w,
        &w.env.exec(
            "demo",
            &[
                venv.to_str().unwrap(),
                "-c",
                &call(w.model, &format!("ssn {SSN}, account {ACCOUNT}.")),
            ],
        ),
    );
    let v: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["ok"], true, "{v}");
    let seen = fs::read_to_string(&w.model_log).unwrap();
    assert!(
        seen.contains("name Ada") && !seen.contains(SSN) && !seen.contains(ACCOUNT),
        "the model saw the prompt masked: {seen}"
    );
    assert!(
        seen.contains("[REDACTED:protected_value]"),
        "the account was found by fingerprint: {seen}"
    );
    // The strict resource refuses; the SDK shows the reason; the stub saw nothing.
    let out = run_with_hosts(
        &w,
        &w.env.exec(
            "demo",
            &[
                venv.to_str().unwrap(),
                "-c",
                &call(w.model_refuse, &format!("ssn {SSN}")),
            ],
        ),
    );
    let v: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["status"], 403, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("us_ssn at $.messages[2].content") && !msg.contains(SSN),
        "{msg}"
    );
    assert!(
        fs::read_to_string(&w.model_refuse_log)
            .unwrap_or_default()
            .is_empty()
    );
    // A value no detector knows, only the protected values file: refused too.
    let out = run_with_hosts(
        &w,
        &w.env.exec(
            "demo",
            &[
                venv.to_str().unwrap(),
                "-c",
                &call(
                    w.model_refuse,
                    &format!("account {}", ACCOUNT.to_lowercase()),
                ),
            ],
        ),
    );
    let v: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(v["status"], 403, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("protected_value at $.messages[2].content")
            && !msg.to_ascii_uppercase().contains(ACCOUNT),
        "{msg}"
    );
    assert!(
        fs::read_to_string(&w.model_refuse_log)
            .unwrap_or_default()
            .is_empty(),
        "the stub never saw it"
    );
    // Records: model, usage, tools, DLP by detector and path; never the prompt.
    let recs = records(&w);
    let all = serde_json::to_string(&recs).unwrap();
    assert!(
        !all.contains(SSN)
            && !all.to_ascii_uppercase().contains(ACCOUNT)
            && !all.contains("look up customer"),
        "no prompt text in the log"
    );
    let done = recs
        .iter()
        .find(|r| {
            r["resource"] == "model"
                && r["action"]["llm"]["usage"]["total_tokens"]
                    .as_u64()
                    .is_some()
        })
        .expect("a completed model call with usage");
    assert_eq!(done["action"]["llm"]["model"], "stub-model");
    let asked = recs
        .iter()
        .find(|r| r["resource"] == "model" && r["action"]["dlp"]["masked"]["us_ssn"] == 1)
        .expect("the call's DLP record");
    assert_eq!(
        asked["action"]["llm"]["tools_offered"],
        serde_json::json!(["query"])
    );
    assert!(asked["action"]["dlp"]["paths"][0] == "$.messages[2].content");
    assert!(recs.iter().any(
        |r| r["resource"] == "model-strict" && r["decision"]["rule"] == "agentgate:prompt-dlp"
    ));
}

#[test]
fn ca_show_prints_the_ca_and_rotation_keeps_the_old_one_trusted() {
    let w = world();
    let out = run_ok(&mut w.env.agentgate(&["ca", "show", "--json"])).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["current"]["pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert_eq!(
        v["current"]["fingerprint_sha256"].as_str().unwrap().len(),
        95
    );
    let key = w.env.state.join("ca/ca.key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key).unwrap().permissions()) & 0o777,
        0o600
    );
    let key_text = fs::read_to_string(&key).unwrap();
    let secret_line = key_text.lines().nth(1).unwrap();
    assert!(
        !fs::read_to_string(w.env.state.join("daemon.log"))
            .unwrap()
            .contains(secret_line),
        "the CA key is never logged"
    );
    // The rotation is at the end of this test: other tests keep the first CA
    // in their bundle, which stays trusted for the overlap.
    let out = run_ok(&mut w.env.agentgate(&["ca", "rotate", "--json"])).unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(
        r["current"]["fingerprint_sha256"],
        v["current"]["fingerprint_sha256"]
    );
    assert_eq!(
        r["previous"][0]["fingerprint_sha256"],
        v["current"]["fingerprint_sha256"]
    );
    std::thread::sleep(Duration::from_millis(1500));
    let out = curl(&w, &["-v", &url(&w, "/customers")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
