//! A throwaway `PostgreSQL` 15 server inside a test's network namespace.
//!
//! Runs as the `postgres` system user (initdb refuses root), listens on
//! 127.0.0.1 and `::1`, requires SCRAM-SHA-256 passwords, and can serve TLS with a
//! test CA made on the spot. The data directory is removed on drop.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Netns, Proc, run_ok};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The password of the test roles. Test-only, never a real secret.
pub const PASSWORD: &str = "agentgate-test-password";

pub struct PgServer {
    pub port: u16,
    pub dir: PathBuf,
    pub tls: Option<TestCa>,
    proc: Option<Proc>,
    netns: String,
}

/// A CA and a server certificate for 127.0.0.1/localhost, made with openssl.
pub struct TestCa {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl PgServer {
    /// initdb + start inside `netns` on `port`, optionally with TLS.
    pub fn start(netns: &Netns, port: u16, tls: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("agentgate-pg-{}", netns.name));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let pwfile = dir.join("pw");
        fs::write(&pwfile, PASSWORD)?;
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
        )?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/initdb"))
                .args([
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .arg("-D")
                .arg(&data),
        )?;
        let tls = if tls { Some(make_ca(&dir)?) } else { None };
        let mut conf = String::from(
            "listen_addresses = '127.0.0.1,127.0.0.2,::1'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n",
        );
        if let Some(ca) = &tls {
            use std::fmt::Write as _;
            let _ = write!(
                conf,
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                ca.server_cert.display(),
                ca.server_key.display()
            );
        }
        fs::write(data.join("postgresql.auto.conf"), conf)?;
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
        )?;
        let mut c = netns.command("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("postgres.log"))?);
        let proc = Proc::spawn("postgres", c)?;
        let server = Self {
            port,
            dir,
            tls,
            proc: Some(proc),
            netns: netns.name.clone(),
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.netns))
                .arg("--")
                .arg(format!("{PG_BIN}/pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not start: {}",
                    fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A libpq connection string to this server over TCP.
    pub fn url(&self, host: &str, user: &str, db: &str) -> String {
        format!(
            "host={host} port={} user={user} dbname={db} password={PASSWORD} sslmode=disable",
            self.port
        )
    }

    /// Runs SQL as the superuser over the server's unix socket (not through agentgate).
    pub fn admin_sql(&self, sql: &str) -> Result<String> {
        let out = run_ok(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/psql"))
                .arg("-h")
                .arg(&self.dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-qAtc",
                    sql,
                ])
                .env("PGPASSWORD", PASSWORD),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates the `customers` table with fake, test-only PII.
    pub fn seed_customers(&self, rows: u32) -> Result<()> {
        self.admin_sql(&format!(
            "CREATE TABLE customers (id int primary key, name text, email text, ssn text, card text, balance numeric);\n\
             INSERT INTO customers SELECT i, 'Customer ' || i, 'user' || i || '@example.com', \
             lpad((100 + i % 600)::text, 3, '0') || '-' || lpad((10 + i % 89)::text, 2, '0') || '-' || lpad((1000 + i)::text, 4, '0'), \
             '4111111111111111', i * 10.5 FROM generate_series(1, {rows}) i;"
        ))?;
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A test CA in `dir` and a server certificate it signed for `localhost`,
/// `127.0.0.1` and `::1`.
pub fn make_ca(dir: &Path) -> Result<TestCa> {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| -> Result<()> {
        run_ok(Command::new("openssl").args(args).current_dir(dir))
            .map(|_| ())
            .context("openssl")
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=agentgate test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ])?;
    fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ])?;
    fs::set_permissions(p("server.key"), fs::Permissions::from_mode(0o600))?;
    Ok(TestCa {
        ca_cert: p("ca.crt"),
        server_cert: p("server.crt"),
        server_key: p("server.key"),
    })
}
