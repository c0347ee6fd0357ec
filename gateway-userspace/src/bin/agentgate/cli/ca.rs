//! `agentgate ca show | rotate`: the local CA that HTTPS (and other TLS)
//! interception signs with. Both read or write the files in the state
//! directory; the daemon follows a rotation within a second.

use std::{io::Write as _, path::Path, process::ExitCode, time::Duration};

use agentgate::tls::{self, CaStatus};

use super::daemon::load_config;

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), its fingerprint and validity, and the
    /// retired CAs still trusted.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a new CA; the old one stays in the trust bundle for the overlap.
    Rotate {
        /// Hours the old CA stays trusted (0: drop it at once, e.g. after a
        /// key compromise).
        #[arg(long, default_value_t = tls::ca::DEFAULT_OVERLAP.as_secs() / 3600)]
        overlap_hours: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(config: &Path, cmd: &CaCommand) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let state_dir = &cfg.daemon.state_dir;
    let (status, json) = match cmd {
        CaCommand::Show { json } => (tls::ca::status(state_dir)?, *json),
        CaCommand::Rotate {
            overlap_hours,
            json,
        } => {
            let overlap = Duration::from_hours(*overlap_hours);
            let s = tls::ca::rotate(state_dir, overlap)?;
            if !json {
                eprintln!(
                    "agentgate: rotated the local CA; the old one stays trusted for {overlap_hours} h. Agents that read the bundle only at start trust the new CA once restarted."
                );
            }
            (s, *json)
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &status)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &status)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_text(out: &mut impl std::io::Write, s: &CaStatus) -> std::io::Result<()> {
    let c = &s.current;
    writeln!(out, "subject:      {}", c.subject)?;
    writeln!(out, "sha256:       {}", c.fingerprint_sha256)?;
    writeln!(out, "valid:        {} to {}", c.not_before, c.not_after)?;
    writeln!(out, "bundle:       {}", s.bundle.display())?;
    writeln!(out, "ca only:      {}", s.agentgate_cas.display())?;
    for p in &s.previous {
        writeln!(
            out,
            "previous:     {} trusted until {}",
            p.fingerprint_sha256,
            p.trusted_until.as_deref().unwrap_or("?")
        )?;
    }
    write!(out, "{}", c.pem)
}
