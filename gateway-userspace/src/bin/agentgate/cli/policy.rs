//! `agentgate policy ...`: validate, explain and compare policies.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use agentgate::{
    policy::{
        Action, ArchiveError, PolicyArchive, PolicyErrors, PolicySet, Subject, Verdict, diff,
        load_dir,
    },
    sql,
};
use anyhow::Context;

use super::UsageError;

/// Where policies live when neither `--dir` nor the configuration says.
const DEFAULT_POLICY_DIR: &str = "/etc/agentgate/policies";

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy file in DIR; print each problem as `file:line:column: message`.
    Check {
        /// Directory of policy files.
        dir: PathBuf,
    },
    /// Show how the policy decides one command: the verdict, the rule that made
    /// it, and every other rule that applied.
    Explain {
        /// Identity acting (OIDC subject or service account).
        #[arg(long)]
        identity: String,
        /// A group of the identity (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Resource name as in the policy.
        #[arg(long)]
        resource: String,
        /// SQL text to classify and decide; without it, the connection itself is decided.
        #[arg(long)]
        sql: Option<String>,
        /// Policy directory (default: `[policy] dir` of the configuration, else /etc/agentgate/policies).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Rule-level changes from OLD to NEW: each rule added, removed, loosened,
    /// tightened or changed, by name, with its text. A change is "loosening"
    /// when it can let through a command OLD stopped (see README, "Policy
    /// versions"). OLD and NEW are each a directory of policy files or a
    /// policy digest (64 hex digits, or a unique prefix of at least 8) from the
    /// daemon's policy archive, as `policy.reload` and `daemon.start` records
    /// and the evidence package name them.
    #[command(
        after_help = "Exit status: 0 when both versions load (whether or not they differ), 1 when one does not load or its archive was altered, 2 on a usage error (an argument that is neither a directory nor an archived digest)."
    )]
    Diff {
        /// The older version: a policy directory or an archived digest.
        old: String,
        /// The newer version: a policy directory or an archived digest.
        new: String,
        /// Print the change list as JSON.
        #[arg(long)]
        json: bool,
        /// Policy archive (default: `policies` in `[daemon] state_dir` of the configuration, else /var/lib/agentgate/policies).
        #[arg(long)]
        archive: Option<PathBuf>,
    },
}

pub fn run(config: &Path, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { dir } => Ok(check(&dir)),
        PolicyCommand::Diff {
            old,
            new,
            json,
            archive,
        } => {
            let archive = match archive {
                Some(a) => PolicyArchive::new(a),
                None => archive_from_config(config)?,
            };
            policy_diff(&archive, &old, &new, json)
        }
        PolicyCommand::Explain {
            identity,
            groups,
            resource,
            sql,
            dir,
        } => {
            let dir = match dir {
                Some(d) => d,
                None => policy_dir_from_config(config)?,
            };
            explain(
                &dir,
                &Subject { identity, groups },
                &resource,
                sql.as_deref(),
            )
        }
    }
}

/// `[policy] dir` from the configuration file, if the file exists and sets it.
fn policy_dir_from_config(config: &Path) -> anyhow::Result<PathBuf> {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(PathBuf::from(DEFAULT_POLICY_DIR));
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", config.display())),
    };
    let value: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    match value.get("policy").and_then(|p| p.get("dir")) {
        None => Ok(PathBuf::from(DEFAULT_POLICY_DIR)),
        Some(toml::Value::String(s)) => Ok(PathBuf::from(s)),
        Some(_) => Err(UsageError(format!(
            "{}: `[policy] dir` must be a string",
            config.display()
        ))
        .into()),
    }
}

/// The policy archive of the configured daemon: `policies` in its state directory.
pub(super) fn archive_from_config(config: &Path) -> anyhow::Result<PolicyArchive> {
    let state = if config.is_file() {
        agentgate::config::Config::load(config)
            .map_err(|e| UsageError(e.to_string()))?
            .daemon
            .state_dir
    } else {
        agentgate::config::Config::default().daemon.state_dir
    };
    Ok(PolicyArchive::in_state_dir(&state))
}

