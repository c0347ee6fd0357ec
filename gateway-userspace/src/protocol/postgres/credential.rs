//! Logging in to the server with the resource's own credential (the
//! resource's `credential`), so the agent never holds the database password.
//!
//! The startup packet goes upstream with `user` replaced by the credential's
//! user; the proxy answers the server's authentication request itself
//! (SCRAM-SHA-256 without channel binding, MD5 or cleartext, with
//! `postgres-protocol`'s implementations) and the client sees only the
//! server's `AuthenticationOk` and what follows: whatever password the agent
//! has is never asked for. Fails closed: a secret that cannot be read, a
//! mechanism the proxy does not speak (Kerberos, GSS, SSPI, SCRAM with
//! channel binding only) or a server that rejects the login ends the
//! connection before anything of the client's reaches the server. The
//! secret lives in a [`SecretString`] and goes nowhere but into the
//! exchange: never into an error, a log line or a record.

use bytes::{BufMut as _, BytesMut};
use postgres_protocol::authentication::{
    md5_hash,
    sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256},
};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{
    codec::{self, Authentication, BackendMessage, ErrorFields, Limits, StartupPacket},
    error::PgProxyError,
    proxy::PgContext,
};
use crate::policy::Credential;

fn fatal(sqlstate: &str, message: &str) -> bytes::Bytes {
    BackendMessage::ErrorResponse(ErrorFields::new("FATAL", sqlstate, message)).to_bytes()
}

/// The credential's secret; a file that cannot be read refuses the client
/// (`28000`; the reason goes to the daemon's log, not to the agent).
pub(super) async fn read<C: AsyncWrite + Unpin>(
    client: &mut C,
    ctx: &PgContext,
    c: &Credential,
) -> Result<SecretString, PgProxyError> {
    match c.read_secret() {
        Ok(secret) => Ok(secret),
        Err(e) => {
            tracing::error!(conn = ctx.conn.id, file = %c.password_file.display(), error = %e, "cannot read the resource's credential");
            let _ = client
                .write_all(&fatal(
                    "28000",
                    "agentgate: the resource's credential cannot be read; see the daemon's log",
                ))
                .await;
            Err(PgProxyError::Client {
                what: format!(
                    "the resource's credential {}: {e}",
                    c.password_file.display()
                ),
            })
        }
    }
}

/// Sends the client's startup packet upstream as the credential's user and
/// logs in ([`login`]). Returns the startup parameters as sent and what the
/// server sent from its `AuthenticationOk` on. A refusal reaches the client
/// as the server's error (or `28000` from the proxy).
pub(super) async fn start<C, S>(
    client: &mut C,
    upstream: &mut S,
    ctx: &PgContext,
    cred: &Credential,
    secret: SecretString,
    startup: StartupPacket,
) -> Result<(Vec<(String, String)>, BytesMut), PgProxyError>
where
    C: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let StartupPacket::Startup { version, params } = startup else {
        return Err(PgProxyError::Client {
            what: "not a startup packet".into(),
        });
    };
    let params = with_user(&params, &cred.user);
    let mut out = BytesMut::new();
    StartupPacket::Startup {
        version,
        params: params.clone(),
    }
    .encode(&mut out);
    upstream
        .write_all(&out)
        .await
        .map_err(|source| PgProxyError::UpstreamIo { source })?;
    let result = tokio::time::timeout(
        ctx.settings.auth_timeout,
        login(upstream, &cred.user, &secret, &ctx.settings.limits),
    )
    .await
    .unwrap_or(Err(LoginError::Proxy(PgProxyError::Timeout {
        phase: "login with the resource's credential",
    })));
    drop(secret);
    match result {
        Ok(rest) => Ok((params, rest)),
        Err(LoginError::Server(f)) => {
            tracing::warn!(conn = ctx.conn.id, user = %cred.user, "the server refused the resource's credential");
            let _ = client
                .write_all(&BackendMessage::ErrorResponse(f).to_bytes())
                .await;
            Err(PgProxyError::Client {
                what: format!("the server refused the login as {}", cred.user),
            })
        }
        Err(LoginError::Proxy(e)) => {
            let _ = client
                .write_all(&fatal("28000", &format!("agentgate: {e}")))
                .await;
            Err(e)
        }
    }
}

/// How a login with the daemon's credential failed.
pub(super) enum LoginError {
    /// The server said no; its `ErrorResponse` goes to the client as is.
    Server(ErrorFields),
    /// Anything else; the client gets `FATAL 28000` with this text.
    Proxy(PgProxyError),
}

