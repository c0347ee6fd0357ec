//! A throwaway OpenSSH server (Debian's `sshd`) inside a test's network
//! namespace.
//!
//! Listens on 127.0.0.1 with its own ed25519 host key, accepts only user
//! certificates signed by its own user CA (`TrustedUserCAKeys`, no
//! `authorized_keys`, no passwords), presents a host certificate from its
//! own host CA for `127.0.0.1` beside its plain key, logs VERBOSE to a file (the accepted
//! certificate's key id is there) and serves SFTP. The login is `root`
//! (no test user is added to the machine). Removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Netns, Proc, run_ok};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct SshServer {
    pub port: u16,
    pub dir: PathBuf,
    /// The user CA's private key: the SSH resource's credential.
    pub user_ca: PathBuf,
    /// `[127.0.0.1]:PORT <host key>`: what the daemon checks the host against.
    pub known_hosts: PathBuf,
    /// The host's public key line (`ssh-ed25519 AAAA...`).
    pub host_public: String,
    /// The public key of the host CA that signed its host certificate.
    pub host_ca_pub: PathBuf,
    proc: Option<Proc>,
}

fn keygen(path: &Path, comment: &str) -> Result<()> {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
    )?;
    Ok(())
}

impl SshServer {
    /// Keys, config, then `sshd -D -e` inside `netns` on `port`; returns
    /// once it listens.
    pub fn start(netns: &Netns, port: u16, name: &str) -> Result<Self> {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run `cargo xtask setup` (Debian openssh-server)"
        );
        let dir = std::env::temp_dir().join(format!("agentgate-sshd-{}-{name}", netns.name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::create_dir_all("/run/sshd")?;
        let host_key = dir.join("host_key");
        keygen(&host_key, "test host")?;
        let user_ca = dir.join("user_ca");
        keygen(&user_ca, "test user CA")?;
        let host_ca = dir.join("host_ca");
        keygen(&host_ca, "test host CA")?;
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-s"])
                .arg(&host_ca)
                .args(["-I", "test host", "-h", "-n", "127.0.0.1"])
                .arg(dir.join("host_key.pub")),
        )?;
        let host_public = fs::read_to_string(dir.join("host_key.pub"))?
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let known_hosts = dir.join("known_hosts");
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_public}\n"))?;
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                 TrustedUserCAKeys {d}/user_ca.pub\nAuthorizedKeysFile none\n\
                 HostCertificate {d}/host_key-cert.pub\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin yes\nUsePAM no\n\
                 StrictModes no\nLogLevel VERBOSE\nAllowTcpForwarding yes\n\
                 Subsystem sftp internal-sftp\n",
                hk = host_key.display(),
                d = dir.display(),
            ),
        )?;
        let host_ca_pub = dir.join("host_ca.pub");
        let log = fs::File::create(dir.join("sshd.log"))?;
        let mut c = netns.command(SSHD);
        c.args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log);
        let proc = Proc::spawn("sshd", c)?;
        let mut s = Self {
            port,
            dir,
            user_ca,
            known_hosts,
            host_public,
            host_ca_pub,
            proc: Some(proc),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.log().contains("Server listening on") {
            if let Some(p) = s.proc.as_mut()
                && let Ok(Some(st)) = p.child.try_wait()
            {
                bail!("sshd exited {st}: {}", s.log());
            }
            if Instant::now() > deadline {
                bail!("sshd did not listen within 10 s: {}", s.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Waits until the log holds `needle` (sshd writes asynchronously).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self.log();
            if l.contains(needle) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!("sshd log never held {needle:?}:\n{l}"))
                    .context("sshd log");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
        if std::thread::panicking() {
            eprintln!("--- sshd log ---\n{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
