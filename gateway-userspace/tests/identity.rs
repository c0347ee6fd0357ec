//! Identity against a real `OpenID` provider: the npm `oidc-provider` package run by
//! `tests/oidc/provider.mjs` on loopback (one instance per test, killed on drop).
//!
//! Needs `node` and `(cd tests/oidc && npm ci)` (`cargo xtask setup` does it). Without
//! `tests/oidc/node_modules` every test here says so loudly and returns.
//!
//! The user's browser step is played by driving the provider's real HTML pages:
//! the device code page, its confirmation, the login form and the consent form.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentgate::identity::{
    DevicePrompt, IdentityConfig, IdentityError, IdentityEvent, IdentityKind, IdentityStore,
    LoginHandoff, LoginMethod, OidcClient, ServiceAccountConfig, device_login,
    service_account_login,
};

// ---------------------------------------------------------------------------
// The provider process.

struct Provider {
    child: Child,
    issuer: String,
    /// Where the process listens (differs from `issuer` when started with `OIDC_ISSUER`).
    base: String,
    kids: Vec<String>,
    /// The provider's stderr, shown if the test fails.
    stderr: Arc<Mutex<String>>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- OpenID provider stderr ----\n{}",
                self.stderr.lock().unwrap()
            );
        }
    }
}

fn oidc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc")
}

/// False (after a loud message) when the Node dependencies are not installed.
fn harness_ready() -> bool {
    if oidc_dir().join("node_modules/oidc-provider").is_dir() {
        return true;
    }
    eprintln!(
        "\n==== SKIPPED: tests/oidc/node_modules is missing, so the OpenID provider cannot run.\n\
         ==== Run `cargo xtask setup` (or `cd tests/oidc && npm ci`) and run the tests again.\n"
    );
    false
}

