//! `agentgate approvals list | show ID | approve ID | reject ID | grants | revoke GRANT`.
//!
//! Votes are cast `--as NAME`: the daemon resolves NAME to a session it holds
//! and verified (`agentgate login`), or to a label identity where the config
//! allows labels; a name it cannot vouch for is refused.

use std::{io::Write as _, path::Path, process::ExitCode};

use agentgate::control::Request;

use super::daemon::{load_config, request, runtime};

#[derive(Debug, clap::Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One pending request.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Approve a held command (one vote towards the rule's quorum).
    Approve {
        id: String,
        /// The approver: a verified session (`agentgate login`) or an allowed label.
        #[arg(long = "as", value_name = "NAME")]
        as_name: String,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
        /// A change or incident ticket id (recorded; checked against `[approvals] ticket_pattern`).
        #[arg(long)]
        ticket: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Reject a held command; the client gets a permission error with the reason at once.
    #[command(alias = "deny")]
    Reject {
        id: String,
        #[arg(long = "as", value_name = "NAME")]
        as_name: String,
        /// Why (required; the client sees it).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        ticket: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Live grants: windows in which an approved command may run again.
    Grants {
        #[arg(long)]
        json: bool,
    },
    /// End a grant now.
    Revoke {
        grant: String,
        #[arg(long = "as", value_name = "NAME")]
        as_name: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

impl ApprovalsCommand {
    fn json(&self) -> bool {
        match self {
            Self::List { json }
            | Self::Show { json, .. }
            | Self::Approve { json, .. }
            | Self::Reject { json, .. }
            | Self::Grants { json }
            | Self::Revoke { json, .. } => *json,
        }
    }

    fn request(&self) -> Request {
        match self {
            Self::List { .. } => Request::ApprovalsList,
            Self::Show { id, .. } => Request::ApprovalsShow { id: id.clone() },
            Self::Approve {
                id,
                as_name,
                reason,
                ticket,
                ..
            } => Request::ApprovalsDecide {
                id: id.clone(),
                approve: true,
                as_name: as_name.clone(),
                reason: reason.clone(),
                ticket: ticket.clone(),
            },
            Self::Reject {
                id,
                as_name,
                reason,
                ticket,
                ..
            } => Request::ApprovalsDecide {
                id: id.clone(),
                approve: false,
                as_name: as_name.clone(),
                reason: Some(reason.clone()),
                ticket: ticket.clone(),
            },
            Self::Grants { .. } => Request::ApprovalsGrants,
            Self::Revoke {
                grant,
                as_name,
                reason,
                ..
            } => Request::ApprovalsRevoke {
                grant: grant.clone(),
                as_name: as_name.clone(),
                reason: reason.clone(),
            },
        }
    }
}

fn s(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("?")
}

pub fn run(config: &Path, cmd: &ApprovalsCommand) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let v = runtime()?.block_on(request(&cfg, &cmd.request()))?;
    let mut out = std::io::stdout().lock();
    if cmd.json() {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    match cmd {
        ApprovalsCommand::List { .. } => {
            let list = v.as_array().unwrap_or(&empty);
            writeln!(out, "pending approvals: {}", list.len())?;
            for r in list {
                let q = &r["requester"];
                writeln!(
                    out,
                    "  {}  {}  {}  rule={}  votes={}/{}  deadline={}\n      pid {} {}  cgroup {}\n      {}",
                    s(&r["id"]),
                    s(&q["identity"]),
                    s(&r["resource"]),
                    s(&r["rule"]),
                    r["votes"].as_array().map_or(0, Vec::len),
                    r["quorum"],
                    s(&r["deadline"]),
                    q["pid"],
                    q["exe"].as_str().unwrap_or("-"),
                    q["cgroup"].as_str().unwrap_or("-"),
                    s(&r["summary"]),
                )?;
            }
        }
        ApprovalsCommand::Grants { .. } => {
            let list = v.as_array().unwrap_or(&empty);
            writeln!(out, "live grants: {}", list.len())?;
            for g in list {
                writeln!(
                    out,
                    "  {}  {}  {}  scope={}  uses={}  expires={}  approvers={}\n      {}",
                    s(&g["id"]),
                    s(&g["identity"]),
                    s(&g["resource"]),
                    s(&g["scope"]),
                    g["uses"],
                    s(&g["expires"]),
                    g["approvers"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_default(),
                    s(&g["summary"]),
                )?;
            }
        }
        ApprovalsCommand::Approve { id, .. } | ApprovalsCommand::Reject { id, .. } => {
            match s(&v["result"]) {
                "pending" => writeln!(
                    out,
                    "{id}: vote recorded ({} of {} approvals)",
                    v["approvals"], v["quorum"]
                )?,
                "approved" => match v["grant"].as_str() {
                    Some(g) => writeln!(out, "{id}: approved; the command runs (grant {g})")?,
                    None => writeln!(out, "{id}: approved; the command runs")?,
                },
                _ => writeln!(out, "{id}: rejected; the client was told why")?,
            }
        }
        ApprovalsCommand::Revoke { grant, .. } => writeln!(out, "{grant}: revoked")?,
        ApprovalsCommand::Show { .. } => {
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
