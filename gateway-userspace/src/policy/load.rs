//! Read a directory of policy files, validate, build a [`PolicySet`].
//!
//! Fails closed and loudly: any error in any file rejects the whole set, and
//! every error found is reported as `file:line:column: message` (all of them,
//! not just the first, so one `policy check` run shows everything to fix).

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use toml::Spanned;

use super::{
    glob::Glob,
    model::{
        ActionKind, AddressPattern, ApprovalSpec, ApprovalSpecFile, CgroupBinding, Conditions,
        GrantScope, MatchSpec, PolicyFileSpec, Protocol, Resource, Rule, RuleAction, TlsMode,
        UnixAllow, UnknownDestination, UpstreamTls,
    },
    set::{DnsTable, PolicySet},
};
use crate::{
    mask::{ColumnRule, Detector, DetectorSet, MaskPolicy, Strategy},
    sql::StatementClass,
};

/// Most policy files one directory may hold.
pub const MAX_POLICY_FILES: usize = 1024;
/// Largest policy file read.
pub const MAX_POLICY_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Longest approval timeout a policy may set.
pub const MAX_APPROVAL_TIMEOUT: Duration = Duration::from_hours(7 * 24);
/// Longest grant window a policy may set.
pub const MAX_GRANT_WINDOW: Duration = Duration::from_hours(30 * 24);
/// Largest approval quorum.
pub const MAX_QUORUM: i64 = 16;

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no position (the file could not be read).
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found while loading a policy directory. `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A file's text and path, to turn byte offsets into line:column.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn at(&self, span: &Range<usize>) -> String {
        let (l, c) = self.position(span.start);
        format!("{}:{l}:{c}", self.path.display())
    }
}

struct Errors<'a> {
    list: Vec<PolicyError>,
    src: Option<&'a Source>,
}

impl<'a> Errors<'a> {
    fn set_source(&mut self, src: &'a Source) {
        self.src = Some(src);
    }

    fn at(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let src = self.src.expect("source set");
        let (line, column) = src.position(span.start);
        self.list.push(PolicyError {
            file: src.path.clone(),
            line,
            column,
            message: message.into(),
        });
    }

    fn file(&mut self, path: &Path, message: impl Into<String>) {
        self.list.push(PolicyError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: message.into(),
        });
    }

    fn here(&self, span: &Range<usize>) -> String {
        self.src.expect("source set").at(span)
    }
}

/// Load every `*.toml` file directly in `dir` (sorted by name) as one policy.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Errors {
        list: Vec::new(),
        src: None,
    };
    let mut paths = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                    paths.push(path);
                }
            }
        }
        Err(e) => {
            errors.file(dir, format!("cannot read policy directory: {e}"));
            return Err(PolicyErrors(errors.list));
        }
    }
    paths.sort();
    if paths.is_empty() {
        errors.file(dir, "no policy files (*.toml) in this directory");
        return Err(PolicyErrors(errors.list));
    }
    if paths.len() > MAX_POLICY_FILES {
        errors.file(
            dir,
            format!(
                "{} policy files, over the limit of {MAX_POLICY_FILES}",
                paths.len()
            ),
        );
        return Err(PolicyErrors(errors.list));
    }
    let mut sources = Vec::new();
    for path in paths {
        match read_capped(&path) {
            Ok(text) => sources.push(Source { path, text }),
            Err(msg) => errors.file(&path, msg),
        }
    }
    let errors_list = std::mem::take(&mut errors.list);
    match load_sources(&sources) {
        Ok(set) if errors_list.is_empty() => Ok(set),
        Ok(_) => Err(PolicyErrors(errors_list)),
        Err(PolicyErrors(more)) => {
            let mut all = errors_list;
            all.extend(more);
            Err(PolicyErrors(all))
        }
    }
}

/// Load policy text given in memory as `(file name, text)` pairs, in order (for tests and tools).
pub fn load_str(files: &[(&str, &str)]) -> Result<PolicySet, PolicyErrors> {
    let sources: Vec<Source> = files
        .iter()
        .map(|(name, text)| Source {
            path: PathBuf::from(name),
            text: (*text).to_owned(),
        })
        .collect();
    load_sources(&sources)
}

fn read_capped(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_POLICY_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, over the limit of {MAX_POLICY_FILE_BYTES}",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))
}

struct Defined {
    at: String,
}

#[allow(clippy::too_many_lines)]
fn load_sources(sources: &[Source]) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Errors {
        list: Vec::new(),
        src: None,
    };
    let mut parsed: Vec<(&Source, PolicyFileSpec)> = Vec::new();
    for src in sources {
        errors.set_source(src);
        match toml::from_str::<PolicyFileSpec>(&src.text) {
            Ok(spec) => parsed.push((src, spec)),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                errors.at(&span, e.message().trim_end().replace('\n', "; "));
            }
        }
    }

    // ---- defaults ----
    let mut unknown_destination = UnknownDestination::Deny;
    let mut unknown_destination_at: Option<Defined> = None;
    for (src, spec) in &parsed {
        errors.set_source(src);
        if let Some(defaults) = &spec.defaults
            && let Some(ud) = &defaults.unknown_destination
        {
            if let Some(first) = &unknown_destination_at {
                errors.at(
                    &ud.span(),
                    format!(
                        "`defaults.unknown_destination` is set twice (first at {})",
                        first.at
                    ),
                );
            } else {
                unknown_destination = *ud.get_ref();
                unknown_destination_at = Some(Defined {
                    at: errors.here(&ud.span()),
                });
            }
        }
    }

    // ---- resources ----
    let mut resources: Vec<Resource> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut name_at: HashMap<String, String> = HashMap::new();
    let mut exact: HashMap<SocketAddr, usize> = HashMap::new();
    let mut exact_at: HashMap<SocketAddr, String> = HashMap::new();
    let mut cidrs = Vec::new();
    for (src, spec) in &parsed {
        errors.set_source(src);
        for res in &spec.resources {
            let r = res.get_ref();
            let name = r.name.get_ref().clone();
            check_name(&mut errors, &r.name, "resource");
            if let Some(first) = name_at.get(&name) {
                errors.at(
                    &r.name.span(),
                    format!("duplicate resource name `{name}` (first defined at {first})"),
                );
                continue;
            }
            name_at.insert(name.clone(), errors.here(&r.name.span()));
            let index = resources.len();
            let protocol = *r.protocol.get_ref();
            let mut addresses = Vec::new();
            if r.addresses.get_ref().is_empty() {
                errors.at(
                    &r.addresses.span(),
                    format!("resource `{name}` has no addresses"),
                );
            }
            for a in r.addresses.get_ref() {
                match parse_address(a.get_ref()) {
                    Ok(p) => {
                        match &p {
                            AddressPattern::Exact(sa) => {
                                if let Some(first) = exact_at.get(sa) {
                                    errors.at(
                                        &a.span(),
                                        format!("address {sa} is already used (at {first})"),
                                    );
                                } else {
                                    exact.insert(*sa, index);
                                    exact_at.insert(*sa, errors.here(&a.span()));
                                }
                            }
                            AddressPattern::Cidr { net, prefix, port } => {
                                cidrs.push((*net, *prefix, *port, index));
                            }
                            AddressPattern::Dns { .. } => {}
                        }
                        addresses.push(p);
                    }
                    Err(msg) => errors.at(&a.span(), msg),
                }
            }
            if !protocol.is_http() {
                if let Some(i) = &r.intercept {
                    errors.at(&i.span(), "`intercept` applies to `https` resources only");
                }
                if let Some(p) = &r.profile {
                    errors.at(
                        &p.span(),
                        "`profile` applies to `http` and `https` resources only",
                    );
                }
                if let Some(p) = &r.prompt_dlp {
                    errors.at(
                        &p.span(),
                        "`prompt_dlp` applies to `http` and `https` resources only",
                    );
                }
            } else if let Some(i) = &r.intercept
                && protocol == Protocol::Http
            {
                errors.at(
                    &i.span(),
                    "`intercept` applies to `https` resources only (plain HTTP is always read)",
                );
            }
            let tls = r.tls.as_ref().map(|t| {
                let spec = t.get_ref();
                let mode = spec.mode.unwrap_or_default();
                if mode == TlsMode::Disable
                    && (spec.ca_file.is_some() || spec.server_name.is_some())
                {
                    errors.at(
                        &t.span(),
                        "`ca_file` and `server_name` have no effect with `mode = \"disable\"`",
                    );
                }
                if let Some(sn) = &spec.server_name
                    && sn.get_ref().is_empty()
                {
                    errors.at(&sn.span(), "`server_name` is empty");
                }
                if let Some(ca) = &spec.ca_file
                    && !ca.get_ref().is_absolute()
                {
                    errors.at(&ca.span(), "`ca_file` must be an absolute path");
                }
                UpstreamTls {
                    mode,
                    ca_file: spec.ca_file.as_ref().map(|c| c.get_ref().clone()),
                    server_name: spec.server_name.as_ref().map(|s| s.get_ref().clone()),
                }
            });
            let default = build_action(
                &mut errors,
                r.default_action
                    .as_ref()
                    .map_or(ActionKind::Deny, |a| *a.get_ref()),
                r.default_action
                    .as_ref()
                    .map_or(r.name.span(), Spanned::span),
                r.default_approval.as_ref(),
                "default_action",
                "default_approval",
            );
            let credential = r
                .credential
                .as_ref()
                .and_then(|c| build_credential(&mut errors, c, protocol));
            by_name.insert(name.clone(), index);
            resources.push(Resource {
                name,
                protocol,
                addresses,
                tls,
                credential,
                default: default.unwrap_or(RuleAction::Deny),
                intercept: r.intercept.as_ref().is_none_or(|i| *i.get_ref()),
                profile: r.profile.as_ref().map(|p| *p.get_ref()),
                prompt_dlp: r
                    .prompt_dlp
                    .as_ref()
                    .map(|p| *p.get_ref())
                    .unwrap_or_default(),
                index,
            });
        }
    }
    // Most specific CIDR first: longer prefix, then a named port over `*`.
    cidrs.sort_by_key(|(_, prefix, port, _)| (std::cmp::Reverse(*prefix), port.is_none()));

    // ---- rules ----
    let mut rules: Vec<Rule> = Vec::new();
    let mut rule_at: HashMap<String, String> = HashMap::new();
    for (src, spec) in &parsed {
        errors.set_source(src);
        for rule in &spec.rules {
            if let Some(r) = build_rule(&mut errors, rule, &resources, &mut rule_at) {
                rules.push(r);
            }
        }
    }
    let rules_for: Vec<Vec<usize>> = resources
        .iter()
        .map(|res| {
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.resources.iter().any(|g| g.matches(&res.name)))
                .map(|(i, _)| i)
                .collect()
        })
        .collect();

    // ---- masking ----
    let masking = build_masking(&mut errors, &parsed, &resources);

    // ---- bindings ----
    let mut bindings = Vec::new();
    let mut binding_at: HashMap<String, String> = HashMap::new();
    for (src, spec) in &parsed {
        errors.set_source(src);
        for b in &spec.bindings {
            let b = b.get_ref();
            let cg = b.cgroup.get_ref();
            if !cg.starts_with('/') {
                errors.at(
                    &b.cgroup.span(),
                    "`cgroup` must be an absolute cgroup path (glob), e.g. \"/agents/*\"",
                );
                continue;
            }
            if let Some(first) = binding_at.get(cg) {
                errors.at(
                    &b.cgroup.span(),
                    format!("cgroup `{cg}` is bound twice (first at {first})"),
                );
                continue;
            }
            binding_at.insert(cg.clone(), errors.here(&b.cgroup.span()));
            if b.identity.get_ref().trim().is_empty() {
                errors.at(&b.identity.span(), "`identity` is empty");
            }
            for g in &b.groups {
                if g.get_ref().trim().is_empty() {
                    errors.at(&g.span(), "empty group name");
                }
            }
            bindings.push(CgroupBinding {
                cgroup: Glob::new(cg),
                identity: b.identity.get_ref().clone(),
                groups: b.groups.iter().map(|g| g.get_ref().clone()).collect(),
            });
        }
    }

    // ---- Unix sockets tagged processes may reach ----
    let mut allow_unix: Vec<UnixAllow> = Vec::new();
    for (src, spec) in &parsed {
        errors.set_source(src);
        for a in &spec.allow_unix {
            let path = &a.get_ref().path;
            match unix_allow(path.get_ref()) {
                Ok(u) if !allow_unix.contains(&u) => allow_unix.push(u),
                Ok(_) => {}
                Err(msg) => errors.at(&path.span(), msg),
            }
        }
    }

    if !errors.list.is_empty() {
        return Err(PolicyErrors(errors.list));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"agentgate.policy.v1\0");
    for s in sources {
        let name = s
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(s.text.len() as u64).to_le_bytes());
        hasher.update(s.text.as_bytes());
    }
    Ok(PolicySet {
        digest: hasher.finalize().to_hex().to_string(),
        resources,
        by_name,
        exact,
        cidrs,
        dns: arc_swap::ArcSwap::from_pointee(DnsTable::default()),
        rules,
        rules_for,
        masking,
        bindings,
        allow_unix,
        unknown_destination,
        files: sources.iter().map(|s| s.path.clone()).collect(),
        texts: sources
            .iter()
            .map(|s| {
                let name = s
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, s.text.clone())
            })
            .collect(),
    })
}

