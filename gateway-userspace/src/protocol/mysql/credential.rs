//! Logging in to the server with the resource's own credential (the
//! resource's `credential`), so the agent never holds the database password.
//!
//! The client's handshake response goes upstream rewritten: the
//! credential's user, an authentication answer the proxy computes from the
//! server's scramble, the plugin's name; its capabilities, character set,
//! database and connection attributes stay the client's. The proxy then
//! answers the server's auth switches and extra rounds itself with
//! `mysql_common`'s client plugins (`mysql_native_password`,
//! `caching_sha2_password` fast and full, RSA without TLS, `client_ed25519`,
//! `sha256_password`) and the client sees only the server's `OK`: whatever
//! password the agent sent is never checked or forwarded.
//!
//! Fails closed: a secret that cannot be read, a plugin the proxy does not
//! speak (or `mysql_clear_password` / `mysql_old_password`, refused: the
//! first sends the password in clear outside TLS, the second is broken) or
//! a server that rejects the login ends the connection before any command
//! of the client's reaches the server. The secret lives in a
//! [`SecretString`] and goes nowhere but into the exchange: never into an
//! error, a log line or a record.

use mysql_common::{
    auth::plugins::{AuthProc, ChallengeResponsePlugin as _, Context, Response},
    constants::CapabilityFlags,
    io::ParseBuf,
    packets::{AuthPlugin, HandshakeResponse},
    proto::MySerialize as _,
};
use secrecy::{ExposeSecret as _, SecretString};

/// An upstream login in progress.
pub struct Login {
    secret: SecretString,
    /// The current plugin's challenge (the greeting's scramble, or an auth
    /// switch's data).
    scramble: Vec<u8>,
    /// The upstream leg is TLS (`caching_sha2_password` full authentication
    /// then sends the password itself, as the protocol says).
    pub tls: bool,
    proc: AuthProc,
    /// The plugin in use, for the record.
    pub plugin: String,
}

/// What to do with one server packet of the login.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this answer to the server.
    Send(Vec<u8>),
    /// Nothing to send; read the server's next packet.
    Wait,
    /// The server's `OK`: logged in.
    Done,
    /// The server's `ERR`: the login was refused.
    Refused,
}

struct Ctx<'a> {
    pass: &'a [u8],
    scramble: &'a [u8],
    tls: bool,
}

impl Context for Ctx<'_> {
    fn pass(&self) -> &[u8] {
        self.pass
    }
    fn is_ipc_transport(&self) -> bool {
        false
    }
    fn is_tls_transport(&self) -> bool {
        self.tls
    }
    fn scramble(&self) -> &[u8] {
        self.scramble
    }
    fn server_key_pem(&self) -> Option<&[u8]> {
        None
    }
}

const NATIVE: &str = "mysql_native_password";

/// The client plugin for `name`; `Err` names a plugin not spoken.
fn plugin(name: &str, tls: bool) -> Result<AuthProc, String> {
    let p = AuthPlugin::from_bytes(name.as_bytes());
    match p {
        AuthPlugin::MysqlOldPassword => Err(format!("the server asks for {name}, which is broken")),
        AuthPlugin::MysqlClearPassword if !tls => Err(format!(
            "the server asks for {name} (the password in clear) on a leg without TLS"
        )),
        AuthPlugin::Other(_) | AuthPlugin::Parsec => Err(format!(
            "the server asks for {name}, which agentgate does not speak"
        )),
        _ => p.init().map_err(|e| e.to_string()),
    }
}

impl Login {
    fn run(&mut self, challenge: &[u8]) -> Result<Response, String> {
        let ctx = Ctx {
            pass: self.secret.expose_secret().as_bytes(),
            scramble: &self.scramble,
            tls: self.tls,
        };
        // The plugins' errors never carry the secret; say only which step.
        self.proc
            .run(ctx, challenge)
            .map_err(|e| format!("{} could not answer the server: {e}", self.plugin))
    }

    /// Acts on one server packet.
    pub fn step(&mut self, p: &[u8]) -> Result<Step, String> {
        match p.first() {
            Some(0x00) => Ok(Step::Done),
            Some(0xFF) => Ok(Step::Refused),
            Some(0xFE) => {
                // Auth switch: the plugin's name, NUL, its challenge.
                let rest = &p[1..];
                let end = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or("an auth switch without a plugin name")?;
                let name = String::from_utf8_lossy(&rest[..end]).into_owned();
                let mut data = rest[end + 1..].to_vec();
                if data.last() == Some(&0) {
                    data.pop();
                }
                self.proc = plugin(&name, self.tls)?;
                self.plugin = name;
                self.scramble = data;
                let challenge = self.scramble.clone();
                let r = self.run(&challenge)?;
                Ok(Step::Send(r.data().unwrap_or_default().to_vec()))
            }
            Some(0x01) => match self.run(&p[1..])?.data() {
                Some(d) => Ok(Step::Send(d.to_vec())),
                None => Ok(Step::Wait),
            },
            _ => Err("an authentication packet that does not parse".into()),
        }
    }
}

