//! The protocol seam: one registration point for every protocol handler.
//!
//! The accept path ([`crate::proxy`]) attributes a connection, asks the policy
//! about its destination, then looks the resource's `protocol` up in
//! [`Handlers`] and hands the socket over. It imports no handler; a handler
//! imports [`crate::connection`] (what it is given) and [`crate::gate`] (who
//! decides), never the accept path. A handler:
//!
//! - owns its I/O loop ([`Handler::serve`] takes the accepted `TcpStream`
//!   and its [`Attributed`] context, with the daemon's [`Services`]);
//! - owns its state (the Postgres cancel-key registry lives in its handler);
//! - owns its config section `[proxy.<section>]`, parsed by the handler
//!   (`config.rs` keeps the section as opaque TOML);
//! - renders a connection-level refusal in its own protocol
//!   ([`Handler::refuse`]), so a denied client sees the rule, not a reset.
//!
//! **Adding a handler** = a folder `protocol/<name>/` whose `mod.rs` exports a
//! [`Registration`], plus one line in [`REGISTRY`]. A `protocol` with no
//! registration is refused at accept ("no handler yet"), never relayed blind:
//! fails closed. Plain `tcp` resources are not a handler: the accept path
//! relays them itself.
//!
//! Below each handler's `proxy` (or equivalent I/O) submodule, its layers are
//! sans-IO: bytes go in, messages (or "need more bytes") come out.

pub mod http;
pub mod mysql;
pub mod postgres;
pub mod ssh;

use std::{collections::HashMap, error::Error, fmt, future::Future, pin::Pin, sync::Arc};

use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use tokio::net::TcpStream;

pub use crate::connection::{Attributed, Services};
use crate::policy::Protocol;

/// Why a handler's connection ended badly (logged and put in the
/// `connection.close` record by the accept path).
pub type HandlerError = Box<dyn Error + Send + Sync>;

/// A built handler, shared by every connection of its protocol.
pub type SharedHandler = Arc<dyn Handler>;

/// A boxed future, so handlers can sit behind `dyn Handler`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A protocol handler: the two phases the accept path cannot do itself.
pub trait Handler: Send + Sync {
    /// Serves one connection whose connect decision was allow, until either
    /// side closes. The handler connects upstream itself (from the daemon's
    /// untagged context), decides each command through [`crate::gate`] and
    /// records what its protocol adds. Dropping the future closes both sides.
    fn serve(
        &self,
        client: TcpStream,
        conn: Attributed,
        services: Services,
    ) -> BoxFuture<'_, Result<(), HandlerError>>;

    /// Answers a connection whose connect decision was deny with the
    /// protocol's own error naming `rule` and `reason`. Never contacts the
    /// upstream. Best effort: the refusal is already recorded.
    fn refuse<'a>(&'a self, client: TcpStream, rule: &'a str, reason: &'a str)
    -> BoxFuture<'a, ()>;
}

/// How a handler plugs in: the `protocol` that selects it, its config
/// section, and how to build it.
pub struct Registration {
    pub protocol: Protocol,
    /// Its section, `[proxy.<section>]`.
    pub section: &'static str,
    /// Parses and checks the section in the whole config text (called when
    /// the config is parsed): errors carry line and column.
    pub check: fn(text: &str) -> Result<(), String>,
    /// Builds the handler from its section (`None`: absent, defaults apply).
    pub build: fn(section: Option<&toml::Value>) -> Result<SharedHandler, String>,
}

/// Every handler. Adding one: a line here.
pub const REGISTRY: &[Registration] = &[
    postgres::REGISTRATION,
    mysql::REGISTRATION,
    http::REGISTRATION,
    http::REGISTRATION_TLS,
    ssh::REGISTRATION,
];

