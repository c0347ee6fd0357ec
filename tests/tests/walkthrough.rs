//! The README's walkthrough, run as printed: `cargo xtask run` (the xtask
//! binary, with the debug agentgate and a state directory of the test's own,
//! inside the test's network namespace), then every command of the README's
//! walkthrough block through bash, each command's output compared with the
//! `#>` lines the README shows under it (ids, hashes, pids and timings are
//! wildcards: `...` in the README). The held UPDATE is approved on the
//! approvals page in headless Chromium as the walkthrough says, and the kept,
//! stale config of a second start is named with what differs, until
//! `--fresh` writes the default again with the audit log kept.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentgate_e2e::{Cgroup, Netns, Proc, agentgate_bin, require_root, run_ok, unique};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The xtask binary `cargo xtask test` built (`cargo xtask` runs it).
fn xtask_bin() -> PathBuf {
    let p = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), PathBuf::from)
        .join("debug/xtask");
    assert!(
        p.exists(),
        "no xtask binary at {}: run `cargo xtask test`",
        p.display()
    );
    p
}

/// One command of the walkthrough and the output the README shows for it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The second `sh` block under "## Walkthrough" (the first starts the daemon).
fn walkthrough_steps() -> Vec<Step> {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Walkthrough\n")
        .nth(1)
        .expect("a Walkthrough section");
    let block = section
        .split("```sh\n")
        .nth(2)
        .and_then(|b| b.split("\n```").next())
        .expect("the walkthrough's second sh block");
    let mut steps: Vec<Step> = Vec::new();
    for line in block.lines() {
        if let Some(out) = line.strip_prefix("#>") {
            let step = steps.last_mut().expect("output under a command");
            step.expected
                .push(out.strip_prefix(' ').unwrap_or(out).to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            steps.push(Step {
                command: line.to_owned(),
                expected: Vec::new(),
            });
        }
    }
    steps
}

/// `agentgate-local-XXXXXXXX` (a test trial's names) as `agentgate-local`.
fn default_names(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("agentgate-local-") {
        let (head, tail) = rest.split_at(at + "agentgate-local".len());
        out.push_str(head);
        let hex = &tail[1..];
        let n = hex.chars().take_while(char::is_ascii_hexdigit).count();
        rest = if n == 8 { &hex[8..] } else { tail };
    }
    out.push_str(rest);
    out
}

/// Whether `actual` matches `pattern`, where `...` in the pattern matches any
/// run of characters and runs of spaces compare as one.
fn matches(pattern: &str, actual: &str) -> bool {
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let (pattern, actual) = (squash(pattern), squash(actual));
    let parts: Vec<&str> = pattern.split("...").collect();
    let mut rest = actual.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    rest.is_empty()
}

/// `program` in the test's cgroup (killed with it) and network namespace.
fn in_test(netns: &Netns, cgroup: &Cgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "echo $$ > {} && exec nsenter --net=/run/netns/{} -- \"$@\"",
            cgroup.path.join("cgroup.procs").display(),
            netns.name
        ))
        .arg("sh")
        .arg(program);
    c
}

