//! `agentgate run | status | exec | tag | untag`.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, ExitCode},
};

use agentgate::{
    config::Config,
    control::{Client, ControlError, Request},
};
use anyhow::Context as _;
use std::os::unix::process::ExitStatusExt as _;

use super::UsageError;

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

/// The default config path; a missing file there means built-in defaults for
/// client commands. Any other missing path is an error.
pub const DEFAULT_CONFIG: &str = "/etc/agentgate/agentgate.toml";

pub fn load_config(path: &Path, required: bool) -> anyhow::Result<Config> {
    if !required && path == Path::new(DEFAULT_CONFIG) && !path.exists() {
        return Ok(Config::default());
    }
    if !path.exists() {
        return Err(UsageError(format!(
            "config file {} not found (pass --config FILE; `cargo xtask run` writes a local one)",
            path.display()
        ))
        .into());
    }
    Ok(Config::load(path)?)
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn control_err(e: ControlError) -> anyhow::Error {
    if e.is_usage() {
        UsageError(e.to_string()).into()
    } else {
        anyhow::Error::new(e)
    }
}

pub async fn request(cfg: &Config, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mut client = Client::connect(&cfg.daemon.control_socket)
        .await
        .map_err(control_err)?;
    client.request(req).await.map_err(control_err)
}

pub fn run(config: &Path, _args: &RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, true)?;
    runtime()?.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let _ = tx.send(true);
        });
        agentgate::daemon::run(cfg, rx).await
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn status(config: &Path, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let v = runtime()?.block_on(request(&cfg, &Request::Status))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    let tagged = v["tagged"].as_array().unwrap_or(&empty);
    writeln!(out, "tagged cgroups: {}", tagged.len())?;
    for t in tagged {
        writeln!(
            out,
            "  {:<10} {:<6} {}",
            t["identity"].as_str().unwrap_or("?"),
            t["kind"].as_str().unwrap_or("?"),
            t["cgroup"].as_str().unwrap_or("?")
        )?;
    }
    let conns = v["connections"].as_array().unwrap_or(&empty);
    writeln!(out, "live connections: {}", conns.len())?;
    // (`Value`'s Display ignores widths: numbers become strings first.)
    let num = |v: &serde_json::Value| v.as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string());
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    let rows: Vec<[String; 7]> = conns
        .iter()
        .map(|c| {
            [
                num(&c["id"]),
                num(&c["workload"]["pid"]),
                text(&c["identity"]),
                text(&c["workload"]["exe"]),
                text(&c["destination"]),
                num(&c["bytes_up"]),
                num(&c["bytes_down"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        let header =
            ["ID", "PID", "IDENTITY", "EXE", "DESTINATION", "UP", "DOWN"].map(String::from);
        // Each column as wide as its widest cell; numbers right-aligned.
        let mut width = [0usize; 7];
        for row in std::iter::once(&header).chain(&rows) {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let [id, pid, identity, exe, dest, up, down] = row;
            let [w0, w1, w2, w3, w4, w5, w6] = width;
            writeln!(
                out,
                "  {id:>w0$} {pid:>w1$} {identity:<w2$} {exe:<w3$} {dest:<w4$} {up:>w5$} {down:>w6$}"
            )?;
        }
    }
    let c = &v["counters"];
    if v["fast_path"].as_bool() == Some(true) {
        writeln!(
            out,
            "fast path: on (sockets mapped: {}, agent sockets kept on TCP: {})",
            num(&c["fast_path_inserted"]),
            num(&c["fast_path_declined"])
        )?;
    } else {
        writeln!(out, "fast path: off")?;
    }
    write_audit_status(&mut out, &v["audit"])?;
    Ok(ExitCode::SUCCESS)
}

/// The audit log's lines of `agentgate status`.
fn write_audit_status(out: &mut impl std::io::Write, a: &serde_json::Value) -> std::io::Result<()> {
    let s = &a["stats"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    writeln!(
        out,
        "audit log: {} ({} durability)",
        a["dir"].as_str().unwrap_or("?"),
        a["durability"].as_str().unwrap_or("?")
    )?;
    let fsyncs = n("fsyncs");
    let latency = if fsyncs == 0 {
        String::new()
    } else {
        format!(
            " (mean {:.3} ms, max {:.3} ms)",
            n("fsync_micros_total") as f64 / fsyncs as f64 / 1e3,
            n("fsync_micros_max") as f64 / 1e3
        )
    };
    writeln!(
        out,
        "  records written: {}, fsyncs: {fsyncs}{latency}, checkpoints: {}",
        n("appends"),
        n("checkpoints")
    )?;
    writeln!(
        out,
        "  write failures: {}, checkpoint export failures: {}",
        n("log_failures"),
        n("sink_failures")
    )?;
    if s["failing"].as_bool() == Some(true) {
        writeln!(
            out,
            "  FAILING: the last write failed; audited actions are denied until a write succeeds"
        )?;
    }
    Ok(())
}

pub fn exec(config: &Path, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let rt = runtime()?;
    // The connection stays open while the command runs: the daemon removes the
    // cgroup when it closes and the cgroup is empty.
    let (client, cgroup) = rt.block_on(async {
        let mut client = Client::connect(&cfg.daemon.control_socket)
            .await
            .map_err(control_err)?;
        let v = client
            .request(&Request::Exec {
                identity: args.identity.clone(),
            })
            .await
            .map_err(control_err)?;
        let cgroup = v["cgroup"]
            .as_str()
            .context("daemon response without a cgroup")?
            .to_owned();
        anyhow::Ok((client, cgroup))
    })?;
    // Move this process in first, so the command starts tagged: nothing it
    // does, from its first instruction on, escapes the cgroup.
    agentgate::cgroup::enter(Path::new(&cgroup), std::process::id())?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| UsageError("no command given".into()))?;
    let status = match Command::new(program).args(rest).status() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "agentgate: {}: command not found",
                program.to_string_lossy()
            );
            drop(client);
            return Ok(ExitCode::from(127));
        }
        Err(e) => return Err(e).with_context(|| format!("running {}", program.to_string_lossy())),
    };
    drop(client);
    drop(rt);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

pub fn tag(config: &Path, args: TagArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let req = Request::Tag {
        cgroup: args.cgroup,
        identity: args.identity,
    };
    let v = runtime()?.block_on(request(&cfg, &req))?;
    println!("tagged {}", v["cgroup"].as_str().unwrap_or("?"));
    Ok(ExitCode::SUCCESS)
}

pub fn untag(config: &Path, args: UntagArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let v = runtime()?.block_on(request(
        &cfg,
        &Request::Untag {
            cgroup: args.cgroup,
        },
    ))?;
    println!("untagged {}", v["cgroup"].as_str().unwrap_or("?"));
    Ok(ExitCode::SUCCESS)
}