impl Provider {
    fn start(env: &[(&str, &str)]) -> Provider {
        let mut cmd = Command::new("node");
        cmd.arg("provider.mjs")
            .current_dir(oidc_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .expect("start `node tests/oidc/provider.mjs` (is node installed?)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining both pipes: oidc-provider writes notices to stdout, and a
        // closed pipe would kill it with EPIPE.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
            for _ in lines {}
        });
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let sink = stderr_text.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if !line.is_empty() => line,
            other => {
                let _ = child.kill();
                panic!("the OpenID provider did not start: {other:?}");
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&line).expect("provider ready line");
        Provider {
            child,
            issuer: ready["issuer"].as_str().unwrap().to_owned(),
            base: format!("http://127.0.0.1:{}", ready["port"]),
            stderr: stderr_text,
            kids: ready["kids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned())
                .collect(),
        }
    }

    async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/__harness/stats", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn config(p: &Provider, client_id: &str) -> IdentityConfig {
    let mut cfg = IdentityConfig::new(p.issuer.clone(), Some(client_id.to_owned()));
    cfg.http_timeout_secs = 5;
    cfg.device_flow_max_wait_secs = 60;
    cfg
}

// ---------------------------------------------------------------------------
// The user's browser.

enum Choice {
    Approve(&'static str),
    Deny,
}

struct Form {
    action: String,
    fields: Vec<(String, String)>,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = tag[start..].find('"')? + start;
    Some(tag[start..end].replace("&amp;", "&"))
}

/// The first POST form of a page: its action and its named inputs.
fn first_form(html: &str) -> Option<Form> {
    let start = html.find("<form")?;
    let end = html[start..].find("</form>")? + start;
    let form = &html[start..end];
    let open_end = form.find('>')?;
    let action = attr(&form[..open_end], "action")?;
    let mut fields = Vec::new();
    let mut rest = form;
    while let Some(i) = rest.find("<input") {
        let tag_end = rest[i..].find('>').map_or(rest.len(), |e| i + e);
        let tag = &rest[i..tag_end];
        if let Some(name) = attr(tag, "name") {
            fields.push((name, attr(tag, "value").unwrap_or_default()));
        }
        rest = &rest[tag_end..];
    }
    Some(Form { action, fields })
}

/// Plays the user: opens the verification link, confirms (or aborts) the code, signs
/// in as `user`, consents. `rewrite` maps URLs of the issuer the pages name to the
/// address the process listens on (for a provider started with `OIDC_ISSUER`).
async fn browser(start_url: String, choice: Choice, rewrite: Option<(String, String)>) {
    let fix = |url: &str| match &rewrite {
        Some((from, to)) => url.replacen(from.as_str(), to, 1),
        None => url.to_owned(),
    };
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut url = fix(&start_url);
    let mut page = get_following(&http, &url, &fix).await;
    for _ in 0..10 {
        if page.1.contains("Sign-in Success")
            || page.1.contains("The Sign-in request was interrupted")
        {
            return;
        }
        let form =
            first_form(&page.1).unwrap_or_else(|| panic!("no form on {}: {}", page.0, page.1));
        let mut fields = form.fields;
        if fields.iter().any(|(n, _)| n == "confirm") && matches!(choice, Choice::Deny) {
            fields.retain(|(n, _)| n != "confirm");
            fields.push(("abort".into(), "yes".into()));
        }
        for (name, value) in &mut fields {
            match name.as_str() {
                "login" => {
                    if let Choice::Approve(user) = choice {
                        user.clone_into(value);
                    }
                }
                "password" => "correct horse".clone_into(value),
                _ => {}
            }
        }
        let action = reqwest::Url::parse(&page.0)
            .unwrap()
            .join(&form.action)
            .unwrap();
        url = fix(action.as_str());
        let response = http.post(&url).form(&fields).send().await.unwrap();
        page = follow(&http, response, &fix).await;
    }
    panic!(
        "the browser did not reach the end of the flow; last page {}",
        page.0
    );
}

async fn get_following(
    http: &reqwest::Client,
    url: &str,
    fix: &impl Fn(&str) -> String,
) -> (String, String) {
    let response = http.get(url).send().await.unwrap();
    follow(http, response, fix).await
}

async fn follow(
    http: &reqwest::Client,
    mut response: reqwest::Response,
    fix: &impl Fn(&str) -> String,
) -> (String, String) {
    for _ in 0..10 {
        if !response.status().is_redirection() {
            let url = response.url().to_string();
            return (url, response.text().await.unwrap());
        }
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let next = fix(response.url().join(&location).unwrap().as_str());
        response = http.get(&next).send().await.unwrap();
    }
    panic!("redirect loop");
}

/// `device_login` with the browser step run by a task once the prompt is shown.
async fn login_as(
    client: &OidcClient,
    choice: Choice,
) -> Result<agentgate::identity::Session, IdentityError> {
    let task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let task2 = task.clone();
    let result = device_login(client, move |prompt: &DevicePrompt| {
        let url = prompt
            .verification_uri_complete
            .clone()
            .expect("verification_uri_complete");
        *task2.lock().unwrap() = Some(tokio::spawn(browser(url, choice, None)));
    })
    .await;
    let handle = task.lock().unwrap().take();
    if let Some(handle) = handle {
        handle.await.expect("browser task");
    }
    result
}

/// The device flow done by hand against `base` (where the process listens), for a
/// provider whose issuer names another address. Returns `(id_token, nonce)`.
async fn raw_device_tokens(base: &str, issuer: &str, user: &'static str) -> (String, String) {
    let http = reqwest::Client::new();
    let nonce = "raw-flow-nonce-0123456789";
    let da: serde_json::Value = http
        .post(format!("{base}/device/auth"))
        .form(&[
            ("client_id", "agentgate-cli"),
            ("scope", "openid profile groups"),
            ("nonce", nonce),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = da["verification_uri_complete"].as_str().unwrap().to_owned();
    browser(
        url,
        Choice::Approve(user),
        Some((issuer.to_owned(), base.to_owned())),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let tokens: serde_json::Value = http
        .post(format!("{base}/token"))
        .form(&[
            ("client_id", "agentgate-cli"),
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", da["device_code"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        tokens["id_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{tokens}"))
            .to_owned(),
        nonce.to_owned(),
    )
}

fn id_token_of(session: &agentgate::identity::Session) -> String {
    let line = serde_json::to_string(&session.handoff().unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["id_token"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------
// Human login.

#[tokio::test]
async fn device_login_succeeds_with_groups_and_daemon_reverifies_handoff() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let cli = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let session = login_as(&cli, Choice::Approve("alice"))
        .await
        .expect("login");
    let id = session.identity();
    assert_eq!(id.name, "alice");
    assert_eq!(id.subject, "alice");
    assert_eq!(id.kind, IdentityKind::Human);
    assert_eq!(id.groups, ["analysts"]);
    assert_eq!(id.issuer, p.issuer);
    assert!(
        session.is_refreshable(),
        "offline access gives a refresh token"
    );

    // CLI -> daemon: one JSON line; the daemon verifies it with its own client.
    let line = serde_json::to_string(&session.handoff().unwrap()).unwrap();
    assert!(!line.contains('\n'));
    let handoff: LoginHandoff = serde_json::from_str(&line).unwrap();
    let daemon = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let mut verified = agentgate::identity::Session::from_handoff(&daemon, handoff)
        .await
        .expect("re-verify");
    assert_eq!(verified.identity(), session.identity());

    let mut store = IdentityStore::new();
    let event = store
        .insert(verified.clone(), LoginMethod::DeviceFlow)
        .unwrap();
    assert!(
        matches!(&event, IdentityEvent::Login { name, groups, .. } if name == "alice" && groups == &["analysts"])
    );
    assert_eq!(store.get_verified("alice").unwrap().groups, ["analysts"]);

    // The refresh token renews the session at the provider.
    let before = id_token_of(&verified);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    verified.refresh(&daemon).await.expect("refresh");
    assert_eq!(verified.identity().subject, "alice");
    assert_ne!(
        id_token_of(&verified),
        before,
        "a new ID token was issued and verified"
    );

    // A handoff whose ID token was tampered with is refused by the daemon.
    let mut forged: serde_json::Value = serde_json::from_str(&line).unwrap();
    let token = forged["id_token"].as_str().unwrap().to_owned();
    let mut parts: Vec<&str> = token.split('.').collect();
    let evil_payload = base64_url(
        br#"{"iss":"x","sub":"mallory","aud":"agentgate-cli","exp":9999999999,"iat":1}"#,
    );
    parts[1] = &evil_payload;
    forged["id_token"] = parts.join(".").into();
    let forged: LoginHandoff = serde_json::from_value(forged).unwrap();
    let err = agentgate::identity::Session::from_handoff(&daemon, forged)
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::BadSignature { .. }), "{err}");
}

fn base64_url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn es256_client_and_second_user_groups() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let cli = OidcClient::new(config(&p, "agentgate-cli-es")).unwrap();
    let session = login_as(&cli, Choice::Approve("bob")).await.expect("login");
    assert_eq!(session.identity().name, "bob");
    assert_eq!(session.identity().groups, ["approvers", "analysts"]);
    let header = id_token_of(&session).split('.').next().unwrap().to_owned();
    assert!(
        header.starts_with("eyJhbGciOiJFUzI1NiI"),
        "ES256 header, got {header}"
    );
}

#[tokio::test]
async fn slow_down_adds_five_seconds_and_login_still_succeeds() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[("OIDC_SLOW_DOWN_POLLS", "1")]);
    let cli = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let started = Instant::now();
    let session = login_as(&cli, Choice::Approve("alice"))
        .await
        .expect("login after slow_down");
    assert_eq!(session.identity().name, "alice");
    // First poll after 1 s gets slow_down; the next waits 1 + 5 s.
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(p.stats().await["device_polls"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn user_denies_gives_access_denied() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let cli = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let err = login_as(&cli, Choice::Deny).await.unwrap_err();
    assert!(matches!(err, IdentityError::AccessDenied), "{err}");
}

#[tokio::test]
async fn expired_device_code_and_local_deadline() {
    if !harness_ready() {
        return;
    }
    // Nobody approves; the provider's code expires and it answers expired_token.
    let p = Provider::start(&[("OIDC_DEVICE_CODE_TTL", "2")]);
    let cli = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let prompt = Arc::new(Mutex::new(None));
    let seen = prompt.clone();
    let started = Instant::now();
    let err = device_login(&cli, move |p: &DevicePrompt| {
        *seen.lock().unwrap() = Some(p.clone());
    })
    .await
    .unwrap_err();
    assert!(matches!(err, IdentityError::DeviceCodeExpired), "{err}");
    assert!(err.to_string().contains("expired_token"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let prompt = prompt.lock().unwrap().clone().unwrap();
    assert!(prompt.verification_uri.ends_with("/device"), "{prompt:?}");
    assert_eq!(prompt.expires_in, Duration::from_secs(2));
    assert!(!prompt.user_code.is_empty());

    // Our own upper bound holds even when the provider would wait 5 minutes.
    let p = Provider::start(&[]);
    let mut cfg = config(&p, "agentgate-cli");
    cfg.device_flow_max_wait_secs = 2;
    let cli = OidcClient::new(cfg).unwrap();
    let started = Instant::now();
    let err = device_login(&cli, |_| {}).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::DeviceFlowTimeout { .. }),
        "{err}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

// ---------------------------------------------------------------------------
// Token verification failures.

#[tokio::test]
async fn expired_id_token_is_rejected_and_store_expires_it() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[("OIDC_ID_TOKEN_TTL", "1")]);
    let cli = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let session = login_as(&cli, Choice::Approve("alice"))
        .await
        .expect("login");
    let raw = id_token_of(&session);
    let mut store = IdentityStore::new();
    store.insert(session, LoginMethod::DeviceFlow).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let mut strict = config(&p, "agentgate-cli");
    strict.clock_leeway_secs = 0;
    let daemon = OidcClient::new(strict).unwrap();
    let err = daemon.verify_id_token(&raw, None).await.unwrap_err();
    assert!(matches!(err, IdentityError::TokenExpired { .. }), "{err}");

    assert!(matches!(
        store.get_verified("alice"),
        Err(IdentityError::IdentityExpired { .. })
    ));
    let events = store.expire_due(tokio::time::Instant::now());
    assert_eq!(
        events.iter().map(|e| e.name().unwrap()).collect::<Vec<_>>(),
        ["alice"]
    );
    assert!(matches!(events[0], IdentityEvent::Expiry { .. }));
}

#[tokio::test]
async fn token_signed_by_unknown_key_is_rejected_after_one_refetch() {
    if !harness_ready() {
        return;
    }
    let a = Provider::start(&[]);
    // B claims to be A (same issuer) but signs with keys A never published.
    let b = Provider::start(&[("OIDC_ISSUER", &a.issuer)]);
    let (forged, nonce) = raw_device_tokens(&b.base, &a.issuer, "alice").await;

    let mut cfg = config(&a, "agentgate-cli");
    cfg.jwks_refetch_min_interval_secs = 0;
    let client = OidcClient::new(cfg).unwrap();
    // A genuine token first: the JWKS is fetched once and cached.
    let genuine = login_as(&client, Choice::Approve("alice")).await.unwrap();
    client
        .verify_id_token(&id_token_of(&genuine), None)
        .await
        .unwrap();
    assert_eq!(client.jwks_fetch_count().await, 1, "cached, not refetched");

    let err = client
        .verify_id_token(&forged, Some(&nonce))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IdentityError::UnknownKey { kid: Some(k) } if k.ends_with("-rs256")),
        "{err}"
    );
    assert_eq!(
        client.jwks_fetch_count().await,
        2,
        "one refetch for the unknown key id"
    );
    assert_eq!(a.stats().await["jwks_requests"].as_u64().unwrap(), 2);

    // Within the refetch interval an unknown key id fails without another fetch.
    let mut cfg = config(&a, "agentgate-cli");
    cfg.jwks_refetch_min_interval_secs = 3600;
    let client = OidcClient::new(cfg).unwrap();
    client
        .verify_id_token(&id_token_of(&genuine), None)
        .await
        .unwrap();
    let err = client
        .verify_id_token(&forged, Some(&nonce))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::UnknownKey { .. }), "{err}");
    assert_eq!(client.jwks_fetch_count().await, 1, "rate-limited refetch");
}

#[tokio::test]
async fn token_signed_by_other_key_under_known_kid_is_bad_signature() {
    if !harness_ready() {
        return;
    }
    let a = Provider::start(&[]);
    let prefix = a.kids[0].trim_end_matches("-rs256").to_owned();
    // Same issuer, same key ids, different keys.
    let b = Provider::start(&[("OIDC_ISSUER", &a.issuer), ("OIDC_KID_PREFIX", &prefix)]);
    let (forged, nonce) = raw_device_tokens(&b.base, &a.issuer, "alice").await;
    let client = OidcClient::new(config(&a, "agentgate-cli")).unwrap();
    let err = client
        .verify_id_token(&forged, Some(&nonce))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::BadSignature { .. }), "{err}");
}

