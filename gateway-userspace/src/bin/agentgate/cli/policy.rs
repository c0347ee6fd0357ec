//! `agentgate policy ...`: validate and explain policies.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use agentgate::{
    policy::{Action, PolicyErrors, PolicySet, Subject, Verdict, load_dir},
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
}

pub fn run(config: &Path, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { dir } => Ok(check(&dir)),
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
