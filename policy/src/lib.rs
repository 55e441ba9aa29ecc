//! Access policy of one network: who may open what on whom. Pure: text in, a checked
//! [`Policy`] out; [`eval`] answers one question the slow, obvious way (and explains it);
//! [`compile`] turns a policy and the network's peers into each peer's own part (the peers it
//! may talk to and the inbound rules that apply to it).
//!
//! The document is TOML, kept in git by the tenant:
//!
//! ```toml
//! tags = ["web", "db", "cache"]        # every tag a rule may name, declared
//!
//! [groups]
//! backend = ["db", "cache"]            # named sets of tags
//!
//! [[rule]]
//! name = "web reaches the databases"   # optional, shown by `canopy policy test`
//! from = ["tag:web"]                   # tag:T, group:G, a peer id, or "*"
//! to = ["group:backend"]               # the same, or a CIDR of overlay addresses
//! proto = "tcp"                        # tcp, udp, icmp or any (the default)
//! ports = ["5432", "6379-6380"]        # tcp and udp only; none = every port
//!
//! [auto_approve]                       # routes agents advertise, in force without an admin
//! "10.20.0.0/16" = ["tag:site-gw"]     # any prefix inside, advertised by these peers
//! ```
//!
//! No policy: every peer reaches every other (as before policies existed). A policy: nothing
//! is allowed but what a rule allows, and replies to what was allowed.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod compile;
pub mod eval;
pub mod wire;

/// A tag: 1 to 63 of `A-Za-z0-9-_:.`.
pub fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 63
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b))
}

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

/// Rules in one policy, at most (hosted plans allow fewer).
pub const MAX_RULES: usize = 1000;
/// Selectors in one rule's `from` or `to`, ports in one rule, tags declared, groups.
pub const MAX_ITEMS: usize = 256;
/// Bytes of policy text.
pub const MAX_BYTES: usize = 256 * 1024;

/// A checked policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub tags: BTreeSet<String>,
    pub groups: BTreeMap<String, BTreeSet<String>>,
    pub rules: Vec<Rule>,
    /// Routes advertised by agents that are in force without an admin's approval: a prefix
    /// inside the network, advertised by a peer one of the selectors takes.
    pub auto_approve: Vec<(IpNetwork, Vec<Selector>)>,
}

impl Policy {
    /// A policy with no rules: nothing is allowed.
    pub fn deny_all() -> Self {
        Self {
            tags: BTreeSet::new(),
            groups: BTreeMap::new(),
            rules: Vec::new(),
            auto_approve: Vec::new(),
        }
    }

    /// Whether a route to `prefix` that gateway `gw` advertised is in force without approval.
    pub fn auto_approves(&self, prefix: &IpNetwork, gw: &eval::PeerView<'_>) -> bool {
        self.auto_approve.iter().any(|(net, who)| {
            net.is_ipv4() == prefix.is_ipv4()
                && net.prefix() <= prefix.prefix()
                && net.contains(prefix.network())
                && who.iter().any(|s| eval::source_matches(s, gw))
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The rule's name, or "rule N" (1-based).
    pub name: String,
    /// The line of the document where the rule starts (1-based; 0 when built in code).
    pub line: usize,
    pub from: Vec<Selector>,
    pub to: Vec<Selector>,
    pub proto: Proto,
    /// Empty: every port (and always for icmp and any).
    pub ports: Vec<PortRange>,
}

/// Who a rule is about. Groups are expanded into their tags when the policy is checked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    Any,
    Tag(String),
    Peer(String),
    /// Overlay addresses (in `to` only): the peers whose address is inside, and only
    /// packets to addresses inside.
    Cidr(IpNetwork),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// Whether a packet of protocol `p` is one of these.
    pub fn covers(self, p: Proto) -> bool {
        self == Proto::Any || self == p
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Proto::Any),
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" => Ok(Proto::Icmp),
            other => Err(format!("protocol {other:?}: use tcp, udp, icmp or any")),
        }
    }
}

/// Ports `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Why a policy document was refused: what, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", where_prefix(*line, rule.as_deref()))]
pub struct PolicyError {
    /// 1-based; 0 when the document as a whole is at fault.
    pub line: usize,
    /// The rule's name, when a rule is at fault.
    pub rule: Option<String>,
    pub message: String,
}

