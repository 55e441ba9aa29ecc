//! Tenants, their API tokens, plans and usage. In a self-managed controller there is one tenant
//! (`default`) with no quotas; a hosted controller (`--hosted`) lets customers sign up.

use canopy_proto::v1::{
    ApiToken, ApiTokenRecord, NetworkUsage, Quotas, Subscription, TenantRecord, Usage,
};
use prost::Message as _;

use crate::error::{Error, Result};
use crate::keys;
use crate::plans::{Plan, Scope};
use crate::secret::{self, Secret};
use crate::service::{Caller, Controller, check_token_usable, conflict, decode, now_unix};
use crate::store::{Compare, Op, Txn};

const TXN_ATTEMPTS: usize = 50;

fn quotas(p: Plan) -> Quotas {
    let q = p.quotas();
    Quotas {
        networks: q.networks,
        peers_per_network: q.peers_per_network,
        active_join_tokens: q.active_join_tokens,
    }
}

fn token_view(r: &ApiTokenRecord) -> ApiToken {
    ApiToken {
        id: r.id.clone(),
        name: r.name.clone(),
        scope: Scope::parse(&r.scope)
            .unwrap_or(Scope::Read)
            .name()
            .to_string(),
        created_at_unix: r.created_at_unix,
    }
}

impl Controller {
    /// The ops to add an API token (its record, and its listing entry).
    fn api_token_ops(tenant: &str, name: &str, scope: Scope) -> (ApiTokenRecord, Secret, Txn) {
        let secret = Secret::generate(secret::API_TOKEN);
        let rec = ApiTokenRecord {
            id: secret::new_id("api_"),
            tenant_id: tenant.to_string(),
            secret_hash: secret.hash().to_vec(),
            name: name.to_string(),
            created_at_unix: now_unix(),
            scope: scope.name().to_string(),
        };
        let key = keys::apitoken(&secret.hash());
        let txn = Txn::new()
            .when(Compare::absent(key.clone()))
            .then(Op::put(key, rec.encode_to_vec()))
            .then(Op::put(
                keys::apitokenlist_entry(tenant, &rec.id),
                rec.encode_to_vec(),
            ));
        (rec, secret, txn)
    }

    /// Creates an API token for a tenant; returns it and its secret (shown once).
    pub async fn create_api_token(
        &self,
        tenant: &str,
        name: &str,
        scope: Scope,
    ) -> Result<(ApiToken, Secret)> {
        if name.is_empty() || name.len() > 64 {
            return Err(Error::InvalidArgument(
                "API token name must be 1-64 characters".into(),
            ));
        }
        let (rec, secret, txn) = Self::api_token_ops(tenant, name, scope);
        if !self.store.txn(txn).await?.succeeded {
            return Err(Error::Internal("API token collision".into()));
        }
        Ok((token_view(&rec), secret))
    }

    /// `canopy apitoken create`: an admin of the tenant makes another token.
    pub async fn create_api_token_for(
        &self,
        c: &Caller,
        name: &str,
        scope: &str,
    ) -> Result<(ApiToken, Secret)> {
        c.require_admin()?;
        let scope = Scope::parse(scope)?;
        self.create_api_token(&c.tenant, name, scope).await
    }

    pub async fn list_api_tokens(&self, c: &Caller) -> Result<Vec<ApiToken>> {
        let r = self
            .store
            .range(keys::apitokenlist(&c.tenant).as_bytes())
            .await?;
        let mut v: Vec<ApiToken> = r
            .kvs
            .iter()
            .map(|kv| decode::<ApiTokenRecord>(kv).map(|t| token_view(&t)))
            .collect::<Result<_>>()?;
        v.sort_by_key(|t| t.created_at_unix);
        Ok(v)
    }

