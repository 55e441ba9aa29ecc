//! `convergence --lock`: the same network under the network lock. The tenant locks it before
//! anyone joins and hands out a presigned join string (a delegation signed with its key), so
//! every enrollment is signed by the joining agent itself and checked by the controller and by
//! every other agent. Also times what verifying costs an agent per full map.

use std::time::{Duration, Instant};

use canopy_agent::control::{self, Backoff, ControlClient, NoDataPlane};
use canopy_controller::service::{Caller, Controller};
use canopy_proto::join::JoinString;
use canopy_proto::lock::{self, Kind};
use canopy_proto::v1::{LockDelegation, LockKeySet, NetworkMap};

/// Locks network "bench" with a fresh tenant key and returns a presigned join string for it
/// (tags `tags`, unlimited uses, a day long).
pub async fn presigned_join(
    ctl: &Controller,
    caller: &Caller,
    tags: &[String],
) -> anyhow::Result<JoinString> {
    let k = lock::signing_key(rand::random());
    let net = ctl.get_network(caller, "bench").await?.id;
    let set = LockKeySet {
        network_id: net.clone(),
        keys: vec![k.verifying_key().to_bytes().to_vec()],
        serial: 1,
        revoked: vec![],
    };
    ctl.set_lock_keys(caller, &net, &lock::sign(Kind::KeySet, &set, &k))
        .await?;
    let (_, join) = ctl
        .create_join_token(caller, "bench", 0, 3600, tags)
        .await?;
    let seed: [u8; 32] = rand::random();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let d = LockDelegation {
        network_id: net,
        key: lock::signing_key(seed).verifying_key().to_bytes().to_vec(),
        tags: tags.to_vec(),
        max_uses: 0,
        expires_at_unix: i64::try_from(now.as_secs())? + 86_400,
    };
    let mut j = JoinString::parse(&join)?;
    j.lock_delegate = Some((lock::sign(Kind::Delegation, &d, &k), seed));
    Ok(j)
}

/// Runs a just-enrolled peer's control client until `stop`: under the lock its Hello carries
/// its presigned membership, without which no one takes it.
pub fn follow(
    e: canopy_agent::state::Enrollment,
    map: NetworkMap,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    let mut c = ControlClient::new(e, Some(map), None);
    c.backoff = Backoff::equal(Duration::from_millis(100), Duration::from_secs(2));
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let until = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let _ = c.run(&mut NoDataPlane, until).await;
    });
}

/// What an agent spends checking one full map like `map` (every peer's signature, its routes,
/// the chain): the median of 9 runs, after a first that establishes trust.
pub fn verify_cost(map: &NetworkMap) -> Duration {
    let mut g = canopy_agent::lock::Guard::new(&map.network_id, None, None);
    g.full(&mut map.clone(), 0);
    let mut runs: Vec<Duration> = (0..9)
        .map(|_| {
            let mut m = map.clone();
            let t = Instant::now();
            g.full(&mut m, 0);
            t.elapsed()
        })
        .collect();
    runs.sort();
    runs[4]
}

/// Enrolls one peer with `join`; under the lock, starts its session too.
pub async fn enroll_one(
    join: &JoinString,
    host: &str,
    lock: Option<&tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<String> {
    let key = canopy_agent::keys::PrivateKey::generate().public_key();
    let (e, map) = control::enroll(join, key, host).await?;
    let id = e.peer_id.clone();
    if let Some(stop) = lock {
        follow(e, map, stop);
    }
    Ok(id)
}
