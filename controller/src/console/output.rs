//! Console output: aligned tables for people, `--json` for scripts.
#![allow(clippy::print_stdout)]

use canopy_proto::v1::{
    ApiToken, AuditEntry, JoinToken, Network, Peer, SignUpResponse, Subscription, TenantSummary,
    Usage,
};
use serde_json::{Value, json};

/// Prints one line for a person. Everything in it may come from a client of the controller
/// (names, hostnames, org names, tags), so control characters are escaped: no output can
/// forge a line or rewrite the terminal. (`--json` output is escaped by the JSON encoder.)
macro_rules! say {
    ($($t:tt)*) => {
        println!("{}", canopy_proto::text::escape(&format!($($t)*)))
    };
}

/// An aligned table without borders (comfy-table: widths by display width, so a name with
/// wide or combining characters does not skew the columns). Every cell is escaped first.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    for line in render_table(header, &rows) {
        println!("{line}");
    }
}

fn render_table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    use comfy_table::{CellAlignment, Table, presets::NOTHING};
    let escape = |c: &str| canopy_proto::text::escape(c).into_owned();
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_header(header.iter().map(|h| escape(h)))
        .add_rows(rows.iter().map(|r| r.iter().map(|c| escape(c))));
    for col in t.column_iter_mut() {
        col.set_cell_alignment(CellAlignment::Left);
        col.set_padding((0, 2));
    }
    t.lines().map(|l| l.trim_end().to_string()).collect()
}

fn print_json(v: Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn time(unix: i64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let secs = unix
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
    let (abs, future) = (secs.abs(), secs > 0);
    let span = match abs {
        0..60 => format!("{abs}s"),
        60..3600 => format!("{}m", abs / 60),
        3600..86400 => format!("{}h", abs / 3600),
        _ => format!("{}d", abs / 86400),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

fn network_json(n: &Network) -> Value {
    json!({"id": n.id, "name": n.name, "cidrs": n.cidrs, "created_at": n.created_at_unix, "revision": n.revision,
           "dns_domain": n.dns_domain})
}

pub fn networks(json: bool, nets: &[Network], single: bool) -> anyhow::Result<()> {
    if json {
        return print_json(if single && nets.len() == 1 {
            network_json(&nets[0])
        } else {
            Value::Array(nets.iter().map(network_json).collect())
        });
    }
    table(
        &["ID", "NAME", "CIDRS", "DNS", "CREATED"],
        nets.iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    n.name.clone(),
                    n.cidrs.join(","),
                    n.dns_domain.clone(),
                    time(n.created_at_unix),
                ]
            })
            .collect(),
    );
    Ok(())
}

fn token_json(t: &JoinToken) -> Value {
    json!({"id": t.id, "network_id": t.network_id, "max_uses": t.max_uses, "uses": t.uses,
           "expires_at": t.expires_at_unix, "revoked": t.revoked, "tags": t.tags, "created_at": t.created_at_unix})
}