/// The trial: xtask in the test's cgroup and network namespace; the daemon
/// is stopped (SIGTERM, so xtask cleans up after it) when dropped.
struct Trial {
    xtask: Proc,
    config: PathBuf,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Trial {
    fn start(netns: &Netns, cgroup: &Cgroup, work: &Path, args: &[&str]) -> Self {
        let mut c = in_test(netns, cgroup, xtask_bin());
        c.arg("run")
            .arg("--bin")
            .arg(agentgate_bin())
            .arg("--state")
            .arg(work.join(".state"))
            .args(args)
            .env("AGENTGATE_LOCAL_TRIAL_POINTER", work.join("pointer"))
            .env("AGENTGATE_LOG", "info")
            .current_dir(work)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut xtask = Proc::spawn("cargo xtask run", c).unwrap();
        let err = xtask.child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let trial = Self {
            xtask,
            config: work.join(".state/agentgate.toml"),
            stderr: rx,
        };
        trial.wait_for(netns, work);
        trial
    }

    /// Until the daemon answers `status` (found through the pointer file).
    fn wait_for(&self, netns: &Netns, work: &Path) {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let out = netns
                .command(agentgate_bin())
                .arg("status")
                .env("AGENTGATE_LOCAL_TRIAL_POINTER", work.join("pointer"))
                .env_remove("AGENTGATE_CONFIG")
                .current_dir(work)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the trial's daemon did not answer within 60 s: {}\nxtask said:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.said()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What xtask printed so far.
    fn said(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    fn stop(mut self) -> String {
        stop_daemon(&self.config);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.xtask.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.said()
    }
}

impl Drop for Trial {
    fn drop(&mut self) {
        // Stop the daemon, then let xtask clean up after it (its cgroups,
        // pins, database) before the test's cgroup is killed.
        stop_daemon(&self.config);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.xtask.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn stop_daemon(config: &Path) {
    let _ = Command::new("pkill")
        .args(["-TERM", "-f", "--"])
        .arg(format!("--config {} run", config.display()))
        .status();
}

/// Runs the README's walkthrough block in one bash and checks each
/// command's output against the README's `#>` lines.
fn run_readme(netns: &Netns, cgroup: &Cgroup, work: &Path) -> Vec<Step> {
    // Every command of the README, in one bash, each output delimited.
    let steps = walkthrough_steps();
    assert!(steps.len() >= 8, "{steps:?}");
    let bin = agentgate_bin();
    let mut script = String::from("set -u\n");
    for (i, step) in steps.iter().enumerate() {
        let mut command = step
            .command
            .replace("target/release/agentgate", &bin.display().to_string());
        // A command left running in the background writes to a file of its
        // own (the script's output must end when the script does).
        // It gets a second to start, as it would while a person types on.
        if let Some(fg) = command.trim_end().strip_suffix('&') {
            command = format!(
                "( {fg} ) > {} 2>&1 & sleep 1",
                work.join(format!("bg-{i}.log")).display()
            );
        }
        let _ = write!(script, "echo '@@step {i}'\n{command} 2>&1\nsleep 0.3\n");
    }
    script.push_str("echo '@@end'\n");
    let run = in_test(netns, cgroup, "bash")
        .arg("-c")
        .arg(&script)
        .env("AGENTGATE_LOCAL_TRIAL_POINTER", work.join("pointer"))
        .env_remove("AGENTGATE_CONFIG")
        .current_dir(work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("@@end"), "the walkthrough stopped:\n{text}");
    let mut outputs: Vec<Vec<&str>> = vec![Vec::new(); steps.len()];
    let mut at = None;
    for line in text.lines() {
        if let Some(i) = line.strip_prefix("@@step ") {
            at = i.parse::<usize>().ok();
        } else if line != "@@end"
            && let Some(i) = at
        {
            outputs[i].push(line);
        }
    }
    for (step, lines) in steps.iter().zip(&outputs) {
        // The README's lines appear in order in the command's output (the
        // trial's cgroup names, suffixed per state directory, stand for the
        // default `agentgate-local`).
        let lines: Vec<String> = lines.iter().map(|l| default_names(l)).collect();
        let mut rest = lines.iter();
        for want in &step.expected {
            assert!(
                rest.any(|got| matches(want, got)),
                "`{}`: the README shows {want:?}; the command printed:\n{}",
                step.command,
                lines.join("\n")
            );
        }
    }

    steps
}

/// Approves the held UPDATE on the approvals page in headless Chromium, as
/// the walkthrough says, and checks that it ran and what its client printed.
fn approve_on_the_page(netns: &Netns, work: &Path, steps: &[Step]) {
    let bin = agentgate_bin();
    // The held UPDATE is approved on the page, as the walkthrough says.
    let pending = netns
        .command(&bin)
        .args(["approvals", "list", "--json"])
        .env("AGENTGATE_LOCAL_TRIAL_POINTER", work.join("pointer"))
        .output()
        .unwrap();
    let pending: serde_json::Value = serde_json::from_slice(&pending.stdout).unwrap();
    let id = pending[0]["id"]
        .as_str()
        .expect("the UPDATE is held")
        .to_owned();
    let mut c = netns.command("node");
    c.arg("browser.mjs")
        .args(["approve", "http://127.0.0.1:15080/", "bob", &id])
        .current_dir(root().join("tests/oidc"));
    let page = run_ok(&mut c).unwrap();
    let page: serde_json::Value = serde_json::from_slice(&page.stdout).unwrap();
    assert_eq!(page["signed_in_as"], "bob", "{page}");
    // The UPDATE ran: the row changed (read directly, not through the proxy).
    let deadline = Instant::now() + Duration::from_secs(20);
    let name = loop {
        let out = netns
            .command("/usr/lib/postgresql/15/bin/psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-tAc"])
            .arg("SELECT name FROM customers WHERE id = 1")
            .env("PGPASSWORD", "demo")
            .output()
            .unwrap();
        let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if name == "x" || Instant::now() > deadline {
            break name;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(name, "x", "the UPDATE did not run after bob's approval");
    // What the waiting client printed: the NOTICE naming the request, then
    // the UPDATE's own result.
    let update = steps
        .iter()
        .position(|s| s.command.contains("UPDATE customers"))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        let out = fs::read_to_string(work.join(format!("bg-{update}.log"))).unwrap_or_default();
        if out.contains("UPDATE 1") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(client.contains(&id), "{client}");
    assert!(client.contains("UPDATE 1"), "{client}");
}

#[test]
fn the_readme_walkthrough_runs_as_printed_and_a_stale_config_is_named() {
    require_root();
    let name = unique("walk");
    let netns = Netns::new(&name).unwrap();
    let cgroup = Cgroup::new(&name).unwrap();
    let work = std::env::temp_dir().join(&name);
    fs::create_dir_all(&work).unwrap();

    // A clean state directory: the default config is written.
    let trial = Trial::start(&netns, &cgroup, &work, &[]);

    let steps = run_readme(&netns, &cgroup, &work);
    approve_on_the_page(&netns, &work, &steps);
    let said = trial.stop();
    assert!(
        said.contains("wrote the default config"),
        "first start:\n{said}"
    );

    // A stale config from an earlier experiment: named, with what differs.
    let config = work.join(".state/agentgate.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("{ name = \"demo\", groups = [\"demo\"] },", ""),
    )
    .unwrap();
    let trial = Trial::start(&netns, &cgroup, &work, &[]);
    let said = trial.stop();
    assert!(said.contains("is NOT the default"), "{said}");
    assert!(said.contains("daemon.label_identities"), "{said}");
    assert!(said.contains("cargo xtask run --fresh"), "{said}");

    // --fresh: the default again, the old file kept, the audit log kept.
    let before = fs::read_dir(work.join(".state/audit")).unwrap().count();
    let trial = Trial::start(&netns, &cgroup, &work, &["--fresh"]);
    let said = trial.stop();
    assert!(said.contains("keeps the audit log"), "{said}");
    assert!(said.contains("wrote the default config"), "{said}");
    assert!(work.join(".state/agentgate.toml.old").exists());
    assert!(fs::read_dir(work.join(".state/audit")).unwrap().count() >= before);
    let verify = netns
        .command(agentgate_bin())
        .args(["audit", "verify", "--dir"])
        .arg(work.join(".state/audit"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn wildcards_in_the_readme_match_ids_and_hashes_only_where_written() {
    assert!(matches(
        "apr-...  local-pg  demo",
        "apr-1a2b   local-pg demo"
    ));
    assert!(matches("# 200", "# 200"));
    assert!(!matches("200", "404"));
    assert!(!matches("UPDATE 1", "UPDATE 1 extra"));
    assert!(matches("...", "anything"));
    assert_eq!(
        default_names("cgroup /agentgate-local-1f834205/exec-2262-1"),
        "cgroup /agentgate-local/exec-2262-1"
    );
    assert_eq!(
        default_names("agentgate-local-daemon"),
        "agentgate-local-daemon"
    );
}
