//! `agentgate evidence`: parses the arguments, records the read, runs
//! [`agentgate::evidence::build`] with a progress bar, prints where the
//! package is. Exit 1 when the log is not intact (the package is still written).

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use agentgate::{audit::parse_time, evidence};
use serde_json::json;

use super::{
    UsageError,
    audit::{existing_dir, load_config, record_access},
};

#[derive(Debug, clap::Args)]
pub struct EvidenceArgs {
    /// Identity the report covers, by name (a verified identity is recorded as
    /// `NAME (ISSUER#SUB)`; NAME finds it); repeat for several.
    #[arg(long = "identity", required = true)]
    pub identities: Vec<String>,
    /// Start of the period (RFC 3339), inclusive.
    #[arg(long)]
    pub from: String,
    /// End of the period (RFC 3339), exclusive.
    #[arg(long)]
    pub to: String,
    /// Directory to write index.html, evidence.json and records.jsonl to.
    #[arg(long)]
    pub out: PathBuf,
    /// Audit log directory (default: `[audit] dir` of the config).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Exported checkpoint(s) the log must be consistent with.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The daemon's policy archive, for the "Policy in force" section
    /// (default: `policies` in `[daemon] state_dir` of the config).
    #[arg(long)]
    pub policies: Option<PathBuf>,
}

pub fn run(config: &std::path::Path, args: EvidenceArgs) -> anyhow::Result<ExitCode> {
    let policy_archive = match args.policies {
        Some(p) => p,
        None => super::policy::archive_from_config(config)?.dir().to_owned(),
    };
    let cfg = load_config(config, args.dir)?;
    existing_dir(&cfg)?;
    let time = |v: &str, name: &str| {
        parse_time(v).ok_or_else(|| UsageError(format!("--{name} {v:?} is not an RFC 3339 time")))
    };
    let (from, to) = (time(&args.from, "from")?, time(&args.to, "to")?);
    if let Some(cp) = &args.checkpoint
        && !cp.is_file()
    {
        return Err(UsageError(format!("no checkpoint file at {}", cp.display())).into());
    }
    record_access(
        &cfg,
        "evidence",
        &json!({"identities": args.identities, "from": args.from, "to": args.to,
                "out": args.out.display().to_string()}),
    )?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} reading the log {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let opts = evidence::Options {
        dir: cfg.dir.clone(),
        identities: args.identities,
        from,
        to,
        out: args.out,
        checkpoint: args.checkpoint,
        policy_archive: Some(policy_archive),
    };
    let result = evidence::build(&opts, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let outcome = match result {
        Ok(o) => o,
        Err(evidence::EvidenceError::Usage(m)) => return Err(UsageError(m).into()),
        Err(e) => return Err(e.into()),
    };
    println!(
        "wrote {}, {} and {} ({} records read, {} cited, {} with proofs)",
        outcome.index_html.display(),
        outcome.evidence_json.display(),
        outcome.records_jsonl.display(),
        outcome.records_read,
        outcome.cited,
        outcome.proven
    );
    if outcome.intact {
        println!("ok: the log verifies");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAILED: {}",
            outcome
                .failure
                .as_deref()
                .unwrap_or("the log is not consistent with the checkpoint given")
        );
        Ok(ExitCode::from(1))
    }
}
