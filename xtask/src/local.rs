//! `cargo xtask run`: the local trial. A daemon on a default config under
//! `.state/`, a throwaway demo `PostgreSQL` on 127.0.0.1:5432, and the test
//! `OpenID` provider on 127.0.0.1:15480 so the approvals page works.
//!
//! The config is written once and then kept (it is the user's to edit); a
//! kept file that is not the default is named, with what differs and how to
//! get the default back (`--fresh`). The daemon runs in a cgroup of its own,
//! as a service manager would start it, and a pointer file tells client
//! commands in other terminals which config the trial uses.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::{
    DemoPostgres, PG_BIN, cmd, ignore_sigint,
    procs::{ExecCgroup, Pins, start_provider},
    setup, status, target_dir,
};

/// Where the daemon's address is left for client commands (read by the CLI's
/// `load_config`; `AGENTGATE_LOCAL_TRIAL_POINTER` overrides it for tests).
const POINTER: &str = "/run/agentgate/local-trial";
/// The test provider's port; its `agentgate-web` client redirects to the
/// API's default listen address, 127.0.0.1:15080.
pub const OIDC_PORT: u16 = 15480;

pub struct Options {
    pub fresh: bool,
    pub discard_audit: bool,
    pub bin: Option<PathBuf>,
    pub state: Option<PathBuf>,
}

/// Names of the kernel objects a trial owns, distinct per state directory
/// so a test's trial does not touch a person's.
struct Names {
    exec_cgroup: String,
    bpffs: String,
}

impl Names {
    fn for_state(custom: bool, state: &Path) -> Self {
        let base = if custom {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            state.hash(&mut h);
            format!("agentgate-local-{:08x}", h.finish() as u32)
        } else {
            "agentgate-local".to_owned()
        };
        Self {
            bpffs: format!("/sys/fs/bpf/{base}"),
            exec_cgroup: base,
        }
    }
}

fn default_config(state: &Path, policies: &Path, names: &Names) -> String {
    format!(
        "# Written by `cargo xtask run`; edit freely. It is kept as it is on later runs;\n\
         # `cargo xtask run --fresh` writes this default again.\n\
         [daemon]\n\
         state_dir = \"{state}\"\n\
         control_socket = \"{state}/control.sock\"\n\
         exec_cgroup = \"{exec_cgroup}\"\n\
         fail_mode = \"closed\"\n\
         bpffs_dir = \"{bpffs}\"\n\
         # Unverified identities for trying agentgate without signing in.\n\
         label_identities = [\n\
         \x20 {{ name = \"demo\", groups = [\"demo\"] }},\n\
         \x20 {{ name = \"approver\", groups = [\"approvers\"] }},\n\
         ]\n\n\
         # Label identities may vote on approvals here (local trials only).\n\
         [approvals]\n\
         allow_labels = true\n\n\
         [policy]\n\
         dir = \"{policies}\"\n\n\
         [audit]\n\
         dir = \"{state}/audit\"\n\n\
         # The test OpenID provider `cargo xtask run` starts (tests/oidc): the\n\
         # approvals page signs in its accounts (bob is an approver; any password).\n\
         [identity]\n\
         issuer = \"http://127.0.0.1:{OIDC_PORT}\"\n\
         client_id = \"agentgate-cli\"\n\n\
         [api]\n\
         listen = \"127.0.0.1:15080\"\n\
         [api.web]\n\
         client_id = \"agentgate-web\"\n\n\
         [proxy]\n\
         port = 15001\n",
        state = state.display(),
        policies = policies.display(),
        exec_cgroup = names.exec_cgroup,
        bpffs = names.bpffs,
    )
}

