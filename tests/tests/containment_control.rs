//! Containment of the agent's own privileges and of the control plane: `exec`
//! does not run agents as root unasked, a root agent is recorded and shown,
//! and the control socket refuses callers inside tagged cgroups.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use agentgate_e2e::{DaemonOptions, Env, Proc, agentgate_bin, run_ok, scripts_dir};
use serde_json::Value;

/// The system python: the pyenv one lives under /root, which other users cannot read.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

const ROOT_REFUSAL: &str = "refusing to run the agent as root: a root agent can leave its cgroup and approve its own requests; pass --user NAME, run through sudo, or --allow-root";

const CONTROL_REFUSAL: &str =
    "permission denied: the control socket refuses processes inside a tagged cgroup (";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn audit_records(env: &Env) -> Vec<Value> {
    env.audit_records().unwrap()
}

/// A python program (for the system python) that prints its pid and uid, then
/// waits until `hold` exists.
fn hold_program(hold: &std::path::Path) -> String {
    format!(
        "import os, time\nprint(os.getpid(), os.getuid(), flush=True)\n\
         while not os.path.exists({hold:?}):\n    time.sleep(0.02)\n",
        hold = hold.display().to_string()
    )
}

#[test]
fn exec_as_root_without_a_user_is_refused_and_runs_nothing() {
    let env = Env::new("norootexec", DaemonOptions::default()).unwrap();
    let marker = env.state.join("ran");
    let out = env
        .agentgate(&["exec", "--identity", "demo", "--", "touch"])
        .arg(&marker)
        .env_remove("SUDO_USER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(ROOT_REFUSAL),
        "{}",
        text(&out.stderr)
    );
    assert!(!marker.exists(), "the refused command ran");
    // Refused before the daemon was asked: no cgroup was made or bound.
    let s = env.status().unwrap();
    assert_eq!(s["tagged"].as_array().map(Vec::len), Some(0), "{s:#}");
    assert!(
        !audit_records(&env)
            .iter()
            .any(|r| r["kind"] == "identity.bind"),
        "a refused exec binds nothing"
    );

    // Unknown users and groups are usage errors too, and run nothing.
    for (user, message) in [
        (
            "no-such-user-ag",
            "--user: no such user \"no-such-user-ag\"",
        ),
        (
            "nobody:no-such-group-ag",
            "--user: no such group \"no-such-group-ag\"",
        ),
    ] {
        let out = env
            .agentgate(&["exec", "--user", user, "--identity", "demo", "--", "touch"])
            .arg(&marker)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(message), "{}", text(&out.stderr));
        assert!(!marker.exists(), "the refused command ran");
    }
}

#[test]
fn exec_user_nobody_drops_privileges_and_still_goes_through_the_proxy() {
    let env = Env::new("execnobody", DaemonOptions::default()).unwrap();
    let out = run_ok(&mut env.exec_as(
        "nobody",
        "demo",
        &[
            SYSTEM_PYTHON,
            "-c",
            "import os; print(os.getuid(), os.getgid(), os.geteuid(), os.getegid(), \
             sorted(os.getgroups()), os.environ['USER'], os.environ['LOGNAME'], os.environ['HOME'])",
        ],
    ))
    .unwrap();
    assert_eq!(
        text(&out.stdout).trim(),
        "65534 65534 65534 65534 [65534] nobody nobody /nonexistent",
        "uid, gid, supplementary groups and environment are nobody's"
    );

    // A tagged agent that is not root still goes through the proxy.
    let (_echo, port) = env.echo_server("127.0.0.1").unwrap();
    let hold = env.state.join("release");
    let client = scripts_dir().join("client.py");
    let port = port.to_string();
    let mut cmd = env.exec_as(
        "nobody",
        "demo",
        &[
            SYSTEM_PYTHON,
            client.to_str().unwrap(),
            "blocking",
            "127.0.0.1",
            &port,
            "--hold",
            hold.to_str().unwrap(),
        ],
    );
    cmd.stdout(Stdio::piped());
    let mut agent = Proc::spawn("agent as nobody", cmd).unwrap();
    let line: Value = serde_json::from_str(&agent.read_line().unwrap()).unwrap();
    assert_eq!(
        line["echoed"], "hello",
        "bytes round-trip through the proxy"
    );
    let status = env
        .wait_status(Duration::from_secs(5), |s| {
            s["connections"].as_array().is_some_and(|c| c.len() == 1)
        })
        .unwrap();
    let conn = &status["connections"][0];
    assert_eq!(conn["identity"], "demo");
    assert_eq!(conn["workload"]["pid"], line["pid"]);
    assert_eq!(conn["workload"]["uid"].as_u64(), Some(65534), "{conn:#}");
    assert_eq!(status["counters"]["redirected"].as_u64(), Some(1));
    // The `agentgate exec` waiting in the cgroup as root is not an agent.
    assert_eq!(
        status["root_processes"].as_array().map(Vec::len),
        Some(0),
        "{status:#}"
    );
    fs::write(&hold, "").unwrap();
    assert!(agent.child.wait().unwrap().success());
    // Not privileged: nothing says otherwise in the log.
    assert!(
        !audit_records(&env)
            .iter()
            .any(|r| r["kind"] == "workload.privileged")
    );
}