    pub async fn revoke_api_token(&self, c: &Caller, id: &str) -> Result<ApiToken> {
        c.require_admin()?;
        let entry = keys::apitokenlist_entry(&c.tenant, id);
        let kv = self
            .store
            .get(entry.as_bytes())
            .await?
            .ok_or_else(|| Error::NotFound(format!("API token {id:?} not found")))?;
        let rec: ApiTokenRecord = decode(&kv)?;
        let hash: [u8; 32] = rec
            .secret_hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Internal("bad token hash".into()))?;
        self.store
            .txn(
                Txn::new()
                    .then(Op::delete(entry))
                    .then(Op::delete(keys::apitoken(&hash))),
            )
            .await?;
        Ok(token_view(&rec))
    }

    /// The tenant's plan (self-managed when it has no tenant record).
    pub async fn tenant_plan(&self, tenant: &str) -> Result<Plan> {
        Ok(
            match self.store.get(keys::tenant(tenant).as_bytes()).await? {
                Some(kv) => Plan::from_record(&decode::<TenantRecord>(&kv)?.plan),
                None => Plan::SelfManaged,
            },
        )
    }

    /// The plan of a tenant that may act now: a suspended tenant enrolls no new agents.
    pub async fn active_tenant_plan(&self, tenant: &str) -> Result<Plan> {
        match self.store.get(keys::tenant(tenant).as_bytes()).await? {
            Some(kv) => {
                let t: TenantRecord = decode(&kv)?;
                if t.suspended {
                    return Err(Error::PermissionDenied(
                        "this network's tenant is suspended; no new agents can join".into(),
                    ));
                }
                Ok(Plan::from_record(&t.plan))
            }
            None => Ok(Plan::SelfManaged),
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
        if org.is_empty() || org.len() > 100 {
            return Err(Error::InvalidArgument(
                "organisation name must be 1-100 characters".into(),
            ));
        }
        let email = email.trim();
        if email.len() > 254
            || email
                .split_once('@')
                .is_none_or(|(u, d)| u.is_empty() || !d.contains('.'))
        {
            return Err(Error::InvalidArgument(format!(
                "{email:?} is not an email address"
            )));
        }
        let plan = Plan::parse(plan)?;
        let t = TenantRecord {
            id: secret::new_id("ten_"),
            org: org.to_string(),
            email: email.to_string(),
            plan: plan.name().to_string(),
            suspended: false,
            created_at_unix: now_unix(),
        };
        let (_, secret, mut txn) = Self::api_token_ops(&t.id, "admin", Scope::Admin);
        txn = txn
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

    /// Changes the plan, if what the tenant has fits the new plan's quotas.
    pub async fn change_plan(&self, c: &Caller, plan: &str) -> Result<Subscription> {
        c.require_admin()?;
        let plan = Plan::parse(plan)?;
        let key = keys::tenant(&c.tenant);
        for _ in 0..TXN_ATTEMPTS {
            let kv = self.store.get(key.as_bytes()).await?.ok_or_else(|| {
                Error::FailedPrecondition("a self-managed controller has no plans".into())
            })?;
            let mut t: TenantRecord = decode(&kv)?;
            let u = self.usage(c).await?;
            let q = plan.quotas();
            let biggest = u.per_network.iter().map(|n| n.peers).max().unwrap_or(0);
            if u.networks > q.networks
                || biggest > q.peers_per_network
                || u.active_join_tokens > q.active_join_tokens
            {
                return Err(Error::FailedPrecondition(format!(
                    "the {} plan allows {} networks, {} peers per network and {} active join tokens; you have {}, {} and {}",
                    plan.name(),
                    q.networks,
                    q.peers_per_network,
                    q.active_join_tokens,
                    u.networks,
                    biggest,
                    u.active_join_tokens
                )));
            }
            t.plan = plan.name().to_string();
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), kv.mod_revision))
                        .then(Op::put(key.clone(), t.encode_to_vec())),
                )
                .await?;
            if r.succeeded {
                return self.subscription_of(&c.tenant).await;
            }
        }
        Err(conflict())
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
        let now = now_unix();
        let active = self
            .token_records(&c.tenant)
            .await?
            .iter()
            .filter(|(t, _)| check_token_usable(t, now).is_ok())
            .count();
        Ok(Usage {
            plan: plan.name().to_string(),
            quotas: Some(quotas(plan)),
            networks: nets.len() as u32,
            active_join_tokens: active as u32,
            per_network,
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
        // Compare hashes: constant-time enough, and the secret itself is never kept.
        if &Secret::from_string(bearer.to_string()).hash() == want {
            Ok(())
        } else {
            Err(Error::Unauthenticated(
                "operator credential is not valid".into(),
            ))
        }
    }

    async fn tenant_record(&self, id: &str) -> Result<(TenantRecord, crate::store::Revision)> {
        let kv = self
            .store
            .get(keys::tenant(id).as_bytes())
            .await?
            .ok_or_else(|| Error::NotFound(format!("tenant {id:?} not found")))?;
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
        for _ in 0..TXN_ATTEMPTS {
            let (mut t, rev) = self.tenant_record(id).await?;
            t.suspended = suspended;
            let key = keys::tenant(id);
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(key.clone(), rev))
                        .then(Op::put(key, t.encode_to_vec())),
                )
                .await?;
            if r.succeeded {
                tracing::info!(tenant = %id, suspended, "tenant suspension changed");
                return self.subscription_of(id).await;
            }
        }
        Err(conflict())
    }

    /// Deletes a tenant and everything it owns: networks (with their peers and addresses), join
    /// tokens, API tokens, and the tenant record last.
    pub async fn delete_tenant(&self, id: &str) -> Result<(u32, u32)> {
        self.tenant_record(id).await?;
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
            .then(Op::delete_prefix(format!("{}audit/{id}/", keys::ROOT)))
            .then(Op::delete(keys::tenant(id)));
        self.store.txn(txn).await?;
        tracing::info!(tenant = %id, networks = nets, peers, "tenant deleted");
        Ok((nets, peers))
    }
}

/// The per-tenant audit log: `audit/<tenant>/<millis, 20 digits>-<random>` → AuditEntry, so a
/// range read in key order is oldest first.
impl Controller {
    /// Records a change. Written after the change commits: an entry can be missing if the
    /// store fails in between, never present for a change that did not happen.
    pub async fn audit(&self, tenant: &str, actor: &str, action: &str, object: &str, detail: &str) {
        let at = crate::leader::now_ms();
        let e = canopy_proto::v1::AuditEntry {
            at_unix_ms: at,
            actor: actor.to_string(),
            action: action.to_string(),
            object: object.to_string(),
            detail: detail.to_string(),
        };
        let key = format!(
            "{}audit/{tenant}/{at:020}-{}",
            keys::ROOT,
            secret::new_id("")
        );
        if let Err(e) = self
            .store
            .txn(Txn::new().then(Op::put(key, e.encode_to_vec())))
            .await
        {
            tracing::warn!(error = %e, tenant, action, "audit entry not written");
        }
    }

    pub async fn list_audit(
        &self,
        c: &Caller,
        limit: u32,
        action: &str,
        object: &str,
    ) -> Result<Vec<canopy_proto::v1::AuditEntry>> {
        let limit = match limit {
            0 => 50,
            n => n.min(1000),
        } as usize;
        let r = self
            .store
            .range(format!("{}audit/{}/", keys::ROOT, c.tenant).as_bytes())
            .await?;
        let mut out = Vec::new();
        for kv in r.kvs.iter().rev() {
            let e: canopy_proto::v1::AuditEntry = decode(kv)?;
            if e.action.starts_with(action) && (object.is_empty() || e.object == object) {
                out.push(e);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}
