//! Join tokens: create (quota), list, revoke, and when one may be used.

use canopy_proto::join::JoinString;
use canopy_proto::v1::{IndexRecord, JoinToken, JoinTokenRecord};
use prost::Message;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::model;
use crate::plans::Plan;
use crate::secret::{self, Secret};
use crate::store::{Compare, Op, Revision, Txn};

impl Controller {
    pub async fn create_join_token(
        &self,
        c: &Caller,
        network: &str,
        max_uses: u32,
        ttl_seconds: u64,
        tags: &[String],
    ) -> Result<(JoinToken, String)> {
        c.require_admin()?;
        model::validate_tags(tags)?;
        if ttl_seconds > 10 * 365 * 24 * 3600 {
            return Err(Error::InvalidArgument(
                "ttl is longer than ten years".into(),
            ));
        }
        let (net, _) = self.resolve_network(c, network).await?;
        let (net, tags) = (&net, &tags);
        let (rec, secret) = crate::txn::retry("create join token", |_| async move {
            let tenant = self.tenant_guard(&c.tenant).await?;
            let secret = Secret::generate(secret::JOIN_TOKEN);
            let now = self.now_unix();
            let rec = JoinTokenRecord {
                id: secret::new_id("tok_"),
                tenant_id: c.tenant.clone(),
                network_id: net.id.clone(),
                secret_hash: secret.hash().to_vec(),
                max_uses,
                expires_at_unix: expiry(now, ttl_seconds),
                tags: tags.to_vec(),
                created_at_unix: now,
                ..Default::default()
            };
            // Active tokens are counted under a per-tenant version key the create is
            // conditioned on; the network must still exist when it commits.
            let ver_rev = self.revision_of(&keys::tokensver(&c.tenant)).await?;
            let net_rev = self.revision_of(&keys::network(&c.tenant, &net.id)).await?;
            if net_rev == 0 {
                return Err(Error::NotFound(format!(
                    "network {} not found",
                    canopy_proto::text::quoted(&net.name)
                )));
            }
            check_token_quota(tenant.plan, self.active_join_tokens(&c.tenant, now).await?)?;
            let txn = Txn::new()
                .when(tenant.compare)
                .when(Compare::unchanged(
                    keys::network(&c.tenant, &net.id),
                    net_rev,
                ))
                .when(Compare::unchanged(keys::tokensver(&c.tenant), ver_rev));
            let r = self
                .store
                .txn(token_writes(txn, &rec, &secret.hash()))
                .await?;
            Ok(r.succeeded.then_some((rec, secret)))
        })
        .await?;
        let join = JoinString {
            controller_url: self.public_url.clone(),
            token: secret.expose().to_string(),
            ca_sha256: self.ca_sha256,
            lock_sha256: net.lock.as_ref().and_then(canopy_proto::lock::pin),
            // Made by the tenant's console (`token create --presigned`), never here.
            lock_delegate: None,
        };
        tracing::info!(token = %rec.id, network = %net.id, max_uses, "join token created");
        Ok((token_view(&rec), join.encode()))
    }

    /// Join tokens of the tenant that can still be used at `now`.
    pub(crate) async fn active_join_tokens(&self, tenant: &str, now: i64) -> Result<usize> {
        Ok(self
            .token_records(tenant)
            .await?
            .iter()
            .filter(|(t, _)| check_token_usable(t, now).is_ok())
            .count())
    }

    pub(crate) async fn token_records(
        &self,
        tenant: &str,
    ) -> Result<Vec<(JoinTokenRecord, Revision)>> {
        let r = self.store.range(keys::tokens(tenant).as_bytes()).await?;
        r.kvs
            .iter()
            .map(|kv| Ok((decode(kv)?, kv.mod_revision)))
            .collect()
    }

    pub async fn list_join_tokens(&self, c: &Caller, network: &str) -> Result<Vec<JoinToken>> {
        let filter = if network.is_empty() {
            None
        } else {
            Some(self.resolve_network(c, network).await?.0.id)
        };
        let mut out: Vec<JoinToken> = self
            .token_records(&c.tenant)
            .await?
            .iter()
            .filter(|(t, _)| filter.as_ref().is_none_or(|n| &t.network_id == n))
            .map(|(t, _)| token_view(t))
            .collect();
        out.sort_by_key(|t| t.created_at_unix);
        Ok(out)
    }