/// A version named on the command line: a directory, or a digest (or a
/// unique prefix of one, 8 hex digits at least) in the archive.
fn resolve(archive: &PolicyArchive, arg: &str) -> anyhow::Result<Result<PolicySet, ExitCode>> {
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(load(path));
    }
    let hex = arg.len() >= 8 && arg.len() <= 64 && arg.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex {
        return Err(UsageError(format!(
            "`{arg}` is neither a policy directory nor a policy digest (8 to 64 hex digits)"
        ))
        .into());
    }
    let arg = arg.to_ascii_lowercase();
    let digest = if arg.len() == 64 {
        arg
    } else {
        let mut found: Vec<String> = std::fs::read_dir(archive.dir())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.len() == 64 && n.starts_with(&arg))
                    .collect()
            })
            .unwrap_or_default();
        match found.len() {
            1 => found.remove(0),
            0 => {
                return Err(UsageError(format!(
                    "no archived policy {arg}… in {}",
                    archive.dir().display()
                ))
                .into());
            }
            n => {
                return Err(UsageError(format!(
                    "{arg} is the start of {n} archived digests; give more digits"
                ))
                .into());
            }
        }
    };
    match archive.load(&digest) {
        Ok(set) => Ok(Ok(set)),
        Err(e @ (ArchiveError::Missing { .. } | ArchiveError::BadDigest(_))) => {
            Err(UsageError(e.to_string()).into())
        }
        Err(e) => {
            eprintln!("agentgate: {e}");
            Ok(Err(ExitCode::from(1)))
        }
    }
}

fn policy_diff(
    archive: &PolicyArchive,
    old: &str,
    new: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let old = match resolve(archive, old)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let new = match resolve(archive, new)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let d = diff::diff(&old, &new);
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", diff::render_text(&d));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_errors(errors: &PolicyErrors) -> ExitCode {
    eprintln!("{errors}");
    let n = errors.0.len();
    eprintln!(
        "agentgate: policy is invalid: {n} error{}",
        if n == 1 { "" } else { "s" }
    );
    ExitCode::from(1)
}

fn load(dir: &Path) -> Result<PolicySet, ExitCode> {
    load_dir(dir).map_err(|e| print_errors(&e))
}

fn check(dir: &Path) -> ExitCode {
    let set = match load(dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    println!(
        "ok: {} file{}, {} resources, {} rules, {} bindings, {} allowed unix paths; digest {}",
        set.files().len(),
        if set.files().len() == 1 { "" } else { "s" },
        set.resources().len(),
        set.rules().len(),
        set.bindings().len(),
        set.allow_unix().len(),
        set.digest()
    );
    ExitCode::SUCCESS
}

fn explain(
    dir: &Path,
    subject: &Subject,
    resource: &str,
    sql_text: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let set = match load(dir) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let Some(res) = set.resource(resource) else {
        let names: Vec<_> = set.resources().iter().map(|r| r.name.as_str()).collect();
        return Err(UsageError(format!(
            "no resource `{resource}` in {}; resources: {}",
            dir.display(),
            names.join(", ")
        ))
        .into());
    };
    let action = match sql_text {
        None => Action::Connect,
        Some(text) => {
            let dialect = res.protocol.sql_dialect().ok_or_else(|| {
                UsageError(format!(
                    "resource `{resource}` speaks {}, not SQL",
                    res.protocol.as_str()
                ))
            })?;
            let c = sql::classify(text, dialect);
            println!("class:     {}", c.class);
            if let Some(reason) = &c.reason {
                println!("           ({reason})");
            }
            for (i, s) in c.statements.iter().enumerate() {
                println!(
                    "  [{}] {:<11} tables: {}  functions: {}{}{}",
                    i + 1,
                    s.class.as_str(),
                    list(&s.tables),
                    list(&s.functions),
                    if s.destructive { "  destructive" } else { "" },
                    s.note
                        .as_ref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
            Action::Sql(Arc::new(c))
        }
    };
    let ex = set.explain(subject, res, &action);
    match &ex.decision.verdict {
        Verdict::Allow => println!("decision:  allow"),
        Verdict::Deny { reason } => println!("decision:  deny ({reason})"),
        Verdict::RequireApproval(spec) => println!(
            "decision:  require_approval (approvers: {}; quorum {}; timeout {}s{})",
            spec.approver_groups.join(", "),
            spec.quorum,
            spec.timeout.as_secs(),
            spec.grant_window
                .map(|g| format!("; grant window {}s", g.as_secs()))
                .unwrap_or_default()
        ),
    }
    let origin = set
        .rules()
        .iter()
        .find(|r| r.name == ex.decision.rule)
        .map(|r| format!(" ({})", r.origin))
        .unwrap_or_default();
    println!("rule:      {}{origin}", ex.decision.rule);
    if ex.candidates.len() > 1 {
        println!(
            "rules that applied, most specific first (conditions, subject, resource, severity):"
        );
        for c in &ex.candidates {
            let (a, b, r, s) = c.specificity;
            println!(
                "  {:<32} {:<17} ({a}, {b}, {r}, {s})  {}",
                c.rule, c.action, c.origin
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(", ")
    }
}
