//! Enrollment: a join token, a public key and a credential become a peer with addresses.
//!
//! The operation reads (token, network, used addresses, peer count, tenant), the pure
//! functions below decide (is the request well formed, may the token be used, is there room
//! under the plan, which addresses), and one transaction conditioned on everything read
//! writes the peer, its addresses, its DNS name, its key and credential index and the token's
//! use count.

use std::collections::HashSet;
use std::net::IpAddr;

use canopy_proto::v1::{EnrollResponse, IndexRecord, JoinTokenRecord, NetworkRecord, PeerRecord};
use prost::Message;
use rand::seq::IndexedRandom as _;

use super::tokens::check_token_usable;
use super::{Controller, decode};
use crate::error::{Error, Result};
use crate::model;
use crate::plans::Plan;
use crate::secret::{self, Secret};
use crate::store::{Compare, Op, Revision, Txn};
use crate::{ipam, keys};

/// An enrollment request that passed the checks that need no store.
#[derive(Debug)]
pub(super) struct EnrollRequest {
    pub public_key: [u8; 32],
    pub token_hash: [u8; 32],
    pub credential: Secret,
    /// The agent made the credential itself (so a retry of a lost answer is recognised).
    pub proposed: bool,
}

/// Checks a request's fields and makes (or takes) the peer's credential.
pub(super) fn check_request(
    token: &str,
    public_key: &[u8],
    hostname: &str,
    listen_port: u32,
    proposed_credential: &str,
) -> Result<EnrollRequest> {
    let key = model::validate_public_key(public_key)?;
    model::validate_hostname(hostname)?;
    if listen_port > u32::from(u16::MAX) {
        return Err(Error::InvalidArgument(format!(
            "listen port {listen_port} is out of range"
        )));
    }
    if !token.starts_with(secret::JOIN_TOKEN) {
        return Err(Error::Unauthenticated(
            "that is not a join token (join tokens start with 'cjt_')".into(),
        ));
    }
    let credential = if proposed_credential.is_empty() {
        Secret::generate(secret::CREDENTIAL)
    } else if secret::well_formed(proposed_credential, secret::CREDENTIAL) {
        Secret::from_string(proposed_credential.to_string())
    } else {
        return Err(Error::InvalidArgument(
            "credential must be 'cpc_' and 43 base64url characters".into(),
        ));
    };
    Ok(EnrollRequest {
        public_key: key,
        token_hash: Secret::from_string(token.to_string()).hash(),
        credential,
        proposed: !proposed_credential.is_empty(),
    })
}

/// Whether a network holding `count` peers may take one more under `plan`.
pub(super) fn check_peer_quota(plan: Plan, count: u64) -> Result<()> {
    let limit = plan.quotas().peers_per_network;
    if count >= u64::from(limit) {
        return Err(Error::ResourceExhausted(format!(
            "the {} plan allows {limit} peers per network",
            plan.name()
        )));
    }
    Ok(())
}

/// One free address per CIDR of `net`, not in `used`. The lowest free one: a lost race
/// re-reads and takes the next (a failed transaction costs no fsync); from `attempt` 8 on,
/// under heavy contention, one of the lowest 16 at random.
pub(super) fn pick_addresses(
    net: &NetworkRecord,
    used: &HashSet<IpAddr>,
    attempt: usize,
    rng: &mut impl rand::Rng,
) -> Result<Vec<IpAddr>> {
    let want = if attempt < 8 { 1 } else { 16 };
    net.cidrs
        .iter()
        .filter_map(|c| model::parse_cidr(c).ok())
        .map(|cidr| {
            ipam::free_hosts(&cidr, used, want)
                .choose(rng)
                .copied()
                .ok_or_else(|| {
                    Error::ResourceExhausted(format!(
                        "network {} has no free address left in {cidr}",
                        canopy_proto::text::quoted(&net.name)
                    ))
                })
        })
        .collect()
}

fn index(id: String) -> Vec<u8> {
    IndexRecord {
        id,
        ..Default::default()
    }
    .encode_to_vec()
}

/// What an enrollment read, to decide and to condition its transaction on.
struct Reads {
    token: JoinTokenRecord,
    token_rev: Revision,
    net: NetworkRecord,
    net_rev: Revision,
}

impl Controller {
    /// Enrolls a node: checks the join token, claims one address per network CIDR, counts the
    /// token use and creates the peer, all in one transaction (retried on conflict).
    /// [`Self::enroll`] with the fields of an `EnrollRequest`.
    pub async fn enroll_request(
        &self,
        r: &canopy_proto::v1::EnrollRequest,
    ) -> Result<EnrollResponse> {
        self.enroll(
            &r.join_token,
            &r.public_key,
            &r.hostname,
            r.listen_port,
            &r.credential,
        )
        .await
    }