/// Longest Unix socket address the kernel takes (`sun_path`, 108 bytes,
/// less the terminating NUL a path needs).
const UNIX_ADDRESS_MAX: usize = 107;

/// Parses an `[[allow_unix]]` path: `/exact/path`, `/dir/*`, `@abstract`,
/// `@prefix*`. No `.` or `..` components (the kernel hook refuses such
/// addresses anyway), no other wildcards.
pub fn unix_allow(pattern: &str) -> Result<UnixAllow, String> {
    let (body, exact) = match pattern.strip_suffix('*') {
        Some(b) => (b, false),
        None => (pattern, true),
    };
    if body.contains(['*', '?', '[']) {
        return Err(format!(
            "`{pattern}`: only a trailing `*` is supported (`/dir/*` or `@prefix*`)"
        ));
    }
    let prefix: Vec<u8> = if let Some(name) = body.strip_prefix('@') {
        if exact && name.is_empty() {
            return Err("`@` needs an abstract socket name after it".into());
        }
        std::iter::once(0u8).chain(name.bytes()).collect()
    } else if body.starts_with('/') {
        if !exact && !body.ends_with('/') {
            return Err(format!(
                "`{pattern}`: a path pattern ends in `/*` (a whole directory), e.g. \"/run/app/*\""
            ));
        }
        if body.split('/').any(|c| c == "." || c == "..") {
            return Err(format!(
                "`{pattern}`: `.` and `..` components are not allowed"
            ));
        }
        if exact && body.ends_with('/') {
            return Err(format!("`{pattern}`: a socket path does not end in `/`"));
        }
        body.bytes().collect()
    } else {
        return Err(format!(
            "`{pattern}`: use an absolute path (\"/run/app.sock\", \"/run/app/*\") or an abstract name (\"@name\")"
        ));
    };
    if prefix.len() > UNIX_ADDRESS_MAX || prefix[1..].contains(&0) {
        return Err(format!(
            "`{pattern}`: longer than {UNIX_ADDRESS_MAX} bytes or contains NUL"
        ));
    }
    Ok(UnixAllow {
        pattern: pattern.to_owned(),
        prefix,
        exact,
    })
}