#[tokio::test]
async fn wrong_audience_is_rejected() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let cli = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let session = login_as(&cli, Choice::Approve("alice")).await.unwrap();
    let raw = id_token_of(&session);
    // A daemon configured for another client must not accept agentgate-cli's token.
    let other = OidcClient::new(config(&p, "some-other-client")).unwrap();
    let err = other.verify_id_token(&raw, None).await.unwrap_err();
    match err {
        IdentityError::WrongAudience { expected, found } => {
            assert_eq!(expected, ["some-other-client"]);
            assert_eq!(found, ["agentgate-cli"]);
        }
        other => panic!("expected WrongAudience, got {other}"),
    }
    // Asking for a nonce the token does not carry is refused too.
    let err = cli
        .verify_id_token(&raw, Some("not-the-nonce"))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::NonceMismatch), "{err}");
}

// ---------------------------------------------------------------------------
// Revocation and logout.

#[tokio::test]
async fn revoked_refresh_token_revokes_the_session() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let client = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let session = login_as(&client, Choice::Approve("alice")).await.unwrap();
    let mut store = IdentityStore::new();
    store
        .insert(session.clone(), LoginMethod::DeviceFlow)
        .unwrap();

    // Revoke the refresh token at the provider (RFC 7009), as an admin or logout would.
    session
        .revoke_at_provider(&client)
        .await
        .expect("revocation endpoint");

    let ticket = store
        .due_for_refresh(tokio::time::Instant::now(), Duration::from_hours(1))
        .pop()
        .expect("due for refresh");
    let mut renewing = ticket.session.clone();
    let result = renewing.refresh(&client).await.map(|()| renewing);
    let err = result.as_ref().expect_err("refresh must fail");
    assert!(err.is_grant_revoked(), "{err}");
    let event = store.finish_refresh(ticket, result).unwrap();
    assert!(
        matches!(&event, IdentityEvent::Revoked { name, .. } if name == "alice"),
        "{event:?}"
    );
    assert!(event.ends_identity());
    let err = store.get_verified("alice").unwrap_err();
    assert!(matches!(err, IdentityError::Revoked { .. }), "{err}");
    assert!(err.to_string().contains("invalid_grant"), "{err}");

    // Logout forgets it entirely.
    let (_, event) = store.logout("alice").unwrap();
    assert_eq!(
        event,
        IdentityEvent::Logout {
            name: "alice".into()
        }
    );
    assert!(matches!(
        store.get_verified("alice"),
        Err(IdentityError::UnknownIdentity { .. })
    ));
}

