//! Console output: aligned tables for people, `--json` for scripts.
#![allow(clippy::print_stdout)]

use canopy_proto::v1::{JoinToken, Network, Peer};
use serde_json::{Value, json};

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
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
    json!({"id": n.id, "name": n.name, "cidrs": n.cidrs, "created_at": n.created_at_unix, "revision": n.revision})
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
        &["ID", "NAME", "CIDRS", "CREATED"],
        nets.iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    n.name.clone(),
                    n.cidrs.join(","),
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
    println!("{join}");
    Ok(())
}

fn peer_json(p: &Peer) -> Value {
    use base64::Engine as _;
    json!({"id": p.id, "network_id": p.network_id, "hostname": p.hostname,
           "public_key": base64::engine::general_purpose::STANDARD.encode(&p.public_key),
           "addresses": p.addresses, "endpoints": p.endpoints, "tags": p.tags,
           "online": p.online, "acked_revision": p.acked_revision, "created_at": p.created_at_unix})
}

pub fn peers(json: bool, peers: &[Peer]) -> anyhow::Result<()> {
    if json {
        return print_json(Value::Array(peers.iter().map(peer_json).collect()));
    }
    table(
        &[
            "ID",
            "HOSTNAME",
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
                    p.addresses.join(","),
                    if p.endpoints.is_empty() {
                        "-".into()
                    } else {
                        p.endpoints.join(",")
                    },
                    if p.online {
                        "online".into()
                    } else {
                        "offline".into()
                    },
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
        println!("{text}");
        Ok(())
    }
}