/// Dotted keys whose values differ between two TOML documents (added,
/// removed or changed), each with a short note.
fn differences(kept: &str, default: &str) -> Result<Vec<String>> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let parse = |text: &str| -> Result<BTreeMap<String, String>> {
        let v: toml::Value = toml::from_str(text)?;
        let mut out = BTreeMap::new();
        flatten("", &v, &mut out);
        Ok(out)
    };
    let (kept, default) = (parse(kept)?, parse(default)?);
    let mut out = Vec::new();
    for (k, v) in &default {
        match kept.get(k) {
            None => out.push(format!("{k} is missing (default: {v})")),
            Some(w) if w != v => out.push(format!("{k} = {w} (default: {v})")),
            Some(_) => {}
        }
    }
    for (k, w) in &kept {
        if !default.contains_key(k) {
            out.push(format!("{k} = {w} (not in the default)"));
        }
    }
    Ok(out)
}

/// The config to run with: written when missing or with `--fresh`, else kept
/// and compared with the default.
fn config(state: &Path, opts: &Options, default: &str) -> Result<PathBuf> {
    fs::create_dir_all(state)?;
    let path = state.join("agentgate.toml");
    if opts.fresh {
        if path.exists() {
            let old = state.join("agentgate.toml.old");
            fs::rename(&path, &old)?;
            eprintln!(
                "xtask: --fresh: the previous config is now {}",
                old.display()
            );
        }
        if opts.discard_audit {
            for p in [state.join("audit"), state.join("approvals.redb")] {
                if p.is_dir() {
                    fs::remove_dir_all(&p)?;
                } else if p.exists() {
                    fs::remove_file(&p)?;
                }
            }
            eprintln!("xtask: --discard-audit: the audit log and approvals store are gone");
        } else if state.join("audit").exists() {
            eprintln!(
                "xtask: --fresh keeps the audit log in {} (add --discard-audit to start it anew)",
                state.join("audit").display()
            );
        }
    }
    if !path.exists() {
        fs::write(&path, default)?;
        eprintln!("xtask: wrote the default config {}", path.display());
        return Ok(path);
    }
    let kept = fs::read_to_string(&path)?;
    if kept == default {
        eprintln!("xtask: using the default config {}", path.display());
        return Ok(path);
    }
    match differences(&kept, default) {
        Ok(diffs) if diffs.is_empty() => {
            eprintln!("xtask: using {} (the default, reformatted)", path.display());
        }
        Ok(diffs) => {
            eprintln!(
                "xtask: using {}, kept from an earlier run. It is NOT the default this command \
                 writes; it differs in:",
                path.display()
            );
            for d in &diffs {
                eprintln!("xtask:   {d}");
            }
            eprintln!(
                "xtask: the walkthrough below assumes the default: `cargo xtask run --fresh` \
                 writes it (the audit log is kept)"
            );
        }
        Err(e) => bail!(
            "{} is not valid TOML ({e}); fix it, or `cargo xtask run --fresh` to write the default",
            path.display()
        ),
    }
    Ok(path)
}

/// The pointer file, removed on drop.
struct Pointer(Option<PathBuf>);