/// A resource's `credential`: only database protocols log in; the file
/// must be absolute, a regular file, and unreadable to group and others.
fn build_credential(
    errors: &mut Errors<'_>,
    c: &Spanned<super::model::CredentialSpec>,
    protocol: Protocol,
) -> Option<super::model::Credential> {
    use std::os::unix::fs::PermissionsExt as _;
    if !matches!(protocol, Protocol::Postgres | Protocol::Mysql) {
        errors.at(
            &c.span(),
            "`credential` is for database resources (protocol postgres or mysql)",
        );
        return None;
    }
    let spec = c.get_ref();
    if spec.user.get_ref().is_empty() {
        errors.at(&spec.user.span(), "`user` is empty");
    }
    let file = spec.password_file.get_ref();
    let at = spec.password_file.span();
    if !file.is_absolute() {
        errors.at(&at, "`password_file` must be an absolute path");
        return None;
    }
    match std::fs::metadata(file) {
        Err(e) => errors.at(&at, format!("`password_file` {}: {e}", file.display())),
        Ok(m) if !m.is_file() => {
            errors.at(&at, format!("`password_file` {} is not a regular file", file.display()));
        }
        Ok(m) if m.permissions().mode() & 0o077 != 0 => errors.at(
            &at,
            format!(
                "`password_file` {} is accessible to group or others (mode {:o}); it must be readable by its owner only (chmod 600)",
                file.display(),
                m.permissions().mode() & 0o777
            ),
        ),
        Ok(_) => {}
    }
    Some(super::model::Credential {
        user: spec.user.get_ref().clone(),
        password_file: file.clone(),
    })
}