impl From<PgProxyError> for LoginError {
    fn from(e: PgProxyError) -> Self {
        LoginError::Proxy(e)
    }
}

/// Answers the server's authentication requests as `user` with `secret`,
/// until `AuthenticationOk`. Returns what the server sent from its
/// `AuthenticationOk` on (re-encoded at the front), for the session to
/// handle as if it had just arrived.
pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    up: &mut S,
    user: &str,
    secret: &SecretString,
    limits: &Limits,
) -> Result<BytesMut, LoginError> {
    let mut uin = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    loop {
        let m = loop {
            match codec::decode_backend(&mut uin, limits) {
                Ok(Some(m)) => break m,
                Ok(None) => {
                    uin.reserve(4096);
                    let n = up
                        .read_buf(&mut uin)
                        .await
                        .map_err(|source| PgProxyError::UpstreamIo { source })?;
                    if n == 0 {
                        return Err(proxy("the server closed the connection during login"));
                    }
                }
                Err(source) => return Err(PgProxyError::Protocol { source }.into()),
            }
        };
        let mut out = BytesMut::new();
        match m {
            BackendMessage::Authentication(Authentication::Ok) => {
                let mut rest = BytesMut::new();
                BackendMessage::Authentication(Authentication::Ok).encode(&mut rest);
                rest.extend_from_slice(&uin);
                return Ok(rest);
            }
            BackendMessage::Authentication(Authentication::CleartextPassword) => {
                let mut body = secret.expose_secret().as_bytes().to_vec();
                body.push(0);
                auth_response(&mut out, &body);
            }
            BackendMessage::Authentication(Authentication::Md5Password { salt }) => {
                let hash = md5_hash(user.as_bytes(), secret.expose_secret().as_bytes(), salt);
                let mut body = hash.into_bytes();
                body.push(0);
                auth_response(&mut out, &body);
            }
            BackendMessage::Authentication(Authentication::Sasl { mechanisms }) => {
                if !mechanisms
                    .iter()
                    .any(|m| m.as_ref() == SCRAM_SHA_256.as_bytes())
                {
                    return Err(proxy(
                        "the server offers no SASL mechanism the proxy speaks (SCRAM-SHA-256)",
                    ));
                }
                let s = ScramSha256::new(
                    secret.expose_secret().as_bytes(),
                    ChannelBinding::unsupported(),
                );
                let mut body = BytesMut::new();
                body.put_slice(SCRAM_SHA_256.as_bytes());
                body.put_u8(0);
                let first = s.message();
                body.put_i32(i32::try_from(first.len()).unwrap_or(i32::MAX));
                body.put_slice(first);
                auth_response(&mut out, &body);
                scram = Some(s);
            }
            BackendMessage::Authentication(Authentication::SaslContinue(data)) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| proxy("SASL continue before SASL start"))?;
                s.update(&data).map_err(|e| proxy(&format!("SCRAM: {e}")))?;
                let msg = s.message().to_vec();
                auth_response(&mut out, &msg);
            }
            BackendMessage::Authentication(Authentication::SaslFinal(data)) => {
                // Verifies the server's signature: a server that does not
                // know the password cannot complete the exchange.
                scram
                    .take()
                    .ok_or_else(|| proxy("SASL final before SASL start"))?
                    .finish(&data)
                    .map_err(|e| proxy(&format!("SCRAM: the server's proof: {e}")))?;
            }
            BackendMessage::ErrorResponse(f) => return Err(LoginError::Server(f)),
            BackendMessage::NoticeResponse(_) => {}
            BackendMessage::Authentication(Authentication::Other { code, .. }) => {
                return Err(proxy(&format!(
                    "the server asks for an authentication method the proxy does not speak (code {code})"
                )));
            }
            _ => return Err(proxy("unexpected message from the server during login")),
        }
        if !out.is_empty() {
            up.write_all(&out)
                .await
                .map_err(|source| PgProxyError::UpstreamIo { source })?;
        }
    }
}

fn proxy(what: &str) -> LoginError {
    LoginError::Proxy(PgProxyError::Client {
        what: format!("login with the resource's credential: {what}"),
    })
}

/// A `PasswordMessage` / `SASLInitialResponse` / `SASLResponse` (`p`).
fn auth_response(dst: &mut BytesMut, body: &[u8]) {
    dst.put_u8(b'p');
    dst.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    dst.put_slice(body);
}

