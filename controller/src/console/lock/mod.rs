//! `canopy network lock …`, `canopy peer sign`, `canopy route sign`: the tenant's side of the
//! network lock. The signing key is made and kept here (a file, mode 0600, by default
//! `~/.config/canopy/lock/NETWORK_ID.key`); the controller gets only public keys and
//! signatures.

use std::path::{Path, PathBuf};

use anyhow::bail;
use canopy_proto::lock::{self, Kind, SigningKey};
use canopy_proto::v1::*;
use clap::Subcommand;

use super::{Client, ConnOpts, client, output, reply};

mod keys;
mod sign;

pub use keys::check_pin;
use keys::{b64, create_key, key_path, load_key, parse_public, public, save_pin};
pub use sign::{presign_join, revoke_peer, sign_peer, sign_route};

#[derive(Subcommand, Debug)]
pub enum LockCmd {
    /// Lock a network: make a signing key here (or use --key's), sign every peer and route in
    /// force now, then make the key the network's only trusted key. From then on agents take
    /// only what a trusted key signed.
    Init {
        network: String,
        /// The signing key file (made if absent, mode 0600).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// The trusted keys, what waits for a signature, and what agents refused.
    Status { network: String },
    /// Make a signing key in FILE (mode 0600) and print its public key, for add-key (on
    /// another machine: a second admin, or a key kept offline).
    NewKey { file: PathBuf },
    /// Trust one more signing key (its public key, base64), signed with --key.
    AddKey {
        network: String,
        public_key: String,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Stop trusting a key; what it signed is signed again with --key first.
    RemoveKey {
        network: String,
        public_key: String,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Sign every pending peer (and peers whose tags changed since signed) and every approved
    /// route without a signature.
    SignPending {
        network: String,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

pub(super) fn peer_statement(p: &Peer, expires_at_unix: i64) -> LockedPeer {
    LockedPeer {
        network_id: p.network_id.clone(),
        public_key: p.public_key.clone(),
        addresses: p.addresses.clone(),
        tags: p.tags.clone(),
        expires_at_unix,
        peer_id: p.id.clone(),
    }
}

fn route_signature(r: &Route, gateway_key: &[u8], k: &SigningKey) -> RouteSignature {
    let s = LockedRoute {
        network_id: r.network_id.clone(),
        gateway_public_key: gateway_key.to_vec(),
        prefix: r.prefix.clone(),
    };
    RouteSignature {
        route_id: r.id.clone(),
        signed: Some(lock::sign(Kind::Route, &s, k)),
    }
}

fn peer_signature(p: &Peer, k: &SigningKey, expires: i64) -> PeerSignature {
    PeerSignature {
        peer_id: p.id.clone(),
        signed: Some(lock::sign(Kind::Peer, &peer_statement(p, expires), k)),
    }
}

/// Sends signatures in calls of at most 100 (the policy's with the first).
async fn submit(
    cl: &mut Client,
    network: &str,
    peers: Vec<PeerSignature>,
    routes: Vec<RouteSignature>,
    mut policy: Option<Signed>,
) -> anyhow::Result<()> {
    let mut calls: Vec<SignLockRequest> = Vec::new();
    for chunk in peers.chunks(100) {
        calls.push(SignLockRequest {
            peers: chunk.to_vec(),
            ..Default::default()
        });
    }
    for chunk in routes.chunks(100) {
        calls.push(SignLockRequest {
            routes: chunk.to_vec(),
            ..Default::default()
        });
    }
    if calls.is_empty() && policy.is_some() {
        calls.push(SignLockRequest::default());
    }
    for mut req in calls {
        req.network = network.to_string();
        req.policy = policy.take();
        reply(cl.sign_lock(req).await)?;
    }
    Ok(())
}

fn policy_signature(network_id: &str, text: &str, serial: u64, k: &SigningKey) -> Signed {
    let s = LockedPolicy {
        network_id: network_id.to_string(),
        text_sha256: canopy_proto::sha256(text.as_bytes()).to_vec(),
        serial,
    };
    lock::sign(Kind::Policy, &s, k)
}

/// `canopy policy set` in a locked network: the document's signature, its serial one above
/// the current policy's (`None` when the network is not locked).
pub(super) async fn sign_policy(
    cl: &mut Client,
    network: &str,
    text: &str,
    key: Option<PathBuf>,
) -> anyhow::Result<Option<Signed>> {
    let net = read(cl, network).await?;
    if net.lock.serial == 0 {
        return Ok(None);
    }
    let k = load_key(&key_path(key, &net.id)?)?;
    let serial = net
        .policy
        .lock
        .and_then(|s| prost::Message::decode(s.body.as_slice()).ok())
        .map_or(0, |p: LockedPolicy| p.serial);
    Ok(Some(policy_signature(&net.id, text, serial + 1, &k)))
}

struct Net {
    id: String,
    lock: NetworkLock,
    peers: Vec<Peer>,
    routes: Vec<Route>,
    policy: Policy,
}

async fn read(cl: &mut Client, network: &str) -> anyhow::Result<Net> {
    let n = reply(
        cl.get_network(GetNetworkRequest {
            network: network.to_string(),
        })
        .await,
    )?;
    let lock = reply(
        cl.get_network_lock(GetNetworkLockRequest {
            network: n.id.clone(),
        })
        .await,
    )?;
    let peers = reply(
        cl.list_peers(ListPeersRequest {
            network: n.id.clone(),
            paths: false,
        })
        .await,
    )?
    .peers;
    let routes = reply(
        cl.list_routes(ListRoutesRequest {
            network: n.id.clone(),
        })
        .await,
    )?
    .routes;
    let policy = reply(
        cl.get_policy(GetPolicyRequest {
            network: n.id.clone(),
        })
        .await,
    )?;
    Ok(Net {
        id: n.id,
        lock,
        peers,
        routes,
        policy,
    })
}

fn gateway_key<'a>(net: &'a Net, r: &Route) -> Option<&'a [u8]> {
    let gw = net.peers.iter().find(|p| p.id == r.peer_id)?;
    Some(&gw.public_key)
}

/// The next key set: the current one changed by `change`, serial one more, signed with `k`.
async fn next_set(
    cl: &mut Client,
    net: &Net,
    (k, path): (&SigningKey, &Path),
    change: impl FnOnce(&mut LockKeySet),
) -> anyhow::Result<NetworkLock> {
    if net.lock.serial == 0 {
        bail!("network {} is not locked: canopy network lock init", net.id);
    }
    if !net.lock.keys.contains(&public(k)) {
        bail!("this signing key is not one the network trusts");
    }
    let mut set = LockKeySet {
        network_id: net.id.clone(),
        keys: net.lock.keys.clone(),
        serial: net.lock.serial + 1,
        revoked: net.lock.revoked.clone(),
    };
    change(&mut set);
    let req = SetLockKeysRequest {
        network: net.id.clone(),
        key_set: Some(lock::sign(Kind::KeySet, &set, k)),
    };
    let l = reply(cl.set_lock_keys(req).await)?;
    save_pin(path, &l)?;
    Ok(l)
}

pub async fn run(conn: &ConnOpts, json: bool, c: LockCmd) -> anyhow::Result<()> {
    // Offline: no controller involved.
    if let LockCmd::NewKey { file } = c {
        let k = create_key(&file)?;
        let key = b64(&public(&k));
        let text = format!(
            "{key}\n(key kept in {}; add it with `canopy network lock add-key NETWORK {key}`)",
            file.display()
        );
        let v = serde_json::json!({"public_key": key, "file": file});
        return output::done(json, &text, v);
    }
    let mut cl = client(conn).await?;
    match c {
        LockCmd::NewKey { .. } => unreachable!("handled above"),
        LockCmd::Init { network, key } => init(&mut cl, json, &network, key).await,
        LockCmd::Status { network } => {
            let net = read(&mut cl, &network).await?;
            lock_status(json, &net.lock, &net.peers)
        }
        LockCmd::AddKey {
            network,
            public_key,
            key,
        } => {
            let new = parse_public(&public_key)?;
            let net = read(&mut cl, &network).await?;
            let path = key_path(key, &net.id)?;
            let k = load_key(&path)?;
            if net.lock.keys.contains(&new) {
                bail!("the network already trusts {public_key}");
            }
            let l = next_set(&mut cl, &net, (&k, &path), |s| s.keys.push(new)).await?;
            lock_status(json, &l, &net.peers)
        }
        LockCmd::RemoveKey {
            network,
            public_key,
            key,
        } => remove_key(&mut cl, json, &network, &public_key, key).await,
        LockCmd::SignPending { network, key } => sign_pending(&mut cl, json, &network, key).await,
    }
}

async fn init(
    cl: &mut Client,
    json: bool,
    network: &str,
    key: Option<PathBuf>,
) -> anyhow::Result<()> {
    let net = read(cl, network).await?;
    if net.lock.serial != 0 {
        bail!(
            "network {} is locked already (key set {}): use add-key",
            net.id,
            net.lock.serial
        );
    }
    let path = key_path(key, &net.id)?;
    let k = match path.exists() {
        true => load_key(&path)?,
        false => create_key(&path)?,
    };
    let peers: Vec<PeerSignature> = net.peers.iter().map(|p| peer_signature(p, &k, 0)).collect();
    let in_force = net.routes.iter().filter(|r| r.state != "pending");
    let routes: Vec<RouteSignature> = in_force
        .filter_map(|r| Some(route_signature(r, gateway_key(&net, r)?, &k)))
        .collect();
    let (np, nr) = (peers.len(), routes.len());
    let p = &net.policy;
    let policy = (p.revision != 0).then(|| policy_signature(&net.id, &p.text, 1, &k));
    submit(cl, &net.id, peers, routes, policy).await?;
    let set = LockKeySet {
        network_id: net.id.clone(),
        keys: vec![public(&k)],
        serial: 1,
        revoked: Vec::new(),
    };
    let req = SetLockKeysRequest {
        network: net.id.clone(),
        key_set: Some(lock::sign(Kind::KeySet, &set, &k)),
    };
    let l = reply(cl.set_lock_keys(req).await)?;
    save_pin(&path, &l)?;
    output::done(
        json,
        &format!(
            "locked network {} with key {} (kept in {}; keep a copy offline)\nsigned {np} peers and {nr} routes; new peers wait for `canopy peer sign`.\nJoin strings made from now on pin this key set: make new ones.",
            net.id,
            b64(&public(&k)),
            path.display()
        ),
        serde_json::json!({"network_id": net.id, "key": b64(&public(&k)), "key_file": path,
            "signed_peers": np, "signed_routes": nr}),
    )
}

async fn remove_key(
    cl: &mut Client,
    json: bool,
    network: &str,
    public_key: &str,
    key: Option<PathBuf>,
) -> anyhow::Result<()> {
    let gone = parse_public(public_key)?;
    let net = read(cl, network).await?;
    let path = key_path(key, &net.id)?;
    let k = load_key(&path)?;
    if public(&k) == gone {
        bail!("sign the removal of a key with another key of the network");
    }
    if !net.lock.keys.contains(&gone) {
        bail!("the network does not trust {public_key}");
    }
    // What the key signed, signed again with ours (only statements it really signed).
    let by_gone = |s: &Option<Signed>| s.as_ref().filter(|s| s.key == gone).cloned();
    let again = |kind, s: &Signed| resign(kind, s, &gone, &k, |_: &mut LockedPeer| {});
    let mut peers = Vec::new();
    for p in &net.peers {
        if let Some(s) = by_gone(&p.lock) {
            let signed = Some(again(Kind::Peer, &s)?);
            let peer_id = p.id.clone();
            peers.push(PeerSignature { peer_id, signed });
        }
    }
    let mut routes = Vec::new();
    for r in &net.routes {
        if let Some(s) = by_gone(&r.lock) {
            let signed = Some(resign(
                Kind::Route,
                &s,
                &gone,
                &k,
                |_: &mut LockedRoute| {},
            )?);
            let route_id = r.id.clone();
            routes.push(RouteSignature { route_id, signed });
        }
    }
    let next_serial = |p: &mut LockedPolicy| p.serial += 1;
    let policy = by_gone(&net.policy.lock)
        .map(|s| resign(Kind::Policy, &s, &gone, &k, next_serial))
        .transpose()?;
    submit(cl, &net.id, peers, routes, policy).await?;
    let l = next_set(cl, &net, (&k, &path), |s| s.keys.retain(|x| x != &gone)).await?;
    lock_status(json, &l, &net.peers)
}

/// A statement `gone` really signed (checked), changed by `change`, signed again with `k`.
fn resign<M: prost::Message + Default>(
    kind: Kind,
    s: &Signed,
    gone: &[u8],
    k: &SigningKey,
    change: impl FnOnce(&mut M),
) -> anyhow::Result<Signed> {
    let mut st: M = lock::verify(kind, s, &[gone.to_vec()])?;
    change(&mut st);
    Ok(lock::sign(kind, &st, k))
}

async fn sign_pending(
    cl: &mut Client,
    json: bool,
    network: &str,
    key: Option<PathBuf>,
) -> anyhow::Result<()> {
    let net = read(cl, network).await?;
    let k = load_key(&key_path(key, &net.id)?)?;
    let pending = net
        .peers
        .iter()
        .filter(|p| matches!(p.lock_state.as_str(), "pending" | "stale"));
    let mut lines = Vec::new();
    let mut peers = Vec::new();
    for p in pending {
        lines.push(format!(
            "signed peer {} ({}, key {}, {}, tags {})",
            p.id,
            canopy_proto::text::escape(&p.hostname),
            b64(&p.public_key),
            p.addresses.join(","),
            p.tags.join(",")
        ));
        peers.push(peer_signature(p, &k, 0));
    }
    let unsigned = net
        .routes
        .iter()
        .filter(|r| r.lock.is_none() && r.state == "approved");
    let mut routes = Vec::new();
    for r in unsigned {
        if let Some(gw) = gateway_key(&net, r) {
            lines.push(format!(
                "signed route {} ({} via {})",
                r.id, r.prefix, r.peer_id
            ));
            routes.push(route_signature(r, gw, &k));
        }
    }
    let (np, nr) = (peers.len(), routes.len());
    submit(cl, &net.id, peers, routes, None).await?;
    lines.push(format!("{np} peers and {nr} routes signed"));
    output::done(
        json,
        &lines.join("\n"),
        serde_json::json!({"signed_peers": np, "signed_routes": nr}),
    )
}

/// `canopy network lock status`.
fn lock_status(json: bool, l: &NetworkLock, peers: &[Peer]) -> anyhow::Result<()> {
    let keys: Vec<String> = l.keys.iter().map(|k| b64(k)).collect();
    let pending: Vec<&Peer> = peers.iter().filter(|p| p.lock_state == "pending").collect();
    if json {
        let v = serde_json::json!({"network_id": l.network_id, "locked": l.serial != 0,
            "serial": l.serial, "keys": keys, "revoked": l.revoked.len(),
            "pending_peers": l.pending_peers, "unsigned_routes": l.unsigned_routes,
            "refused": l.refused, "refusing_agents": l.refusing_agents,
            "pending": pending.iter().map(|p| &p.id).collect::<Vec<_>>()});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if l.serial == 0 {
        println!("network {} is not locked", l.network_id);
        return Ok(());
    }
    println!("network:   {} (locked, key set {})", l.network_id, l.serial);
    for k in &keys {
        println!("key:       {k}");
    }
    println!("revoked:   {} peer keys", l.revoked.len());
    println!(
        "pending:   {} peers, {} routes without a signature",
        l.pending_peers, l.unsigned_routes
    );
    for p in pending {
        println!(
            "  {} {} key {} (canopy peer sign {})",
            p.id,
            canopy_proto::text::escape(&p.hostname),
            b64(&p.public_key),
            p.id
        );
    }
    println!(
        "refused:   {} unsigned peers/routes, by {} agents (on this replica)",
        l.refused, l.refusing_agents
    );
    Ok(())
}
