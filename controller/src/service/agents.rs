//! What agents do after enrolling: authenticate, report endpoints, follow their map.

use canopy_proto::v1::{IndexRecord, PairPath, PeerRecord};
use prost::Message;

use super::{AgentIdentity, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::model;
use crate::netmap::Update;
use crate::secret::{self, Secret};
use crate::store::{Compare, Op, Revision, Txn};

/// Endpoints an agent may report.
const MAX_ENDPOINTS: usize = canopy_proto::MAX_ENDPOINTS;

impl Controller {
    /// A relay ticket for agent `id` (its network and WireGuard key, valid
    /// [`TICKET_SECONDS`](crate::server::relay::TICKET_SECONDS)); `None` without a relay key or
    /// before the cache knows the peer.
    pub fn relay_ticket(&self, id: &AgentIdentity) -> Option<canopy_proto::v1::RelayTicket> {
        if self.relay_secret.is_empty() {
            return None;
        }
        let peer = self.cache.peer(&id.network_id, &id.peer_id)?;
        let expires = u64::try_from(self.now_unix()).ok()? + crate::server::relay::TICKET_SECONDS;
        let t = canopy_proto::relay::Ticket {
            network_id: id.network_id.clone(),
            public_key: peer.public_key.as_slice().try_into().ok()?,
            expires_unix: expires,
        };
        Some(canopy_proto::v1::RelayTicket {
            ticket: t.mint(&self.relay_secret),
            expires_at_unix: i64::try_from(expires).ok()?,
            relays: self.relays.iter().map(ToString::to_string).collect(),
        })
    }

    /// Checks an agent's Sync credential. A credential whose peer was removed answers
    /// [`Error::PeerRemoved`]: possession of the credential is what entitles the caller to
    /// learn it, and it costs the same one read as any other check.
    pub async fn authenticate_agent(&self, bearer: &str) -> Result<AgentIdentity> {
        let invalid = || Error::Unauthenticated("peer credential is not valid".into());
        // Cheap checks first: a flood of garbage costs no store read.
        if !bearer.starts_with(secret::CREDENTIAL) || bearer.len() > 128 {
            return Err(invalid());
        }
        let secret = Secret::from_string(bearer.to_string());
        let hash = secret.hash();
        let kv = self
            .store
            .get(keys::credential(&hash).as_bytes())
            .await?
            .ok_or_else(invalid)?;
        let idx = decode::<IndexRecord>(&kv)?;
        let (network_id, peer_id) = idx.id.split_once('/').ok_or_else(invalid)?;
        if idx.removed_at_unix != 0 {
            return Err(Error::PeerRemoved {
                network_id: network_id.to_string(),
                peer_id: peer_id.to_string(),
            });
        }
        let peer = self
            .store
            .get(keys::peer(network_id, peer_id).as_bytes())
            .await?
            .ok_or_else(invalid)?;
        if !secret.matches(&decode::<PeerRecord>(&peer)?.credential_hash) {
            return Err(invalid());
        }
        Ok(AgentIdentity {
            network_id: network_id.to_string(),
            peer_id: peer_id.to_string(),
            credential_hash: hash,
        })
    }

    /// Records the endpoints an agent reports (its own, and where it is seen from outside its
    /// NAT), if they changed.
    pub async fn report_endpoints(
        &self,
        id: &AgentIdentity,
        endpoints: &[String],
        outside: &[String],
    ) -> Result<()> {
        if endpoints.len() > MAX_ENDPOINTS || outside.len() > canopy_proto::MAX_OUTSIDE {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_ENDPOINTS} endpoints and {} outside addresses",
                canopy_proto::MAX_OUTSIDE
            )));
        }
        for e in endpoints.iter().chain(outside) {
            model::parse_endpoint(e)?;
        }
        let key = &keys::peer(&id.network_id, &id.peer_id);
        crate::txn::retry("record endpoints", |_| async move {
            let Some(kv) = self.store.get(key.as_bytes()).await? else {
                return Err(Error::NotFound("peer was removed".into()));
            };
            let mut p: PeerRecord = decode(&kv)?;
            if p.endpoints == endpoints && p.outside == outside {
                return Ok(Some(()));
            }
            p.endpoints = endpoints.to_vec();
            p.outside = outside.to_vec();
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), kv.mod_revision))
                        .then(Op::put(key.clone(), p.encode_to_vec())),
                )
                .await?;
            Ok(r.succeeded.then_some(()))
        })
        .await
    }

    /// Records how agent `id` reaches its peers (what `peer list --paths` and `peer show`
    /// show), as merged and checked by its session (`health`).
    pub async fn report_paths(&self, id: &AgentIdentity, pairs: Vec<PairPath>) -> Result<()> {
        let record = canopy_proto::v1::PathsRecord {
            pairs,
            at_unix: self.now_unix(),
        };
        let (key, peer) = (
            &keys::paths(&id.network_id, &id.peer_id),
            &keys::peer(&id.network_id, &id.peer_id),
        );
        let value = &record.encode_to_vec();
        // Only while the peer exists (a removed one's record would outlive it).
        crate::txn::retry("record paths", |_| async move {
            let Some(kv) = self.store.get(peer.as_bytes()).await? else {
                return Err(Error::NotFound("peer was removed".into()));
            };
            let txn = Txn::new()
                .when(Compare::unchanged(peer.clone(), kv.mod_revision))
                .then(Op::put(key.clone(), value.clone()));
            Ok(self.store.txn(txn).await?.succeeded.then_some(()))
        })
        .await
    }

    /// Whether the store says this agent's peer was removed (its credential entry is marked).
    /// Only this, never a lagging cache or a missing record, tells an agent it was removed.
    pub async fn was_removed(&self, id: &AgentIdentity) -> Result<bool> {
        Ok(
            match self
                .store
                .get(keys::credential(&id.credential_hash).as_bytes())
                .await?
            {
                Some(kv) => decode::<IndexRecord>(&kv)?.removed_at_unix != 0,
                None => false,
            },
        )
    }

    /// The store revision of the peer's record, if it exists.
    pub async fn peer_revision(&self, id: &AgentIdentity) -> Result<Option<Revision>> {
        Ok(self
            .store
            .get(keys::peer(&id.network_id, &id.peer_id).as_bytes())
            .await?
            .map(|kv| kv.mod_revision))
    }

    /// Admits a new Sync session of one peer: a peer (or a stolen credential) reconnecting in
    /// a loop is paced on its own, without spending other agents' admission budget.
    pub fn admit_peer_session(&self, peer: &str) -> Result<(), std::time::Duration> {
        let mut g = self.peer_starts.lock().unwrap_or_else(|e| e.into_inner());
        g.admit(peer, self.clock.instant())
    }

    /// The next update for an agent at `base`, or `None` if the cache has no such peer.
    pub fn update_for(&self, id: &AgentIdentity, base: Revision) -> Option<Update> {
        self.cache.update_for(&id.network_id, &id.peer_id, base)
    }
}
