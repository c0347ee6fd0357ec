//! The validated policy in force: resources and how addresses map to them,
//! rules, masking and cgroup bindings. Immutable once loaded except for the
//! DNS table, which a refresher swaps atomically.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;

use super::model::{
    AddressPattern, CgroupBinding, Resource, Rule, Subject, UnixAllow, UnknownDestination,
};
use crate::mask::{MaskKey, MaskPolicy};

/// How long one DNS lookup may take before it counts as failed.
pub const DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolved addresses of the resources named by DNS.
#[derive(Debug, Default, Clone)]
pub(crate) struct DnsTable {
    /// (host, port) -> addresses it resolved to at the last successful lookup.
    pub by_name: HashMap<(String, u16), Vec<IpAddr>>,
    /// Resolved socket address -> resource index.
    pub by_addr: HashMap<SocketAddr, usize>,
}

/// A fresh DNS answer for `(host, port)`, or `None` when the lookup failed.
pub type DnsAnswer = ((String, u16), Option<Vec<IpAddr>>);

/// A loaded, validated set of policy files.
#[derive(Debug)]
pub struct PolicySet {
    pub(crate) resources: Vec<Resource>,
    pub(crate) by_name: HashMap<String, usize>,
    pub(crate) exact: HashMap<SocketAddr, usize>,
    /// (net, prefix, port, resource index), most specific first.
    pub(crate) cidrs: Vec<(IpAddr, u8, Option<u16>, usize)>,
    pub(crate) dns: ArcSwap<DnsTable>,
    pub(crate) rules: Vec<Rule>,
    /// Per resource index: indices of the rules that name it.
    pub(crate) rules_for: Vec<Vec<usize>>,
    pub(crate) masking: Vec<MaskPolicy>,
    pub(crate) bindings: Vec<CgroupBinding>,
    pub(crate) allow_unix: Vec<UnixAllow>,
    pub(crate) unknown_destination: UnknownDestination,
    pub(crate) files: Vec<PathBuf>,
    /// Each file's name and the exact text loaded (what the digest covers).
    pub(crate) texts: Vec<(String, String)>,
    pub(crate) digest: String,
}

/// Unwrap IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what connect6 sees for a v4 peer).
fn canonical(dst: SocketAddr) -> SocketAddr {
    match dst.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), dst.port()),
            None => dst,
        },
        IpAddr::V4(_) => dst,
    }
}