fn where_prefix(line: usize, rule: Option<&str>) -> String {
    match (line, rule) {
        (0, None) => String::new(),
        (0, Some(r)) => format!("{r}: "),
        (l, None) => format!("line {l}: "),
        (l, Some(r)) => format!("line {l}, {r}: "),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<Spanned<String>>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    auto_approve: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    from: Vec<Spanned<String>>,
    to: Vec<Spanned<String>>,
    proto: Option<Spanned<String>>,
    #[serde(default)]
    ports: Vec<Spanned<String>>,
}

/// Reads and checks a whole policy document. Every error names its line (and rule).
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let doc_err = |line, message| PolicyError {
        line,
        rule: None,
        message,
    };
    if text.len() > MAX_BYTES {
        return Err(doc_err(0, format!("a policy is at most {MAX_BYTES} bytes")));
    }
    let doc: Document = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        doc_err(line, e.message().trim().to_string())
    })?;
    if doc.rules.len() > MAX_RULES {
        return Err(doc_err(0, format!("at most {MAX_RULES} rules")));
    }
    if doc.tags.len() > MAX_ITEMS || doc.groups.len() > MAX_ITEMS {
        return Err(doc_err(
            0,
            format!("at most {MAX_ITEMS} tags and {MAX_ITEMS} groups"),
        ));
    }
    let mut tags = BTreeSet::new();
    for t in &doc.tags {
        if !valid_tag(t.get_ref()) {
            let e = format!(
                "tag {} is not valid",
                canopy_proto::text::quoted(t.get_ref())
            );
            return Err(doc_err(line_of(text, t.span().start), e));
        }
        tags.insert(t.get_ref().clone());
    }
    let mut groups = BTreeMap::new();
    for (name, members) in &doc.groups {
        let mut set = BTreeSet::new();
        for m in members {
            let line = line_of(text, m.span().start);
            if !tags.contains(m.get_ref()) {
                let msg = format!(
                    "group {name}: tag {:?} is not declared in `tags`",
                    m.get_ref()
                );
                return Err(doc_err(line, msg));
            }
            set.insert(m.get_ref().clone());
        }
        groups.insert(name.clone(), set);
    }
    let mut rules = Vec::with_capacity(doc.rules.len());
    for (i, r) in doc.rules.iter().enumerate() {
        rules.push(check_rule(text, i, r, &tags, &groups)?);
    }
    let auto_approve = check_auto_approve(text, &doc.auto_approve, &tags, &groups)?;
    Ok(Policy {
        tags,
        groups,
        rules,
        auto_approve,
    })
}

