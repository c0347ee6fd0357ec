//! `agentgate audit ...`: verify, read, export and prove the audit log.
//!
//! Every command that reads the log first records an `audit.access` record
//! naming the reader (uid, process) and what was read. With the writer lock free
//! the record is appended directly; while the daemon holds it, the request is
//! spooled to `access-requests.jsonl` for the daemon to ingest. If neither works
//! the command refuses to read (fails closed). `verify` checks first and records
//! afterwards, so that recording never alters what is being verified.

use std::{
    collections::VecDeque,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use agentgate::audit::{
    AuditConfig, AuditError, AuditLog, Durability, IdentityRef, InclusionProof, Kind, LineEnd,
    LineReader, NewRecord, Workload, list_segments, parse_line, parse_time, prove_inclusion,
    read_records, spool_access_request, verify_dir, verify_inclusion_proof,
};
use anyhow::Context;
use serde_json::json;

use super::UsageError;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Rotate the checkpoint signing key (through the running daemon). The new
    /// key is endorsed by the old one in a `key.rotation` record.
    RotateKey,
    /// Verify chain, tree, signatures and consistency with an older checkpoint.
    Verify {
        /// Audit log directory (default: `[audit] dir` of the config, else /var/lib/agentgate/audit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// An older exported checkpoint (or a file of them, one per line) the log must be consistent with.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print the last records; with -f keep printing new ones.
    Tail {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How many records to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Follow the log as it grows.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Export records: `jsonl` as stored (each line stays verifiable), or
    /// `ocsf` (one OCSF 1.3 event per line: Datastore Activity for SQL, API
    /// Activity for the rest; each names its record's seq and hash).
    Export {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Only records at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Only records before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Only records whose identity subject is this.
        #[arg(long)]
        identity: Option<String>,
    },
    /// Print an inclusion proof for record SEQ (JSON) against the newest checkpoint covering it.
    Prove {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        seq: u64,
    },
    /// Check an inclusion proof made by `prove` (does not need the log).
    VerifyProof {
        file: PathBuf,
        /// Require the checkpoint to be signed by this public key (hex, or a file holding it).
        #[arg(long)]
        key: Option<String>,
    },
    /// Test helper: append records from many tasks, printing `READY` once open, then `ACK <seq> <hash>` per durable append.
    #[command(hide = true)]
    Stress {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Total appends (default: until killed).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        batched: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Ocsf,
}

const MAX_PROOF_FILE: u64 = 16 << 20;

pub fn run(config: &Path, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::RotateKey => {
            let cfg = super::daemon::load_config(config, false)?;
            let v = super::daemon::runtime()?.block_on(super::daemon::request(
                &cfg,
                &agentgate::control::Request::AuditRotateKey,
            ))?;
            println!(
                "new checkpoint signing key: {}",
                v["public_key"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { dir, checkpoint } => verify(config, dir, checkpoint),
        AuditCommand::Tail { dir, lines, follow } => {
            let cfg = load_config(config, dir)?;
            existing_dir(&cfg)?;
            record_access(&cfg, "tail", &json!({"lines": lines, "follow": follow}))?;
            tail(&cfg.dir, lines, follow)
        }
        AuditCommand::Export {
            dir,
            format,
            from,
            to,
            identity,
        } => export(
            config,
            dir,
            format,
            from.as_deref(),
            to.as_deref(),
            identity.as_deref(),
        ),
        AuditCommand::Prove { dir, seq } => {
            let cfg = load_config(config, dir)?;
            existing_dir(&cfg)?;
            record_access(&cfg, "prove", &json!({"seq": seq}))?;
            match prove_inclusion(&cfg.dir, seq) {
                Ok(p) => {
                    println!("{}", serde_json::to_string_pretty(&p)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ AuditError::Unprovable { .. }) => Err(UsageError(e.to_string()).into()),
                Err(e) => Err(e.into()),
            }
        }
        AuditCommand::VerifyProof { file, key } => verify_proof(&file, key),
        AuditCommand::Stress {
            dir,
            writers,
            count,
            batched,
        } => stress(dir, writers, count, batched),
    }
}

fn verify(
    config: &Path,
    dir: Option<PathBuf>,
    checkpoint: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, dir)?;
    existing_dir(&cfg)?;
    if let Some(cp) = &checkpoint
        && !cp.is_file()
    {
        return Err(UsageError(format!("no checkpoint file at {}", cp.display())).into());
    }
    let result = verify_dir(&cfg.dir, checkpoint.as_deref());
    record_access(
        &cfg,
        "verify",
        &json!({"checkpoint": checkpoint.map(|p| p.display().to_string())}),
    )?;
    match result {
        Ok(r) => {
            println!(
                "ok: {} intact: seqs {}..{} ({} records) in {} segment(s), {} checkpoint(s), root {}",
                cfg.dir.display(),
                r.first_seq,
                r.size,
                r.size - r.first_seq,
                r.segments,
                r.checkpoints,
                r.root
            );
            if !r.keys.is_empty() {
                println!("signing keys: {}", r.keys.join(" -> "));
            }
            if r.older_checked + r.older_predating_retention > 0 {
                println!(
                    "consistent with {} older checkpoint(s){}",
                    r.older_checked,
                    if r.older_predating_retention > 0 {
                        format!(
                            "; {} predate retained data and were not compared",
                            r.older_predating_retention
                        )
                    } else {
                        String::new()
                    }
                );
            }
            for q in &r.quarantined {
                println!("quarantined torn tail kept: {}", q.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            println!("FAILED: {} is not intact: {f}", cfg.dir.display());
            if f.what == agentgate::audit::Broken::TornLine {
                println!(
                    "note: if this is the last segment, a crash can leave a torn last line; \
                     starting the daemon moves it to quarantine/ and records log.recovered"
                );
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn export(
    config: &Path,
    dir: Option<PathBuf>,
    format: ExportFormat,
    from: Option<&str>,
    to: Option<&str>,
    identity: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, dir)?;
    existing_dir(&cfg)?;
    let time_arg = |s: Option<&str>, name: &str| -> anyhow::Result<Option<time::OffsetDateTime>> {
        s.map(|v| {
            parse_time(v)
                .ok_or_else(|| UsageError(format!("--{name} {v:?} is not an RFC 3339 time")))
        })
        .transpose()
        .map_err(Into::into)
    };
    let (t_from, t_to) = (time_arg(from, "from")?, time_arg(to, "to")?);
    record_access(
        &cfg,
        "export",
        &json!({"format": format!("{format:?}").to_lowercase(), "from": from, "to": to, "identity": identity}),
    )?;
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    read_records(&cfg.dir, |_, _, p, raw| {
        let t = parse_time(&p.record.time);
        let in_window =
            t.is_some_and(|t| t_from.is_none_or(|f| t >= f) && t_to.is_none_or(|e| t < e));
        let who =
            identity.is_none_or(|id| p.record.identity.as_ref().is_some_and(|i| i.subject == id));
        if !(in_window && who) {
            return true;
        }
        let written = match format {
            ExportFormat::Jsonl => out.write_all(raw),
            ExportFormat::Ocsf => serde_json::to_writer(
                &mut out,
                &agentgate::audit::ocsf::to_ocsf(&p.record, &hex::encode(p.hash)),
            )
            .map_err(std::io::Error::other),
        };
        if let Err(e) = written.and_then(|()| out.write_all(b"\n")) {
            write_err = Some(e);
            return false;
        }
        true
    })
    .with_context(|| format!("reading {}", cfg.dir.display()))?;
    if let Some(e) = write_err {
        return Err(e).context("writing the export");
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_proof(file: &Path, key: Option<String>) -> anyhow::Result<ExitCode> {
    let meta =
        std::fs::metadata(file).map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    if meta.len() > MAX_PROOF_FILE {
        return Err(UsageError(format!(
            "{} is larger than {MAX_PROOF_FILE} bytes",
            file.display()
        ))
        .into());
    }
    let raw = std::fs::read(file).with_context(|| file.display().to_string())?;
    let proof: InclusionProof = serde_json::from_slice(&raw)
        .map_err(|e| UsageError(format!("{}: not an inclusion proof: {e}", file.display())))?;
    let key = key
        .map(|k| {
            if Path::new(&k).is_file() {
                std::fs::read_to_string(&k).map(|s| s.trim().to_owned())
            } else {
                Ok(k)
            }
        })
        .transpose()?;
    match verify_inclusion_proof(&proof, key.as_deref()) {
        Ok(()) => {
            println!(
                "ok: seq {} is record {} of {} in the log of {}, root {} signed by {} at {}",
                proof.seq,
                proof.seq,
                proof.checkpoint.size,
                proof.checkpoint.origin,
                proof.checkpoint.root,
                proof.checkpoint.key,
                proof.checkpoint.time
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("FAILED: proof for seq {}: {e}", proof.seq);
            Ok(ExitCode::from(1))
        }
    }
}

/// `[audit]` from the config file if it exists (other sections are ignored
/// here), then `--dir` on top.
pub(super) fn load_config(config: &Path, dir: Option<PathBuf>) -> anyhow::Result<AuditConfig> {
    let mut cfg = if config.is_file() {
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        let doc: toml::Value =
            toml::from_str(&text).map_err(|e| UsageError(format!("{}: {e}", config.display())))?;
        match doc.get("audit") {
            Some(section) => section
                .clone()
                .try_into::<AuditConfig>()
                .map_err(|e| UsageError(format!("{}: [audit]: {e}", config.display())))?,
            None => AuditConfig::default(),
        }
    } else {
        AuditConfig::default()
    };
    if let Some(d) = dir {
        cfg.dir = d;
    }
    cfg.validate().map_err(|e| UsageError(e.to_string()))?;
    Ok(cfg)
}

pub(super) fn existing_dir(cfg: &AuditConfig) -> anyhow::Result<()> {
    if cfg.dir.is_dir() {
        Ok(())
    } else {
        Err(UsageError(format!("no audit log at {}", cfg.dir.display())).into())
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Who is reading: the local uid (a label, not a verified identity).
fn reader_identity(uid: u32) -> IdentityRef {
    let mut subject = format!("uid:{uid}");
    if let Ok(sudo) = std::env::var("SUDO_USER")
        && !sudo.is_empty()
        && sudo.len() <= 64
    {
        subject.push_str(" sudo_user:");
        subject.push_str(&sudo);
    }
    IdentityRef {
        subject,
        kind: "label".into(),
        groups: Vec::new(),
    }
}

/// Appends `audit.access` directly, or spools it; refuses (error) if neither works.
pub(super) fn record_access(
    cfg: &AuditConfig,
    command: &str,
    args: &serde_json::Value,
) -> anyhow::Result<()> {
    let workload = Workload::current_process();
    let rec = NewRecord::new(Kind::AuditAccess)
        .identity(reader_identity(workload.uid))
        .workload(workload)
        .resource(cfg.dir.display().to_string())
        .action(json!({"command": command, "args": args}));
    let direct = runtime()?.block_on(async {
        let log = AuditLog::open_for_reader(cfg.clone()).await?;
        let appended = log.append(rec.clone()).await;
        log.close().await?;
        appended
    });
    match direct {
        Ok(a) => {
            tracing::debug!(seq = a.seq, "audit.access recorded");
            Ok(())
        }
        Err(why) => {
            tracing::debug!(%why, "audit.access: writer not available, spooling");
            spool_access_request(&cfg.dir, &rec)
                .map(|path| tracing::debug!(path = %path.display(), "audit.access spooled"))
                .with_context(|| {
                    format!(
                        "cannot record this read of {} ({why}); refusing to read",
                        cfg.dir.display()
                    )
                })
        }
    }
}

fn tail(dir: &Path, n: usize, follow: bool) -> anyhow::Result<ExitCode> {
    let mut last: VecDeque<Vec<u8>> = VecDeque::with_capacity(n + 1);
    let mut pos: Option<(PathBuf, u64, u64)> = None; // segment, first seq, offset after the last line
    read_records(dir, |seg, off, p, raw| {
        if n > 0 {
            if last.len() == n {
                last.pop_front();
            }
            last.push_back(raw.to_vec());
        }
        let first = list_first_seq(seg);
        pos = Some((seg.to_path_buf(), first, off + raw.len() as u64 + 1));
        let _ = p;
        true
    })?;
    let mut out = std::io::stdout().lock();
    for l in &last {
        out.write_all(l)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let (mut seg_first, mut offset) = pos.map_or((0, 0), |(_, f, o)| (f, o));
    let mut buf = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let floor = seg_first;
        for seg in list_segments(dir)?
            .into_iter()
            .filter(|s| s.first_seq >= floor)
        {
            if seg.first_seq > seg_first {
                seg_first = seg.first_seq;
                offset = 0;
            }
            let mut r = LineReader::open(&seg.path, offset)?;
            while let Some((_, end)) = r.next_line(&mut buf)? {
                if end != LineEnd::Complete || parse_line(&buf).is_err() {
                    break;
                }
                out.write_all(&buf)?;
                out.write_all(b"\n")?;
                offset = r.offset();
            }
        }
        out.flush()?;
    }
}

fn list_first_seq(seg: &Path) -> u64 {
    seg.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| {
            n.strip_prefix("segment-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn stress(
    dir: PathBuf,
    writers: usize,
    count: Option<u64>,
    batched: bool,
) -> anyhow::Result<ExitCode> {
    let mut cfg = AuditConfig::with_dir(dir);
    cfg.checkpoint_every_records = 100;
    if batched {
        cfg.durability = Durability::Batched;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let log = AuditLog::open(cfg).await?;
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        {
            let mut o = out.lock().expect("stdout lock");
            writeln!(o, "READY")?;
            o.flush()?;
        }
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..writers.max(1) {
            let (log, out, next) = (log.clone(), Arc::clone(&out), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if count.is_some_and(|c| i >= c) {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let rec = NewRecord::new(Kind::Statement)
                        .session(format!("stress-{w}"))
                        .connection(i)
                        .resource("stress")
                        .action(json!({"sql": "SELECT ? FROM t WHERE id = ?", "n": i}));
                    let a = log.append(rec).await?;
                    let mut o = out.lock().expect("stdout lock");
                    writeln!(o, "ACK {} {}", a.seq, hex::encode(a.hash))?;
                    o.flush()?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        log.close().await?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}