// ---------------------------------------------------------------------------
// Provider down.

#[tokio::test]
async fn provider_down_fails_fast_and_clearly() {
    // Nothing listening: connection refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = IdentityConfig::new(
        format!("http://127.0.0.1:{port}"),
        Some("agentgate-cli".into()),
    );
    cfg.http_timeout_secs = 1;
    let client = OidcClient::new(cfg).unwrap();
    let started = Instant::now();
    let err = device_login(&client, |_| panic!("no prompt when the provider is down"))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::IdpUnreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Accepts connections but never answers: our timeout, not a hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut cfg = IdentityConfig::new(
        format!("http://127.0.0.1:{port}"),
        Some("agentgate-cli".into()),
    );
    cfg.http_timeout_secs = 1;
    cfg.service_account.push(ServiceAccountConfig {
        name: "svc".into(),
        client_id: "svc".into(),
        secret_file: None,
        secret_env: Some("AGENTGATE_TEST_UNUSED_SECRET".into()),
        scopes: vec![],
        audience: None,
    });
    let client = OidcClient::new(cfg).unwrap();
    for attempt in 0..2 {
        let started = Instant::now();
        let err = if attempt == 0 {
            device_login(&client, |_| {}).await.unwrap_err()
        } else {
            client.verify_id_token("a.b.c", None).await.unwrap_err()
        };
        let waited = started.elapsed();
        assert!(
            matches!(&err, IdentityError::IdpTimeout { timeout, .. } if *timeout == Duration::from_secs(1)),
            "{err}"
        );
        assert!(
            err.to_string().contains("did not answer within 1s"),
            "{err}"
        );
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }
    drop(silent);
}