/// The daemon's handlers, one instance each, by protocol.
#[derive(Clone, Default)]
pub struct Handlers(HashMap<Protocol, Arc<dyn Handler>>);

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Handlers {
    /// Builds every registered handler from its `[proxy.<section>]`
    /// (`sections`: the opaque sections `config.rs` kept).
    pub fn from_sections(sections: &toml::Table) -> Result<Self, String> {
        let mut map = HashMap::new();
        for r in REGISTRY {
            let h = (r.build)(sections.get(r.section))
                .map_err(|e| format!("[proxy.{}]: {e}", r.section))?;
            map.insert(r.protocol, h);
        }
        Ok(Self(map))
    }

    /// The handler for `protocol`; `None`: no handler yet (refuse).
    pub fn get(&self, protocol: Protocol) -> Option<&dyn Handler> {
        self.0.get(&protocol).map(AsRef::as_ref)
    }
}

/// Checks every `[proxy.<name>]` section in a config text: each must belong
/// to a registered handler and parse as that handler's config. `keys`: the
/// section names the config parser did not know itself.
pub fn check_sections<'k>(
    text: &str,
    keys: impl IntoIterator<Item = &'k String>,
) -> Result<(), String> {
    for key in keys {
        if !REGISTRY.iter().any(|r| r.section == key) {
            section::<Unknown>(text, key).map_err(|e| e.to_string().trim_end().to_owned())?;
        }
    }
    for r in REGISTRY {
        (r.check)(text)?;
    }
    Ok(())
}

/// `[proxy.<name>]` of a whole config text as `T`, with toml's line and
/// column in any error (deserialized in place, not from a detached value).
pub fn section<T: DeserializeOwned>(text: &str, name: &str) -> Result<Option<T>, toml::de::Error> {
    let de = toml::Deserializer::new(text);
    Root::<T> {
        name,
        inner: std::marker::PhantomData,
    }
    .deserialize(de)
}

/// A section no handler registered: always an error (at its own position).
struct Unknown;

impl<'de> serde::Deserialize<'de> for Unknown {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_ignored_any(IgnoredAny)?;
        let names: Vec<&str> = REGISTRY.iter().map(|r| r.section).collect();
        Err(de::Error::custom(format!(
            "unknown key in [proxy]: neither a [proxy] setting nor a protocol handler's section ({})",
            names.join(", ")
        )))
    }
}

/// Seeds that walk `proxy.<name>` and ignore everything else.
struct Root<'n, T> {
    name: &'n str,
    inner: std::marker::PhantomData<T>,
}

struct Proxy<'n, T> {
    name: &'n str,
    inner: std::marker::PhantomData<T>,
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Root<'_, T> {
    type Value = Option<T>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for Root<'_, T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a config table")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "proxy" {
                found = map.next_value_seed(Proxy::<T> {
                    name: self.name,
                    inner: self.inner,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Proxy<'_, T> {
    type Value = Option<T>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for Proxy<'_, T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the [proxy] table")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == self.name {
                found = Some(map.next_value::<T>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_proxy_section_is_refused_with_its_line() {
        let text = "[proxy]\nport = 1\n\n[proxy.mongo]\nx = 1\n";
        let keys = ["mongo".to_owned()];
        let e = check_sections(text, &keys).unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        assert!(e.contains("unknown key in [proxy]"), "{e}");
        assert!(e.contains("postgres"), "{e}");
    }

    #[test]
    fn every_registered_protocol_has_one_handler_and_tcp_none() {
        let h = Handlers::from_sections(&toml::Table::new()).unwrap();
        for p in [
            Protocol::Postgres,
            Protocol::Mysql,
            Protocol::Http,
            Protocol::Https,
            Protocol::Ssh,
        ] {
            assert!(h.get(p).is_some(), "no handler for {}", p.as_str());
        }
        assert!(
            h.get(Protocol::Tcp).is_none(),
            "tcp is relayed by the accept path"
        );
        // One registration per protocol (http and https share a section).
        let mut seen = std::collections::HashSet::new();
        for r in REGISTRY {
            assert!(
                seen.insert(r.protocol),
                "{} registered twice",
                r.protocol.as_str()
            );
        }
    }
}