/// The `[auto_approve]` table: prefix → the peers (tags, groups, ids, "*") whose advertised
/// routes inside it are in force.
fn check_auto_approve(
    text: &str,
    table: &BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    tags: &BTreeSet<String>,
    groups: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<(IpNetwork, Vec<Selector>)>, PolicyError> {
    if table.len() > MAX_ITEMS {
        let message = format!("auto_approve: at most {MAX_ITEMS} prefixes");
        return Err(PolicyError {
            line: 0,
            rule: None,
            message,
        });
    }
    let mut out = Vec::with_capacity(table.len());
    for (prefix, who) in table {
        let fail = |at: usize, message: String| PolicyError {
            line: line_of(text, at),
            rule: None,
            message: format!("auto_approve {prefix:?}: {message}"),
        };
        let net: IpNetwork = prefix
            .parse()
            .map_err(|_| fail(who.span().start, "not a CIDR".into()))?;
        if net.network() != net.ip() {
            return Err(fail(who.span().start, "host bits set".into()));
        }
        if who.get_ref().is_empty() || who.get_ref().len() > MAX_ITEMS {
            let msg = format!("needs 1 to {MAX_ITEMS} entries");
            return Err(fail(who.span().start, msg));
        }
        let mut selectors = BTreeSet::new();
        for s in who.get_ref() {
            let parsed =
                selector(s.get_ref(), false, tags, groups).map_err(|m| fail(s.span().start, m))?;
            selectors.extend(parsed);
        }
        out.push((net, selectors.into_iter().collect()));
    }
    Ok(out)
}

fn check_rule(
    text: &str,
    index: usize,
    raw: &Spanned<RawRule>,
    tags: &BTreeSet<String>,
    groups: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Rule, PolicyError> {
    let r = raw.get_ref();
    let name = r
        .name
        .clone()
        .unwrap_or_else(|| format!("rule {}", index + 1));
    let line = line_of(text, raw.span().start);
    let fail = |at: usize, message: String| PolicyError {
        line: line_of(text, at),
        rule: Some(name.clone()),
        message,
    };
    let mut sides = Vec::with_capacity(2);
    for (side, items) in [("from", &r.from), ("to", &r.to)] {
        if items.is_empty() || items.len() > MAX_ITEMS {
            let msg = format!("`{side}` needs 1 to {MAX_ITEMS} entries");
            return Err(fail(raw.span().start, msg));
        }
        let mut out = BTreeSet::new();
        for s in items {
            let parsed = selector(s.get_ref(), side == "to", tags, groups)
                .map_err(|m| fail(s.span().start, format!("{side}: {m}")))?;
            out.extend(parsed);
        }
        sides.push(out.into_iter().collect::<Vec<_>>());
    }
    let proto = match &r.proto {
        Some(p) => p.get_ref().parse().map_err(|m| fail(p.span().start, m))?,
        None => Proto::Any,
    };
    if r.ports.len() > MAX_ITEMS {
        return Err(fail(
            raw.span().start,
            format!("at most {MAX_ITEMS} port ranges"),
        ));
    }
    let mut ports = Vec::with_capacity(r.ports.len());
    for p in &r.ports {
        if !matches!(proto, Proto::Tcp | Proto::Udp) {
            let msg = format!("ports need proto tcp or udp (this rule is {proto})");
            return Err(fail(p.span().start, msg));
        }
        ports.push(port_range(p.get_ref()).map_err(|m| fail(p.span().start, m))?);
    }
    ports.sort();
    ports.dedup();
    let to = sides.pop().unwrap_or_default();
    let from = sides.pop().unwrap_or_default();
    Ok(Rule {
        name,
        line,
        from,
        to,
        proto,
        ports,
    })
}

/// One `from`/`to` entry: a group becomes its tags.
fn selector(
    s: &str,
    cidr_allowed: bool,
    tags: &BTreeSet<String>,
    groups: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<Selector>, String> {
    if s == "*" {
        return Ok(vec![Selector::Any]);
    }
    if let Some(t) = s.strip_prefix("tag:") {
        if !tags.contains(t) {
            return Err(format!("tag {t:?} is not declared in `tags`"));
        }
        return Ok(vec![Selector::Tag(t.to_string())]);
    }
    if let Some(g) = s.strip_prefix("group:") {
        let members = groups.get(g).ok_or_else(|| format!("no group {g:?}"))?;
        return Ok(members.iter().cloned().map(Selector::Tag).collect());
    }
    if s.starts_with("peer_")
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Ok(vec![Selector::Peer(s.to_string())]);
    }
    if let Ok(net) = s.parse::<IpNetwork>() {
        if !cidr_allowed {
            return Err(format!("{s}: addresses are destinations only (`to`)"));
        }
        if net.network() != net.ip() {
            return Err(format!(
                "{s} has host bits set; did you mean {}/{}?",
                net.network(),
                net.prefix()
            ));
        }
        return Ok(vec![Selector::Cidr(net)]);
    }
    Err(format!(
        "{s:?}: use tag:NAME, group:NAME, a peer id (peer_…), \"*\"{}",
        if cidr_allowed { " or a CIDR" } else { "" }
    ))
}

fn port_range(s: &str) -> Result<PortRange, String> {
    let bad = || format!("port {s:?}: use a port (1-65535) or a range like 8000-8100");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let first: u16 = a.trim().parse().map_err(|_| bad())?;
    let last: u16 = b.trim().parse().map_err(|_| bad())?;
    if first == 0 || last < first {
        return Err(bad());
    }
    Ok(PortRange { first, last })
}

/// The 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
