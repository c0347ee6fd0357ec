//! SSH at L7 end to end: a real daemon, Debian's OpenSSH `sshd` (its own
//! host key and `TrustedUserCAKeys`), and real clients (OpenSSH `ssh`,
//! `scp` and `sftp`, paramiko) run tagged as the label `demo`; `bob` approves.
//!
//! One world per file (one daemon, three sshds: the host, trusted through
//! its host CA, and two impostors, one with another host key, one with a
//! host certificate from another CA); the scenarios run in order inside one
//! test so the sshds start once.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use agentgate_e2e::{DaemonOptions, Env, Proc, run_ok, ssh::SshServer};
use serde_json::Value;

const HOST_PORT: u16 = 2222;
const IMPOSTOR_PORT: u16 = 2223;
const IMPOSTOR_CA_PORT: u16 = 2224;
const PY: &str = "/usr/bin/python3";

fn policy() -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "ops"
protocol = "ssh"
addresses = ["127.0.0.1:{HOST_PORT}"]
default_action = "deny"

[[resource]]
name = "impostor"
protocol = "ssh"
addresses = ["127.0.0.1:{IMPOSTOR_PORT}"]
default_action = "deny"

[[resource]]
name = "impostor-ca"
protocol = "ssh"
addresses = ["127.0.0.1:{IMPOSTOR_CA_PORT}"]
default_action = "deny"

[[resource]]
name = "loopback"
protocol = "tcp"
addresses = ["127.0.0.0/8:*"]
default_action = "deny"

[[rule]]
name = "ssh-reads"
identities = ["demo"]
resources = ["ops", "impostor", "impostor-ca"]
action = "allow"
match = {{ ssh = ["read"] }}
ssh_user = "root"

[[rule]]
name = "intern-reads"
identities = ["intern"]
resources = ["ops"]
action = "allow"
match = {{ ssh = ["read"] }}

[[rule]]
name = "ssh-privileged"
identities = ["demo"]
resources = ["ops"]
action = "require_approval"
match = {{ ssh = ["privileged", "shell"] }}
approval = {{ approver_groups = ["approvers"], timeout = "30s" }}

[[rule]]
name = "ssh-no-changes"
identities = ["demo"]
resources = ["ops"]
action = "deny"
match = {{ ssh = ["write", "delete"] }}

[[rule]]
name = "sftp-reads"
identities = ["demo"]
resources = ["ops"]
action = "allow"
match = {{ ssh = ["sftp-read"] }}

[[rule]]
name = "sftp-no-uploads"
identities = ["demo"]
resources = ["ops"]
action = "deny"
match = {{ ssh = ["sftp-write"] }}

[masking]
detectors = ["us_ssn"]
detector_resources = ["ops"]
"#
    )
}

struct World {
    env: Env,
    host: SshServer,
    impostor: SshServer,
    impostor_ca: SshServer,
}

fn world() -> World {
    let mut env = Env::prepare(
        "ssh",
        DaemonOptions {
            policies: vec![("ssh.toml".into(), policy())],
            labels: vec![
                ("bob".into(), vec!["approvers".into()]),
                ("intern".into(), Vec::new()),
            ],
            ..DaemonOptions::default()
        },
    )
    .unwrap();
    let host = SshServer::start(&env.netns, HOST_PORT, "host").unwrap();
    let impostor = SshServer::start(&env.netns, IMPOSTOR_PORT, "impostor").unwrap();
    // Another host with a host certificate from another CA, checked against
    // the real host's CA.
    let impostor_ca = SshServer::start(&env.netns, IMPOSTOR_CA_PORT, "impostor-ca").unwrap();
    // The impostor is checked against the real host's key.
    let bad_known_hosts = env.state.join("impostor_known_hosts");
    fs::write(
        &bad_known_hosts,
        format!("[127.0.0.1]:{IMPOSTOR_PORT} {}\n", host.host_public),
    )
    .unwrap();
    let s = env.state.display().to_string();
    env.opts.extra = format!(
        "\n[proxy.ssh]\nhost_ca_key = \"{s}/ssh/host_ca\"\nhost_key = \"{s}/ssh/host_key\"\n\
         known_hosts = \"{s}/ssh/known_hosts\"\nhandshake_timeout_secs = 3\nmax_channels = 4\n\n\
         [proxy.ssh.resources.ops]\nuser = \"nobody\"\nuser_ca_key = \"{ca}\"\nhost_ca = \"{hca}\"\n\n\
         [proxy.ssh.resources.impostor-ca]\nuser = \"root\"\nuser_ca_key = \"{ca3}\"\nhost_ca = \"{hca}\"\n\n\
         [proxy.ssh.resources.impostor]\nuser = \"root\"\nuser_ca_key = \"{ca2}\"\nknown_hosts = \"{bad}\"\n\n\
         [approvals]\nallow_labels = true\n",
        ca = host.user_ca.display(),
        hca = host.host_ca_pub.display(),
        ca3 = impostor_ca.user_ca.display(),
        ca2 = impostor.user_ca.display(),
        bad = bad_known_hosts.display(),
    );
    env.write_config().unwrap();
    env.start_daemon().unwrap();
    World {
        env,
        host,
        impostor,
        impostor_ca,
    }
}

