//! `agentgate audit ...` (issue: tamper-evident audit log).

use std::{path::Path, process::ExitCode};

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify chain, tree, signatures and consistency with an older checkpoint.
    Verify {
        /// Audit log directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// An older exported checkpoint the log must be consistent with.
        #[arg(long)]
        checkpoint: Option<std::path::PathBuf>,
    },
}

pub fn run(_config: &Path, _cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the audit log is not built yet")
}