    pub async fn revoke_join_token(&self, c: &Caller, token_id: &str) -> Result<JoinToken> {
        c.require_admin()?;
        if token_id.is_empty() {
            return Err(Error::InvalidArgument("token id is required".into()));
        }
        let key = &keys::token(&c.tenant, token_id);
        crate::txn::retry("revoke join token", |_| async move {
            let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "join token {} not found",
                    canopy_proto::text::quoted(token_id)
                ))
            })?;
            let mut rec: JoinTokenRecord = decode(&kv)?;
            rec.revoked = true;
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), kv.mod_revision))
                        .then(Op::put(key.clone(), rec.encode_to_vec())),
                )
                .await?;
            Ok(r.succeeded.then(|| token_view(&rec)))
        })
        .await
    }
}

/// A new token's writes: the record, its hash index (the hash still unused), and the tenant's
/// token version bumped (so a racing create re-counts).
fn token_writes(txn: Txn, rec: &JoinTokenRecord, hash: &[u8; 32]) -> Txn {
    let hash_key = keys::tokenhash(hash);
    let index = IndexRecord {
        id: format!("{}/{}", rec.tenant_id, rec.id),
        ..Default::default()
    };
    txn.then(Op::put(keys::tokensver(&rec.tenant_id), rec.id.clone()))
        .when(Compare::absent(hash_key.clone()))
        .then(Op::put(
            keys::token(&rec.tenant_id, &rec.id),
            rec.encode_to_vec(),
        ))
        .then(Op::put(hash_key, index.encode_to_vec()))
}

/// When a token made at `now` with `ttl_seconds` expires (0: never).
pub(super) fn expiry(now: i64, ttl_seconds: u64) -> i64 {
    if ttl_seconds == 0 {
        0
    } else {
        now.saturating_add(i64::try_from(ttl_seconds).unwrap_or(i64::MAX))
    }
}

/// Whether a tenant with `active` usable join tokens may make one more under `plan`.
pub(super) fn check_token_quota(plan: Plan, active: usize) -> Result<()> {
    let limit = plan.quotas().active_join_tokens;
    if active as u64 >= u64::from(limit) {
        return Err(Error::ResourceExhausted(format!(
            "the {} plan allows {limit} active join tokens",
            plan.name()
        )));
    }
    Ok(())
}

pub(crate) fn check_token_usable(t: &JoinTokenRecord, now: i64) -> Result<()> {
    if t.revoked {
        return Err(Error::PermissionDenied("join token was revoked".into()));
    }
    if t.expires_at_unix != 0 && now >= t.expires_at_unix {
        return Err(Error::PermissionDenied("join token has expired".into()));
    }
    if t.max_uses != 0 && t.uses >= t.max_uses {
        return Err(Error::PermissionDenied(format!(
            "join token has been used up ({} of {} uses)",
            t.uses, t.max_uses
        )));
    }
    Ok(())
}

fn token_view(t: &JoinTokenRecord) -> JoinToken {
    JoinToken {
        id: t.id.clone(),
        network_id: t.network_id.clone(),
        max_uses: t.max_uses,
        uses: t.uses,
        expires_at_unix: t.expires_at_unix,
        revoked: t.revoked,
        tags: t.tags.clone(),
        created_at_unix: t.created_at_unix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(max_uses: u32, uses: u32, expires: i64, revoked: bool) -> JoinTokenRecord {
        JoinTokenRecord {
            max_uses,
            uses,
            expires_at_unix: expires,
            revoked,
            ..Default::default()
        }
    }

    #[test]
    fn a_token_expires_ttl_seconds_after_it_was_made_or_never() {
        assert_eq!(expiry(1000, 0), 0);
        assert_eq!(expiry(1000, 60), 1060);
        assert_eq!(expiry(1000, u64::MAX), i64::MAX);
    }

    #[test]
    fn the_token_quota_counts_active_tokens() {
        let limit = Plan::Free.quotas().active_join_tokens as usize;
        assert!(check_token_quota(Plan::Free, limit - 1).is_ok());
        let e = check_token_quota(Plan::Free, limit).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the free plan allows {limit} active join tokens")
        );
    }

    #[test]
    fn token_usability_rules() {
        assert!(check_token_usable(&token(0, 1000, 0, false), 10).is_ok());
        assert!(check_token_usable(&token(1, 0, 11, false), 10).is_ok());
        let msg = |r: Result<()>| r.unwrap_err().to_string();
        assert_eq!(
            msg(check_token_usable(&token(1, 1, 0, false), 10)),
            "join token has been used up (1 of 1 uses)"
        );
        assert_eq!(
            msg(check_token_usable(&token(0, 0, 10, false), 10)),
            "join token has expired"
        );
        assert_eq!(
            msg(check_token_usable(&token(0, 0, 0, true), 10)),
            "join token was revoked"
        );
    }
}