impl World {
    /// The `known_hosts` file the daemon keeps (its `@cert-authority` block).
    fn proxy_known_hosts(&self) -> PathBuf {
        self.env.state.join("ssh/known_hosts")
    }

    /// A user's own `known_hosts`: the real host's key under the same name,
    /// as if the user had logged in directly before.
    fn user_known_hosts(&self) -> PathBuf {
        let p = self.env.state.join("user_known_hosts");
        fs::write(
            &p,
            format!("[127.0.0.1]:{HOST_PORT} {}\n", self.host.host_public),
        )
        .unwrap();
        p
    }

    /// `ssh` run tagged as `demo`, trusting only the daemon's `known_hosts`
    /// (plus the user's own entry for the host).
    fn ssh(&self, port: u16, extra: &[&str], command: Option<&str>) -> Command {
        self.ssh_as("demo", port, extra, command)
    }

    fn ssh_as(&self, who: &str, port: u16, extra: &[&str], command: Option<&str>) -> Command {
        let gk = format!(
            "GlobalKnownHostsFile={}",
            self.proxy_known_hosts().display()
        );
        let uk = format!("UserKnownHostsFile={}", self.user_known_hosts().display());
        let port = port.to_string();
        let mut args: Vec<&str> = vec![
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            &gk,
            "-o",
            &uk,
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentityFile=/dev/null",
            "-p",
            &port,
        ];
        args.extend_from_slice(extra);
        args.push("root@127.0.0.1");
        if let Some(c) = command {
            args.push(c);
        }
        let mut c = self.env.exec(who, &args);
        c.env("HOME", "/tmp");
        c
    }

    fn records(&self) -> Vec<Value> {
        self.env.audit_records().unwrap()
    }

    fn exec_records(&self, needle: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| {
                r["kind"] == "statement"
                    && r["action"]["ssh"]["command"]
                        .as_str()
                        .is_some_and(|c| c.contains(needle))
            })
            .collect()
    }

    fn sessions_started(&self) -> usize {
        self.host.log().matches("Starting session:").count()
    }
}

