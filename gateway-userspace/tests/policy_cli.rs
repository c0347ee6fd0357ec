//! `agentgate policy check` / `explain` as a user runs them: output and exit codes.

use std::{path::PathBuf, process::Command};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agentgate"));
    c.env("AGENTGATE_CONFIG", "/nonexistent/agentgate.toml");
    c
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn check_accepts_the_shipped_packs() {
    for pack in ["policies", "policies/local"] {
        let out = bin()
            .args(["policy", "check"])
            .arg(root().join(pack))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{pack}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
    }
}

#[test]
fn check_prints_every_error_with_position_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("agentgate-cli-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_policies");
    std::fs::copy(fixtures.join("bad_rules.toml"), dir.join("bad_rules.toml")).unwrap();
    let out = bin().args(["policy", "check"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = dir.join("bad_rules.toml");
    let f = file.display();
    for want in [
        format!("{f}:10:26: unknown statement class `reads`"),
        format!("{f}:14:8: rule `r2` applies to no one"),
        format!("{f}:15:14: unknown resource `dbx`"),
        format!("{f}:16:10: `action = \"require_approval\"` needs an `approval` table"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&want)),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("policy is invalid: 4 errors"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn explain_prints_decision_and_rule() {
    let out = bin()
        .args([
            "policy",
            "explain",
            "--identity",
            "demo",
            "--resource",
            "local-postgres",
            "--sql",
        ])
        .arg("SELECT * FROM customers; DELETE FROM customers")
        .arg("--dir")
        .arg(root().join("policies/local"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("class:     write"), "{stdout}");
    assert!(
        stdout
            .contains("decision:  require_approval (approvers: approvers; quorum 1; timeout 120s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rule:      demo-changes-need-approval ("),
        "{stdout}"
    );
}

#[test]
fn explain_reads_the_policy_dir_from_the_config() {
    let dir = std::env::temp_dir().join(format!("agentgate-cli-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agentgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[policy]\ndir = {:?}\n\n[other]\nignored = true\n",
            root().join("policies/local").display().to_string()
        ),
    )
    .unwrap();
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .args([
            "policy",
            "explain",
            "--identity",
            "nobody",
            "--resource",
            "local-postgres",
            "--sql",
            "SELECT 1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("decision:  deny"), "{stdout}");
    assert!(
        stdout.contains("rule:      default:resource:local-postgres"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn explain_usage_errors_exit_2() {
    let out = bin()
        .args([
            "policy",
            "explain",
            "--identity",
            "demo",
            "--resource",
            "nope",
            "--dir",
        ])
        .arg(root().join("policies/local"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no resource `nope`"));
    let out = bin()
        .args([
            "policy",
            "explain",
            "--identity",
            "demo",
            "--resource",
            "local-echo",
            "--sql",
            "SELECT 1",
            "--dir",
        ])
        .arg(root().join("policies/local"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