pub fn tokens(json: bool, tokens: &[JoinToken]) -> anyhow::Result<()> {
    if json {
        return print_json(Value::Array(tokens.iter().map(token_json).collect()));
    }
    table(
        &["ID", "NETWORK", "USES", "EXPIRES", "STATE", "TAGS"],
        tokens
            .iter()
            .map(|t| {
                let max = if t.max_uses == 0 {
                    "∞".to_string()
                } else {
                    t.max_uses.to_string()
                };
                let state = if t.revoked {
                    "revoked"
                } else if t.max_uses != 0 && t.uses >= t.max_uses {
                    "used up"
                } else {
                    "active"
                };
                vec![
                    t.id.clone(),
                    t.network_id.clone(),
                    format!("{}/{max}", t.uses),
                    time(t.expires_at_unix),
                    state.into(),
                    t.tags.join(","),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn join_string(json: bool, t: Option<&JoinToken>, join: &str) -> anyhow::Result<()> {
    if json {
        return print_json(json!({"token": t.map(token_json), "join_string": join}));
    }
    say!("{join}");
    Ok(())
}

fn peer_json(p: &Peer) -> Value {
    use base64::Engine as _;
    json!({"id": p.id, "network_id": p.network_id, "hostname": p.hostname, "dns_name": p.dns_name,
           "public_key": base64::engine::general_purpose::STANDARD.encode(&p.public_key),
           "addresses": p.addresses, "endpoints": p.endpoints, "tags": p.tags,
           "online": p.online, "acked_revision": p.acked_revision, "created_at": p.created_at_unix,
           "exit_node": p.exit_node, "outside": p.outside,
           "last_handshake": p.last_handshake_unix, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes,
           "quiet_secs": p.quiet_secs, "lock_state": p.lock_state, "lock_refused": p.lock_refused,
           "paths": p.paths.iter().map(|x| json!({"peer_id": x.peer_id, "path": x.path,
               "via": x.via, "why": x.why, "last_handshake_secs": x.last_handshake_secs,
               "rx_bytes": x.rx_bytes, "tx_bytes": x.tx_bytes}))
               .collect::<Vec<_>>(),
           "paths_at": p.paths_at_unix})
}

/// What STATUS says: offline, online, or online with no handshake with any peer for a while
/// (its data plane is broken though its agent talks to the controller).
fn status_text(p: &Peer) -> String {
    let s = match (p.online, p.quiet_secs) {
        (false, _) => "offline".into(),
        (true, 0) => "online".into(),
        (true, q) => format!("online, NO HANDSHAKE for {}m", q / 60),
    };
    match (p.lock_state.as_str(), p.lock_refused) {
        ("pending", _) => format!("{s}, PENDING SIGNATURE"),
        ("stale", _) => format!("{s}, signed before its tags changed"),
        (_, 0) => s,
        (_, n) => format!("{s}, REFUSED {n} unsigned"),
    }
}

/// `canopy peer show`: one peer, and each of its paths with handshake age and bytes.
/// `names`: peer id → hostname, for the paths.
pub fn peer_detail(
    json: bool,
    p: &Peer,
    names: &std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    if json {
        return print_json(peer_json(p));
    }
    let mut lines = vec![
        format!("peer:       {}", p.id),
        format!("hostname:   {}", p.hostname),
        format!("dns name:   {}", p.dns_name),
        format!("addresses:  {}", p.addresses.join(", ")),
        format!("endpoints:  {}", endpoints_text(p)),
        format!("tags:       {}", p.tags.join(", ")),
        format!("status:     {}", status_text(p)),
        format!(
            "handshake:  {} (newest with any peer)",
            time(p.last_handshake_unix)
        ),
        format!("traffic:    rx {} B, tx {} B", p.rx_bytes, p.tx_bytes),
        format!("reported:   {}", time(p.paths_at_unix)),
    ];
    for x in &p.paths {
        let to = names.get(&x.peer_id).unwrap_or(&x.peer_id);
        let hs = match x.last_handshake_secs {
            s if s < 0 => "no handshake".to_string(),
            s => format!("handshake {s} s ago"),
        };
        lines.push(format!(
            "  → {to}: {} {}, {hs}, rx {} B, tx {} B",
            x.path, x.via, x.rx_bytes, x.tx_bytes
        ));
    }
    for l in lines {
        println!("{}", canopy_proto::text::escape(&l));
    }
    Ok(())
}

/// A peer's endpoints for the table: its own, then its NAT's outside address(es) marked.
fn endpoints_text(p: &Peer) -> String {
    let outside = p.outside.iter().map(|o| format!("{o} (outside)"));
    let all: Vec<String> = p.endpoints.iter().cloned().chain(outside).collect();
    if all.is_empty() {
        "-".into()
    } else {
        all.join(",")
    }
}

/// Each peer's paths to the others, one line a pair: "web → db: direct 192.0.2.7:51820,
/// handshake 12 s ago" or "relayed (not direct: …)".
pub fn paths(peers: &[Peer]) {
    println!();
    for line in path_lines(peers) {
        println!("{line}");
    }
}

/// The lines [`paths`] prints, escaped: hostnames and reasons come from agents.
fn path_lines(peers: &[Peer]) -> Vec<String> {
    let name: std::collections::HashMap<&str, &str> = peers
        .iter()
        .map(|p| (p.id.as_str(), p.hostname.as_str()))
        .collect();
    let mut out = Vec::new();
    for p in peers {
        if p.paths_at_unix == 0 {
            out.push(format!("{}: no paths reported", p.hostname));
            continue;
        }
        for x in &p.paths {
            let to = name.get(x.peer_id.as_str()).copied().unwrap_or(&x.peer_id);
            let hs = match x.last_handshake_secs {
                s if s < 0 => "no handshake".to_string(),
                s => format!("handshake {s} s ago"),
            };
            let why = if x.why.is_empty() {
                String::new()
            } else {
                format!(" (not direct: {})", x.why)
            };
            out.push(format!(
                "{} → {to}: {} {}{why}, {hs}",
                p.hostname, x.path, x.via
            ));
        }
    }
    out.iter()
        .map(|l| canopy_proto::text::escape(l).into_owned())
        .collect()
}

pub fn peers(json: bool, peers: &[Peer]) -> anyhow::Result<()> {
    if json {
        return print_json(Value::Array(peers.iter().map(peer_json).collect()));
    }
    table(
        &[
            "ID",
            "HOSTNAME",
            "DNS",
            "ADDRESSES",
            "ENDPOINTS",
            "STATUS",
            "REVISION",
        ],
        peers
            .iter()
            .map(|p| {
                vec![
                    p.id.clone(),
                    p.hostname.clone(),
                    p.dns_name.clone(),
                    p.addresses.join(","),
                    endpoints_text(p),
                    status_text(p),
                    if p.online {
                        p.acked_revision.to_string()
                    } else {
                        "-".into()
                    },
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn done(json: bool, text: &str, v: Value) -> anyhow::Result<()> {
    if json {
        print_json(v)
    } else {
        say!("{text}");
        Ok(())
    }
}

fn api_token_json(t: &ApiToken) -> Value {
    json!({"id": t.id, "name": t.name, "scope": t.scope, "created_at": t.created_at_unix})
}

pub fn api_tokens(json: bool, tokens: &[ApiToken]) -> anyhow::Result<()> {
    if json {
        return print_json(Value::Array(tokens.iter().map(api_token_json).collect()));
    }
    table(
        &["ID", "NAME", "SCOPE", "CREATED"],
        tokens
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.scope.clone(),
                    time(t.created_at_unix),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn api_token_created(json: bool, t: Option<&ApiToken>, secret: &str) -> anyhow::Result<()> {
    if json {
        return print_json(json!({"token": t.map(api_token_json), "secret": secret}));
    }
    say!("{secret}");
    Ok(())
}

fn subscription_json(s: &Subscription) -> Value {
    let q = s.quotas.unwrap_or_default();
    json!({"tenant_id": s.tenant_id, "org": s.org, "plan": s.plan, "suspended": s.suspended,
           "quotas": {"networks": q.networks, "peers_per_network": q.peers_per_network, "active_join_tokens": q.active_join_tokens, "api_tokens": q.api_tokens}})
}

pub fn signed_up(json: bool, server: &str, r: &SignUpResponse) -> anyhow::Result<()> {
    if json {
        return print_json(
            json!({"tenant_id": r.tenant_id, "api_token": r.api_token, "subscription": r.subscription.as_ref().map(subscription_json)}),
        );
    }
    let plan = r.subscription.as_ref().map_or("", |s| s.plan.as_str());
    say!("tenant {} created on the {plan} plan", r.tenant_id);
    say!("API token (shown once, keep it safe): {}", r.api_token);
    say!("log in with: canopy login --server {server} --token <that token> [--ca CA.pem]");
    Ok(())
}

fn limit(n: u32) -> String {
    if n == u32::MAX {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

pub fn subscription(json: bool, s: &Subscription) -> anyhow::Result<()> {
    if json {
        return print_json(subscription_json(s));
    }
    let q = s.quotas.unwrap_or_default();
    say!("tenant:   {} {}", s.tenant_id, s.org);
    say!(
        "plan:     {}{}",
        s.plan,
        if s.suspended { " (suspended)" } else { "" }
    );
    say!(
        "networks: {}, peers per network: {}, active join tokens: {}, API tokens: {}",
        limit(q.networks),
        limit(q.peers_per_network),
        limit(q.active_join_tokens),
        limit(q.api_tokens)
    );
    Ok(())
}

pub fn usage(json: bool, u: &Usage) -> anyhow::Result<()> {
    let q = u.quotas.unwrap_or_default();
    if json {
        return print_json(
            json!({"plan": u.plan, "networks": u.networks, "active_join_tokens": u.active_join_tokens,
            "quotas": {"networks": q.networks, "peers_per_network": q.peers_per_network, "active_join_tokens": q.active_join_tokens, "api_tokens": q.api_tokens, "relay_mib_per_month": q.relay_mib_per_month},
            "relay_bytes_this_month": u.relay_bytes_this_month,
            "per_network": u.per_network.iter().map(|n| json!({"network_id": n.network_id, "name": n.name, "peers": n.peers, "agents_online": n.agents_online})).collect::<Vec<_>>()}),
        );
    }
    say!(
        "plan {}: {} of {} networks, {} of {} active join tokens",
        u.plan,
        u.networks,
        limit(q.networks),
        u.active_join_tokens,
        limit(q.active_join_tokens)
    );
    let relay_limit = match q.relay_mib_per_month {
        0 => "no limit".to_string(),
        m => format!("{m} MiB"),
    };
    say!(
        "relayed this month: {:.1} MiB of {relay_limit}",
        u.relay_bytes_this_month as f64 / 1048576.0
    );
    table(
        &["NETWORK", "PEERS", "ONLINE"],
        u.per_network
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    format!("{} of {}", n.peers, limit(q.peers_per_network)),
                    n.agents_online.to_string(),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn tenants(json: bool, tenants: &[TenantSummary]) -> anyhow::Result<()> {
    if json {
        return print_json(Value::Array(
            tenants
                .iter()
                .map(|t| json!({"subscription": t.subscription.as_ref().map(subscription_json), "email": t.email, "networks": t.networks, "peers": t.peers, "created_at": t.created_at_unix}))
                .collect(),
        ));
    }
    table(
        &[
            "TENANT", "ORG", "PLAN", "STATE", "NETWORKS", "PEERS", "CREATED",
        ],
        tenants
            .iter()
            .map(|t| {
                let s = t.subscription.clone().unwrap_or_default();
                vec![
                    s.tenant_id,
                    s.org,
                    s.plan,
                    if s.suspended {
                        "suspended".into()
                    } else {
                        "active".into()
                    },
                    t.networks.to_string(),
                    t.peers.to_string(),
                    time(t.created_at_unix),
                ]
            })
            .collect(),
    );
    Ok(())
}

pub fn audit(json: bool, entries: &[AuditEntry]) -> anyhow::Result<()> {
    if json {
        return print_json(Value::Array(
            entries.iter().map(|e| json!({"at_unix_ms": e.at_unix_ms, "actor": e.actor, "action": e.action, "object": e.object, "detail": e.detail})).collect(),
        ));
    }
    table(
        &["WHEN", "ACTOR", "ACTION", "OBJECT", "DETAIL"],
        entries
            .iter()
            .map(|e| {
                vec![
                    time(e.at_unix_ms / 1000),
                    e.actor.clone(),
                    e.action.clone(),
                    e.object.clone(),
                    e.detail.clone(),
                ]
            })
            .collect(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_lines_name_the_peers_and_escape_what_agents_reported() {
        use super::{Peer, path_lines};
        use canopy_proto::v1::PairPath;
        let pair = |to: &str, why: &str| PairPath {
            peer_id: to.into(),
            path: "relayed".into(),
            why: why.into(),
            last_handshake_secs: 3,
            ..Default::default()
        };
        let peers = [
            Peer {
                id: "peer_a".into(),
                hostname: "a".into(),
                paths: vec![pair("peer_b", "no answer\x1b[2J")],
                paths_at_unix: 1,
                ..Default::default()
            },
            Peer {
                id: "peer_b".into(),
                hostname: "b".into(),
                ..Default::default()
            },
        ];
        let lines = path_lines(&peers);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("a → b: relayed  (not direct: no answer"),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains('\x1b'), "{:?}", lines[0]);
        assert_eq!(lines[1], "b: no paths reported");
    }

    #[test]
    fn tables_align_by_display_width_and_escape_every_cell() {
        let rows = vec![
            vec!["web-1".to_string(), "100.64.0.1".to_string()],
            vec!["東京".to_string(), "100.64.0.22".to_string()],
            vec![
                format!("evil{}[2J{}x", '\u{1b}', '\n'),
                "100.64.0.3".to_string(),
            ],
        ];
        let lines = super::render_table(&["HOST", "ADDRESS"], &rows);
        assert_eq!(
            lines.len(),
            4,
            "an embedded newline made no line of its own: {lines:?}"
        );
        assert!(lines[0].starts_with("HOST  ") && lines[1].starts_with("web-1  "));
        // Two wide characters take four columns: the second column still lines up.
        let at = col(&lines[0], "ADDRESS");
        for l in &lines[1..] {
            assert_eq!(col(l, "100.64"), at, "{lines:?}");
        }
        assert!(!lines.concat().contains('\u{1b}'), "{lines:?}");
    }

    /// The display column where `needle` starts (wide characters count two).
    fn col(line: &str, needle: &str) -> usize {
        let at = line.find(needle).unwrap();
        line[..at]
            .chars()
            .map(|c| if c as u32 >= 0x1100 { 2 } else { 1 })
            .sum()
    }
}
