//! A throwaway `MariaDB` server (Debian's `mariadb-server`) inside a test's
//! network namespace.
//!
//! Its own data directory (removed on drop), no defaults files read, runs
//! as the `mysql` system user, listens on the namespace's loopback (127.0.0.1,
//! and 127.0.0.2 for the benchmark's TCP resource); administered over
//! its unix socket (not through agentgate). Users: `app` with
//! `mysql_native_password` and `edu` with `ed25519`, both granted the
//! `shop` database, whose `customers` table holds fake, test-only PII.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{Netns, Proc, run_ok};

/// The password of the test users. Test-only, never a real secret.
pub const PASSWORD: &str = "agentgate-test-password";

pub struct MariaDb {
    pub port: u16,
    pub dir: PathBuf,
    proc: Option<Proc>,
}

impl MariaDb {
    /// A fresh data directory and a server inside `netns` on `port`.
    pub fn start(netns: &Netns, port: u16) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("agentgate-my-{}", netns.name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data"))?;
        run_ok(Command::new("chown").args(["-R", "mysql:mysql"]).arg(&dir))?;
        run_ok(
            Command::new("mariadb-install-db")
                .args([
                    "--no-defaults",
                    "--user=mysql",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ])
                .arg(format!("--datadir={}", dir.join("data").display())),
        )?;
        let mut c = netns.command("mariadbd");
        c.args([
            "--no-defaults",
            "--user=mysql",
            "--bind-address=0.0.0.0",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
            "--max-connections=200",
            "--local-infile=1",
            "--plugin-load-add=auth_ed25519",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--datadir={}", dir.join("data").display()))
        .arg(format!("--socket={}", dir.join("sock").display()))
        .arg(format!("--pid-file={}", dir.join("pid").display()))
        .arg(format!("--log-error={}", dir.join("error.log").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let proc = Proc::spawn("mariadbd", c)?;
        let server = Self {
            port,
            dir,
            proc: Some(proc),
        };
        server.wait_ready()?;
        server.admin_sql(&format!(
            "CREATE DATABASE shop;\n\
             CREATE USER 'app'@'%' IDENTIFIED BY '{PASSWORD}';\n\
             CREATE USER 'edu'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{PASSWORD}');\n\
             GRANT ALL ON shop.* TO 'app'@'%';\n\
             GRANT ALL ON shop.* TO 'edu'@'%';\n\
             GRANT FILE ON *.* TO 'app'@'%';"
        ))?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("mariadb-admin")
                .arg(format!("--socket={}", self.dir.join("sock").display()))
                .args(["-uroot", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mariadbd did not start: {}",
                    fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as root over the server's unix socket (not through
    /// agentgate); tab-separated rows, no headers.
    pub fn admin_sql(&self, sql: &str) -> Result<String> {
        let out = run_ok(
            Command::new("mariadb")
                .arg(format!("--socket={}", self.dir.join("sock").display()))
                .args(["-uroot", "--batch", "--skip-column-names", "-e", sql]),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `customers` in `shop` with fake, test-only PII (the same values as the
    /// Postgres fixture's).
    pub fn seed_customers(&self, rows: u32) -> Result<()> {
        self.admin_sql(&format!(
            "CREATE TABLE shop.customers (id int primary key, name text, email text, ssn text, card text, balance decimal(12,2));\n\
             INSERT INTO shop.customers SELECT seq, CONCAT('Customer ', seq), CONCAT('user', seq, '@example.com'), \
             CONCAT(LPAD(100 + seq % 600, 3, '0'), '-', LPAD(10 + seq % 89, 2, '0'), '-', LPAD(1000 + seq, 4, '0')), \
             '4111111111111111', seq * 10.5 FROM shop.seq_1_to_{rows};"
        ))?;
        Ok(())
    }

    /// The arguments the `mariadb` CLI needs to reach this server over TCP
    /// (the password goes in `MYSQL_PWD`, never on a command line).
    pub fn cli_args(&self, user: &str) -> Vec<String> {
        vec![
            "mariadb".into(),
            "-h127.0.0.1".into(),
            format!("-P{}", self.port),
            format!("-u{user}"),
            "--skip-ssl".into(),
            "shop".into(),
        ]
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
