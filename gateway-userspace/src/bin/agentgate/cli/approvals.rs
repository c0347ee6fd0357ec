//! `agentgate approvals list | show ID | approve ID | deny ID`.

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
    /// One pending request, as JSON.
    Show { id: String },
    /// Approve a held command.
    Approve {
        id: String,
        /// Who approves (recorded in the audit log); never the requester.
        #[arg(long, default_value = "root")]
        approver: String,
        /// Why, or a ticket id.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a held command; the client gets a permission error at once.
    Deny {
        id: String,
        #[arg(long, default_value = "root")]
        approver: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

pub fn run(config: &Path, cmd: &ApprovalsCommand) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let req = match cmd {
        ApprovalsCommand::List { .. } => Request::ApprovalsList,
        ApprovalsCommand::Show { id } => Request::ApprovalsShow { id: id.clone() },
        ApprovalsCommand::Approve {
            id,
            approver,
            reason,
        } => Request::ApprovalsDecide {
            id: id.clone(),
            approve: true,
            approver: approver.clone(),
            reason: reason.clone(),
        },
        ApprovalsCommand::Deny {
            id,
            approver,
            reason,
        } => Request::ApprovalsDecide {
            id: id.clone(),
            approve: false,
            approver: approver.clone(),
            reason: reason.clone(),
        },
    };
    let v = runtime()?.block_on(request(&cfg, &req))?;
    let mut out = std::io::stdout().lock();
    match cmd {
        ApprovalsCommand::List { json: false } => {
            let empty = Vec::new();
            let list = v.as_array().unwrap_or(&empty);
            writeln!(out, "pending approvals: {}", list.len())?;
            for r in list {
                writeln!(
                    out,
                    "  {}  {}  {}  rule={}  deadline={}\n      {}",
                    r["id"].as_str().unwrap_or("?"),
                    r["identity"].as_str().unwrap_or("?"),
                    r["resource"].as_str().unwrap_or("?"),
                    r["rule"].as_str().unwrap_or("?"),
                    r["deadline"].as_str().unwrap_or("?"),
                    r["summary"].as_str().unwrap_or("?"),
                )?;
            }
        }
        _ => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
    }
    Ok(ExitCode::SUCCESS)
}