// ---------------------------------------------------------------------------
// Service accounts.

const SVC_SECRET: &str = "svc-reporting-test-secret-5f2c9a";

fn svc_config(
    p: &Provider,
    dir: &std::path::Path,
    mode: u32,
    client_id: &str,
    secret: &str,
) -> IdentityConfig {
    let path = dir.join(format!("{client_id}.secret"));
    let _ = std::fs::remove_file(&path); // a fresh file, owned by us
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    let mut cfg = config(p, "agentgate-cli");
    cfg.service_account.push(ServiceAccountConfig {
        name: client_id.into(),
        client_id: client_id.into(),
        secret_file: Some(path),
        secret_env: None,
        scopes: vec!["reports:read".into()],
        audience: (client_id == "svc-reporting").then(|| "urn:agentgate".to_owned()),
    });
    cfg
}

#[tokio::test]
async fn service_account_login_with_secret_file() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let dir = tempfile::tempdir().unwrap();

    // JWT access token (RFC 9068), verified against the JWKS.
    let client = OidcClient::new(svc_config(
        &p,
        dir.path(),
        0o600,
        "svc-reporting",
        SVC_SECRET,
    ))
    .unwrap();
    let mut session = service_account_login(&client, "svc-reporting")
        .await
        .expect("client credentials");
    let id = session.identity().clone();
    assert_eq!(
        (id.name.as_str(), id.kind),
        ("svc-reporting", IdentityKind::Service)
    );
    assert_eq!(id.groups, ["reporting"]);
    assert_eq!(session.service_account(), Some("svc-reporting"));
    session
        .refresh(&client)
        .await
        .expect("renew by client credentials");
    let mut store = IdentityStore::new();
    store
        .insert(session, LoginMethod::ClientCredentials)
        .unwrap();
    assert_eq!(
        store.get_verified("svc-reporting").unwrap().kind,
        IdentityKind::Service
    );

    // Opaque access token: verified by introspection.
    let client =
        OidcClient::new(svc_config(&p, dir.path(), 0o400, "svc-opaque", SVC_SECRET)).unwrap();
    let session = service_account_login(&client, "svc-opaque")
        .await
        .expect("introspected");
    assert_eq!(session.identity().name, "svc-opaque");
    assert!(session.identity().expires_at > std::time::SystemTime::now());

    // A group- or world-readable secret file is refused before anything is sent.
    for mode in [0o640, 0o644, 0o604] {
        let client = OidcClient::new(svc_config(
            &p,
            dir.path(),
            mode,
            "svc-reporting",
            SVC_SECRET,
        ))
        .unwrap();
        let err = service_account_login(&client, "svc-reporting")
            .await
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::SecretFileMode { .. }),
            "{mode:o}: {err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    // A 0600 file owned by someone else is refused too (when we can arrange one).
    let cfg = svc_config(&p, dir.path(), 0o600, "svc-reporting", SVC_SECRET);
    let path = cfg.service_account[0].secret_file.clone().unwrap();
    if std::os::unix::fs::chown(&path, Some(65534), None).is_ok() {
        let client = OidcClient::new(cfg).unwrap();
        let err = service_account_login(&client, "svc-reporting")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("owned by another user"), "{err}");
    } else {
        eprintln!("not root: skipping the foreign-owner secret file check");
    }

    // A wrong secret: the provider's invalid_client, and the secret appears nowhere.
    let wrong = "wrong-secret-value-77aa";
    let client =
        OidcClient::new(svc_config(&p, dir.path(), 0o600, "svc-reporting", wrong)).unwrap();
    let err = service_account_login(&client, "svc-reporting")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IdentityError::OAuth { error, .. } if error == "invalid_client"),
        "{err}"
    );
    for text in [
        err.to_string(),
        format!("{err:?}"),
        format!("{:?}", client.config()),
    ] {
        assert!(!text.contains(wrong), "secret leaked: {text}");
    }

    // Unknown account name.
    assert!(matches!(
        service_account_login(&client, "nope").await,
        Err(IdentityError::UnknownServiceAccount { .. })
    ));
}

