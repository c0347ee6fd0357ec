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
    /// Run the command as this user (and group; by default the user's primary
    /// group), with the user's supplementary groups and HOME, USER and
    /// LOGNAME. Without it (and without --allow-root), root runs the command
    /// as the user who ran sudo, or refuses.
    #[arg(long, value_name = "NAME[:GROUP]")]
    pub user: Option<String>,
    /// Run the command as root (when no --user is given, even under sudo). A
    /// root agent can leave its cgroup and reach the control plane's host:
    /// this prints a warning and the daemon records workload.privileged.
    #[arg(long)]
    pub allow_root: bool,
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

/// Where `cargo xtask run` writes the path of the local trial's config while
/// its daemon runs, so that a client command in a new terminal (no
/// `--config`, no `AGENTGATE_CONFIG`) finds that daemon.
/// `AGENTGATE_LOCAL_TRIAL_POINTER` names another pointer file (tests).
pub const LOCAL_TRIAL_POINTER: &str = "/run/agentgate/local-trial";

pub fn load_config(path: &Path, required: bool) -> anyhow::Result<Config> {
    if !required && path == Path::new(DEFAULT_CONFIG) && !path.exists() {
        let pointer = std::env::var_os("AGENTGATE_LOCAL_TRIAL_POINTER")
            .map_or_else(|| LOCAL_TRIAL_POINTER.into(), std::path::PathBuf::from);
        if let Some(trial) = local_trial(&pointer) {
            let cfg = Config::load(&trial)?;
            eprintln!(
                "agentgate: no {DEFAULT_CONFIG}; using the local trial's config {} \
                 (from `cargo xtask run`). Set AGENTGATE_CONFIG or pass --config to choose another.",
                trial.display()
            );
            return Ok(cfg);
        }
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

/// The config named by the local trial's pointer file, when the file names a
/// config that exists and whose daemon's control socket exists.
fn local_trial(pointer: &Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(pointer).ok()?;
    let config = std::path::PathBuf::from(text.trim());
    let cfg = Config::load(&config).ok()?;
    cfg.daemon.control_socket.exists().then_some(config)
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
    write_containment_status(&mut out, &v["containment"])?;
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
    // After the connections table: tests find its rows by exe, and a root
    // agent's exe is on both.
    write_root_processes(&mut out, &v["root_processes"])?;
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
    let (a, w) = (&v["approvals"], &v["webhooks"]);
    if a.is_object() {
        writeln!(
            out,
            "approvals: {} pending, {} live grants",
            num(&a["pending"]),
            num(&a["grants"])
        )?;
    }
    if w.is_object() {
        writeln!(
            out,
            "webhooks: {} delivered, {} failed after every attempt, {} attempts failed, {} dropped (queue full)",
            num(&w["delivered"]),
            num(&w["failed"]),
            num(&w["attempts_failed"]),
            num(&w["dropped"])
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Root processes inside tagged cgroups, one line each; nothing when there
/// are none (or the daemon does not report them).
fn write_root_processes(
    out: &mut impl std::io::Write,
    procs: &serde_json::Value,
) -> std::io::Result<()> {
    let Some(procs) = procs.as_array().filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    writeln!(
        out,
        "root processes in tagged cgroups: {} (WARNING: a root process can leave its cgroup and bypass the gateway)",
        procs.len()
    )?;
    for p in procs {
        writeln!(
            out,
            "  pid {} {:<10} {} {}",
            p["pid"]
                .as_u64()
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            p["identity"].as_str().unwrap_or("?"),
            p["cgroup"].as_str().unwrap_or("?"),
            p["exe"].as_str().unwrap_or("?")
        )?;
    }
    Ok(())
}

/// The audit log's lines of `agentgate status`.
fn write_audit_status(out: &mut impl std::io::Write, a: &serde_json::Value) -> std::io::Result<()> {
    let s = &a["stats"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    // Relative to the working directory when below it: what a person typed.
    let dir = a["dir"].as_str().unwrap_or("?");
    let cwd = std::env::current_dir().unwrap_or_default();
    let shown = Path::new(dir)
        .strip_prefix(&cwd)
        .ok()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| dir.to_owned(), |p| p.display().to_string());
    writeln!(
        out,
        "audit log: {shown} ({} durability)",
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

/// Why `exec` will not run an agent as root unasked.
const ROOT_REFUSAL: &str = "refusing to run the agent as root: a root agent can leave its cgroup and approve its own requests; pass --user NAME, run through sudo, or --allow-root";

/// Who `exec` runs the command as.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunAs {
    /// The caller itself (a non-root caller): nothing changes.
    Caller,
    /// Root (the caller's own credentials), by `--allow-root`: warned about
    /// and recorded.
    Root,
    /// Another account: privileges are dropped in the child.
    User(Account),
}

impl RunAs {
    /// Whether the command runs with uid 0 (`--allow-root`, or a `--user`
    /// whose uid is 0): the daemon records it as `workload.privileged`.
    fn is_root(&self) -> bool {
        match self {
            Self::Caller => false,
            Self::Root => true,
            Self::User(a) => a.user.uid == 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    user: agentgate::sys::User,
    gid: u32,
    groups: Vec<u32>,
}

/// Which user a `--user` (or `SUDO_USER`) request names, before the
/// password database is asked: `(user, group)`.
fn split_user_spec(spec: &str) -> Result<(&str, Option<&str>), UsageError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(UsageError(format!(
            "--user {spec:?}: expected NAME or NAME:GROUP"
        )));
    }
    Ok((user, group))
}

/// Looks an account up: the user, its group (`GROUP` or the user's primary
/// group) and the supplementary groups `initgroups` would give it.
fn account(spec: &str, source: &str) -> anyhow::Result<Account> {
    let (name, group) = split_user_spec(spec)?;
    let user = agentgate::sys::user_by_name(name)
        .with_context(|| format!("looking up user {name:?}"))?
        .ok_or_else(|| UsageError(format!("{source}: no such user {name:?}")))?;
    let gid = match group {
        None => user.gid,
        Some(g) => agentgate::sys::group_by_name(g)
            .with_context(|| format!("looking up group {g:?}"))?
            .ok_or_else(|| UsageError(format!("{source}: no such group {g:?}")))?,
    };
    let mut groups = agentgate::sys::group_list(&user.name, user.gid)
        .with_context(|| format!("reading the groups of {}", user.name))?;
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Account { user, gid, groups })
}

/// Decides who runs the command: `--user`; for root, else root itself with
/// `--allow-root` (an explicit choice beats sudo's), else `SUDO_USER` (if not
/// root), else nobody: refused. A non-root caller runs it as itself (it
/// cannot become anyone else).
fn run_as(args: &ExecArgs, caller_uid: u32, sudo_user: Option<&str>) -> anyhow::Result<RunAs> {
    let named = match (&args.user, sudo_user) {
        (Some(spec), _) => Some(account(spec, "--user")?),
        (None, Some(sudo))
            if caller_uid == 0 && !args.allow_root && !sudo.is_empty() && sudo != "root" =>
        {
            Some(account(sudo, "SUDO_USER")?)
        }
        _ => None,
    };
    let chosen = match named {
        Some(a) if caller_uid != 0 => {
            if a.user.uid == caller_uid && a.gid == a.user.gid {
                return Ok(RunAs::Caller);
            }
            return Err(UsageError(format!(
                "--user {}: only root can run a command as another user or group",
                a.user.name
            ))
            .into());
        }
        Some(a) => RunAs::User(a),
        None if caller_uid != 0 => return Ok(RunAs::Caller),
        None => RunAs::Root,
    };
    if chosen.is_root() && !args.allow_root {
        return Err(UsageError(ROOT_REFUSAL.into()).into());
    }
    Ok(chosen)
}

pub fn exec(config: &Path, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, false)?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| UsageError("no command given".into()))?;
    // Decided before the daemon is asked: a refusal leaves no cgroup behind.
    let sudo_user = std::env::var("SUDO_USER").ok();
    let run_as = run_as(args, agentgate::sys::geteuid(), sudo_user.as_deref())?;
    let privileged = run_as.is_root();
    if privileged {
        eprintln!(
            "agentgate: warning: running the agent as root (--allow-root): a root agent can leave its cgroup and reach the control plane's host; the daemon records this as workload.privileged"
        );
    }
    let rt = runtime()?;
    // The connection stays open while the command runs: the daemon removes the
    // cgroup when it closes and the cgroup is empty. It is made, and the
    // request sent, before this process moves into the tagged cgroup: the
    // daemon refuses requests from inside one.
    let (client, cgroup, unix_in_kernel) = rt.block_on(async {
        let mut client = Client::connect(&cfg.daemon.control_socket)
            .await
            .map_err(control_err)?;
        let v = client
            .request(&Request::Exec {
                identity: args.identity.clone(),
                privileged,
            })
            .await
            .map_err(control_err)?;
        let cgroup = v["cgroup"]
            .as_str()
            .context("daemon response without a cgroup")?
            .to_owned();
        let unix_in_kernel = v["unix_paths_checked_by_kernel"].as_bool() == Some(true);
        anyhow::Ok((client, cgroup, unix_in_kernel))
    })?;
    // Move this process in first, so the command starts tagged: nothing it
    // does, from its first instruction on, escapes the cgroup.
    agentgate::cgroup::enter(Path::new(&cgroup), std::process::id())?;
    let mut command = Command::new(program);
    command.args(rest);
    // TLS interception: the command trusts the local CA through the usual
    // variables (the daemon made the bundle at its start).
    let ca = agentgate::tls::CaPaths::new(&cfg.daemon.state_dir);
    if ca.bundle().exists() {
        for (var, file) in agentgate::tls::ca::exec_env(&ca) {
            command.env(var, file);
        }
    }
    if let RunAs::User(a) = &run_as {
        command
            .env("HOME", &a.user.home)
            .env("USER", &a.user.name)
            .env("LOGNAME", &a.user.name);
        agentgate::sys::drop_privileges_on_exec(&mut command, a.user.uid, a.gid, a.groups.clone());
    }
    // The agent's own seccomp filter keeps it to the socket families the
    // gateway governs (and off Unix sockets where the kernel cannot check
    // their paths); this process answers what it refuses.
    let (supervisor_end, child_end) =
        std::os::unix::net::UnixStream::pair().context("socketpair for the seccomp listener")?;
    agentgate::sys::seccomp_on_exec(
        &mut command,
        agentgate::sys::seccomp::Filter::sockets(unix_in_kernel),
        std::os::fd::AsRawFd::as_raw_fd(&child_end),
    );
    let mut child = match command.spawn() {
        Ok(c) => c,
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
    drop(child_end);
    let listener = match agentgate::sys::seccomp::recv_listener(&supervisor_end) {
        Ok(Some(l)) => l,
        other => {
            // Never leave an agent running without its supervisor.
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the agent's seccomp listener did not arrive: {other:?}");
        }
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let supervisor = {
        let (stop, handle) = (stop.clone(), rt.handle().clone());
        std::thread::spawn(move || supervise(&listener, client, &handle, &stop))
    };
    let status = child.wait().context("waiting for the agent")?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The connection goes last: the daemon releases the cgroup when it closes.
    drop(supervisor.join());
    drop(rt);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Answers the calls the agent's seccomp filter hands over: each is refused
/// (`EPERM`) and reported to the daemon, until the agent is gone and `stop`
/// is set. Returns the control connection, which keeps the cgroup alive.
fn supervise(
    listener: &std::os::fd::OwnedFd,
    mut client: Client,
    rt: &tokio::runtime::Handle,
    stop: &std::sync::atomic::AtomicBool,
) -> Client {
    use agentgate::sys::seccomp;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let n = match seccomp::receive(listener, 200) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => {
                eprintln!("agentgate: seccomp supervisor: {e}");
                break;
            }
        };
        let call = match n.nr {
            seccomp::SYS_SOCKET => "socket",
            seccomp::SYS_SOCKETPAIR => "socketpair",
            seccomp::SYS_IO_URING_SETUP => "io_uring_setup",
            _ => "other",
        };
        // The filter compares the low 32 bits: so does the record.
        let int = |a: u64| i64::from(a as u32 as i32);
        let report = Request::ContainmentReport {
            pid: agentgate::provenance::thread_group(n.pid),
            call: call.into(),
            family: int(n.args[0]),
            sock_type: int(n.args[1]),
            protocol: int(n.args[2]),
        };
        // Reported while the caller still waits in the call (so the daemon
        // finds it), refused whatever the report's fate.
        if let Err(e) = rt.block_on(client.request(&report)) {
            eprintln!("agentgate: could not report a refused {call} to the daemon: {e}");
        }
        if let Err(e) = seccomp::refuse(listener, n.id, libc::EPERM) {
            eprintln!("agentgate: seccomp supervisor: answering a refused call: {e}");
        }
    }
    client
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

/// The containment lines of `agentgate status`: what a tagged process can
/// reach besides the proxy, which hooks enforce it, what was refused.
fn write_containment_status(
    out: &mut impl std::io::Write,
    containment: &serde_json::Value,
) -> std::io::Result<()> {
    let empty = Vec::new();
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    writeln!(out, "containment:")?;
    let hooks = containment["hooks"].as_array().unwrap_or(&empty);
    let off: Vec<&serde_json::Value> = hooks
        .iter()
        .filter(|hook| hook["attached"] != true)
        .collect();
    writeln!(
        out,
        "  hooks attached: {} of {}",
        hooks.len() - off.len(),
        hooks.len()
    )?;
    let lsm_missing = off.iter().any(|hook| {
        hook["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("ag_lsm_"))
    });
    for hook in off {
        writeln!(
            out,
            "  NOT ENFORCED: {} ({})",
            hook["role"].as_str().unwrap_or("?"),
            hook["error"].as_str().unwrap_or("not attached")
        )?;
    }
    if lsm_missing {
        writeln!(
            out,
            "  instead: agents started by `exec` may make no Unix sockets and no other families (seccomp); \
             cgroups bound by `tag` or policy are not contained for them"
        )?;
    }
    let resolvers: Vec<&str> = containment["dns_resolvers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|entry| entry["resolver"].as_str())
        .collect();
    writeln!(
        out,
        "  dns resolvers: {}",
        if resolvers.is_empty() {
            "none".to_owned()
        } else {
            resolvers.join(", ")
        }
    )?;
    let unix: Vec<&str> = containment["allow_unix"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    writeln!(
        out,
        "  unix sockets allowed: {}",
        if unix.is_empty() {
            "none".to_owned()
        } else {
            unix.join(", ")
        }
    )?;
    let refused = &containment["refused"];
    let dns = &containment["dns"];
    writeln!(
        out,
        "  refused since start: unix {}, datagram {}, socket type {}, socket family {}, exec filter {}, inbound {}; dns queries forwarded {}, refused {}",
        count(&refused["unix"]),
        count(&refused["datagram"]),
        count(&refused["socket_type"]),
        count(&refused["socket_family"]),
        count(&refused["exec_filter"]),
        count(&refused["inbound"]),
        count(&dns["forwarded"]),
        count(&dns["refused"])
    )?;
    let escapes = &containment["escapes"];
    writeln!(
        out,
        "  escapes from tagged cgroups: {} (killed {})",
        count(&escapes["escapes_detected"]),
        count(&escapes["escapes_killed"])
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(user: Option<&str>, allow_root: bool) -> ExecArgs {
        ExecArgs {
            identity: "demo".into(),
            user: user.map(str::to_owned),
            allow_root,
            command: vec!["true".into()],
        }
    }

    fn usage_message(r: anyhow::Result<RunAs>) -> String {
        let e = r.expect_err("a usage error");
        e.downcast_ref::<UsageError>()
            .unwrap_or_else(|| panic!("not a usage error: {e:#}"))
            .0
            .clone()
    }

    #[test]
    fn root_without_a_user_is_refused_unless_allowed() {
        let m = usage_message(run_as(&args(None, false), 0, None));
        assert!(m.starts_with("refusing to run the agent as root"), "{m}");
        assert_eq!(run_as(&args(None, true), 0, None).unwrap(), RunAs::Root);
        assert_eq!(
            run_as(&args(None, true), 0, Some("nobody")).unwrap(),
            RunAs::Root,
            "--allow-root is explicit; sudo's user is a default"
        );
        // SUDO_USER=root is no one else.
        let m = usage_message(run_as(&args(None, false), 0, Some("root")));
        assert!(m.contains("--allow-root"), "{m}");
        // --user root is root too.
        let m = usage_message(run_as(&args(Some("root"), false), 0, None));
        assert!(m.contains("--allow-root"), "{m}");
        assert!(
            run_as(&args(Some("root"), true), 0, None)
                .unwrap()
                .is_root()
        );
    }

    #[test]
    fn a_named_user_wins_over_sudo_user_and_allow_root() {
        let RunAs::User(a) = run_as(&args(Some("nobody"), true), 0, Some("root")).unwrap() else {
            panic!("runs as nobody");
        };
        assert_eq!(a.user.name, "nobody");
        assert_ne!(a.user.uid, 0);
        assert_eq!(a.gid, a.user.gid);
        assert!(a.groups.contains(&a.gid));
        let RunAs::User(a) = run_as(&args(None, false), 0, Some("nobody")).unwrap() else {
            panic!("SUDO_USER names the user");
        };
        assert_eq!(a.user.name, "nobody");
        let RunAs::User(a) = run_as(&args(Some("nobody:root"), false), 0, None).unwrap() else {
            panic!("runs as nobody");
        };
        assert_eq!(a.gid, 0, "an explicit group replaces the primary one");
    }

    #[test]
    fn unknown_users_and_groups_are_usage_errors() {
        let m = usage_message(run_as(&args(Some("no-such-user-ag"), false), 0, None));
        assert_eq!(m, "--user: no such user \"no-such-user-ag\"");
        let m = usage_message(run_as(
            &args(Some("nobody:no-such-group-ag"), false),
            0,
            None,
        ));
        assert_eq!(m, "--user: no such group \"no-such-group-ag\"");
        let m = usage_message(run_as(&args(None, false), 0, Some("no-such-user-ag")));
        assert!(m.starts_with("SUDO_USER: no such user"), "{m}");
        for bad in ["", ":x", "nobody:"] {
            let m = usage_message(run_as(&args(Some(bad), false), 0, None));
            assert!(m.contains("NAME:GROUP"), "{bad}: {m}");
        }
    }

    #[test]
    fn a_non_root_caller_runs_as_itself() {
        assert_eq!(
            run_as(&args(None, false), 1000, None).unwrap(),
            RunAs::Caller
        );
        assert_eq!(
            run_as(&args(None, false), 1000, Some("nobody")).unwrap(),
            RunAs::Caller
        );
        let m = usage_message(run_as(&args(Some("root"), true), 1000, None));
        assert!(m.contains("only root"), "{m}");
    }
}