/// The handshake response to send upstream in place of the client's
/// (`client_hello`, already checked), and the login it starts. `greeting_plugin`
/// and `scramble`: from the server's greeting.
pub fn hello(
    client_hello: &[u8],
    user: &str,
    secret: SecretString,
    greeting_plugin: Option<&str>,
    scramble: Vec<u8>,
) -> Result<(Vec<u8>, Login), String> {
    let c: HandshakeResponse<'_> = ParseBuf(client_hello)
        .parse(())
        .map_err(|_| "the client's handshake response does not parse".to_owned())?;
    // The greeting's plugin when the proxy speaks it without TLS, else
    // native (the server switches to what the account needs).
    let name = greeting_plugin
        .filter(|n| plugin(n, false).is_ok())
        .unwrap_or(NATIVE)
        .to_owned();
    let mut login = Login {
        secret,
        scramble,
        tls: false,
        proc: plugin(&name, false)?,
        plugin: name,
    };
    let challenge = login.scramble.clone();
    let first = login.run(&challenge)?;
    let caps = c.capabilities() | CapabilityFlags::CLIENT_PLUGIN_AUTH;
    let r = HandshakeResponse::new(
        Some(first.data().unwrap_or_default().to_vec()),
        (10, 0, 0),
        Some(user.as_bytes().to_vec()),
        c.db_name().map(<[u8]>::to_vec),
        Some(AuthPlugin::from_bytes(login.plugin.as_bytes()).into_owned()),
        caps,
        c.connect_attributes(),
        // Checked at least 32 bytes long (SSL_REQUEST_LEN) by the caller's parse.
        u32::from_le_bytes([
            client_hello[4],
            client_hello[5],
            client_hello[6],
            client_hello[7],
        ]),
    );
    let mut out = Vec::new();
    r.serialize(&mut out);
    // The client's character set, not the builder's (it decides the
    // session's character_set_client/results).
    if out.len() > 8 {
        out[8] = c.collation();
    }
    Ok((out, login))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(db: Option<&str>) -> Vec<u8> {
        let r = HandshakeResponse::new(
            Some(vec![1u8; 20]),
            (10, 11, 0),
            Some(b"agent-says-anything".to_vec()),
            db.map(|d| d.as_bytes().to_vec()),
            Some(AuthPlugin::MysqlNativePassword),
            CapabilityFlags::CLIENT_PROTOCOL_41
                | CapabilityFlags::CLIENT_SECURE_CONNECTION
                | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
            None,
            16 << 20,
        );
        let mut out = Vec::new();
        r.serialize(&mut out);
        out[8] = 8; // latin1
        out
    }

    #[test]
    fn the_upstream_hello_carries_the_credential_and_the_clients_session_settings() {
        let scramble: Vec<u8> = (1..=20).collect();
        let (out, login) = hello(
            &client_hello(Some("shop")),
            "app",
            SecretString::from("s3cret"),
            Some(NATIVE),
            scramble.clone(),
        )
        .unwrap();
        let r: HandshakeResponse<'_> = ParseBuf(&out).parse(()).unwrap();
        assert_eq!(r.user(), b"app");
        assert_eq!(r.db_name(), Some(&b"shop"[..]));
        assert_eq!(r.collation(), 8);
        let want = mysql_common::auth::plugins::mysql_native_password::scramble_native(
            &scramble, b"s3cret",
        )
        .unwrap();
        assert_eq!(r.scramble_buf(), want);
        assert_eq!(login.plugin, NATIVE);
        assert!(!String::from_utf8_lossy(&out).contains("s3cret"));
    }

    #[test]
    fn auth_switches_and_extra_rounds_are_answered_and_clear_text_refused_without_tls() {
        let (_, mut login) = hello(
            &client_hello(None),
            "app",
            SecretString::from("s3cret"),
            Some("caching_sha2_password"),
            vec![7; 20],
        )
        .unwrap();
        assert_eq!(login.plugin, "caching_sha2_password");
        // Fast authentication: nothing to send, the OK follows.
        assert_eq!(login.step(&[0x01, 0x03]).unwrap(), Step::Wait);
        assert_eq!(login.step(&[0x00, 0, 0, 2, 0]).unwrap(), Step::Done);
        // Full authentication without TLS asks for the server's key.
        let (_, mut login) = hello(
            &client_hello(None),
            "app",
            SecretString::from("s3cret"),
            Some("caching_sha2_password"),
            vec![7; 20],
        )
        .unwrap();
        assert_eq!(login.step(&[0x01, 0x04]).unwrap(), Step::Send(vec![0x02]));
        // Over TLS it sends the password, as the protocol says.
        let (_, mut login) = hello(
            &client_hello(None),
            "app",
            SecretString::from("s3cret"),
            Some("caching_sha2_password"),
            vec![7; 20],
        )
        .unwrap();
        login.tls = true;
        assert_eq!(
            login.step(&[0x01, 0x04]).unwrap(),
            Step::Send(b"s3cret\0".to_vec())
        );
        // A switch to client_ed25519 (MariaDB): a 64-byte signature.
        let mut switch = vec![0xFE];
        switch.extend(b"client_ed25519\0");
        switch.extend([9u8; 32]);
        let Step::Send(sig) = login.step(&switch).unwrap() else {
            panic!("no answer")
        };
        assert_eq!(sig.len(), 64);
        // Clear text outside TLS, and plugins not spoken: refused.
        login.tls = false;
        let mut clear = vec![0xFE];
        clear.extend(b"mysql_clear_password\0");
        assert!(login.step(&clear).is_err());
        let mut other = vec![0xFE];
        other.extend(b"auth_gssapi_client\0x");
        let e = login.step(&other).unwrap_err();
        assert!(e.contains("auth_gssapi_client") && !e.contains("s3cret"));
        assert_eq!(login.step(&[0xFF, 0x15, 0x04]).unwrap(), Step::Refused);
    }
}