const SECRET_VAR: &str = "AGENTGATE_TEST_SVC_REPORTING_SECRET";

fn env_account_config(issuer: String) -> IdentityConfig {
    let mut cfg = IdentityConfig::new(issuer, None);
    cfg.service_account.push(ServiceAccountConfig {
        name: "reporting".into(),
        client_id: "svc-reporting".into(),
        secret_file: None,
        secret_env: Some(SECRET_VAR.into()),
        scopes: vec![],
        audience: Some("urn:agentgate".into()),
    });
    cfg
}

#[tokio::test]
async fn service_account_secret_from_environment() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    // Unset here: a clear error naming the variable.
    let client = OidcClient::new(env_account_config(p.issuer.clone())).unwrap();
    let err = service_account_login(&client, "reporting")
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::SecretEnvMissing { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(SECRET_VAR), "{err}");

    // Set: run the login in a copy of this test binary that has it in its environment
    // (setting variables in a running multi-threaded test process is not sound).
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_secret_child", "--ignored", "--nocapture"])
        .env(SECRET_VAR, SVC_SECRET)
        .env("AGENTGATE_TEST_ISSUER", &p.issuer)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "child login with the secret from the environment failed"
    );
}

/// Run by `service_account_secret_from_environment` with the secret in its environment.
#[tokio::test]
#[ignore = "child process of service_account_secret_from_environment"]
async fn env_secret_child() {
    let issuer = std::env::var("AGENTGATE_TEST_ISSUER")
        .expect("run via service_account_secret_from_environment");
    let client = OidcClient::new(env_account_config(issuer)).unwrap();
    let session = service_account_login(&client, "reporting")
        .await
        .expect("login");
    assert_eq!(session.identity().name, "reporting");
    assert_eq!(session.identity().groups, ["reporting"]);
}

