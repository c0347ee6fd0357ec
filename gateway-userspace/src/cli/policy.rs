//! `agentgate policy ...` (issue: policy engine).

use std::{path::Path, process::ExitCode};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy file in DIR.
    Check {
        /// Directory of policy files.
        dir: std::path::PathBuf,
    },
}

pub fn run(_config: &Path, _cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the policy engine is not built yet")
}
