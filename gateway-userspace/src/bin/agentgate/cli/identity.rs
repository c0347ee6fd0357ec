//! `agentgate login` (issue: OIDC identities).
//!
//! Runs the device flow in this (unprivileged) process, shows the user the
//! verification URL and code on stderr, verifies the ID token, then hands the
//! tokens to the daemon as one JSON line ([`LoginHandoff`]) over its control
//! socket. The daemon verifies the ID token again itself
//! (`Session::from_handoff`); nothing this process says is trusted. No token is
//! ever written to a file or printed.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use agentgate::{
    control::{Client, Request},
    identity::{DevicePrompt, IdentityConfig, OidcClient, Session, device_login},
};
use anyhow::Context as _;

use super::UsageError;

/// Where the daemon listens (DESIGN.md, "Command line"). `AGENTGATE_CONTROL_SOCKET`
/// overrides it (tests, a daemon run elsewhere).
const DEFAULT_CONTROL_SOCKET: &str = "/run/agentgate/control.sock";

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// OIDC issuer URL.
    #[arg(long)]
    pub issuer: Option<String>,
    /// OIDC client id.
    #[arg(long)]
    pub client_id: Option<String>,
}

pub fn login(config: &Path, args: LoginArgs) -> anyhow::Result<ExitCode> {
    let cfg = identity_config(config, args)?;
    let client = OidcClient::new(cfg).map_err(|e| UsageError(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let session = runtime
        .block_on(device_login(&client, show_prompt))
        .context("login failed")?;
    let id = session.identity();
    let groups = if id.groups.is_empty() {
        "none".to_owned()
    } else {
        id.groups.join(", ")
    };
    eprintln!("Logged in as {} (groups: {groups}).", id.name);
    let held = hand_to_daemon(&session)?;
    eprintln!(
        "The daemon now holds the session for {} (until {}).",
        held["name"].as_str().unwrap_or(&id.name),
        held["expires_at"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

fn show_prompt(prompt: &DevicePrompt) {
    let minutes = prompt.expires_in.as_secs().div_ceil(60);
    eprintln!(
        "To log in, open this page in a browser:\n\n    {}\n",
        prompt.verification_uri
    );
    eprintln!("and enter the code:\n\n    {}\n", prompt.user_code);
    if let Some(complete) = &prompt.verification_uri_complete {
        eprintln!("(or open {complete} , which has the code filled in)");
    }
    eprintln!("Waiting up to {minutes} min for you to approve...");
}

/// The `[identity]` section of the config file, with `--issuer`/`--client-id` on top.
/// Without a readable config file both flags are needed.
fn identity_config(path: &Path, args: LoginArgs) -> anyhow::Result<IdentityConfig> {
    // Only [identity] is read here; the other sections belong to other parts of the
    // daemon, which check them (unknown top-level keys are theirs to reject).
    #[derive(serde::Deserialize)]
    struct ConfigFile {
        identity: Option<IdentityConfig>,
    }
    let from_file = match std::fs::read_to_string(path) {
        Ok(text) => {
            let file: ConfigFile = toml::from_str(&text)
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
            file.identity
        }
        Err(e) if args.issuer.is_some() && args.client_id.is_some() => {
            eprintln!(
                "note: not using {} ({e}); using --issuer and --client-id with default settings",
                path.display()
            );
            None
        }
        Err(e) => {
            return Err(UsageError(format!(
                "cannot read {}: {e}; pass --issuer URL and --client-id ID, or fix --config",
                path.display()
            ))
            .into());
        }
    };
    let mut cfg = match (from_file, &args.issuer) {
        (Some(cfg), _) => cfg,
        (None, Some(issuer)) => IdentityConfig::new(issuer, None),
        (None, None) => {
            return Err(UsageError(format!(
                "no [identity] section in {}; pass --issuer URL and --client-id ID",
                path.display()
            ))
            .into());
        }
    };
    if let Some(issuer) = args.issuer {
        cfg.issuer = issuer;
    }
    if let Some(client_id) = args.client_id {
        cfg.client_id = Some(client_id);
    }
    if cfg.client_id.is_none() {
        return Err(UsageError(
            "no device-flow client id: set [identity] client_id or pass --client-id".into(),
        )
        .into());
    }
    Ok(cfg)
}

/// Gives the verified session to the daemon: a `login` request on its control
/// socket carrying the [`LoginHandoff`]. The daemon verifies the ID token again
/// and answers with the identity it now holds.
fn hand_to_daemon(session: &Session) -> anyhow::Result<serde_json::Value> {
    let handoff = session
        .handoff()
        .context("the login produced no ID token to hand over")?;
    let socket = std::env::var_os("AGENTGATE_CONTROL_SOCKET")
        .map_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET), PathBuf::from);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut client = Client::connect(&socket)
            .await
            .map_err(|e| UsageError(format!("{e}")))?;
        client
            .request(&Request::Login { handoff })
            .await
            .map_err(|e| {
                if e.is_usage() {
                    UsageError(e.to_string()).into()
                } else {
                    anyhow::Error::new(e)
                }
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate::identity::LoginHandoff;

    fn handoff() -> LoginHandoff {
        LoginHandoff {
            version: 1,
            issuer: "https://idp".into(),
            client_id: "agentgate-cli".into(),
            id_token: "header.payload.signature".into(),
            refresh_token: Some("refresh-secret".into()),
            nonce: Some("n".into()),
        }
    }

    #[test]
    fn login_request_carries_the_handoff_and_hides_it_in_debug() {
        let req = Request::Login { handoff: handoff() };
        let text = serde_json::to_string(&req).unwrap();
        let back: Request = serde_json::from_str(&text).unwrap();
        let Request::Login { handoff: back } = back else {
            panic!("not a login: {text}")
        };
        assert_eq!(back.client_id, "agentgate-cli");
        assert!(!format!("{req:?}").contains("refresh-secret"));
    }

    #[test]
    fn config_from_flags_file_or_usage_error() {
        let missing = Path::new("/nonexistent/agentgate.toml");
        let args = |i: Option<&str>, c: Option<&str>| LoginArgs {
            issuer: i.map(str::to_owned),
            client_id: c.map(str::to_owned),
        };
        let cfg = identity_config(missing, args(Some("https://idp"), Some("cli"))).unwrap();
        assert_eq!(
            (cfg.issuer.as_str(), cfg.client_id.as_deref()),
            ("https://idp", Some("cli"))
        );
        let err = identity_config(missing, args(Some("https://idp"), None)).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agentgate.toml");
        std::fs::write(
            &file,
            "[daemon]\nx = 1\n[identity]\nissuer = \"https://a\"\nclient_id = \"cli\"\n",
        )
        .unwrap();
        let cfg = identity_config(&file, args(None, None)).unwrap();
        assert_eq!(cfg.issuer, "https://a");
        let cfg = identity_config(&file, args(Some("https://b"), None)).unwrap();
        assert_eq!(cfg.issuer, "https://b");
        std::fs::write(&file, "[identity]\nissuer = \"https://a\"\nbogus = 1\n").unwrap();
        let err = identity_config(&file, args(None, None)).unwrap_err();
        assert!(
            err.to_string().contains("bogus") && err.to_string().contains("line 3"),
            "{err}"
        );
    }
}

#[derive(Debug, clap::Args)]
pub struct LogoutArgs {
    /// The identity whose session ends (its refresh token is revoked at the provider).
    #[arg(long)]
    pub identity: String,
}

pub fn logout(config: &Path, args: &LogoutArgs) -> anyhow::Result<ExitCode> {
    let cfg = super::daemon::load_config(config, false)?;
    let v = super::daemon::runtime()?.block_on(super::daemon::request(
        &cfg,
        &Request::Logout {
            identity: args.identity.clone(),
        },
    ))?;
    println!(
        "logged out {} ({} live connections closed)",
        args.identity,
        v["connections_closed"].as_u64().unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}