fn check_name(errors: &mut Errors<'_>, name: &Spanned<String>, what: &str) {
    let n = name.get_ref();
    if n.is_empty() || n.len() > 128 {
        errors.at(
            &name.span(),
            format!("{what} name must be 1 to 128 characters"),
        );
    } else if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        errors.at(
            &name.span(),
            format!("{what} name `{n}` may only contain letters, digits, '-', '_', '.', ':'"),
        );
    }
}

fn parse_port(p: &str) -> Result<Option<u16>, String> {
    if p == "*" {
        return Ok(None);
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port `{p}` (1-65535 or `*`)")),
        Ok(n) => Ok(Some(n)),
    }
}

/// `ip:port`, `[ipv6]:port`, `cidr:port`, `[ipv6-cidr]:port`, `dns.name:port`; port may be `*`
/// for IPs and CIDRs.
pub(crate) fn parse_address(s: &str) -> Result<AddressPattern, String> {
    let bad = || format!("invalid address `{s}`: expected host:port, [ipv6]:port or cidr:port");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        s.rsplit_once(':').ok_or_else(bad)?
    };
    if !s.starts_with('[') && host.contains(':') {
        return Err(format!(
            "invalid address `{s}`: write IPv6 addresses in brackets, e.g. [::1]:5432"
        ));
    }
    let port = parse_port(port)?;
    if let Some((net, prefix)) = host.split_once('/') {
        let net: IpAddr = net
            .parse()
            .map_err(|_| format!("invalid CIDR network `{net}` in `{s}`"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("invalid CIDR prefix `/{prefix}` in `{s}` (0-{max})"))?;
        return Ok(AddressPattern::Cidr { net, prefix, port });
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(match port {
            Some(p) => AddressPattern::Exact(SocketAddr::new(ip, p)),
            None => AddressPattern::Cidr {
                net: ip,
                prefix: if ip.is_ipv4() { 32 } else { 128 },
                port: None,
            },
        });
    }
    let valid_dns = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !valid_dns {
        return Err(format!(
            "invalid host `{host}` in `{s}`: not an IP address, CIDR or DNS name"
        ));
    }
    let port = port.ok_or_else(|| format!("a DNS name needs a port, not `*`: `{s}`"))?;
    Ok(AddressPattern::Dns {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// "500ms", "30s", "2m", "1h", "1d".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!(
            "invalid duration `{s}`: expected a number and a unit (ms, s, m, h, d), e.g. \"120s\""
        )
    })?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => {
            return Err(format!(
                "invalid duration `{s}`: unknown unit `{}` (ms, s, m, h, d)",
                unit.trim()
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

fn build_approval(errors: &mut Errors<'_>, a: &Spanned<ApprovalSpecFile>) -> Option<ApprovalSpec> {
    let spec = a.get_ref();
    let mut ok = true;
    let groups: Vec<String> = spec
        .approver_groups
        .get_ref()
        .iter()
        .map(|g| g.get_ref().clone())
        .collect();
    if groups.is_empty() {
        errors.at(
            &spec.approver_groups.span(),
            "`approver_groups` is empty: nobody could approve",
        );
        ok = false;
    }
    for g in spec.approver_groups.get_ref() {
        if g.get_ref().trim().is_empty() || g.get_ref().contains(['*', '?']) {
            errors.at(&g.span(), "approver group must be a group name (no globs)");
            ok = false;
        }
    }
    let quorum = match &spec.quorum {
        None => 1,
        Some(q) => {
            let v = *q.get_ref();
            if (1..=MAX_QUORUM).contains(&v) {
                v as u32
            } else {
                errors.at(&q.span(), format!("`quorum` must be 1 to {MAX_QUORUM}"));
                ok = false;
                1
            }
        }
    };
    let timeout = match parse_duration(spec.timeout.get_ref()) {
        Ok(d) if d.is_zero() || d > MAX_APPROVAL_TIMEOUT => {
            errors.at(
                &spec.timeout.span(),
                "`timeout` must be more than 0 and at most 7d",
            );
            ok = false;
            d
        }
        Ok(d) => d,
        Err(msg) => {
            errors.at(&spec.timeout.span(), msg);
            ok = false;
            Duration::ZERO
        }
    };
    let grant_window = match &spec.grant_window {
        None => None,
        Some(g) => match parse_duration(g.get_ref()) {
            Ok(d) if d.is_zero() || d > MAX_GRANT_WINDOW => {
                errors.at(
                    &g.span(),
                    "`grant_window` must be more than 0 and at most 30d",
                );
                ok = false;
                None
            }
            Ok(d) => Some(d),
            Err(msg) => {
                errors.at(&g.span(), msg);
                ok = false;
                None
            }
        },
    };
    let grant_scope = match spec.grant_scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "statement")) => GrantScope::Statement,
        Some((_, "class")) => GrantScope::Class,
        Some((s, other)) => {
            errors.at(
                &s.span(),
                format!("`grant_scope` must be \"statement\" or \"class\", not {other:?}"),
            );
            ok = false;
            GrantScope::Statement
        }
    };
    if let Some(s) = &spec.grant_scope
        && grant_window.is_none()
        && ok
    {
        errors.at(&s.span(), "`grant_scope` needs a `grant_window`");
        ok = false;
    }
    ok.then_some(ApprovalSpec {
        approver_groups: groups,
        quorum,
        timeout,
        grant_window,
        grant_scope,
    })
}

