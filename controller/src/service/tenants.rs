//! Tenants, their API tokens, plans and usage. In a self-managed controller there is one tenant
//! (`default`) with no quotas; a hosted controller (`--hosted`) lets customers sign up.

use canopy_proto::v1::{ApiTokenRecord, NetworkUsage, Quotas, Subscription, TenantRecord, Usage};
use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::plans::{Plan, Scope};
use crate::secret::{self, Secret};
use crate::store::{Compare, Op, Txn};

/// A tenant as a write saw it: its plan, and the compare that keeps the write honest.
#[derive(Clone, Debug)]
pub struct TenantGuard {
    pub plan: Plan,
    pub compare: Compare,
}

fn quotas(p: Plan) -> Quotas {
    let q = p.quotas();
    Quotas {
        networks: q.networks,
        peers_per_network: q.peers_per_network,
        active_join_tokens: q.active_join_tokens,
        api_tokens: q.api_tokens,
        relay_mib_per_month: p.relay_mib_per_month().unwrap_or(0),
    }
}

impl Controller {
    /// The tenant's plan (self-managed for the default tenant of a self-managed controller).
    pub async fn tenant_plan(&self, tenant: &str) -> Result<Plan> {
        Ok(self.tenant_guard(tenant).await?.plan)
    }

    /// What a write on behalf of `tenant` must be conditioned on: the tenant as it is now.
    /// Creates check quotas against `plan` and add [`TenantGuard::compare`] to their
    /// transaction, so a plan change, a suspension or a deletion that commits first makes them
    /// re-read (and refuse). A tenant with no record is the self-managed default tenant; any
    /// other missing tenant was deleted and gets nothing, least of all unlimited quotas.
    pub async fn tenant_guard(&self, tenant: &str) -> Result<TenantGuard> {
        let key = keys::tenant(tenant);
        match self.store.get(key.as_bytes()).await? {
            None if tenant == super::DEFAULT_TENANT => Ok(TenantGuard {
                plan: Plan::SelfManaged,
                compare: Compare::absent(key),
            }),
            None => Err(Error::PermissionDenied(
                "this tenant has been deleted".into(),
            )),
            Some(kv) => {
                let t: TenantRecord = decode(&kv)?;
                if t.deleted {
                    return Err(Error::PermissionDenied(
                        "this tenant is being deleted".into(),
                    ));
                }
                if t.suspended {
                    return Err(Error::PermissionDenied(format!(
                        "tenant {} is suspended; contact the operator",
                        canopy_proto::text::quoted(&t.org)
                    )));
                }
                Ok(TenantGuard {
                    plan: Plan::from_record(&t.plan),
                    compare: Compare::unchanged(key, kv.mod_revision),
                })
            }
        }
    }

