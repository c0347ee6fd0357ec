//! Command-line front end. Exit codes: 0 ok, 1 failure, 2 usage error
//! (bad arguments, unknown cgroup, daemon not running, caller not allowed).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod approvals;
mod audit;
mod ca;
mod daemon;
mod evidence;
mod identity;
mod policy;

/// Privileged-access gateway for AI agents.
///
/// Redirects the outbound connections of tagged processes (by cgroup) into a
/// local proxy that attributes, decides, masks and audits every command.
#[derive(Debug, Parser)]
#[command(name = "agentgate", version, propagate_version = true)]
pub struct Cli {
    /// Daemon configuration file.
    #[arg(
        long,
        global = true,
        env = "AGENTGATE_CONFIG",
        default_value = "/etc/agentgate/agentgate.toml"
    )]
    pub config: std::path::PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run(daemon::RunArgs),
    /// Show tagged cgroups, live connections and the audit log's health.
    Status(daemon::StatusArgs),
    /// Run a command in a fresh cgroup tagged and bound to an identity.
    Exec(daemon::ExecArgs),
    /// Tag an existing cgroup (a systemd unit, a container) and bind it to an identity.
    Tag(daemon::TagArgs),
    /// Remove the tag from a cgroup.
    Untag(daemon::UntagArgs),
    /// Log in with OIDC (device authorization flow).
    Login(identity::LoginArgs),
    /// End an identity's session: new connections are refused, live ones closed.
    Logout(identity::LogoutArgs),
    /// Decide on commands held for approval.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Validate and explain policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Write the examiner's evidence package for identities and a period.
    Evidence(evidence::EvidenceArgs),
    /// The local CA that TLS interception signs with.
    #[command(subcommand)]
    Ca(ca::CaCommand),
}

/// An error that is the caller's to fix: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        agentgate::sys::default_sigpipe();
    }
    init_tracing();
    let result = match cli.command {
        Command::Run(args) => daemon::run(&cli.config, &args),
        Command::Status(args) => daemon::status(&cli.config, &args),
        Command::Exec(args) => daemon::exec(&cli.config, &args),
        Command::Tag(args) => daemon::tag(&cli.config, args),
        Command::Untag(args) => daemon::untag(&cli.config, args),
        Command::Login(args) => identity::login(&cli.config, args),
        Command::Logout(args) => identity::logout(&cli.config, &args),
        Command::Policy(cmd) => policy::run(&cli.config, cmd),
        Command::Approvals(cmd) => approvals::run(&cli.config, &cmd),
        Command::Audit(cmd) => audit::run(&cli.config, cmd),
        Command::Evidence(args) => evidence::run(&cli.config, args),
        Command::Ca(cmd) => ca::run(&cli.config, &cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("agentgate: {err:#}");
            if err.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("AGENTGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