/// Runs a client to its end (30 s at most, then the test fails). Output
/// goes through files: a killed client's children cannot hold a pipe open.
fn output(c: &mut Command) -> Output {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir();
    let (o, e) = (
        dir.join(format!(
            "agentgate-ssh-test-{}-{seq}.out",
            std::process::id()
        )),
        dir.join(format!(
            "agentgate-ssh-test-{}-{seq}.err",
            std::process::id()
        )),
    );
    c.stdin(Stdio::null())
        .stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap());
    let mut p = Proc::spawn("client", std::mem::replace(c, Command::new("true"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            p.kill9();
            panic!(
                "the client did not finish: {}{}",
                fs::read_to_string(&o).unwrap_or_default(),
                fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: fs::read(&o).unwrap_or_default(),
        stderr: fs::read(&e).unwrap_or_default(),
    };
    let _ = (fs::remove_file(&o), fs::remove_file(&e));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pending(env: &Env) -> Vec<Value> {
    let out = run_ok(&mut env.agentgate(&["approvals", "list", "--json"])).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

fn next_request(env: &Env, client: &mut Proc) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut p = pending(env);
        if p.len() == 1 {
            return p.remove(0);
        }
        assert!(p.is_empty(), "more than one request pending: {p:?}");
        assert!(
            client.child.try_wait().unwrap().is_none(),
            "the client exited before its request was held"
        );
        assert!(Instant::now() < deadline, "no approval request came");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(p: Proc) -> Output {
    let mut p = p;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the client did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = std::mem::replace(&mut p.child, Command::new("true").spawn().unwrap());
    child.wait_with_output().unwrap()
}

#[test]
#[allow(clippy::too_many_lines)] // one daemon and sshd, the scenario step by step
fn ssh_commands_shells_forwarding_and_recordings() {
    let w = world();
    let env = &w.env;
    let from = agentgate_e2e::agent::utc(-60);

    // The agent's own user has no key the host accepts: straight to sshd
    // (untagged, not through the proxy) it is refused.
    let direct = output(
        env.netns
            .command("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o"])
            .arg(format!(
                "UserKnownHostsFile={}",
                w.host.known_hosts.display()
            ))
            .args(["-p", &HOST_PORT.to_string(), "root@127.0.0.1", "true"])
            .env("HOME", "/tmp"),
    );
    assert!(
        !direct.status.success(),
        "the host accepted the agent's own credentials"
    );
    assert!(
        text(&direct.stderr).contains("Permission denied"),
        "{}",
        text(&direct.stderr)
    );

    // 1. A read runs, with the proxy trusted through the host CA although
    //    the user's known_hosts holds the real host's key; output masked.
    let t0 = Instant::now();
    let out = output(&mut w.ssh(HOST_PORT, &[], Some("uname -s; echo ssn 123-45-6789")));
    let first_exec = t0.elapsed();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Linux"), "{stdout}");
    assert!(
        !stdout.contains("123-45-6789"),
        "an SSN reached the agent: {stdout}"
    );
    assert!(stdout.contains("[REDACTED:us_ssn]"), "{stdout}");
    // The host saw the certificate's key id naming the verified identity.
    let log = w
        .host
        .wait_log("ID demo conn-", Duration::from_secs(5))
        .unwrap();
    assert!(log.contains("Accepted publickey for root"), "{log}");
    let recs = w.records();
    let start = recs
        .iter()
        .find(|r| r["kind"] == "session.start" && r["resource"] == "ops")
        .expect("a session.start record");
    let s = &start["action"]["ssh"];
    assert_eq!(s["credential"]["kind"], "user-certificate", "{start}");
    assert!(
        s["credential"]["id"]
            .as_str()
            .unwrap()
            .starts_with("demo conn-"),
        "{start}"
    );
    // The host is trusted through its host CA (the resource names no
    // known_hosts).
    assert_eq!(s["host_key_check"], "match", "{start}");
    assert!(
        s["host_ca"].as_str().unwrap().starts_with("SHA256:"),
        "{start}"
    );
    assert!(
        s["host_key"].as_str().unwrap().starts_with("SHA256:"),
        "{start}"
    );
    // The login comes from the rule that names one (the resource's default
    // is `nobody`).
    assert_eq!(s["upstream_user"], "root");
    assert_eq!(s["upstream_user_rule"], "ssh-reads", "{start}");
    assert_eq!(s["agent_auth"][0], "none", "{start}");
    let exec = &w.exec_records("uname -s")[0];
    assert_eq!(exec["action"]["ssh"]["class"], "read");
    assert_eq!(exec["decision"]["verdict"], "allow");
    let hash = exec["action"]["ssh"]["hash"].as_str().unwrap();
    let done = recs
        .iter()
        .find(|r| r["result"]["status"] == "ok" && r["action"]["ssh"]["hash"] == hash)
        .expect("the exec's result");
    assert!(done["result"]["bytes"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(
        done["transform"]["masked"]["detectors"][0], "us_ssn",
        "{done}"
    );
    let chunks: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "recording.chunk")
        .collect();
    assert!(!chunks.is_empty(), "no recording chunk recorded");
    let cast = env
        .state
        .join("audit/recordings")
        .join(chunks[0]["result"]["file"].as_str().unwrap());
    let cast_text = fs::read_to_string(&cast).unwrap();
    assert!(
        cast_text.contains("[REDACTED:us_ssn]") && !cast_text.contains("123-45-6789"),
        "{cast_text}"
    );
    eprintln!("first exec through the handler: {first_exec:?}");

    // 1b. An identity whose rules name no login gets the resource's: the
    //     host sees `nobody` (whose shell refuses to run anything).
    let _ = output(&mut w.ssh_as("intern", HOST_PORT, &[], Some("id -un")));
    w.host
        .wait_log("Accepted publickey for nobody", Duration::from_secs(5))
        .unwrap();
    let intern = w
        .records()
        .into_iter()
        .find(|r| r["kind"] == "session.start" && r["identity"]["subject"] == "intern")
        .expect("intern's session.start");
    assert_eq!(
        intern["action"]["ssh"]["upstream_user"], "nobody",
        "{intern}"
    );

    // 2. A denied command never reaches the host: 126 and one line on stderr.
    let before = w.sessions_started();
    let out = output(&mut w.ssh(HOST_PORT, &[], Some("rm -rf /tmp/agentgate-ssh-x")));
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("agentgate: denied by rule ssh-no-changes"),
        "{err}"
    );
    assert_eq!(
        w.sessions_started(),
        before,
        "a denied command started a session on the host"
    );

    // 3. `sudo` is held; rejected it never runs, approved it runs.
    let rejected_marker = env.state.join("rejected-marker");
    let mut held = w.ssh(
        HOST_PORT,
        &[],
        Some(&format!("sudo touch {}", rejected_marker.display())),
    );
    held.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut p = Proc::spawn("ssh sudo", held).unwrap();
    let req = next_request(env, &mut p);
    assert!(
        req["summary"].as_str().unwrap().contains("sudo touch"),
        "{req}"
    );
    let id = req["id"].as_str().unwrap().to_owned();
    run_ok(&mut env.agentgate(&[
        "approvals",
        "reject",
        &id,
        "--as",
        "bob",
        "--reason",
        "not now",
    ]))
    .unwrap();
    let out = finish(p);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("held for approval"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("not approved"),
        "{}",
        text(&out.stderr)
    );
    assert!(!rejected_marker.exists(), "a rejected command ran");

    let marker = env.state.join("approved-marker");
    let mut held = w.ssh(
        HOST_PORT,
        &[],
        Some(&format!("sudo touch {}", marker.display())),
    );
    held.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut p = Proc::spawn("ssh sudo", held).unwrap();
    let id = next_request(env, &mut p)["id"].as_str().unwrap().to_owned();
    assert!(!marker.exists(), "the held command ran before approval");
    run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "bob"])).unwrap();
    let out = finish(p);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(marker.exists(), "the approved command did not run");
    let rec = &w
        .exec_records("sudo touch")
        .into_iter()
        .find(|r| r["approval"]["outcome"] == "approved")
        .expect("the approved exec's record");
    assert_eq!(rec["approval"]["approvers"][0], "bob", "{rec}");

    // 4. An interactive shell is held, approved, used; the recording holds
    //    what was typed.
    let mut shell = w.ssh(HOST_PORT, &["-tt"], None);
    shell
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Proc::spawn("ssh shell", shell).unwrap();
    let req = next_request(env, &mut p);
    assert!(
        req["summary"]
            .as_str()
            .unwrap()
            .contains("interactive shell"),
        "{req}"
    );
    let id = req["id"].as_str().unwrap().to_owned();
    run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "bob"])).unwrap();
    let mut stdin = p.child.stdin.take().unwrap();
    stdin.write_all(b"echo typed-$((6*7))\nexit\n").unwrap();
    drop(stdin);
    let out = finish(p);
    assert!(
        text(&out.stdout).contains("typed-42"),
        "{}",
        text(&out.stdout)
    );
    let shell_rec = w
        .records()
        .into_iter()
        .filter(|r| r["kind"] == "recording.chunk")
        .map(|r| r["result"]["file"].as_str().unwrap().to_owned())
        .find(|f| {
            fs::read_to_string(env.state.join("audit/recordings").join(f))
                .unwrap()
                .contains(r#""i","echo typed-$((6*7))"#)
        });
    assert!(shell_rec.is_some(), "no recording holds the typed command");

    // 5. Forwarding goes nowhere: -W (direct-tcpip) and -R are refused and
    //    the target listener sees nobody.
    let peers = env.state.join("echo-peers");
    let (_echo, echo_port) = {
        let mut c = env.netns.command("python3");
        c.arg(agentgate_e2e::scripts_dir().join("echo_server.py"))
            .arg("127.0.0.1")
            .arg(&peers)
            .stdout(Stdio::piped());
        let mut p = Proc::spawn("echo", c).unwrap();
        let port: u16 = p.read_line().unwrap().trim().parse().unwrap();
        (p, port)
    };
    let target = format!("127.0.0.1:{echo_port}");
    let out = output(&mut w.ssh(HOST_PORT, &["-W", &target], None));
    assert!(!out.status.success(), "ssh -W succeeded");
    assert!(
        text(&out.stderr).contains("administratively prohibited"),
        "{}",
        text(&out.stderr)
    );
    let remote = format!("0:{target}");
    let out = output(&mut w.ssh(
        HOST_PORT,
        &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &remote],
        None,
    ));
    assert!(!out.status.success(), "ssh -R succeeded");
    assert!(
        text(&out.stderr).contains("forwarding failed"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        fs::read_to_string(&peers).unwrap_or_default().is_empty(),
        "the target was reached"
    );
    let forwards: Vec<Value> = w
        .records()
        .into_iter()
        .filter(|r| r["action"]["ssh"]["class"] == "forward")
        .collect();
    assert_eq!(forwards.len(), 2, "{forwards:?}");
    assert!(forwards.iter().all(|r| r["decision"]["verdict"] == "deny"));

    // 6. scp (legacy protocol: an exec of `scp -f` / `scp -t`): download
    //    allowed and recorded, upload denied by rule.
    let local = env.state.join("downloaded");
    let mut scp = env.exec(
        "demo",
        &[
            "scp",
            "-O",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("GlobalKnownHostsFile={}", w.proxy_known_hosts().display()),
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-P",
            &HOST_PORT.to_string(),
            "root@127.0.0.1:/etc/hostname",
            &local.display().to_string(),
        ],
    );
    let out = output(scp.env("HOME", "/tmp"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fs::read(&local).unwrap(),
        fs::read("/etc/hostname").unwrap()
    );
    let mut up = env.exec(
        "demo",
        &[
            "scp",
            "-O",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("GlobalKnownHostsFile={}", w.proxy_known_hosts().display()),
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-P",
            &HOST_PORT.to_string(),
            &local.display().to_string(),
            "root@127.0.0.1:/tmp/agentgate-uploaded",
        ],
    );
    let out = output(up.env("HOME", "/tmp"));
    assert!(!out.status.success(), "an upload went through");
    assert!(!Path::new("/tmp/agentgate-uploaded").exists());
    // 6b. SFTP (OpenSSH `sftp`, and `scp` in its default SFTP mode): a
    //     download is recorded with its size; an upload, a remove and a
    //     rename are refused by rule with nothing changed on the host, and
    //     the session stays usable.
    let keep = env.state.join("keep-me");
    fs::write(&keep, b"kept").unwrap();
    let fetched = env.state.join("fetched");
    let batch = env.state.join("sftp-batch");
    fs::write(
        &batch,
        format!(
            "get /etc/hostname {f}\n-put {f} /tmp/agentgate-sftp-up\n-rm {k}\n\
             -rename {k} {k}-moved\nls {k}\n",
            f = fetched.display(),
            k = keep.display()
        ),
    )
    .unwrap();
    let sftp_opts = |prog: &str, port_flag: &str| -> Vec<String> {
        [
            prog,
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("GlobalKnownHostsFile={}", w.proxy_known_hosts().display()),
            "-o",
            "UserKnownHostsFile=/dev/null",
            port_flag,
            &HOST_PORT.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let mut args = sftp_opts("sftp", "-P");
    args.extend([
        "-b".into(),
        batch.display().to_string(),
        "root@127.0.0.1".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = output(env.exec("demo", &args).env("HOME", "/tmp"));
    let (said, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{said}{err}");
    assert_eq!(
        fs::read(&fetched).unwrap(),
        fs::read("/etc/hostname").unwrap()
    );
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        !Path::new("/tmp/agentgate-sftp-up").exists(),
        "an sftp upload was written"
    );
    assert_eq!(
        fs::read(&keep).unwrap(),
        b"kept",
        "remove or rename went through"
    );
    assert!(
        said.contains(&keep.display().to_string()),
        "the session did not go on: {said}"
    );
    let mut args = sftp_opts("scp", "-P");
    args.extend([
        fetched.display().to_string(),
        "root@127.0.0.1:/tmp/agentgate-scp-up".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = output(env.exec("demo", &args).env("HOME", "/tmp"));
    assert!(!out.status.success(), "an scp (sftp) upload went through");
    assert!(!Path::new("/tmp/agentgate-scp-up").exists());
    let sftp_recs: Vec<Value> = w
        .records()
        .into_iter()
        .filter(|r| r["action"]["ssh"]["request"] == "sftp")
        .collect();
    let size = fs::metadata("/etc/hostname").unwrap().len();
    let download = sftp_recs
        .iter()
        .find(|r| {
            r["action"]["ssh"]["op"] == "open-read"
                && r["action"]["ssh"]["path"] == "/etc/hostname"
                && r["result"]["status"] == "ok"
        })
        .unwrap_or_else(|| panic!("no download result: {sftp_recs:#?}"));
    assert_eq!(download["action"]["ssh"]["read_bytes"], size, "{download}");
    for (op, path) in [
        ("open-write", "/tmp/agentgate-sftp-up".to_owned()),
        ("open-write", "/tmp/agentgate-scp-up".to_owned()),
        ("remove", keep.display().to_string()),
        ("posix-rename", keep.display().to_string()),
    ] {
        let denied = sftp_recs
            .iter()
            .find(|r| r["action"]["ssh"]["op"] == op && r["action"]["ssh"]["path"] == path.as_str())
            .unwrap_or_else(|| panic!("no {op} {path} record: {sftp_recs:#?}"));
        assert_eq!(denied["decision"]["verdict"], "deny", "{denied}");
        assert_eq!(denied["decision"]["rule"], "sftp-no-uploads", "{denied}");
    }

    // 7. paramiko, verifying the proxy against the daemon's known_hosts.
    let script = format!(
        r#"
import paramiko
c = paramiko.SSHClient()
c.load_host_keys("{kh}")
c.set_missing_host_key_policy(paramiko.RejectPolicy())
c.connect("127.0.0.1", port={HOST_PORT}, username="root", password="unused", look_for_keys=False, allow_agent=False)
_, out, _ = c.exec_command("id -un")
print(out.read().decode().strip(), out.channel.recv_exit_status())
"#,
        kh = w.proxy_known_hosts().display()
    );
    let out = output(&mut env.exec("demo", &[PY, "-c", &script]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "root 0");

    // 8. A host presenting another key is refused, on record.
    let out = output(&mut w.ssh(IMPOSTOR_PORT, &[], Some("uname")));
    assert!(!out.status.success(), "the impostor was reached");
    assert!(
        !w.impostor.log().contains("Accepted"),
        "{}",
        w.impostor.log()
    );
    let refused = w
        .records()
        .into_iter()
        .find(|r| r["kind"] == "session.start" && r["resource"] == "impostor")
        .expect("the refused session on record");
    assert_eq!(
        refused["action"]["ssh"]["host_key_check"], "mismatch",
        "{refused}"
    );
    assert_eq!(refused["result"]["status"], "refused");
    // And a host certificate from another CA.
    let out = output(&mut w.ssh(IMPOSTOR_CA_PORT, &[], Some("uname")));
    assert!(!out.status.success(), "the CA impostor was reached");
    assert!(!w.impostor_ca.log().contains("Accepted"));
    let refused = w
        .records()
        .into_iter()
        .find(|r| r["kind"] == "session.start" && r["resource"] == "impostor-ca")
        .expect("the refused session on record");
    assert_eq!(
        refused["action"]["ssh"]["host_key_check"], "host certificate not signed by the host CA",
        "{refused}"
    );

    // 9. Hostile clients: no key exchange, garbage, a channel flood, a huge
    //    window. Each is closed or refused; nothing reaches the host.
    let accepted = w.host.log().matches("Accepted").count();
    let hostile = format!(
        r#"
import socket, time
def conn():
    s = socket.create_connection(("127.0.0.1", {HOST_PORT}), timeout=10)
    s.recv(256)
    return s
s = conn(); s.sendall(b"SSH-2.0-stall\r\n"); t = time.time()
while s.recv(4096): pass
print("stall-closed", round(time.time() - t))
s = conn(); s.sendall(b"SSH-2.0-junk\r\n" + b"\xff" * 4096)
try:
    while s.recv(4096): pass
except ConnectionResetError: pass
print("junk-closed")
"#
    );
    let out = output(&mut env.exec("demo", &[PY, "-c", &hostile]));
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        said.contains("stall-closed") && said.contains("junk-closed"),
        "{said}"
    );
    assert_eq!(
        w.host.log().matches("Accepted").count(),
        accepted,
        "a hostile client reached the host"
    );
    let flood = format!(
        r#"
import paramiko
t = paramiko.Transport(("127.0.0.1", {HOST_PORT}))
t.connect(username="root", password="unused")
opened = refused = 0
for i in range(12):
    try:
        t.open_session(window_size=2**31 - 1, max_packet_size=2**31 - 1); opened += 1
    except Exception:
        refused += 1
print(opened, refused)
"#
    );
    let out = output(&mut env.exec("demo", &[PY, "-c", &flood]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let counts: Vec<u32> = text(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts, [4, 8], "max_channels = 4");
    assert!(
        !env.daemon_log().contains("panicked"),
        "{}",
        env.daemon_log()
    );
    env.status().unwrap();

    // 10. The evidence package lists the sessions (host, login, command,
    //     decision, approver, exit status) and shows the recordings' output
    //     in the page, masked values still masked.
    let pkg = env.state.join("evidence");
    let run =
        agentgate_e2e::agent::evidence(env, "demo", &from, &agentgate_e2e::agent::utc(5), &pkg);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    let report: Value =
        serde_json::from_slice(&fs::read(pkg.join("evidence.json")).unwrap()).unwrap();
    let sessions = report["ssh_sessions"]["sessions"]
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "no ssh_sessions: {:?} {}",
                report.as_object().unwrap().keys().collect::<Vec<_>>(),
                report["ssh_sessions"]
            )
        });
    let find = |needle: &str| {
        sessions
            .iter()
            .find(|e| e["command"].as_str().is_some_and(|c| c.contains(needle)))
            .unwrap_or_else(|| panic!("no {needle} session: {sessions:#?}"))
    };
    let sudo = sessions
        .iter()
        .find(|e| {
            e["command"]
                .as_str()
                .is_some_and(|c| c.contains("approved-marker"))
        })
        .expect("the approved sudo session");
    assert_eq!(sudo["approvers"][0], "bob", "{sudo}");
    assert_eq!(sudo["exit_status"], "exit-status 0", "{sudo}");
    assert_eq!(sudo["host"], format!("127.0.0.1:{HOST_PORT}"), "{sudo}");
    assert_eq!(sudo["upstream_user"], "root", "{sudo}");
    assert!(sudo["duration_ms"].as_u64().is_some(), "{sudo}");
    assert_eq!(find("rm -rf")["verdict"], "deny");
    let uname = find("uname -s");
    assert!(
        uname["transcript"]
            .as_str()
            .unwrap()
            .contains("[REDACTED:us_ssn]"),
        "{uname}"
    );
    let shell = find("interactive shell");
    assert!(
        shell["transcript"].as_str().unwrap().contains("typed-42"),
        "{shell}"
    );
    assert!(find("sftp")["sftp_denied"].as_u64().unwrap() >= 3);
    let page = fs::read_to_string(pkg.join("index.html")).unwrap();
    assert!(
        page.contains("SSH sessions") && page.contains("typed-42"),
        "the page does not replay the shell"
    );
    assert!(!page.contains("123-45-6789"), "an SSN in the evidence page");

    // 11. A changed byte in a recording fails `audit verify`, naming it.
    let dir = env.state.join("audit");
    run_ok(&mut env.agentgate(&["audit", "verify", "--dir", &dir.display().to_string()])).unwrap();
    let mut bytes = fs::read(&cast).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&cast, &bytes).unwrap();
    let out = output(&mut env.agentgate(&["audit", "verify", "--dir", &dir.display().to_string()]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let name = cast.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        said.contains(&name),
        "verify does not name the recording: {said}"
    );
}