    /// Hosted sign-up: a new tenant on a plan, and its first (admin) API token.
    pub async fn sign_up(
        &self,
        org: &str,
        email: &str,
        plan: &str,
    ) -> Result<(String, Secret, Subscription)> {
        if !self.hosted {
            return Err(Error::FailedPrecondition(
                "sign-up is only open on a hosted controller (canopy serve --hosted)".into(),
            ));
        }
        let org = org.trim();
        if org.is_empty() || org.chars().count() > 100 || org.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(
                "organisation name must be 1-100 characters, none of them control characters"
                    .into(),
            ));
        }
        let email = email.trim();
        crate::model::validate_email(email)?;
        let plan = Plan::parse(plan)?;
        let t = TenantRecord {
            id: secret::new_id("ten_"),
            org: org.to_string(),
            email: email.to_string(),
            plan: plan.name().to_string(),
            suspended: false,
            created_at_unix: self.now_unix(),
            deleted: false,
        };
        let (rec, secret, mut txn) = self.api_token_ops(&t.id, "admin", Scope::Admin);
        txn = txn
            .then(Op::put(keys::apitokensver(&t.id), rec.id))
            .when(Compare::absent(keys::tenant(&t.id)))
            .then(Op::put(keys::tenant(&t.id), t.encode_to_vec()));
        if !self.store.txn(txn).await?.succeeded {
            return Err(Error::Internal("tenant id collision".into()));
        }
        tracing::info!(tenant = %t.id, plan = plan.name(), "tenant signed up");
        Ok((t.id.clone(), secret, self.subscription_of(&t.id).await?))
    }

    async fn subscription_of(&self, tenant: &str) -> Result<Subscription> {
        let rec = match self.store.get(keys::tenant(tenant).as_bytes()).await? {
            Some(kv) => decode::<TenantRecord>(&kv)?,
            None => TenantRecord {
                id: tenant.to_string(),
                ..Default::default()
            },
        };
        let plan = Plan::from_record(&rec.plan);
        Ok(Subscription {
            tenant_id: rec.id,
            org: rec.org,
            plan: plan.name().to_string(),
            quotas: Some(quotas(plan)),
            suspended: rec.suspended,
        })
    }

    pub async fn subscription(&self, c: &Caller) -> Result<Subscription> {
        self.subscription_of(&c.tenant).await
    }

    /// Changes the plan, if what the tenant has fits the new plan's quotas. The change is
    /// conditioned on every counter a create is counted under (networks, join tokens, API
    /// tokens, each network's peers), and creates are conditioned on the tenant record, so a
    /// create and a plan change that race are serialised: one of them re-reads.
    pub async fn change_plan(&self, c: &Caller, plan: &str) -> Result<Subscription> {
        c.require_admin()?;
        let plan = Plan::parse(plan)?;
        let key = &keys::tenant(&c.tenant);
        crate::txn::retry("change plan", |_| async move {
            let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
                Error::FailedPrecondition("a self-managed controller has no plans".into())
            })?;
            let mut t: TenantRecord = decode(&kv)?;
            // Counters first, counts after: a create in between moves a counter and fails us.
            let mut counters = vec![
                keys::netsver(&c.tenant),
                keys::tokensver(&c.tenant),
                keys::apitokensver(&c.tenant),
            ];
            counters.extend(
                self.network_records(&c.tenant)
                    .await?
                    .iter()
                    .map(|n| keys::netpeers(&n.id)),
            );
            let mut txn = Txn::new().when(Compare::unchanged(key.clone(), kv.mod_revision));
            for k in counters {
                let rev = self
                    .store
                    .get(k.as_bytes())
                    .await?
                    .map_or(0, |kv| kv.mod_revision);
                txn = txn.when(Compare::unchanged(k, rev));
            }
            let u = self.usage(c).await?;
            let api_tokens = self.api_token_records(&c.tenant).await?.1.len() as u32;
            let q = plan.quotas();
            let biggest = u.per_network.iter().map(|n| n.peers).max().unwrap_or(0);
            if u.networks > q.networks
                || biggest > q.peers_per_network
                || u.active_join_tokens > q.active_join_tokens
                || api_tokens > q.api_tokens
            {
                return Err(Error::FailedPrecondition(format!(
                    "the {} plan allows {} networks, {} peers per network, {} active join tokens and {} API tokens; you have {}, {}, {} and {}",
                    plan.name(),
                    q.networks,
                    q.peers_per_network,
                    q.active_join_tokens,
                    q.api_tokens,
                    u.networks,
                    biggest,
                    u.active_join_tokens,
                    api_tokens
                )));
            }
            t.plan = plan.name().to_string();
            let r = self
                .store
                .txn(txn.then(Op::put(key.clone(), t.encode_to_vec())))
                .await?;
            Ok(r.succeeded.then_some(()))
        })
        .await?;
        self.subscription_of(&c.tenant).await
    }

    /// Networks, peers, agents online (on this replica) and active join tokens, against the quotas.
    pub async fn usage(&self, c: &Caller) -> Result<Usage> {
        let plan = self.tenant_plan(&c.tenant).await?;
        let nets = self.network_records(&c.tenant).await?;
        let mut per_network = Vec::with_capacity(nets.len());
        for n in &nets {
            let peers = self.store.range(keys::peers(&n.id).as_bytes()).await?;
            let online = peers
                .kvs
                .iter()
                .filter_map(|kv| keys::parse_peer(&kv.key))
                .filter(|(_, p)| self.sessions.get(p).is_some())
                .count();
            per_network.push(NetworkUsage {
                network_id: n.id.clone(),
                name: n.name.clone(),
                peers: peers.kvs.len() as u32,
                agents_online: online as u32,
            });
        }
        let active = self.active_join_tokens(&c.tenant, self.now_unix()).await?;
        Ok(Usage {
            plan: plan.name().to_string(),
            quotas: Some(quotas(plan)),
            networks: nets.len() as u32,
            active_join_tokens: active as u32,
            per_network,
            relay_bytes_this_month: self.relay_used(&c.tenant).await?,
        })
    }
}

/// Operator actions on tenants (hosted). Callers are authenticated with the operator credential.
impl Controller {
    pub fn authenticate_operator(&self, bearer: &str) -> Result<()> {
        let Some(want) = &self.operator_token_hash else {
            return Err(Error::PermissionDenied(
                "this controller has no operator credential configured (CANOPY_OPERATOR_TOKEN)"
                    .into(),
            ));
        };
        // Only the hash is kept; it is compared in constant time.
        if Secret::from_string(bearer.to_string()).matches(want) {
            Ok(())
        } else {
            Err(Error::Unauthenticated(
                "operator credential is not valid".into(),
            ))
        }
    }