/// The startup parameters with `user` replaced (added if absent). A client
/// that named no database gets its own user name as the database, as
/// Postgres would have done: the credential's user does not change it.
pub(super) fn with_user(params: &[(String, String)], user: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "user")
        .cloned()
        .collect();
    if !params.iter().any(|(k, _)| k == "database")
        && let Some((_, agent_user)) = params.iter().find(|(k, _)| k == "user")
    {
        out.push(("database".into(), agent_user.clone()));
    }
    out.insert(0, ("user".into(), user.to_owned()));
    out
}

#[cfg(test)]
mod tests {
    use bytes::{Buf as _, Bytes};

    use super::*;

    /// Cleartext and MD5 against a scripted server; SCRAM-SHA-256 is run
    /// against the real `PostgreSQL` in the end-to-end tests.
    #[tokio::test]
    async fn scram_md5_and_cleartext_answer_as_the_server_asks() {
        let limits = Limits::default();
        let secret = SecretString::from("s3cret-value".to_owned());
        // Cleartext: the password message carries the secret.
        let (mut proxy_side, mut server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            let mut b = BytesMut::new();
            BackendMessage::Authentication(Authentication::CleartextPassword).encode(&mut b);
            server.write_all(&b).await.unwrap();
            let mut got = vec![0u8; 5 + 13];
            server.read_exact(&mut got).await.unwrap();
            let mut b = BytesMut::new();
            BackendMessage::Authentication(Authentication::Ok).encode(&mut b);
            b.extend_from_slice(b"Z\0\0\0\x05I");
            server.write_all(&b).await.unwrap();
            got
        });
        let rest = login(&mut proxy_side, "app", &secret, &limits)
            .await
            .map_err(|_| "login failed")
            .unwrap();
        let got = srv.await.unwrap();
        assert_eq!(&got[..1], b"p");
        assert_eq!(&got[5..], b"s3cret-value\0");
        assert!(
            rest.starts_with(b"R\0\0\0\x08\0\0\0\0"),
            "AuthenticationOk first"
        );
        assert!(rest.ends_with(b"Z\0\0\0\x05I"), "then what followed it");

        // MD5: md5(md5(password || user) || salt), as Postgres computes it.
        let (mut proxy_side, mut server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            let mut b = BytesMut::new();
            BackendMessage::Authentication(Authentication::Md5Password { salt: [1, 2, 3, 4] })
                .encode(&mut b);
            server.write_all(&b).await.unwrap();
            let mut got = vec![0u8; 5 + 36];
            server.read_exact(&mut got).await.unwrap();
            let mut f = BytesMut::new();
            BackendMessage::ErrorResponse(ErrorFields::new("FATAL", "28P01", "no")).encode(&mut f);
            server.write_all(&f).await.unwrap();
            got
        });
        let r = login(&mut proxy_side, "app", &secret, &limits).await;
        assert!(
            matches!(r, Err(LoginError::Server(_))),
            "the server's refusal is passed on"
        );
        let got = srv.await.unwrap();
        assert_eq!(
            std::str::from_utf8(&got[5..40]).unwrap(),
            md5_hash(b"app", b"s3cret-value", [1, 2, 3, 4])
        );
        assert!(!String::from_utf8_lossy(&got).contains("s3cret"));

        // A method the proxy does not speak ends the login.
        let (mut proxy_side, mut server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut b = BytesMut::new();
            BackendMessage::Authentication(Authentication::Other {
                code: 7,
                data: Bytes::new(),
            })
            .encode(&mut b);
            server.write_all(&b).await.unwrap();
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink).await;
        });
        let r = login(&mut proxy_side, "app", &secret, &limits).await;
        let Err(LoginError::Proxy(e)) = r else {
            panic!("GSS must fail");
        };
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn the_user_is_replaced_and_the_database_kept() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
        };
        assert_eq!(
            with_user(&p(&[("user", "agent"), ("database", "bank")]), "app"),
            p(&[("user", "app"), ("database", "bank")])
        );
        assert_eq!(
            with_user(&p(&[("user", "agent")]), "app"),
            p(&[("user", "app"), ("database", "agent")])
        );
        assert_eq!(with_user(&[], "app"), p(&[("user", "app")]));
    }

    #[test]
    fn length_prefix_of_an_auth_response_counts_itself() {
        let mut b = BytesMut::new();
        auth_response(&mut b, b"abc");
        let mut r = b.freeze();
        assert_eq!(r.get_u8(), b'p');
        assert_eq!(r.get_i32(), 7);
    }
}
