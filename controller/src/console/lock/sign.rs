//! One-off signatures: a peer, a route, a presigned join string, a revocation.

use std::path::PathBuf;

use anyhow::{anyhow, bail};
use canopy_proto::lock::{self, Kind};
use canopy_proto::v1::*;

use super::keys::{b64, key_path, load_key, parse_public, public};
use super::{
    Client, ConnOpts, client, gateway_key, next_set, output, peer_signature, read, reply,
    route_signature, submit,
};

/// `canopy peer sign PEER`: signs one peer as it is now (its key checked against
/// `expect_key` if given), valid for `expires` (`None`: until removed).
pub async fn sign_peer(
    conn: &ConnOpts,
    json: bool,
    peer_id: String,
    key: Option<PathBuf>,
    expect_key: Option<String>,
    expires: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let expires_at_unix = match expires {
        None => 0,
        Some(d) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            i64::try_from((now + d).as_secs())?
        }
    };
    let mut cl = client(conn).await?;
    let p = reply(cl.get_peer(GetPeerRequest { peer_id }).await)?;
    if p.lock_state.is_empty() {
        bail!(
            "network {} is not locked: canopy network lock init",
            p.network_id
        );
    }
    if let Some(want) = expect_key
        && parse_public(&want)? != p.public_key
    {
        bail!(
            "peer {} has key {}, not {want}: not signed",
            p.id,
            b64(&p.public_key)
        );
    }
    let k = load_key(&key_path(key, &p.network_id)?)?;
    let sig = peer_signature(&p, &k, expires_at_unix);
    submit(&mut cl, &p.network_id, vec![sig], Vec::new(), None).await?;
    output::done(
        json,
        &format!(
            "signed peer {} (key {}, {}, tags {})",
            p.id,
            b64(&p.public_key),
            p.addresses.join(","),
            p.tags.join(",")
        ),
        serde_json::json!({"signed": p.id}),
    )
}

/// `canopy token create --presigned`: the join string of token `t` with a delegation of a
/// fresh key (its seed in the join string only), signed with the lock key: the token's tags
/// and uses, lasting `signed_for`.
pub async fn presign_join(
    cl: &mut Client,
    t: &JoinToken,
    join: &str,
    key: Option<PathBuf>,
    signed_for: std::time::Duration,
) -> anyhow::Result<String> {
    let req = GetNetworkLockRequest {
        network: t.network_id.clone(),
    };
    let l = reply(cl.get_network_lock(req).await)?;
    if l.serial == 0 {
        bail!(
            "network {} is not locked: a join string needs no presigning",
            t.network_id
        );
    }
    let k = load_key(&key_path(key, &t.network_id)?)?;
    let seed: [u8; 32] = rand::random();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let d = LockDelegation {
        network_id: t.network_id.clone(),
        key: public(&lock::signing_key(seed)),
        tags: t.tags.clone(),
        max_uses: t.max_uses,
        expires_at_unix: i64::try_from((now + signed_for).as_secs())?,
    };
    let mut j = canopy_proto::join::JoinString::parse(join)?;
    j.lock_delegate = Some((lock::sign(Kind::Delegation, &d, &k), seed));
    Ok(j.encode())
}

/// `canopy route sign ROUTE --network NET`: signs (and so approves) one route.
pub async fn sign_route(
    conn: &ConnOpts,
    json: bool,
    network: &str,
    route_id: &str,
    key: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut cl = client(conn).await?;
    let net = read(&mut cl, network).await?;
    let r = net
        .routes
        .iter()
        .find(|r| r.id == route_id)
        .ok_or_else(|| anyhow!("route {route_id} not found in network {network}"))?;
    let gw = gateway_key(&net, r).ok_or_else(|| anyhow!("route {route_id}'s gateway is gone"))?;
    let k = load_key(&key_path(key, &net.id)?)?;
    let sig = route_signature(r, gw, &k);
    submit(&mut cl, &net.id, Vec::new(), vec![sig], None).await?;
    output::done(
        json,
        &format!("signed route {} ({} via {})", r.id, r.prefix, r.peer_id),
        serde_json::json!({"signed": r.id}),
    )
}

/// Before `canopy peer remove` in a locked network: revokes the peer's key in a new key set
/// (so its old signature can never bring it back), if the signing key is at hand. Returns
/// whether it did.
pub async fn revoke_peer(
    cl: &mut Client,
    peer_id: &str,
    key: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let p = reply(
        cl.get_peer(GetPeerRequest {
            peer_id: peer_id.to_string(),
        })
        .await,
    )?;
    if p.lock_state.is_empty() {
        return Ok(false);
    }
    let path = key_path(key.clone(), &p.network_id)?;
    if key.is_none() && !path.exists() {
        eprintln!(
            "warning: no lock key at {}: {peer_id} is removed but not revoked (pass --key to revoke it)",
            path.display()
        );
        return Ok(false);
    }
    let k = load_key(&path)?;
    let net = read(cl, &p.network_id).await?;
    if net.lock.revoked.len() >= lock::MAX_REVOKED {
        bail!(
            "the network lock revokes {} keys already, the most it can",
            lock::MAX_REVOKED
        );
    }
    let revoke = |s: &mut LockKeySet| s.revoked.push(p.public_key.clone());
    next_set(cl, &net, (&k, &path), revoke).await?;
    Ok(true)
}