    pub async fn enroll(
        &self,
        token: &str,
        public_key: &[u8],
        hostname: &str,
        listen_port: u32,
        proposed_credential: &str,
    ) -> Result<EnrollResponse> {
        let req = &check_request(
            token,
            public_key,
            hostname,
            listen_port,
            proposed_credential,
        )?;
        crate::txn::retry("enroll", |attempt| async move {
            let reads = self.enroll_reads(&req.token_hash).await?;
            let (net, key) = (&reads.net, &req.public_key);
            let pubkey_key = keys::pubkey(&net.id, key);
            if let Some(kv) = self.store.get(pubkey_key.as_bytes()).await? {
                return self
                    .answer_again(req, net, &decode::<IndexRecord>(&kv)?.id)
                    .await;
            }
            check_token_usable(&reads.token, self.now_unix())?;
            // A credential the agent proposed must be new (a removed peer's, too).
            let cred_key = keys::credential(&req.credential.hash());
            if self.store.get(cred_key.as_bytes()).await?.is_some() {
                return Err(Error::AlreadyExists(
                    "this credential is already in use; make a new one".into(),
                ));
            }
            let used = self.used_addresses(&net.id).await?;
            let names = self.index_keys(&keys::dnsnames(&net.id)).await?;
            // The tenant as it is now (suspension, plan change, deletion).
            let tenant = self.tenant_guard(&reads.token.tenant_id).await?;
            let mut txn = Txn::new()
                .when(tenant.compare)
                .when(Compare::unchanged(
                    keys::token(&reads.token.tenant_id, &reads.token.id),
                    reads.token_rev,
                ))
                .when(Compare::unchanged(
                    keys::network(&net.tenant_id, &net.id),
                    reads.net_rev,
                ))
                .when(Compare::absent(pubkey_key));
            txn = self.count_peer(txn, tenant.plan, &net.id).await?;
            let ips = pick_addresses(net, &used, attempt, &mut rand::rng())?;
            let peer = PeerRecord {
                id: secret::new_id("peer_"),
                tenant_id: reads.token.tenant_id.clone(),
                network_id: net.id.clone(),
                public_key: key.to_vec(),
                addresses: ips.iter().map(|ip| model::host_prefix(*ip)).collect(),
                hostname: hostname.to_string(),
                tags: reads.token.tags.clone(),
                endpoints: Vec::new(),
                created_at_unix: self.now_unix(),
                credential_hash: req.credential.hash().to_vec(),
                join_token_id: reads.token.id.clone(),
                exit_node: String::new(),
                outside: Vec::new(),
                dns_name: crate::names::pick(hostname, &names),
                // In a locked network: pending until the tenant signs it.
                lock: None,
                lock_delegation: None,
            };
            let txn = enroll_writes(txn, &reads.token, &peer, &ips, req);
            if !self.store.txn(txn).await?.succeeded {
                return Ok(None);
            }
            self.enrolled(&reads.token, &peer, req, net).await.map(Some)
        })
        .await
    }

    /// The join token a hash names and its network, with the revisions they were read at.
    async fn enroll_reads(&self, token_hash: &[u8; 32]) -> Result<Reads> {
        let invalid = || Error::Unauthenticated("join token is not valid".into());
        let idx = self
            .store
            .get(keys::tokenhash(token_hash).as_bytes())
            .await?
            .ok_or_else(invalid)?;
        let index = decode::<IndexRecord>(&idx)?.id;
        let (tenant, token_id) = index
            .split_once('/')
            .ok_or_else(|| Error::Internal("malformed join token index".into()))?;
        let tok_kv = self
            .store
            .get(keys::token(tenant, token_id).as_bytes())
            .await?
            .ok_or_else(invalid)?;
        let token: JoinTokenRecord = decode(&tok_kv)?;
        let net_kv = self
            .store
            .get(keys::network(&token.tenant_id, &token.network_id).as_bytes())
            .await?
            .ok_or_else(|| Error::NotFound("the token's network has been deleted".into()))?;
        Ok(Reads {
            token,
            token_rev: tok_kv.mod_revision,
            net: decode(&net_kv)?,
            net_rev: net_kv.mod_revision,
        })
    }