impl PolicySet {
    /// The resource an agent's original destination belongs to: an exact
    /// address first, then an address a DNS name resolved to, then the most
    /// specific CIDR (longest prefix; a named port beats `*`).
    pub fn resource_for(&self, dst: SocketAddr) -> Option<&Resource> {
        let dst = canonical(dst);
        if let Some(&i) = self.exact.get(&dst) {
            return Some(&self.resources[i]);
        }
        if let Some(&i) = self.dns.load().by_addr.get(&dst) {
            return Some(&self.resources[i]);
        }
        self.cidrs
            .iter()
            .find(|(net, prefix, port, _)| {
                port.is_none_or(|p| p == dst.port())
                    && AddressPattern::cidr_contains(*net, *prefix, dst.ip())
            })
            .map(|&(_, _, _, i)| &self.resources[i])
    }

    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.by_name.get(name).map(|&i| &self.resources[i])
    }

    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The SSH login for `subject` on `resource`: the `ssh_user` of the
    /// most specific rule (by subject, then resource) that applies to them,
    /// does not deny, and names one; the first such rule in the policy on a
    /// tie. With the rule's name. The login is chosen once per connection,
    /// before any command: conditions are not consulted.
    pub fn ssh_user_for(&self, subject: &Subject, resource: &Resource) -> Option<(&str, &str)> {
        let ri = self.index_of(resource)?;
        let mut best: Option<((u8, u8), &Rule)> = None;
        for &i in &self.rules_for[ri] {
            let rule = &self.rules[i];
            if rule.ssh_user.is_none() || matches!(rule.action, super::RuleAction::Deny) {
                continue;
            }
            let Some(score) = super::decide::rule_scores(rule, subject, &resource.name) else {
                continue;
            };
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, rule));
            }
        }
        best.and_then(|(_, r)| Some((r.name.as_str(), r.ssh_user.as_deref()?)))
    }

    /// The masking that applies to a resource's responses.
    pub fn masking_for(&self, resource: &Resource) -> &MaskPolicy {
        static NONE: std::sync::OnceLock<MaskPolicy> = std::sync::OnceLock::new();
        match self.index_of(resource) {
            Some(i) => &self.masking[i],
            None => NONE.get_or_init(MaskPolicy::none),
        }
    }

    /// Set the key for keyed-hash masking (from the daemon configuration).
    #[must_use]
    pub fn with_mask_key(mut self, key: Option<&Arc<MaskKey>>) -> Self {
        self.masking = self
            .masking
            .into_iter()
            .map(|m| m.with_key(key.cloned()))
            .collect();
        self
    }

    pub fn bindings(&self) -> &[CgroupBinding] {
        &self.bindings
    }

    /// The Unix socket addresses tagged processes may reach.
    pub fn allow_unix(&self) -> &[UnixAllow] {
        &self.allow_unix
    }

    /// The binding for a cgroup path: a literal pattern beats a glob, then the longest pattern.
    pub fn binding_for(&self, cgroup_path: &str) -> Option<&CgroupBinding> {
        self.bindings
            .iter()
            .filter(|b| b.cgroup.matches(cgroup_path))
            .max_by_key(|b| (b.cgroup.is_literal(), b.cgroup.as_str().len()))
    }

    pub fn unknown_destination(&self) -> UnknownDestination {
        self.unknown_destination
    }

    /// The files this set was loaded from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Each file's name and the text that was loaded, in load order: what
    /// [`PolicySet::digest`] covers and what the archive keeps.
    pub fn texts(&self) -> &[(String, String)] {
        &self.texts
    }

    /// BLAKE3 (hex) over the files' names and contents, in load order.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// DNS names (with ports) the resources use, for the refresher.
    pub fn dns_names(&self) -> Vec<(String, u16)> {
        let mut out = Vec::new();
        for r in &self.resources {
            for a in &r.addresses {
                if let AddressPattern::Dns { host, port } = a
                    && !out.iter().any(|(h, p)| h == host && p == port)
                {
                    out.push((host.clone(), *port));
                }
            }
        }
        out
    }

    /// Install resolved addresses. `results` holds a fresh answer per name, or
    /// `None` when the lookup failed: then the previous answer is kept (biased
    /// towards availability of already-known upstreams; a name that never
    /// resolved matches nothing, so its traffic is an unknown destination).
    pub fn install_dns(&self, results: &[DnsAnswer]) {
        let old = self.dns.load();
        let mut table = DnsTable::default();
        for (key, fresh) in results {
            let ips = match fresh {
                Some(ips) => ips.clone(),
                None => old.by_name.get(key).cloned().unwrap_or_default(),
            };
            table.by_name.insert(key.clone(), ips);
        }
        for (i, r) in self.resources.iter().enumerate() {
            for a in &r.addresses {
                if let AddressPattern::Dns { host, port } = a
                    && let Some(ips) = table.by_name.get(&(host.clone(), *port))
                {
                    for ip in ips {
                        let sa = canonical(SocketAddr::new(*ip, *port));
                        if let Some(&other) = table.by_addr.get(&sa)
                            && other != i
                        {
                            tracing::warn!(
                                address = %sa,
                                first = %self.resources[other].name,
                                second = %r.name,
                                "two resources' DNS names resolve to the same address; the first keeps it"
                            );
                            continue;
                        }
                        table.by_addr.insert(sa, i);
                    }
                }
            }
        }
        self.dns.store(Arc::new(table));
    }

    /// Carry resolved DNS answers over from the set this one replaces, so a
    /// reload does not make DNS-named upstreams unknown until the next refresh.
    pub fn inherit_dns(&self, previous: &PolicySet) {
        let prev = previous.dns.load();
        let results: Vec<_> = self
            .dns_names()
            .into_iter()
            .map(|k| {
                let ips = prev.by_name.get(&k).cloned();
                (k, ips)
            })
            .collect();
        self.install_dns(&results);
    }

    /// Resolve every DNS name now (each lookup bounded by [`DNS_LOOKUP_TIMEOUT`]) and install the answers.
    pub async fn refresh_dns(&self) {
        let mut results = Vec::new();
        for (host, port) in self.dns_names() {
            let lookup = tokio::time::timeout(
                DNS_LOOKUP_TIMEOUT,
                tokio::net::lookup_host(format!("{host}:{port}")),
            )
            .await;
            let ips = match lookup {
                Ok(Ok(addrs)) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    ips.sort();
                    ips.dedup();
                    Some(ips)
                }
                Ok(Err(e)) => {
                    tracing::warn!(%host, port, error = %e, "DNS lookup for a policy resource failed; keeping the previous answer");
                    None
                }
                Err(_) => {
                    tracing::warn!(%host, port, "DNS lookup for a policy resource timed out; keeping the previous answer");
                    None
                }
            };
            results.push(((host, port), ips));
        }
        self.install_dns(&results);
    }

    pub(crate) fn index_of(&self, resource: &Resource) -> Option<usize> {
        match self.resources.get(resource.index) {
            Some(r) if r.name == resource.name => Some(resource.index),
            _ => self.by_name.get(&resource.name).copied(),
        }
    }
}