fn build_action(
    errors: &mut Errors<'_>,
    kind: ActionKind,
    kind_span: Range<usize>,
    approval: Option<&Spanned<ApprovalSpecFile>>,
    action_key: &str,
    approval_key: &str,
) -> Option<RuleAction> {
    match (kind, approval) {
        (ActionKind::Allow, None) => Some(RuleAction::Allow),
        (ActionKind::Deny, None) => Some(RuleAction::Deny),
        (ActionKind::RequireApproval, Some(a)) => {
            build_approval(errors, a).map(RuleAction::RequireApproval)
        }
        (ActionKind::RequireApproval, None) => {
            errors.at(
                &kind_span,
                format!("`{action_key} = \"require_approval\"` needs an `{approval_key}` table"),
            );
            None
        }
        (_, Some(a)) => {
            errors.at(
                &a.span(),
                format!(
                    "`{approval_key}` is only allowed with `{action_key} = \"require_approval\"`"
                ),
            );
            None
        }
    }
}

fn non_empty_list<'s>(
    errors: &mut Errors<'_>,
    list: &'s Spanned<Vec<Spanned<String>>>,
    key: &str,
) -> &'s [Spanned<String>] {
    if list.get_ref().is_empty() {
        errors.at(
            &list.span(),
            format!("`{key}` is an empty list, which matches nothing; remove it or add entries"),
        );
    }
    for item in list.get_ref() {
        if item.get_ref().trim().is_empty() {
            errors.at(&item.span(), format!("empty entry in `{key}`"));
        }
    }
    list.get_ref()
}

#[allow(clippy::too_many_lines)]
fn build_conditions(errors: &mut Errors<'_>, m: &MatchSpec) -> Conditions {
    let mut c = Conditions::default();
    if let Some(list) = &m.sql {
        let mut classes = Vec::new();
        for item in non_empty_list(errors, list, "match.sql") {
            match StatementClass::parse(item.get_ref()) {
                Some(cl) => classes.push(cl),
                None => errors.at(
                    &item.span(),
                    format!(
                        "unknown statement class `{}` (one of: transaction, read, write, ddl, dcl, admin, unknown)",
                        item.get_ref()
                    ),
                ),
            }
        }
        c.sql = Some(classes);
    }
    let globs_ci = |errors: &mut Errors<'_>, l: &Spanned<Vec<Spanned<String>>>, key: &str| {
        non_empty_list(errors, l, key)
            .iter()
            .map(|s| Glob::new_case_insensitive(s.get_ref()))
            .collect::<Vec<_>>()
    };
    if let Some(l) = &m.tables {
        c.tables = Some(globs_ci(errors, l, "match.tables"));
    }
    if let Some(l) = &m.functions {
        c.functions = Some(globs_ci(errors, l, "match.functions"));
    }
    c.destructive = m.destructive.as_ref().map(|d| *d.get_ref());
    if let Some(l) = &m.http_methods {
        let mut methods = Vec::new();
        for item in non_empty_list(errors, l, "match.http_methods") {
            let v = item.get_ref();
            if v.is_empty() || !v.chars().all(|ch| ch.is_ascii_alphabetic()) {
                errors.at(&item.span(), format!("invalid HTTP method `{v}`"));
            }
            methods.push(v.to_ascii_uppercase());
        }
        c.http_methods = Some(methods);
    }
    if let Some(l) = &m.http_hosts {
        c.http_hosts = Some(globs_ci(errors, l, "match.http_hosts"));
    }
    if let Some(l) = &m.http_paths {
        let items = non_empty_list(errors, l, "match.http_paths");
        for item in items {
            if !item.get_ref().starts_with('/') && item.get_ref() != "*" {
                errors.at(
                    &item.span(),
                    format!("HTTP path pattern `{}` must start with '/'", item.get_ref()),
                );
            }
        }
        c.http_paths = Some(items.iter().map(|s| Glob::new(s.get_ref())).collect());
    }
    if let Some(l) = &m.http_query {
        let mut tests = Vec::new();
        for item in non_empty_list(errors, l, "match.http_query") {
            match super::field_test::QueryTest::parse(item.get_ref()) {
                Ok(t) => tests.push(t),
                Err(e) => errors.at(&item.span(), format!("match.http_query: {e}")),
            }
        }
        c.http_query = Some(tests);
    }
    if let Some(l) = &m.http_json {
        let mut tests = Vec::new();
        for item in non_empty_list(errors, l, "match.http_json") {
            match super::field_test::JsonTest::parse(item.get_ref()) {
                Ok(t) => tests.push(t),
                Err(e) => errors.at(&item.span(), format!("match.http_json: {e}")),
            }
        }
        c.http_json = Some(tests);
    }
    if let Some(l) = &m.kube_verbs {
        c.kube_verbs = Some(globs_ci(errors, l, "match.kube_verbs"));
    }
    if let Some(l) = &m.kube_resources {
        c.kube_resources = Some(globs_ci(errors, l, "match.kube_resources"));
    }
    if let Some(l) = &m.kube_namespaces {
        c.kube_namespaces = Some(globs_ci(errors, l, "match.kube_namespaces"));
    }
    if let Some(l) = &m.ssh {
        let mut classes = Vec::new();
        for item in non_empty_list(errors, l, "match.ssh") {
            if super::model::SSH_CLASSES.contains(&item.get_ref().as_str()) {
                classes.push(item.get_ref().clone());
            } else {
                errors.at(
                    &item.span(),
                    format!(
                        "unknown SSH class `{}` (one of: {})",
                        item.get_ref(),
                        super::model::SSH_CLASSES.join(", ")
                    ),
                );
            }
        }
        c.ssh = Some(classes);
    }
    if let Some(l) = &m.ssh_destinations {
        let items = non_empty_list(errors, l, "match.ssh_destinations");
        c.ssh_destinations = Some(items.iter().map(|s| Glob::new(s.get_ref())).collect());
    }
    c
}

