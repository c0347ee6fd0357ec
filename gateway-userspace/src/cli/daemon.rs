//! `agentgate run | status | exec | tag | untag`.

use std::{path::Path, process::ExitCode};

#[derive(Debug, clap::Args)]
pub struct RunArgs {}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Identity the command acts for.
    #[arg(long)]
    pub identity: String,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, clap::Args)]
pub struct TagArgs {
    /// cgroup v2 path, absolute or relative to the cgroup2 mount.
    #[arg(long)]
    pub cgroup: std::path::PathBuf,
    /// Identity the cgroup's processes act for.
    #[arg(long)]
    pub identity: String,
}

#[derive(Debug, clap::Args)]
pub struct UntagArgs {
    /// cgroup v2 path, absolute or relative to the cgroup2 mount.
    #[arg(long)]
    pub cgroup: std::path::PathBuf,
}

pub fn run(_config: &Path, _args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
pub fn status(_config: &Path, _args: StatusArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
pub fn exec(_config: &Path, _args: ExecArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
pub fn tag(_config: &Path, _args: TagArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
pub fn untag(_config: &Path, _args: UntagArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