// ---------------------------------------------------------------------------
// Secrets stay out of logs and Debug output.

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_and_secrets_never_reach_logs_or_debug() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    // Global, not thread-local: tracing caches per-callsite interest across threads,
    // so a thread-local subscriber misses events while other tests run. Every test's
    // logs from here on land in the capture, which only makes the check stricter.
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber)
        .expect("only this test installs a subscriber");

    let dir = tempfile::tempdir().unwrap();
    let client = OidcClient::new(svc_config(
        &p,
        dir.path(),
        0o600,
        "svc-reporting",
        SVC_SECRET,
    ))
    .unwrap();
    let svc = service_account_login(&client, "svc-reporting")
        .await
        .unwrap();
    let mut human = login_as(&client, Choice::Approve("alice")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    human.refresh(&client).await.unwrap();
    let handoff = human.handoff().unwrap();
    let wire: serde_json::Value = serde_json::to_value(&handoff).unwrap();
    let id_token = wire["id_token"].as_str().unwrap().to_owned();
    let refresh_token = wire["refresh_token"].as_str().unwrap().to_owned();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("device login verified"),
        "the capture works: {logs}"
    );
    let debug = format!(
        "{svc:?} {human:?} {handoff:?} {:?} {client:?}",
        client.config()
    );
    for (what, secret) in [
        ("client secret", SVC_SECRET),
        ("ID token", &id_token),
        ("refresh token", &refresh_token),
    ] {
        assert!(!logs.contains(secret), "{what} in logs");
        assert!(!debug.contains(secret), "{what} in Debug output: {debug}");
    }
    // The ID token's signature part alone must not leak either (e.g. truncated tokens).
    let signature = id_token.rsplit('.').next().unwrap();
    assert!(!logs.contains(signature) && !debug.contains(signature));
}

