//! Approvals over HTTP, end to end: a real daemon, real `PostgreSQL`, the real
//! npm `oidc-provider` (tests/oidc/provider.mjs), and real Chromium driven by
//! npm `playwright-core` (tests/oidc/browser.mjs).
//!
//! The agent is the service account `svc-reporting` (its groups include
//! `approvers` here, so that only separation of duties stops it approving
//! its own request); bob (group `approvers`) signs in to the approvals page
//! and approves; alice (not an approver) cannot.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use agentgate_e2e::{DaemonOptions, Env, Proc, pg::PgServer, run_ok, scripts_dir};
use serde_json::Value;

const OIDC_PORT: u16 = 18080;
const API_PORT: u16 = 15080;
const PG_PORT: u16 = 5432;
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
/// The provider's default test-only secret for `svc-reporting`.
const SVC_SECRET: &str = "svc-reporting-test-secret-5f2c9a";
const HOOK_SECRET: &str = "webhook-test-secret-71d0";

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

fn policy() -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:{PG_PORT}"]
default_action = "deny"

# Lets the agent's connection reach the API through the proxy, so that the
# API's own refusal of governed callers is what is tested.
[[resource]]
name = "approvals-api"
protocol = "tcp"
addresses = ["127.0.0.1:{API_PORT}"]
default_action = "deny"

[[rule]]
name = "reporting-sql"
groups = ["reporting"]
resources = ["pg"]
action = "allow"
match = {{ sql = ["read", "write", "ddl", "transaction"] }}

[[rule]]
name = "drops-need-approval"
groups = ["reporting"]
resources = ["pg"]
action = "require_approval"
match = {{ destructive = true }}
approval = {{ approver_groups = ["approvers"], timeout = "90s", grant_window = "4s" }}

[[rule]]
name = "reporting-may-try-the-api"
groups = ["reporting"]
resources = ["approvals-api"]
action = "allow"
"#
    )
}

/// What the test runs besides the daemon.
struct World {
    env: Env,
    pg: PgServer,
    _provider: Proc,
    receiver: Proc,
    dir: PathBuf,
}