#[allow(clippy::too_many_lines)]
fn build_rule(
    errors: &mut Errors<'_>,
    rule: &Spanned<super::model::RuleSpec>,
    resources: &[Resource],
    rule_at: &mut HashMap<String, String>,
) -> Option<Rule> {
    let r = rule.get_ref();
    let name = r.name.get_ref().clone();
    check_name(errors, &r.name, "rule");
    if name.starts_with("default:") {
        errors.at(
            &r.name.span(),
            "rule names starting with `default:` are reserved",
        );
    }
    if let Some(first) = rule_at.get(&name) {
        errors.at(
            &r.name.span(),
            format!("duplicate rule name `{name}` (first defined at {first})"),
        );
        return None;
    }
    let origin = errors.here(&r.name.span());
    rule_at.insert(name.clone(), origin.clone());
    let n0 = errors.list.len();
    if r.identities.is_empty() && r.groups.is_empty() {
        errors.at(
            &r.name.span(),
            format!("rule `{name}` applies to no one: set `identities` or `groups` (use [\"*\"] for everyone)"),
        );
    }
    for s in r.identities.iter().chain(&r.groups) {
        if s.get_ref().trim().is_empty() {
            errors.at(&s.span(), "empty identity or group");
        }
    }
    let mut matched: Vec<&Resource> = Vec::new();
    for pat in non_empty_list(errors, &r.resources, "resources") {
        let g = Glob::new(pat.get_ref());
        let hits: Vec<&Resource> = resources
            .iter()
            .filter(|res| g.matches(&res.name))
            .collect();
        if hits.is_empty() {
            let msg = if g.is_literal() {
                format!("unknown resource `{}`", pat.get_ref())
            } else {
                format!("resource pattern `{}` matches no resource", pat.get_ref())
            };
            errors.at(&pat.span(), msg);
        }
        matched.extend(hits);
    }
    let conditions = match &r.conditions {
        Some(m) => {
            let c = build_conditions(errors, m.get_ref());
            let kinds = u8::from(c.has_sql())
                + u8::from(c.has_http())
                + u8::from(c.has_kube())
                + u8::from(c.has_ssh());
            if kinds > 1 {
                errors.at(
                    &m.span(),
                    "a rule's `match` may hold SQL, HTTP, Kubernetes or SSH conditions, not a mix: split it into rules",
                );
            } else if !matched.is_empty() {
                let fits = |p: Protocol| {
                    (c.has_sql() && p.sql_dialect().is_some())
                        || ((c.has_http() || c.has_kube()) && p.is_http())
                        || (c.has_ssh() && p == Protocol::Ssh)
                };
                if kinds == 1 && !matched.iter().any(|res| fits(res.protocol)) {
                    let what = if c.has_sql() {
                        "SQL"
                    } else if c.has_http() {
                        "HTTP"
                    } else if c.has_ssh() {
                        "SSH"
                    } else {
                        "Kubernetes"
                    };
                    errors.at(
                        &m.span(),
                        format!("{what} conditions can never match: none of the rule's resources speaks that protocol"),
                    );
                }
            }
            c
        }
        None => Conditions::default(),
    };
    let action = build_action(
        errors,
        *r.action.get_ref(),
        r.action.span(),
        r.approval.as_ref(),
        "action",
        "approval",
    );
    let ssh_user = r.ssh_user.as_ref().and_then(|u| {
        let ok = !u.get_ref().is_empty()
            && u.get_ref().len() <= 32
            && u.get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !u.get_ref().starts_with('-');
        if !ok {
            errors.at(
                &u.span(),
                "ssh_user must be a login name: 1 to 32 of A-Z a-z 0-9 . _ -",
            );
        }
        ok.then(|| u.get_ref().clone())
    });
    if errors.list.len() > n0 {
        return None;
    }
    Some(Rule {
        ssh_user,
        name,
        identities: r
            .identities
            .iter()
            .map(|s| Glob::new(s.get_ref()))
            .collect(),
        groups: r.groups.iter().map(|s| Glob::new(s.get_ref())).collect(),
        resources: r
            .resources
            .get_ref()
            .iter()
            .map(|s| Glob::new(s.get_ref()))
            .collect(),
        conditions,
        action: action?,
        origin,
    })
}

fn resource_globs(
    errors: &mut Errors<'_>,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
    key: &str,
    resources: &[Resource],
) -> Vec<Glob> {
    let Some(list) = list else {
        return vec![Glob::new("*")];
    };
    let mut out = Vec::new();
    for pat in non_empty_list(errors, list, key) {
        let g = Glob::new(pat.get_ref());
        if !resources.iter().any(|r| g.matches(&r.name)) {
            errors.at(
                &pat.span(),
                format!("`{}` matches no resource", pat.get_ref()),
            );
        }
        out.push(g);
    }
    out
}

/// Longest `equality_window` a column rule may set.
pub const MAX_EQUALITY_WINDOW: Duration = Duration::from_hours(30 * 24);