// ---------------------------------------------------------------------------
// The `agentgate login` command, end to end, with a stand-in daemon socket.

#[tokio::test]
async fn agentgate_login_command_hands_a_verifiable_session_to_the_daemon() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_agentgate"))
        .args([
            "login",
            "--issuer",
            &p.issuer,
            "--client-id",
            "agentgate-cli",
        ])
        .args(["--config", "/nonexistent/agentgate.toml"])
        .env("AGENTGATE_CONTROL_SOCKET", &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut output = String::new();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the CLI shows the verification link");
        output.push_str(&line);
        output.push('\n');
        if let Some(rest) = line.strip_prefix("(or open ") {
            break rest.split(' ').next().unwrap().to_owned();
        }
    };
    assert!(output.contains("enter the code"), "{output}");
    browser(url, Choice::Approve("bob"), None).await;

    // The "daemon": read the login request, answer it, and verify it independently.
    let line = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stream);
        reader.read_line(&mut line).unwrap();
        reader
            .get_mut()
            .write_all(b"{\"ok\":true,\"data\":{\"name\":\"bob\",\"expires_at\":\"soon\"}}\n")
            .unwrap();
        line
    })
    .await
    .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        output.push_str(&line);
        output.push('\n');
    }
    assert!(status.success(), "agentgate login failed: {output}");
    assert!(
        output.contains("Logged in as bob (groups: approvers, analysts)"),
        "{output}"
    );

    let request: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(request["op"], "login", "{line}");
    let handoff: LoginHandoff = serde_json::from_value(request["handoff"].clone()).unwrap();
    let daemon = OidcClient::new(config(&p, "agentgate-cli")).unwrap();
    let session = agentgate::identity::Session::from_handoff(&daemon, handoff)
        .await
        .unwrap();
    assert_eq!(session.identity().name, "bob");
    let wire: serde_json::Value = serde_json::from_str(&line).unwrap();
    for token in ["id_token", "refresh_token"] {
        let value = wire["handoff"][token].as_str().unwrap();
        assert!(!output.contains(value), "{token} printed by the CLI");
    }

    // Neither a config file nor --issuer: a usage error (exit 2) naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_agentgate"))
        .args(["login", "--config", "/nonexistent/agentgate.toml"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--issuer"));
}

// ---------------------------------------------------------------------------
// The daemon's maintenance pass.

#[tokio::test]
async fn maintain_logs_in_service_accounts_and_refreshes_before_expiry() {
    if !harness_ready() {
        return;
    }
    let p = Provider::start(&[("OIDC_ID_TOKEN_TTL", "30"), ("OIDC_ACCESS_TOKEN_TTL", "30")]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = svc_config(&p, dir.path(), 0o600, "svc-reporting", SVC_SECRET);
    cfg.refresh_before_expiry_secs = 60; // longer than the tokens live: due at once
    let client = OidcClient::new(cfg).unwrap();
    let store = tokio::sync::Mutex::new(IdentityStore::for_config(client.config()));

    let events = agentgate::identity::maintain(&store, &client).await;
    assert!(
        matches!(events.as_slice(), [IdentityEvent::Login { name, method: LoginMethod::ClientCredentials, .. }] if name == "svc-reporting"),
        "{events:?}"
    );
    assert!(store.lock().await.get_verified("svc-reporting").is_ok());

    let alice = login_as(&client, Choice::Approve("alice")).await.unwrap();
    let first_expiry = alice.identity().expires_at;
    store
        .lock()
        .await
        .insert(alice, LoginMethod::DeviceFlow)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let events = agentgate::identity::maintain(&store, &client).await;
    let refreshed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            IdentityEvent::Refresh { name, expires_at } => Some((name.as_str(), *expires_at)),
            _ => None,
        })
        .collect();
    assert!(
        refreshed
            .iter()
            .any(|(n, at)| *n == "alice" && *at > first_expiry),
        "{events:?}"
    );
    assert!(
        refreshed.iter().any(|(n, _)| *n == "svc-reporting"),
        "{events:?}"
    );
    assert!(store.lock().await.get_verified("alice").is_ok());
}