    /// The key is already a peer. With the same credential that is an enrollment whose answer
    /// was lost: give it back (nothing written, no token use spent). Otherwise a conflict.
    async fn answer_again(
        &self,
        req: &EnrollRequest,
        net: &NetworkRecord,
        peer_id: &str,
    ) -> Result<Option<EnrollResponse>> {
        if req.proposed
            && let Some(p) = self
                .store
                .get(keys::peer(&net.id, peer_id).as_bytes())
                .await?
            && req
                .credential
                .matches(&decode::<PeerRecord>(&p)?.credential_hash)
        {
            tracing::info!(peer = %peer_id, network = %net.id, "enrollment retried; answering it again");
            let map = self.map_from_store(net, peer_id).await?;
            return Ok(Some(EnrollResponse {
                peer_id: peer_id.to_string(),
                network_id: net.id.clone(),
                credential: req.credential.expose().to_string(),
                map: Some(map),
            }));
        }
        Err(Error::AlreadyExists(format!(
            "this public key is already a peer of network {}",
            canopy_proto::text::quoted(&net.name)
        )))
    }

    async fn used_addresses(&self, network_id: &str) -> Result<HashSet<IpAddr>> {
        Ok(self
            .index_keys(&keys::ipams(network_id))
            .await?
            .iter()
            .filter_map(|k| k.parse().ok())
            .collect())
    }

    /// The last segment of every key under `prefix` (an index: addresses, DNS names).
    async fn index_keys(&self, prefix: &str) -> Result<HashSet<String>> {
        Ok(self
            .store
            .range(prefix.as_bytes())
            .await?
            .kvs
            .iter()
            .filter_map(|kv| kv.key.rsplit(|b| *b == b'/').next())
            .filter_map(|k| Some(std::str::from_utf8(k).ok()?.to_string()))
            .collect())
    }

    /// The plan's peer quota, counted under netpeers/<net>, which the transaction is then
    /// conditioned on and advances (only when the plan has a quota: no extra contention
    /// otherwise). The key holds the count the last enrollment left; a removal writes
    /// "recount" there, and then (or for a key from before counts) the peers are counted.
    async fn count_peer(&self, txn: Txn, plan: Plan, network_id: &str) -> Result<Txn> {
        if plan.quotas().peers_per_network == u32::MAX {
            return Ok(txn);
        }
        let ver_key = keys::netpeers(network_id);
        let ver = self.store.get(ver_key.as_bytes()).await?;
        let ver_rev = ver.as_ref().map_or(0, |kv| kv.mod_revision);
        let counted = ver
            .as_ref()
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u64>().ok());
        let count = match counted {
            Some(n) => n,
            None => self
                .store
                .range(keys::peers(network_id).as_bytes())
                .await?
                .kvs
                .len() as u64,
        };
        check_peer_quota(plan, count)?;
        Ok(txn
            .when(Compare::unchanged(ver_key.clone(), ver_rev))
            .then(Op::put(ver_key, (count + 1).to_string())))
    }

    /// After the commit: the log, the audit entry and the answer with the map as of the
    /// enrollment's revision, read from the store (the cache may lag).
    async fn enrolled(
        &self,
        token: &JoinTokenRecord,
        peer: &PeerRecord,
        req: &EnrollRequest,
        net: &NetworkRecord,
    ) -> Result<EnrollResponse> {
        tracing::info!(peer = %peer.id, network = %net.id, addresses = ?peer.addresses, "peer enrolled");
        let what = format!("{} {}", peer.hostname, peer.addresses.join(","));
        self.audit(&token.tenant_id, &token.id, "peer.enroll", &peer.id, &what)
            .await;
        Ok(EnrollResponse {
            peer_id: peer.id.clone(),
            network_id: net.id.clone(),
            credential: req.credential.expose().to_string(),
            map: Some(self.map_from_store(net, &peer.id).await?),
        })
    }

    pub(super) async fn map_from_store(
        &self,
        net: &NetworkRecord,
        peer_id: &str,
    ) -> Result<canopy_proto::v1::NetworkMap> {
        let r = self.store.range(keys::peers(&net.id).as_bytes()).await?;
        let mut state = crate::netmap::NetState::new(net.clone(), r.revision);
        for kv in &r.kvs {
            state.put_peer(decode(kv)?, kv.mod_revision);
        }
        state
            .full_map(peer_id, r.revision)
            .ok_or_else(|| Error::NotFound("peer was removed".into()))
    }
}

