//! Verified identities end to end: a real `OpenID` provider (npm `oidc-provider`,
//! tests/oidc/provider.mjs) and a real daemon in the test's netns.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use agentgate_e2e::{DaemonOptions, Env, Proc, run_ok, scripts_dir};

const OIDC_PORT: u16 = 18080;
/// The provider's default test-only secret for `svc-reporting`.
const SVC_SECRET: &str = "svc-reporting-test-secret-5f2c9a";

fn oidc_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

#[test]
fn service_account_identity_is_verified_and_its_groups_drive_policy() {
    assert!(
        oidc_dir().join("node_modules/oidc-provider").is_dir(),
        "tests/oidc/node_modules is missing: run `cargo xtask setup`"
    );
    let secret_dir = std::env::temp_dir().join(agentgate_e2e::unique("svcsecret"));
    fs::create_dir_all(&secret_dir).unwrap();
    let secret = secret_dir.join("svc-reporting.secret");
    fs::write(&secret, SVC_SECRET).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();

    let policy = r#"
[defaults]
unknown_destination = "deny"
[[resource]]
name = "loopback"
protocol = "tcp"
addresses = ["127.0.0.0/8:*"]
default_action = "deny"
[[rule]]
name = "reporting-may-connect"
groups = ["reporting"]
resources = ["loopback"]
action = "allow"
"#;
    let extra = format!(
        "\n[identity]\nissuer = \"http://127.0.0.1:{OIDC_PORT}\"\nclient_id = \"agentgate-cli\"\n\
         [[identity.service_account]]\nname = \"svc-reporting\"\nclient_id = \"svc-reporting\"\n\
         secret_file = \"{}\"\nscopes = [\"reports:read\"]\naudience = \"urn:agentgate\"\n",
        secret.display()
    );
    let mut env = Env::prepare(
        "identity",
        DaemonOptions {
            extra,
            policies: vec![("p.toml".into(), policy.into())],
            ..Default::default()
        },
    )
    .unwrap();

    let mut c = env.netns.command("node");
    c.arg("provider.mjs")
        .current_dir(oidc_dir())
        .env("OIDC_PORT", OIDC_PORT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut provider = Proc::spawn("oidc-provider", c).unwrap();
    let ready = provider.read_line().unwrap();
    assert!(ready.contains("issuer"), "{ready}");
    env.start_daemon().unwrap();
    let (_echo, port) = env.echo_server("127.0.0.1").unwrap();

    // The daemon logs the service account in by itself (client credentials,
    // token verified against the provider's JWKS); until then it is unknown.
    let client = [
        "python3".to_owned(),
        scripts_dir().join("client.py").display().to_string(),
        "blocking".into(),
        "127.0.0.1".into(),
        port.to_string(),
        "--bytes".into(),
        "10".into(),
    ];
    let argv: Vec<&str> = client.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = env.exec("svc-reporting", &argv).output().unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "svc-reporting never became usable: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        env.daemon_log().contains("identity.event"),
        "the login is logged"
    );

    // Users who never logged in are not known to the daemon.
    for who in ["alice", "mallory"] {
        let out = env.exec(who, &["true"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{who}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown identity"));
    }
    // The secret never reaches the daemon's log.
    assert!(!env.daemon_log().contains(SVC_SECRET));

    // A forged login handoff is refused by the daemon's own verification.
    let forged = r#"{"op":"login","handoff":{"version":1,"issuer":"http://127.0.0.1:18080","client_id":"agentgate-cli","id_token":"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2ln","refresh_token":null,"nonce":null}}"#;
    let sock = env.state.join("control.sock");
    let probe = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX); s.connect('{}'); s.sendall(sys.argv[1].encode()+b'\\n'); print(s.makefile().readline())",
        sock.display()
    );
    let out = run_ok(std::process::Command::new("python3").args(["-c", &probe, forged])).unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("login refused"),
        "{reply}"
    );
    fs::remove_dir_all(secret_dir).unwrap();
}