/// A column rule's `max_equality_values`, `equality_budget` and
/// `equality_window`, the defaults where not set.
fn equality_limits(
    errors: &mut Errors<'_>,
    col: &crate::policy::model::ColumnSpec,
) -> crate::mask::EqualityLimits {
    let mut limits = crate::mask::EqualityLimits::default();
    if let Some(n) = &col.max_equality_values {
        if *n.get_ref() > 10_000 {
            errors.at(
                &n.span(),
                "`max_equality_values` must be at most 10000".to_owned(),
            );
        }
        limits.max_values = *n.get_ref();
    }
    if let Some(n) = &col.equality_budget {
        if *n.get_ref() > 1_000_000 {
            errors.at(
                &n.span(),
                "`equality_budget` must be at most 1000000".to_owned(),
            );
        }
        limits.budget = *n.get_ref();
    }
    if let Some(w) = &col.equality_window {
        match parse_duration(w.get_ref()) {
            Ok(d) if !d.is_zero() && d <= MAX_EQUALITY_WINDOW => limits.window = d,
            Ok(_) => errors.at(
                &w.span(),
                "`equality_window` must be more than 0 and at most 30d".to_owned(),
            ),
            Err(msg) => errors.at(&w.span(), msg),
        }
    }
    limits
}

/// Reads a protected values file, bounded, and keeps only fingerprints.
fn read_protected_values(
    path: &std::path::Path,
) -> Result<crate::mask::fingerprints::ProtectedValues, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(crate::mask::fingerprints::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > crate::mask::fingerprints::MAX_FILE_BYTES {
        return Err(format!(
            "over {} bytes",
            crate::mask::fingerprints::MAX_FILE_BYTES
        ));
    }
    crate::mask::fingerprints::ProtectedValues::from_lines(&text)
}