impl Pointer {
    fn write(config: &Path) -> Result<Self> {
        let path = std::env::var_os("AGENTGATE_LOCAL_TRIAL_POINTER")
            .map_or_else(|| PathBuf::from(POINTER), PathBuf::from);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, format!("{}\n", config.display()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for Pointer {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

pub fn run(root: &Path, opts: &Options, args: &[String]) -> Result<()> {
    setup(root)?;
    let bin = if let Some(bin) = &opts.bin {
        bin.clone()
    } else {
        status(cmd("cargo").args(["build", "--release", "-p", "agentgate"]))?;
        target_dir(root).join("release/agentgate")
    };
    let custom = opts.state.is_some();
    let state = opts.state.clone().unwrap_or_else(|| root.join(".state"));
    let names = Names::for_state(custom, &state);
    let default = default_config(&state, &root.join("policies/local"), &names);
    let config = config(&state, opts, &default)?;
    for port in [OIDC_PORT, 15080, 15001] {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!(
                "127.0.0.1:{port} is in use (another `cargo xtask run` or `demo`?); the local trial needs it"
            );
        }
    }
    let demo_pg = if custom {
        DemoPostgres::start_on(&state.join("pg"), 5432, &state.join("pg"))?
    } else {
        DemoPostgres::start(&state.join("pg"))?
    };
    let _provider = start_provider(root, OIDC_PORT)?;
    let psql = format!("{PG_BIN}/psql");
    eprintln!(
        "\nagentgate is starting with {config}.\n\
         {pg}\n\
         The test OpenID provider (accounts in tests/oidc/provider.mjs) is at http://127.0.0.1:{OIDC_PORT}.\n\
         In another terminal (as root; agents run as an ordinary user), try:\n\
         \x20 export PGPASSWORD={pw}\n\
         \x20 # reads are allowed; ssn, card and email come back masked:\n\
         \x20 {bin} exec --identity demo --user nobody -- {psql} -h 127.0.0.1 -U postgres -c 'SELECT * FROM customers LIMIT 3'\n\
         \x20 # writes wait for an approver (see the NOTICE for the request id):\n\
         \x20 {bin} exec --identity demo --user nobody -- {psql} -h 127.0.0.1 -U postgres -c \"UPDATE customers SET name = 'x' WHERE id = 1\" &\n\
         \x20 {bin} approvals list\n\
         \x20 # approve it on the page: http://127.0.0.1:15080/ (sign in as bob, any password),\n\
         \x20 # or here: {bin} approvals approve <ID> --as approver\n\
         \x20 {bin} status\n\
         \x20 {bin} audit verify\n\
         Stop with Ctrl-C. Tagged processes cannot connect anywhere while it is down (fail-closed).\n",
        config = config.display(),
        bin = bin.display(),
        pw = DemoPostgres::PASSWORD,
        pg = demo_pg.as_ref().map_or_else(
            || "A server already listens on 127.0.0.1:5432; the demo database was not started."
                .to_owned(),
            |_| "A demo PostgreSQL with a fake `customers` table listens on 127.0.0.1:5432."
                .to_owned()
        ),
    );
    // Ctrl-C reaches the whole foreground group: the daemon stops on it, and
    // this process must outlive the daemon to stop what it started after.
    ignore_sigint();
    let _pins = Pins(PathBuf::from(&names.bpffs));
    let _exec_cgroups = ExecCgroup::new(&names.exec_cgroup);
    // The daemon's own cgroup, as a service manager would give it: not the
    // shell's, so nothing else shares it.
    let own = ExecCgroup::new(&format!("{}-daemon", names.exec_cgroup));
    let own_dir = own.0.clone().context("no cgroup2 mount")?;
    fs::create_dir_all(&own_dir).with_context(|| format!("mkdir {}", own_dir.display()))?;
    let mut daemon = cmd(&bin)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .args(args)
        .spawn()
        .context("starting the daemon")?;
    fs::write(own_dir.join("cgroup.procs"), daemon.id().to_string())
        .with_context(|| format!("moving the daemon into {}", own_dir.display()))?;
    // A test's trial (its own state directory) writes a pointer only where
    // the test says, never over a person's.
    let pointed = !custom || std::env::var_os("AGENTGATE_LOCAL_TRIAL_POINTER").is_some();
    let _pointer = if pointed {
        Some(Pointer::write(&config)?)
    } else {
        None
    };
    let result = daemon.wait()?;
    drop(demo_pg);
    if !result.success() {
        bail!("the daemon exited: {result}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_config_names_what_differs_from_the_default() {
        let names = Names::for_state(false, Path::new("/s"));
        let default = default_config(Path::new("/s"), Path::new("/p"), &names);
        assert!(differences(&default, &default).unwrap().is_empty());
        let kept = default
            .replace("/p\"", "/elsewhere\"")
            .replace("{ name = \"demo\", groups = [\"demo\"] },", "");
        let diffs = differences(&kept, &default).unwrap();
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(diffs[0].starts_with("daemon.label_identities"), "{diffs:?}");
        assert!(
            diffs[1].starts_with("policy.dir = \"/elsewhere\""),
            "{diffs:?}"
        );
    }
}