    pub(super) async fn tenant_record(
        &self,
        id: &str,
    ) -> Result<(TenantRecord, crate::store::Revision)> {
        let kv = self
            .store
            .get(keys::tenant(id).as_bytes())
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "tenant {} not found",
                    canopy_proto::text::quoted(id)
                ))
            })?;
        Ok((decode(&kv)?, kv.mod_revision))
    }

    pub async fn list_tenants(&self) -> Result<Vec<canopy_proto::v1::TenantSummary>> {
        let r = self.store.range(keys::ALL_TENANTS.as_bytes()).await?;
        let mut out = Vec::new();
        for kv in &r.kvs {
            let t: TenantRecord = decode(kv)?;
            let nets = self.network_records(&t.id).await?;
            let mut peers = 0;
            for n in &nets {
                peers += self
                    .store
                    .range(keys::peers(&n.id).as_bytes())
                    .await?
                    .kvs
                    .len() as u32;
            }
            out.push(canopy_proto::v1::TenantSummary {
                subscription: Some(self.subscription_of(&t.id).await?),
                email: t.email.clone(),
                networks: nets.len() as u32,
                peers,
                created_at_unix: t.created_at_unix,
            });
        }
        out.sort_by_key(|t| t.created_at_unix);
        Ok(out)
    }

    /// Suspends or resumes a tenant. A suspended tenant's console calls are refused; its agents
    /// keep their last map (their streams are not touched).
    pub async fn set_suspended(&self, id: &str, suspended: bool) -> Result<Subscription> {
        self.update_tenant(id, "suspend tenant", move |t| {
            t.suspended = suspended;
            true
        })
        .await?;
        tracing::info!(tenant = %id, suspended, "tenant suspension changed");
        self.subscription_of(id).await
    }

    /// Rewrites a tenant's record with `change` (read, change, compare-and-swap, retried);
    /// `change` returns false when there is nothing to write.
    async fn update_tenant(
        &self,
        id: &str,
        what: &str,
        change: impl Fn(&mut TenantRecord) -> bool + Copy + Send,
    ) -> Result<()> {
        crate::txn::retry(what, |_| async move {
            let (mut t, rev) = self.tenant_record(id).await?;
            if !change(&mut t) {
                return Ok(Some(()));
            }
            let key = keys::tenant(id);
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), rev))
                        .then(Op::put(key, t.encode_to_vec())),
                )
                .await?;
            Ok(r.succeeded.then_some(()))
        })
        .await
    }

    /// Deletes a tenant and everything it owns: networks (with their peers and addresses), join
    /// tokens, API tokens, and the tenant record last.
    ///
    /// Final: the record is marked `deleted` first, and every create of the tenant is
    /// conditioned on that record, so nothing created after this call began survives it. Run
    /// again after a crash, it finishes the job.
    pub async fn delete_tenant(&self, id: &str) -> Result<(u32, u32)> {
        self.update_tenant(id, "mark tenant deleted", |t| {
            !std::mem::replace(&mut t.deleted, true)
        })
        .await?;
        let caller = Caller {
            tenant: id.to_string(),
            token_id: "operator".into(),
            scope: Scope::Admin,
            plan: Plan::SelfManaged,
        };
        let (mut nets, mut peers) = (0, 0);
        for n in self.network_records(id).await? {
            peers += self.delete_network(&caller, &n.id).await?;
            nets += 1;
        }
        let mut txn = Txn::new();
        for (t, _) in self.token_records(id).await? {
            txn = txn.then(Op::delete(keys::token(id, &t.id)));
            if let Ok(h) = <[u8; 32]>::try_from(t.secret_hash.as_slice()) {
                txn = txn.then(Op::delete(keys::tokenhash(&h)));
            }
        }
        for kv in self
            .store
            .range(keys::apitokenlist(id).as_bytes())
            .await?
            .kvs
        {
            let rec: ApiTokenRecord = decode(&kv)?;
            if let Ok(h) = <[u8; 32]>::try_from(rec.secret_hash.as_slice()) {
                txn = txn.then(Op::delete(keys::apitoken(&h)));
            }
        }
        txn = txn
            .then(Op::delete_prefix(keys::apitokenlist(id)))
            .then(Op::delete(keys::netsver(id)))
            .then(Op::delete(keys::tokensver(id)))
            .then(Op::delete(keys::apitokensver(id)))
            .then(Op::delete_prefix(format!("{}audit/{id}/", keys::ROOT)))
            .then(Op::delete(keys::tenant(id)));
        self.store.txn(txn).await?;
        tracing::info!(tenant = %id, networks = nets, peers, "tenant deleted");
        Ok((nets, peers))
    }
}