#[test]
fn exec_allow_root_warns_records_and_is_listed_in_status() {
    let env = Env::new("allowroot", DaemonOptions::default()).unwrap();
    let hold = env.state.join("release");
    let program = hold_program(&hold);
    let mut cmd = env.exec("demo", &[SYSTEM_PYTHON, "-c", &program]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut agent = Proc::spawn("root agent", cmd).unwrap();
    let line = agent.read_line().unwrap();
    let (pid, uid) = line.split_once(' ').unwrap();
    let pid: u64 = pid.parse().unwrap();
    assert_eq!(uid, "0", "the agent runs as root");

    let status = env.status().unwrap();
    let roots = status["root_processes"].as_array().unwrap();
    assert_eq!(
        roots.len(),
        1,
        "only the agent, not `agentgate exec`: {status:#}"
    );
    assert_eq!(roots[0]["pid"].as_u64(), Some(pid));
    assert_eq!(roots[0]["identity"], "demo");
    let tagged = status["tagged"][0]["cgroup"].as_str().unwrap();
    let cgroup = roots[0]["cgroup"].as_str().unwrap();
    assert!(
        tagged.ends_with(cgroup),
        "{cgroup} is the exec cgroup {tagged}"
    );
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(roots[0]["exe"].as_str(), exe.to_str());
    let out = run_ok(&mut env.agentgate(&["status"])).unwrap();
    let status_text = text(&out.stdout);
    assert!(
        status_text.contains("root processes in tagged cgroups: 1")
            && status_text.contains("can leave its cgroup"),
        "{status_text}"
    );
    assert!(
        status_text
            .lines()
            .any(|l| l.contains(&format!("pid {pid} ")) && l.contains("demo")),
        "{status_text}"
    );

    fs::write(&hold, "").unwrap();
    assert!(agent.child.wait().unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(agent.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("warning: running the agent as root")
            && stderr
                .contains("a root agent can leave its cgroup and reach the control plane's host"),
        "{stderr}"
    );

    let records = audit_records(&env);
    let privileged = records
        .iter()
        .find(|r| r["kind"] == "workload.privileged")
        .expect("a workload.privileged record");
    assert_eq!(privileged["identity"]["subject"], "demo");
    assert_eq!(privileged["workload"]["uid"].as_u64(), Some(0));
    assert_eq!(
        privileged["workload"]["pid"].as_u64(),
        Some(u64::from(agent.pid()))
    );
    assert!(
        privileged["workload"]["cmdline"]
            .as_str()
            .is_some_and(|c| c.contains("--allow-root")),
        "{privileged:#}"
    );
    assert_eq!(privileged["action"]["cgroup"].as_str(), Some(tagged));
    // Written before the cgroup was handed out, so before its binding.
    let seq = |r: &Value| r["seq"].as_u64().unwrap();
    let bind = records
        .iter()
        .find(|r| r["kind"] == "identity.bind")
        .unwrap();
    assert!(seq(privileged) < seq(bind));
}

#[test]
fn sudo_user_names_the_user_a_root_caller_runs_the_agent_as() {
    let env = Env::new("sudouser", DaemonOptions::default()).unwrap();
    let out = run_ok(
        env.agentgate(&[
            "exec",
            "--identity",
            "demo",
            "--",
            SYSTEM_PYTHON,
            "-c",
            "import os; print(os.getuid(), os.getgid(), os.environ['USER'])",
        ])
        .env("SUDO_USER", "nobody"),
    )
    .unwrap();
    assert_eq!(text(&out.stdout).trim(), "65534 65534 nobody");
    // SUDO_USER=root names no one else: still refused.
    let out = env
        .agentgate(&["exec", "--identity", "demo", "--", "true"])
        .env("SUDO_USER", "root")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(ROOT_REFUSAL));
}

/// A running daemon and a cgroup `svc` tagged with `agentgate tag` as
/// `demo` (as a systemd unit would be): its root processes have no seccomp
/// filter, and the policy lets tagged processes reach the control socket's
/// path where the kernel checks Unix paths, so what is tested is the
/// daemon's own check, behind those.
fn tagged_caller(name: &str) -> (Env, PathBuf) {
    let mut env = Env::prepare(name, DaemonOptions::default()).unwrap();
    fs::write(
        env.state.join("policy/control-socket.toml"),
        format!(
            "[[allow_unix]]\npath = \"{}\"\n",
            env.state.join("control.sock").display()
        ),
    )
    .unwrap();
    env.start_daemon().unwrap();
    let svc = env.cgroup.child("svc").unwrap();
    run_ok(&mut env.agentgate(&[
        "tag",
        "--cgroup",
        svc.to_str().unwrap(),
        "--identity",
        "demo",
    ]))
    .unwrap();
    (env, svc)
}

#[test]
fn control_socket_refuses_callers_in_tagged_cgroups_even_root() {
    let (env, svc) = tagged_caller("ctlrefuse");
    let bin = agentgate_bin();
    let bin = bin.to_str().unwrap();
    let config = env.config.to_str().unwrap();
    for (args, op) in [("status", "status"), ("approvals list", "approvals-list")] {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {bin} --config {config} {args}",
            svc.display()
        );
        let out = env
            .netns
            .command("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{op}: {stderr}");
        assert!(
            stderr.contains(CONTROL_REFUSAL) && stderr.contains(", identity demo)"),
            "{op}: {stderr}"
        );
    }
    // An agent started by `exec` does not get that far here: its seccomp
    // filter refuses the Unix socket (the kernel has no BPF LSM to check the
    // path), and that refusal is on record too.
    let out = env
        .exec("demo", &[bin, "--config", config, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The same commands from outside a tagged cgroup still work.
    run_ok(&mut env.agentgate(&["status"])).unwrap();
    run_ok(&mut env.agentgate(&["approvals", "list"])).unwrap();

    let records = audit_records(&env);
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "control.refused")
        .collect();
    let ops: Vec<&str> = refused
        .iter()
        .filter_map(|r| r["action"]["op"].as_str())
        .collect();
    assert_eq!(ops[..2], ["status", "approvals-list"], "{refused:#?}");
    // The exec'd agent: refused by its filter (here), or by the daemon
    // (where the kernel checks Unix paths and lets it reach the socket).
    let by_filter = records.iter().any(|r| {
        r["kind"] == "containment.refused"
            && r["action"]["family"] == "unix"
            && r["decision"]["enforced_by"] == "seccomp"
    });
    assert!(by_filter || ops.len() == 3, "{ops:?}");
    for r in refused {
        assert_eq!(r["identity"]["subject"], "demo");
        assert_eq!(r["workload"]["uid"].as_u64(), Some(0));
        assert!(
            r["workload"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("agentgate")),
            "{r:#}"
        );
        assert!(
            r["workload"]["cgroup"]
                .as_str()
                .is_some_and(|c| c.contains(&env.name)),
            "{r:#}"
        );
        assert_eq!(r["decision"]["verdict"], "deny");
        assert_eq!(
            r["action"].as_object().map(serde_json::Map::len),
            Some(1),
            "the op only, never the arguments: {r:#}"
        );
    }
}

/// A tagged process that calls the control socket in a loop is refused every
/// time, but writes at most 10 `control.refused` records per 10 s window; the
/// first record after the window counts the ones left out.
#[test]
fn control_socket_refusals_in_a_loop_are_counted_not_each_recorded() {
    const CALLS: usize = 50;
    const PER_WINDOW: usize = 10;
    let (env, svc) = tagged_caller("ctlflood");
    let bin = agentgate_bin();
    let bin = bin.to_str().unwrap();
    let config = env.config.to_str().unwrap();
    // Each call must be refused (exit 2, the refusal message); `refused`
    // counts those, and the script fails on any other answer.
    let flood = |calls: usize| {
        let script = format!(
            "echo $$ > {cgroup}/cgroup.procs && refused=0 && for i in $(seq {calls}); do \
             {bin} --config {config} status 2>&1 | grep -qF {msg:?} && refused=$((refused+1)); done; \
             echo $refused",
            cgroup = svc.display(),
            msg = CONTROL_REFUSAL,
        );
        let out = env
            .netns
            .command("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(
            text(&out.stdout).trim(),
            calls.to_string(),
            "every call is refused: {}",
            text(&out.stderr)
        );
    };
    let refused = |env: &Env| -> Vec<Value> {
        audit_records(env)
            .into_iter()
            .filter(|r| r["kind"] == "control.refused")
            .collect()
    };

    flood(CALLS);
    let recs = refused(&env);
    assert_eq!(recs.len(), PER_WINDOW, "{recs:#?}");
    assert!(recs.iter().all(|r| r["action"].get("suppressed").is_none()));

    // The window is 10 s: the first refusal after it is recorded again, with
    // the count of those left out.
    std::thread::sleep(Duration::from_secs(10));
    flood(1);
    let recs = refused(&env);
    assert_eq!(recs.len(), PER_WINDOW + 1, "{recs:#?}");
    let last = &recs[PER_WINDOW];
    assert_eq!(last["action"]["op"], "status", "{last:#}");
    assert_eq!(
        last["action"]["suppressed"].as_u64(),
        Some((CALLS - PER_WINDOW) as u64),
        "{last:#}"
    );
}

/// `agentgate --help` text names what the flags do (users read it to decide).
#[test]
fn exec_help_explains_user_and_allow_root() {
    let out = Command::new(agentgate_bin())
        .args(["exec", "--help"])
        .output()
        .unwrap();
    let help = text(&out.stdout);
    assert!(
        help.contains("--user <NAME[:GROUP]>") && help.contains("supplementary groups"),
        "{help}"
    );
    assert!(
        help.contains("--allow-root") && help.contains("workload.privileged"),
        "{help}"
    );
}