#[allow(clippy::too_many_lines)] // one pass over every file's `[masking]` table, key by key
fn build_masking<'a>(
    errors: &mut Errors<'a>,
    parsed: &[(&'a Source, PolicyFileSpec)],
    resources: &[Resource],
) -> Vec<MaskPolicy> {
    let mut detectors = DetectorSet::NONE;
    let mut detectors_at: Option<String> = None;
    let mut strategy = Strategy::Redact;
    let mut strategy_at: Option<String> = None;
    let mut detector_resources = vec![Glob::new("*")];
    let mut detector_resources_at: Option<String> = None;
    // (resource globs, rule)
    let mut columns: Vec<(Vec<Glob>, ColumnRule)> = Vec::new();
    let mut json: Vec<(Vec<Glob>, crate::mask::JsonFieldRule)> = Vec::new();
    let mut protected: Option<std::sync::Arc<crate::mask::fingerprints::ProtectedValues>> = None;
    for (src, spec) in parsed {
        errors.set_source(src);
        let Some(m) = &spec.masking else { continue };
        if let Some(list) = &m.detectors {
            if let Some(first) = &detectors_at {
                errors.at(
                    &list.span(),
                    format!("`masking.detectors` is set twice (first at {first})"),
                );
            } else {
                detectors_at = Some(errors.here(&list.span()));
                for item in list.get_ref() {
                    let v = item.get_ref();
                    if v == "all" {
                        detectors = DetectorSet::ALL;
                    } else if let Some(d) = Detector::parse(v) {
                        detectors = detectors.with(d);
                    } else {
                        errors.at(
                            &item.span(),
                            format!("unknown detector `{v}` (one of: all, us_ssn, card_pan, email, phone, iban, aba_routing)"),
                        );
                    }
                }
            }
        }
        if let Some(s) = &m.detector_strategy {
            if let Some(first) = &strategy_at {
                errors.at(
                    &s.span(),
                    format!("`masking.detector_strategy` is set twice (first at {first})"),
                );
            } else {
                strategy_at = Some(errors.here(&s.span()));
                strategy = *s.get_ref();
            }
        }
        if let Some(f) = &m.protected_values_file {
            if protected.is_some() {
                errors.at(
                    &f.span(),
                    "`masking.protected_values_file` is set twice".to_owned(),
                );
            } else {
                let read = if f.get_ref().is_absolute() {
                    read_protected_values(f.get_ref())
                } else {
                    Err("must be an absolute path".into())
                };
                match read {
                    Ok(p) => protected = Some(std::sync::Arc::new(p)),
                    Err(e) => errors.at(
                        &f.span(),
                        format!(
                            "masking.protected_values_file {}: {e}",
                            f.get_ref().display()
                        ),
                    ),
                }
            }
        }
        if let Some(list) = &m.detector_resources {
            if let Some(first) = &detector_resources_at {
                errors.at(
                    &list.span(),
                    format!("`masking.detector_resources` is set twice (first at {first})"),
                );
            } else {
                detector_resources_at = Some(errors.here(&list.span()));
                detector_resources =
                    resource_globs(errors, Some(list), "masking.detector_resources", resources);
            }
        }
        for col in &m.column {
            let col = col.get_ref();
            let globs = resource_globs(
                errors,
                col.resources.as_ref(),
                "masking.column.resources",
                resources,
            );
            let equality = equality_limits(errors, col);
            for spec in non_empty_list(errors, &col.columns, "masking.column.columns") {
                let v = spec.get_ref();
                if v.split('.').count() > 3 || v.split('.').any(str::is_empty) {
                    errors.at(
                        &spec.span(),
                        format!("invalid column `{v}`: expected column, table.column or schema.table.column"),
                    );
                    continue;
                }
                columns.push((
                    globs.clone(),
                    ColumnRule::parse(v, *col.strategy.get_ref())
                        .with_modes(col.predicates, col.derived)
                        .with_equality(equality),
                ));
            }
        }
        for j in &m.json {
            let j = j.get_ref();
            let globs = resource_globs(
                errors,
                j.resources.as_ref(),
                "masking.json.resources",
                resources,
            );
            for p in non_empty_list(errors, &j.paths, "masking.json.paths") {
                match crate::mask::JsonPath::parse(p.get_ref()) {
                    Ok(path) => json.push((
                        globs.clone(),
                        crate::mask::JsonFieldRule {
                            path,
                            strategy: *j.strategy.get_ref(),
                        },
                    )),
                    Err(e) => errors.at(&p.span(), e.to_string()),
                }
            }
        }
    }
    resources
        .iter()
        .map(|r| {
            let cols = columns
                .iter()
                .filter(|(g, _)| g.iter().any(|g| g.matches(&r.name)))
                .map(|(_, c)| c.clone())
                .collect();
            let det = if detector_resources.iter().any(|g| g.matches(&r.name)) {
                detectors
            } else {
                DetectorSet::NONE
            };
            let fields = json
                .iter()
                .filter(|(g, _)| g.iter().any(|g| g.matches(&r.name)))
                .map(|(_, j)| j.clone())
                .collect();
            // Used where the detectors run, and by prompt DLP on any resource.
            MaskPolicy::new(cols, det, strategy)
                .with_json_fields(fields)
                .with_protected_values(protected.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval_rule(approval: &str) -> Result<PolicySet, PolicyErrors> {
        let text = format!(
            "[[resource]]\nname = \"pg\"\nprotocol = \"postgres\"\naddresses = [\"127.0.0.1:5432\"]\n\n\
             [[rule]]\nname = \"r\"\nidentities = [\"a\"]\nresources = [\"pg\"]\n\
             action = \"require_approval\"\napproval = {{ approver_groups = [\"x\"], timeout = \"1m\"{approval} }}\n"
        );
        load_str(&[("p.toml", &text)])
    }

    #[test]
    fn grant_scope_is_statement_or_class_and_needs_a_window() {
        let scope = |extra: &str| match &approval_rule(extra).unwrap().rules()[0].action {
            RuleAction::RequireApproval(spec) => spec.grant_scope,
            other => panic!("{other:?}"),
        };
        assert_eq!(scope(""), GrantScope::Statement);
        assert_eq!(scope(", grant_window = \"5m\""), GrantScope::Statement);
        assert_eq!(
            scope(", grant_window = \"5m\", grant_scope = \"class\""),
            GrantScope::Class
        );
        let e = approval_rule(", grant_window = \"5m\", grant_scope = \"table\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml:") && e.contains("grant_scope"), "{e}");
        let e = approval_rule(", grant_scope = \"class\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a `grant_window`"), "{e}");
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("127.0.0.1:5432"),
            Ok(AddressPattern::Exact("127.0.0.1:5432".parse().unwrap()))
        );
        assert_eq!(
            parse_address("[::1]:5432"),
            Ok(AddressPattern::Exact("[::1]:5432".parse().unwrap()))
        );
        assert_eq!(
            parse_address("10.1.0.0/16:*"),
            Ok(AddressPattern::Cidr {
                net: "10.1.0.0".parse().unwrap(),
                prefix: 16,
                port: None
            })
        );
        assert_eq!(
            parse_address("[fd00::/8]:443"),
            Ok(AddressPattern::Cidr {
                net: "fd00::".parse().unwrap(),
                prefix: 8,
                port: Some(443)
            })
        );
        assert_eq!(
            parse_address("DB.internal:5432"),
            Ok(AddressPattern::Dns {
                host: "db.internal".into(),
                port: 5432
            })
        );
        assert!(parse_address("db.internal:*").is_err());
        assert!(parse_address("::1:5432").is_err());
        assert!(parse_address("10.0.0.0/33:1").is_err());
        assert!(parse_address("host:0").is_err());
        assert!(parse_address("bad_host!:80").is_err());
        assert!(parse_address("nohost").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_mins(15)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_hours(2)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_hours(24)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5w").is_err());
    }

    #[test]
    fn the_ssh_login_comes_from_the_most_specific_rule_naming_one() {
        let text = "[[resource]]\nname = \"ops\"\nprotocol = \"ssh\"\naddresses = [\"127.0.0.1:22\"]\n\n\
             [[rule]]\nname = \"all\"\nidentities = [\"*\"]\nresources = [\"ops\"]\naction = \"allow\"\n\
             match = { ssh = [\"read\"] }\nssh_user = \"reader\"\n\n\
             [[rule]]\nname = \"alice\"\nidentities = [\"alice\"]\nresources = [\"ops\"]\n\
             action = \"allow\"\nssh_user = \"deploy\"\n\n\
             [[rule]]\nname = \"no-bob\"\nidentities = [\"bob\"]\nresources = [\"ops\"]\n\
             action = \"deny\"\nssh_user = \"root\"\n";
        let p = load_str(&[("p.toml", text)]).unwrap();
        let ops = p.resource("ops").unwrap();
        let who = |i: &str| crate::policy::Subject {
            identity: i.into(),
            groups: Vec::new(),
        };
        assert_eq!(
            p.ssh_user_for(&who("alice"), ops),
            Some(("alice", "deploy"))
        );
        // A deny rule names no login; the wildcard rule does.
        assert_eq!(p.ssh_user_for(&who("bob"), ops), Some(("all", "reader")));
        let bad = text.replace("ssh_user = \"deploy\"", "ssh_user = \"-oProxyCommand\"");
        let e = load_str(&[("p.toml", &bad)]).unwrap_err().to_string();
        assert!(e.contains("ssh_user must be a login name"), "{e}");
    }
}