/// The enrollment's writes: each address claimed if still free, the token's use counted, the
/// peer, its key index and its credential index (the credential still unused).
fn enroll_writes(
    mut txn: Txn,
    token: &JoinTokenRecord,
    peer: &PeerRecord,
    ips: &[IpAddr],
    req: &EnrollRequest,
) -> Txn {
    let net = &peer.network_id;
    for ip in ips {
        let k = keys::ipam(net, ip);
        txn = txn
            .when(Compare::absent(k.clone()))
            .then(Op::put(k, index(peer.id.clone())));
    }
    let mut used = token.clone();
    used.uses += 1;
    // Claimed like an address: two enrollments picking one name cannot both commit.
    let name_key = keys::dnsname(net, &peer.dns_name);
    txn = txn
        .when(Compare::absent(name_key.clone()))
        .then(Op::put(name_key, index(peer.id.clone())));
    let cred_key = keys::credential(&req.credential.hash());
    txn.then(Op::put(
        keys::token(&token.tenant_id, &token.id),
        used.encode_to_vec(),
    ))
    .then(Op::put(keys::peer(net, &peer.id), peer.encode_to_vec()))
    .then(Op::put(
        keys::pubkey(net, &req.public_key),
        index(peer.id.clone()),
    ))
    .when(Compare::absent(cred_key.clone()))
    .then(Op::put(cred_key, index(format!("{net}/{}", peer.id))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(cidrs: &[&str]) -> NetworkRecord {
        NetworkRecord {
            name: "prod".into(),
            cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_lowest_free_address_of_each_cidr_is_taken() {
        let n = net(&["100.64.0.0/29", "fd00::/125"]);
        let used: HashSet<IpAddr> = ["100.64.0.1".parse().unwrap()].into();
        let ips = pick_addresses(&n, &used, 0, &mut rand::rng()).unwrap();
        assert_eq!(
            ips,
            vec![
                "100.64.0.2".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_full_cidr_names_itself_and_the_network() {
        let n = net(&["100.64.0.0/30"]);
        let used: HashSet<IpAddr> = ["100.64.0.1", "100.64.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let e = pick_addresses(&n, &used, 0, &mut rand::rng()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network \"prod\" has no free address left in 100.64.0.0/30"
        );
    }

    #[test]
    fn under_contention_addresses_spread_over_the_lowest_free_ones() {
        let n = net(&["100.64.0.0/24"]);
        let seen: HashSet<IpAddr> = (0..200)
            .map(|_| pick_addresses(&n, &HashSet::new(), 8, &mut rand::rng()).unwrap()[0])
            .collect();
        assert!(seen.len() > 1 && seen.len() <= 16, "{seen:?}");
    }

    #[test]
    fn the_peer_quota_counts_what_the_network_holds() {
        let limit = Plan::Free.quotas().peers_per_network;
        assert!(check_peer_quota(Plan::Free, u64::from(limit) - 1).is_ok());
        let e = check_peer_quota(Plan::Free, u64::from(limit)).unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("{limit} peers per network"))
        );
    }

    #[test]
    fn requests_are_checked_before_any_read() {
        let key = [9u8; 32];
        let good = Secret::generate(secret::CREDENTIAL);
        let ok = check_request("cjt_x", &key, "web-1", 51820, good.expose()).unwrap();
        assert!(ok.proposed);
        assert_eq!(ok.credential.hash(), good.hash());
        let fresh = check_request("cjt_x", &key, "web-1", 0, "").unwrap();
        assert!(!fresh.proposed, "no credential proposed: one is made");
        let code = |r: Result<EnrollRequest>| match r.unwrap_err() {
            Error::InvalidArgument(_) => "invalid",
            Error::Unauthenticated(_) => "unauthenticated",
            other => panic!("{other:?}"),
        };
        let short_key: &[u8] = &[0u8; 5];
        // (what, token, key, hostname, port, credential, the answer's kind)
        type Case<'a> = (&'a str, &'a str, &'a [u8], &'a str, u32, &'a str, &'a str);
        let refused: [Case; 5] = [
            (
                "port out of range",
                "cjt_x",
                &key,
                "web-1",
                70000,
                "",
                "invalid",
            ),
            (
                "an API token",
                "cat_x",
                &key,
                "web-1",
                0,
                "",
                "unauthenticated",
            ),
            (
                "a space in the hostname",
                "cjt_x",
                &key,
                "web 1",
                0,
                "",
                "invalid",
            ),
            (
                "a short credential",
                "cjt_x",
                &key,
                "web-1",
                0,
                "cpc_short",
                "invalid",
            ),
            ("a short key", "cjt_x", short_key, "web-1", 0, "", "invalid"),
        ];
        for (what, token, key, host, port, cred, expected) in refused {
            let got = code(check_request(token, key, host, port, cred));
            assert_eq!(got, expected, "{what}");
        }
    }
}
