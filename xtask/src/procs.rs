//! Processes and kernel objects `cargo xtask run` and `demo` start, each
//! undone on drop (Ctrl-C included): children, bpffs pins, exec cgroups, and
//! the test `OpenID` provider.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::cmd;

/// A child stopped (SIGTERM, then SIGKILL) on drop.
pub struct Guard {
    name: &'static str,
    pub child: Child,
}

impl Guard {
    pub fn spawn(name: &'static str, c: &mut Command) -> Result<Self> {
        let child = c.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                #[allow(unsafe_code)]
                // SAFETY: kill(2) on a child this process started and has not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    eprintln!("xtask: stopped {}", self.name);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("xtask: killed {}", self.name);
        }
    }
}

/// Removes the daemon's bpffs pins on drop (nothing stays attached).
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes the demo's (empty) exec cgroups on drop.
pub struct ExecCgroup(pub Option<PathBuf>);

impl ExecCgroup {
    pub fn new(name: &str) -> Self {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]));
        Self(mount.map(|m| m.join(name)))
    }
}

fn remove_cgroups(p: &Path) {
    if let Ok(entries) = fs::read_dir(p) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroups(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(p);
}

impl Drop for ExecCgroup {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            remove_cgroups(p);
        }
    }
}

/// The test `OpenID` provider (tests/oidc, npm `oidc-provider`) on
/// 127.0.0.1:`port`, its accounts as tests/oidc/provider.mjs lists them.
pub fn start_provider(root: &Path, port: u16) -> Result<Guard> {
    let mut c = cmd("node");
    c.arg("provider.mjs")
        .current_dir(root.join("tests/oidc"))
        .env("OIDC_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut provider = Guard::spawn("OpenID provider", &mut c)?;
    let mut out = BufReader::new(provider.child.stdout.take().context("stdout")?);
    let mut ready = String::new();
    out.read_line(&mut ready)?;
    if !ready.contains("issuer") {
        bail!("the OpenID provider did not start");
    }
    // Keep draining: oidc-provider writes notices to stdout, and a closed pipe
    // would kill it with EPIPE.
    std::thread::spawn(move || for _ in out.lines() {});
    Ok(provider)
}
