//! The audit log in the data path: nothing proceeds that cannot be recorded.

use std::{fs, process::Command};

use agentgate_e2e::{DaemonOptions, Env, json_output, run_ok, scripts_dir};

/// Unmounts the tmpfs on drop, also when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn client(port: u16) -> Vec<String> {
    let script = scripts_dir().join("client.py");
    vec![
        "python3".into(),
        script.display().to_string(),
        "blocking".into(),
        "127.0.0.1".into(),
        port.to_string(),
        "--bytes".into(),
        "100".into(),
    ]
}

#[test]
fn a_full_audit_disk_refuses_connections_until_space_returns() {
    let mut env = Env::prepare("auditfull", DaemonOptions::default()).unwrap();
    let dir = env.state.join("audit");
    fs::create_dir_all(&dir).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir),
    )
    .unwrap();
    let _mount = Tmpfs(dir.clone());
    env.start_daemon().unwrap();
    let (_echo, port) = env.echo_server("127.0.0.1").unwrap();
    let argv = client(port);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let ok = json_output(&mut env.exec("demo", &argv)).unwrap();
    assert_eq!(ok["received"].as_u64(), Some(100));

    // Fill the disk: the next connection cannot be recorded, so it is refused.
    let filler = dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // The segment's last page may still have room for a record or two; once
    // it is used up, every connection is refused.
    let mut refused = false;
    for _ in 0..20 {
        if !env.exec("demo", &argv).output().unwrap().status.success() {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "connections kept getting through with the audit disk full"
    );
    for _ in 0..3 {
        let out = env.exec("demo", &argv).output().unwrap();
        assert!(
            !out.status.success(),
            "a connection got through while the audit log could not be written"
        );
    }
    assert!(
        env.daemon_log().contains("audit log unavailable")
            || env.daemon_log().contains("log.failure"),
        "{}",
        env.daemon_log()
    );
    // The operator sees it in `status`.
    let audit = &env.status().unwrap()["audit"];
    assert_eq!(audit["stats"]["failing"], true, "{audit}");
    assert!(
        audit["stats"]["log_failures"].as_u64() >= Some(1),
        "{audit}"
    );
    let text = run_ok(&mut env.agentgate(&["status"])).unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains(&format!("audit log: {} (strict durability)", dir.display()))
            && text.contains("FAILING"),
        "{text}"
    );

    // Space returns: connections flow again and the failure is in the log.
    fs::remove_file(&filler).unwrap();
    let mut recovered = false;
    for _ in 0..50 {
        if let Ok(v) = json_output(&mut env.exec("demo", &argv)) {
            recovered = v["received"].as_u64() == Some(100);
            if recovered {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        recovered,
        "connections never recovered:\n{}",
        env.daemon_log()
    );
    let audit = &env.status().unwrap()["audit"];
    assert_eq!(audit["stats"]["failing"], false, "{audit}");
    assert!(audit["stats"]["fsyncs"].as_u64() > Some(0), "{audit}");
    let text = run_ok(&mut env.agentgate(&["status"])).unwrap();
    assert!(!String::from_utf8_lossy(&text.stdout).contains("FAILING"));
    let d = dir.to_str().unwrap();
    run_ok(&mut env.agentgate(&["audit", "verify", "--dir", d])).unwrap();
    let out =
        run_ok(&mut env.agentgate(&["audit", "export", "--format", "jsonl", "--dir", d])).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"log.failure\""),
        "a log.failure record follows the outage"
    );
    env.kill_daemon();
}
