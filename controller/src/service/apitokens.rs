//! API tokens of a tenant: create (quota, scope), list, revoke (never the last admin), reset.

use canopy_proto::v1::{ApiToken, ApiTokenRecord};
use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::plans::Scope;
use crate::secret::{self, Secret};
use crate::store::{Compare, Op, Txn};

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
    pub(super) fn api_token_ops(
        &self,
        tenant: &str,
        name: &str,
        scope: Scope,
    ) -> (ApiTokenRecord, Secret, Txn) {
        let secret = Secret::generate(secret::API_TOKEN);
        let rec = ApiTokenRecord {
            id: secret::new_id("api_"),
            tenant_id: tenant.to_string(),
            secret_hash: secret.hash().to_vec(),
            name: name.to_string(),
            created_at_unix: self.now_unix(),
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

    /// Creates an API token for a tenant within its plan's quota; returns it and its secret
    /// (shown once). Counted under `apitokensver/<tenant>`, which the create is conditioned on.
    pub async fn create_api_token(
        &self,
        tenant: &str,
        name: &str,
        scope: Scope,
    ) -> Result<(ApiToken, Secret)> {
        self.add_api_token(tenant, name, scope, true).await
    }

    async fn add_api_token(
        &self,
        tenant: &str,
        name: &str,
        scope: Scope,
        within_quota: bool,
    ) -> Result<(ApiToken, Secret)> {
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(
                "API token name must be 1-64 characters, none of them control characters".into(),
            ));
        }
        crate::txn::retry("create API token", |_| async move {
            let guard = self.tenant_guard(tenant).await?;
            let (ver_rev, tokens) = self.api_token_records(tenant).await?;
            let limit = guard.plan.quotas().api_tokens;
            if within_quota && tokens.len() as u64 >= u64::from(limit) {
                return Err(Error::ResourceExhausted(format!(
                    "the {} plan allows {limit} API tokens; revoke one first",
                    guard.plan.name()
                )));
            }
            let (rec, secret, txn) = self.api_token_ops(tenant, name, scope);
            let ver = keys::apitokensver(tenant);
            let txn = txn
                .when(guard.compare)
                .when(Compare::unchanged(ver.clone(), ver_rev))
                .then(Op::put(ver, rec.id.clone()));
            let r = self.store.txn(txn).await?;
            Ok(r.succeeded.then(|| (token_view(&rec), secret)))
        })
        .await
    }

    /// A tenant's API token records, and the revision of the version key they are counted under.
    pub(super) async fn api_token_records(
        &self,
        tenant: &str,
    ) -> Result<(
        crate::store::Revision,
        Vec<(ApiTokenRecord, crate::store::Revision)>,
    )> {
        let ver_rev = self
            .store
            .get(keys::apitokensver(tenant).as_bytes())
            .await?
            .map_or(0, |kv| kv.mod_revision);
        let r = self
            .store
            .range(keys::apitokenlist(tenant).as_bytes())
            .await?;
        let tokens = r
            .kvs
            .iter()
            .map(|kv| Ok((decode::<ApiTokenRecord>(kv)?, kv.mod_revision)))
            .collect::<Result<_>>()?;
        Ok((ver_rev, tokens))
    }

    /// `canopy apitoken create`: an admin of the tenant makes another token. The scope must be
    /// said: an empty or unknown one is refused, never taken as admin.
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

    /// A new admin API token for a tenant that lost its own (the operator's `token-reset`, or
    /// `canopy serve --reset-admin-token` for the self-managed tenant). Outside the quota: it
    /// is how a locked-out tenant gets back in.
    pub async fn reset_admin_token(&self, tenant: &str) -> Result<(ApiToken, Secret)> {
        if tenant != crate::service::DEFAULT_TENANT {
            self.tenant_record(tenant).await?;
        }
        let r = self
            .add_api_token(tenant, "admin (reset)", Scope::Admin, false)
            .await?;
        tracing::info!(tenant, token = %r.0.id, "admin API token reset");
        Ok(r)
    }

    pub async fn list_api_tokens(&self, c: &Caller) -> Result<Vec<ApiToken>> {
        let (_, tokens) = self.api_token_records(&c.tenant).await?;
        let mut v: Vec<ApiToken> = tokens.iter().map(|(t, _)| token_view(t)).collect();
        v.sort_by_key(|t| t.created_at_unix);
        Ok(v)
    }

    /// Revokes an API token, unless it is the tenant's last admin token (that would lock the
    /// tenant out for good). Two revocations that race are serialised by the version key.
    pub async fn revoke_api_token(&self, c: &Caller, id: &str) -> Result<ApiToken> {
        c.require_admin()?;
        let tenant = c.tenant.as_str();
        crate::txn::retry("revoke API token", |_| async move {
            let (ver_rev, tokens) = self.api_token_records(tenant).await?;
            let Some((rec, rev)) = tokens.iter().find(|(t, _)| t.id == id) else {
                return Err(Error::NotFound(format!(
                    "API token {} not found",
                    canopy_proto::text::quoted(id)
                )));
            };
            let is_admin = |t: &ApiTokenRecord| Scope::parse(&t.scope) == Ok(Scope::Admin);
            if is_admin(rec) && tokens.iter().filter(|(t, _)| is_admin(t)).count() == 1 {
                return Err(Error::FailedPrecondition(
                    "this is the tenant's last admin API token: create another admin token first"
                        .into(),
                ));
            }
            let hash: [u8; 32] = rec
                .secret_hash
                .as_slice()
                .try_into()
                .map_err(|_| Error::Internal("bad token hash".into()))?;
            let entry = keys::apitokenlist_entry(tenant, id);
            let ver = keys::apitokensver(tenant);
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(Compare::unchanged(ver.clone(), ver_rev))
                        .when(Compare::unchanged(entry.clone(), *rev))
                        .then(Op::put(ver, rec.id.clone()))
                        .then(Op::delete(entry))
                        .then(Op::delete(keys::apitoken(&hash))),
                )
                .await?;
            Ok(r.succeeded.then(|| token_view(rec)))
        })
        .await
    }
}
