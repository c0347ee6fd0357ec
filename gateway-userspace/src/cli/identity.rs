//! `agentgate login` (issue: OIDC identities).

use std::{path::Path, process::ExitCode};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// OIDC issuer URL.
    #[arg(long)]
    pub issuer: Option<String>,
    /// OIDC client id.
    #[arg(long)]
    pub client_id: Option<String>,
}

pub fn login(_config: &Path, _args: LoginArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("OIDC login is not built yet")
}