fn start() -> World {
    assert!(
        oidc_dir().join("node_modules/playwright-core").is_dir()
            && oidc_dir().join("node_modules/oidc-provider").is_dir(),
        "tests/oidc/node_modules is incomplete: run `cargo xtask setup`"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "Debian chromium is missing: run `cargo xtask setup`"
    );
    let dir = std::env::temp_dir().join(agentgate_e2e::unique("apweb"));
    fs::create_dir_all(&dir).unwrap();
    let secret = |name: &str, value: &str| {
        let p = dir.join(name);
        fs::write(&p, value).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let svc_secret = secret("svc.secret", SVC_SECRET);
    let hook_secret = secret("hook.secret", HOOK_SECRET);

    let mut env = Env::prepare(
        "apweb",
        DaemonOptions {
            policies: vec![("p.toml".into(), policy())],
            ..Default::default()
        },
    )
    .unwrap();

    // The webhook receiver fails twice, then accepts.
    let mut c = env.netns.command("python3");
    c.arg(scripts_dir().join("webhook_receiver.py"))
        .arg(&hook_secret)
        .arg("2")
        .stdout(Stdio::piped());
    let mut receiver = Proc::spawn("webhook receiver", c).unwrap();
    let hook_port: Value = serde_json::from_str(&receiver.read_line().unwrap()).unwrap();
    let hook_port = hook_port["port"].as_u64().unwrap();

    env.opts.extra = format!(
        "\n[identity]\nissuer = \"http://127.0.0.1:{OIDC_PORT}\"\nclient_id = \"agentgate-cli\"\n\
         [[identity.service_account]]\nname = \"svc-reporting\"\nclient_id = \"svc-reporting\"\n\
         secret_file = \"{svc}\"\nscopes = [\"reports:read\"]\naudience = \"urn:agentgate\"\n\n\
         [api]\nlisten = \"127.0.0.1:{API_PORT}\"\n[api.web]\nclient_id = \"agentgate-web\"\n\n\
         [[approvals.webhook]]\nurl = \"http://127.0.0.1:{hook_port}/hook\"\nsecret_file = \"{hook}\"\n\
         backoff_ms = 200\n",
        svc = svc_secret.display(),
        hook = hook_secret.display(),
    );
    env.write_config().unwrap();

    let mut c = env.netns.command("node");
    c.arg("provider.mjs")
        .current_dir(oidc_dir())
        .env("OIDC_PORT", OIDC_PORT.to_string())
        .env("OIDC_SVC_GROUPS", "reporting,approvers")
        .env(
            "OIDC_WEB_REDIRECT_URIS",
            format!("http://127.0.0.1:{API_PORT}/callback"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut provider = Proc::spawn("oidc-provider", c).unwrap();
    assert!(provider.read_line().unwrap().contains("issuer"));
    env.start_daemon().unwrap();
    let pg = PgServer::start(&env.netns, PG_PORT, false).unwrap();
    World {
        env,
        pg,
        _provider: provider,
        receiver,
        dir,
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `curl` inside the test's netns (not tagged): (status, body).
fn curl(
    env: &Env,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut c = env.netns.command("curl");
    curl_args(&mut c, method, path, token, body);
    parse_curl(&run_ok(&mut c).unwrap().stdout)
}

fn curl_args(
    c: &mut std::process::Command,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) {
    c.args(["-sS", "-m", "20", "-X", method, "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        c.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    c.arg(format!("http://127.0.0.1:{API_PORT}{path}"));
}

fn parse_curl(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// An ID token of a test account, from the provider, through a real browser login.
fn id_token(env: &Env, user: &str) -> String {
    let mut c = env.netns.command("node");
    c.arg("browser.mjs")
        .args([
            "token",
            &format!("http://127.0.0.1:{OIDC_PORT}"),
            "agentgate-web",
            &format!("http://127.0.0.1:{API_PORT}/callback"),
            user,
        ])
        .current_dir(oidc_dir());
    let out = run_ok(&mut c).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["id_token"].as_str().unwrap().to_owned()
}

/// svc-reporting's own RFC 9068 access token (client credentials).
fn svc_token(env: &Env) -> String {
    let mut c = env.netns.command("curl");
    c.args([
        "-sS",
        "-m",
        "20",
        "-u",
        &format!("svc-reporting:{SVC_SECRET}"),
    ])
    .args([
        "-d",
        "grant_type=client_credentials",
        "-d",
        "scope=reports:read",
    ])
    .args(["-d", "resource=urn:agentgate"])
    .arg(format!("http://127.0.0.1:{OIDC_PORT}/token"));
    let out = run_ok(&mut c).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

fn pending(env: &Env) -> Vec<Value> {
    let out = run_ok(&mut env.agentgate(&["approvals", "list", "--json"])).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .cloned()
        .or_else(|| v["approvals"].as_array().cloned())
        .unwrap_or_default()
}

fn wait_pending(env: &Env, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = pending(env);
        if p.len() == n {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} pending, have {p:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_psql(w: &World, sql: &str) -> Proc {
    let url = w.pg.url("127.0.0.1", "postgres", "postgres");
    let mut c = w.env.exec("svc-reporting", &[PSQL, &url, "-At", "-c", sql]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc::spawn("psql", c).unwrap()
}

fn finish(mut p: Proc, within: Duration) -> (bool, String, String) {
    let deadline = Instant::now() + within;
    while p.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "psql did not finish within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut out, mut err) = (String::new(), String::new());
    p.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    p.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (p.child.wait().unwrap().success(), out, err)
}

fn table_exists(pg: &PgServer, name: &str) -> bool {
    pg.admin_sql(&format!("SELECT to_regclass('public.{name}') IS NOT NULL"))
        .unwrap()
        .trim()
        == "t"
}

#[test]
#[allow(clippy::too_many_lines)] // one approval story, told in order
fn a_held_drop_is_approved_in_the_browser_and_the_api_enforces_who_may_vote() {
    let mut w = start();
    let env = &w.env;
    // The service account logs in by itself; wait until it can work.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, _, err) = finish(
            spawn_psql(&w, "CREATE TABLE t1 (id int)"),
            Duration::from_secs(30),
        );
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "svc-reporting never became usable: {err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // The DROP is held.
    let held = spawn_psql(&w, "DROP TABLE t1");
    let req = wait_pending(env, 1).remove(0);
    let id = req["id"].as_str().unwrap().to_owned();
    assert!(table_exists(&w.pg, "t1"), "nothing ran while held");

    // The API: no token, the requester's own token, a non-member: all refused.
    let (code, body) = curl(env, "GET", "/api/approvals", None, None);
    assert_eq!(code, 401, "{body}");
    let approve = format!("/api/approvals/{id}/approve");
    let (code, body) = curl(env, "POST", &approve, Some(&svc_token(env)), Some("{}"));
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "self_approval",
        "{body}"
    );
    let alice = id_token(env, "alice");
    let (code, body) = curl(env, "POST", &approve, Some(&alice), Some("{}"));
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "not_an_approver",
        "{body}"
    );
    // Reading needs any verified identity.
    let (code, body) = curl(
        env,
        "GET",
        &format!("/api/approvals/{id}"),
        Some(&alice),
        None,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["id"],
        id.as_str()
    );

    // From inside the tagged cgroup, even with an approver's token: refused
    // by the API itself (the proxy relays the connection, the policy allows it).
    let bob = id_token(env, "bob");
    let mut c = env.exec("svc-reporting", &["curl"]);
    curl_args(&mut c, "POST", &approve, Some(&bob), Some("{}"));
    let out = c.output().unwrap();
    let (code, body) = parse_curl(&out.stdout);
    assert_eq!(code, 403, "{body} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        body.contains("tagged") || body.contains("relayed"),
        "{body}"
    );
    assert_eq!(pending(env).len(), 1, "still pending");

    // An untagged shell that shares the daemon's cgroup (a terminal beside
    // `agentgate run`) is not the proxy: served. The relayed call above was
    // refused although it came from the same cgroup.
    let procs = env.cgroup.path.join("daemon/cgroup.procs");
    let mut c = std::process::Command::new("sh");
    c.arg("-c").arg(format!(
        "echo $$ > {} && exec nsenter --net=/run/netns/{} -- \"$@\"",
        procs.display(),
        env.netns.name
    ));
    c.args(["sh", "curl"]);
    curl_args(
        &mut c,
        "GET",
        &format!("/api/approvals/{id}"),
        Some(&alice),
        None,
    );
    let out = run_ok(&mut c).unwrap();
    let (code, body) = parse_curl(&out.stdout);
    assert_eq!(code, 200, "{body}");
    let (code, metrics) = {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(format!(
            "echo $$ > {} && exec nsenter --net=/run/netns/{} -- curl -sS -m 20 -w '\n%{{http_code}}' http://127.0.0.1:{API_PORT}/metrics",
            procs.display(),
            env.netns.name
        ));
        parse_curl(&run_ok(&mut c).unwrap().stdout)
    };
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("agentgate_"), "{metrics}");

    // The page's forms need a signed-in session (and its CSRF token).
    let mut c = env.netns.command("curl");
    c.args([
        "-sS",
        "-m",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-d",
        "csrf=guess&reason=x",
    ])
    .arg(format!(
        "http://127.0.0.1:{API_PORT}/approvals/{id}/approve"
    ));
    let out = run_ok(&mut c).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");

    // bob approves in the browser; a screenshot of the page shows the request.
    // With AGENTGATE_UPDATE_SCREENSHOTS set, the README's picture is replaced.
    let shot = if std::env::var_os("AGENTGATE_UPDATE_SCREENSHOTS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img/approvals-page.png")
    } else {
        w.dir.join("approvals-page.png")
    };
    let mut c = env.netns.command("node");
    c.arg("browser.mjs")
        .args([
            "approve",
            &format!("http://127.0.0.1:{API_PORT}/"),
            "bob",
            &id,
        ])
        .arg(&shot)
        .current_dir(oidc_dir());
    let out = run_ok(&mut c).unwrap();
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["signed_in_as"], "bob", "{page}");
    assert_eq!(
        page["url"],
        format!("http://127.0.0.1:{API_PORT}/"),
        "back on the page after the vote (post/redirect/get): {page}"
    );
    assert!(
        page["notice"]
            .as_str()
            .unwrap()
            .contains(&format!("Approved {id}")),
        "{page}"
    );
    assert!(
        fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );

    // The statement completes in the agent's psql.
    let (ok, out, err) = finish(held, Duration::from_secs(20));
    assert!(ok, "{err}");
    assert!(out.contains("DROP TABLE"), "{out}");
    assert!(!table_exists(&w.pg, "t1"));

    // Within the grant window the same statement runs without a new request.
    finish(
        spawn_psql(&w, "CREATE TABLE t1 (id int)"),
        Duration::from_secs(10),
    );
    let (ok, out, err) = finish(spawn_psql(&w, "DROP TABLE t1"), Duration::from_secs(3));
    assert!(ok && out.contains("DROP TABLE"), "{out}{err}");
    assert!(pending(env).is_empty());
    let granted = env
        .audit_records()
        .unwrap()
        .into_iter()
        .filter(|r| r["approval"]["outcome"] == "granted")
        .collect::<Vec<_>>();
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert!(
        granted[0]["approval"]["grant"]
            .as_str()
            .is_some_and(|g| g.starts_with("grt-")),
        "{granted:?}"
    );

    // After the window, it is held again; this time bob rejects over the API.
    finish(
        spawn_psql(&w, "CREATE TABLE t1 (id int)"),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(5));
    let held = spawn_psql(&w, "DROP TABLE t1");
    let id2 = wait_pending(env, 1)[0]["id"].as_str().unwrap().to_owned();
    assert_ne!(id2, id);
    let (code, body) = curl(
        env,
        "POST",
        &format!("/api/approvals/{id2}/reject"),
        Some(&bob),
        Some("{}"),
    );
    assert_eq!(code, 422, "a rejection needs a reason: {body}");
    let (code, body) = curl(
        env,
        "POST",
        &format!("/api/approvals/{id2}/reject"),
        Some(&bob),
        Some(r#"{"reason": "not during business hours"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let (ok, _, err) = finish(held, Duration::from_secs(20));
    assert!(!ok);
    assert!(err.contains("not during business hours"), "{err}");
    assert!(table_exists(&w.pg, "t1"));

    // Approved over the API with a ticket, its grant is listed, a non-member
    // cannot revoke it, bob can; then the same DROP is held again at once.
    let held = spawn_psql(&w, "DROP TABLE t1");
    let id3 = wait_pending(env, 1)[0]["id"].as_str().unwrap().to_owned();
    let (code, body) = curl(
        env,
        "POST",
        &format!("/api/approvals/{id3}/approve"),
        Some(&bob),
        Some(r#"{"reason": "cleanup", "ticket": "CHG-1042"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let (ok, _, err) = finish(held, Duration::from_secs(20));
    assert!(ok, "{err}");
    let (code, body) = curl(env, "GET", "/api/grants", Some(&alice), None);
    assert_eq!(code, 200, "{body}");
    let grants: Value = serde_json::from_str(&body).unwrap();
    let grants = grants["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1, "{body}");
    assert_eq!(grants[0]["identity"], "svc-reporting", "{body}");
    let grant = grants[0]["id"].as_str().unwrap().to_owned();
    let revoke = format!("/api/grants/{grant}/revoke");
    let (code, body) = curl(env, "POST", &revoke, Some(&alice), None);
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(
        env,
        "POST",
        &revoke,
        Some(&bob),
        Some(r#"{"reason": "done"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let (_, body) = curl(env, "GET", "/api/grants", Some(&bob), None);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["grants"],
        serde_json::json!([])
    );
    finish(
        spawn_psql(&w, "CREATE TABLE t1 (id int)"),
        Duration::from_secs(10),
    );
    let held = spawn_psql(&w, "DROP TABLE t1");
    let id4 = wait_pending(env, 1)[0]["id"].as_str().unwrap().to_owned();
    let (code, body) = curl(
        env,
        "POST",
        &format!("/api/approvals/{id4}/reject"),
        Some(&bob),
        Some(r#"{"reason": "grant revoked"}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert!(!finish(held, Duration::from_secs(20)).0);
    let recs = env.audit_records().unwrap();
    let vote = recs
        .iter()
        .find(|r| r["kind"] == "approval.granted" && r["approval"]["id"] == id3.as_str())
        .unwrap_or_else(|| panic!("no approval.granted for {id3}"));
    assert_eq!(vote["approval"]["ticket"], "CHG-1042", "{vote}");
    assert_eq!(vote["approval"]["via"], "api", "{vote}");
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "grant.revoked" && r["approval"]["grant"] == grant.as_str())
    );

    // The refusal from the tagged cgroup is on record, as the control socket's are.
    let recs = env.audit_records().unwrap();
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "control.refused" && r["action"]["via"] == "api")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["decision"]["verdict"], "deny");

    // The webhook: the first event failed twice, then arrived, signed.
    let first_ok = agentgate_e2e::read_until(w.receiver.child.stdout.as_mut().unwrap(), |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| v["status"] == 204)
    })
    .unwrap();
    let first_ok: Value = serde_json::from_str(&first_ok).unwrap();
    assert_eq!(first_ok["attempt"], 3, "{first_ok}");
    assert_eq!(first_ok["signature_valid"], true);
    assert_eq!(first_ok["body"]["request"]["id"], id.as_str(), "{first_ok}");

    // /metrics and status count what happened.
    let (code, metrics) = curl(env, "GET", "/metrics", None, None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("agentgate_approvals_pending 0"),
        "{metrics}"
    );
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    // CREATE TABLE four times, the two approved DROPs and the DROP under the
    // grant ran (allow); the two rejected ones did not (deny); four were held.
    assert_eq!(
        sample("agentgate_statements_total{decision=\"allow\"}"),
        7,
        "{metrics}"
    );
    assert_eq!(
        sample("agentgate_statements_total{decision=\"deny\"}"),
        2,
        "{metrics}"
    );
    assert_eq!(sample("agentgate_approval_requests_total"), 4, "{metrics}");
    let delivered = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentgate_webhook_deliveries_total{result=\"delivered\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(delivered >= 1, "{metrics}");
    let status = env.status().unwrap();
    assert!(
        status["webhooks"]["attempts_failed"].as_u64().unwrap() >= 2,
        "{status}"
    );
    let text = run_ok(&mut env.agentgate(&["status"])).unwrap().stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("approvals: 0 pending"), "{text}");
    assert!(
        text.contains("webhooks: ") && text.contains(" delivered, 0 failed"),
        "{text}"
    );
    // No secret reaches the daemon's log.
    let log = env.daemon_log();
    assert!(!log.contains(HOOK_SECRET) && !log.contains(SVC_SECRET) && !log.contains(&bob));
    w.receiver.kill9();
}

/// Off the default path: the API over TLS (rustls, the configured PEM files),
/// plain HTTP refused on that port, and the limits on idle and excess
/// connections enforced.
#[test]
fn the_api_serves_tls_and_closes_idle_and_excess_connections() {
    let dir = std::env::temp_dir().join(agentgate_e2e::unique("aptls"));
    fs::create_dir_all(&dir).unwrap();
    let ca = agentgate_e2e::pg::make_ca(&dir).unwrap();
    let mut env = Env::prepare("aptls", DaemonOptions::default()).unwrap();
    env.opts.extra = format!(
        "\n[api]\nlisten = \"127.0.0.1:{API_PORT}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         max_connections = 2\nheader_timeout_secs = 1\n",
        ca.server_cert.display(),
        ca.server_key.display()
    );
    env.write_config().unwrap();
    env.start_daemon().unwrap();
    let https = |path: &str| {
        let mut c = env.netns.command("curl");
        c.args(["-sS", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca.ca_cert)
            .arg(format!("https://127.0.0.1:{API_PORT}{path}"));
        parse_curl(&run_ok(&mut c).unwrap().stdout)
    };
    let (code, body) = https("/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("agentgate_approvals_pending 0"), "{body}");
    let (code, body) = https("/api/approvals");
    assert_eq!(code, 401, "no identity provider, no caller: {body}");
    let plain = env
        .netns
        .command("curl")
        .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{API_PORT}/metrics"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "000",
        "no plain HTTP answer"
    );

    // Two idle connections fill the limit: a third is closed at once; the
    // idle ones are closed when the 1 s handshake/head timeout passes.
    let probe = format!(
        r#"
import json, socket, time
def closed(s, wait):
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
idle = [socket.create_connection(("127.0.0.1", {API_PORT})) for _ in range(2)]
time.sleep(0.3)
third = socket.create_connection(("127.0.0.1", {API_PORT}))
t = time.time(); third_closed = closed(third, 0.8); third_s = time.time() - t
t = time.time(); idle_closed = [closed(s, 4.0) for s in idle]; idle_s = time.time() - t
print(json.dumps({{"third_closed": third_closed, "third_s": third_s, "idle_closed": idle_closed, "idle_s": idle_s}}))
"#
    );
    let out = run_ok(env.netns.command("python3").args(["-c", &probe])).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["third_closed"], true, "{v}");
    assert_eq!(v["idle_closed"], serde_json::json!([true, true]), "{v}");
    assert!(v["idle_s"].as_f64().unwrap() < 3.0, "{v}");
    // And it serves again once they are gone.
    assert_eq!(https("/metrics").0, 200);
    let metrics = https("/metrics").1;
    assert!(
        metrics.contains("agentgate_api_refused_total{reason=\"connection_limit\"} 1"),
        "{metrics}"
    );
    drop(env);
    fs::remove_dir_all(dir).unwrap();
}
