//! Web console sessions: a browser signs in with an API token and gets a random session
//! cookie; the store keeps only its hash, the token's hash (so a revoked token ends every
//! session made with it), a CSRF token and an expiry. Every request is then exactly the API
//! token's caller: same scope, same tenant, same rate limit.

use canopy_proto::v1::WebSessionRecord;
use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::secret::Secret;
use crate::store::{Op, Txn};

/// How long a session lasts from sign-in.
pub const SESSION_SECS: i64 = 12 * 3600;
/// Cookies start with this.
pub const COOKIE_PREFIX: &str = "cws_";

/// A signed-in browser: the caller it acts as and the CSRF token its forms must carry.
#[derive(Clone, Debug)]
pub struct WebSession {
    pub caller: Caller,
    pub csrf: String,
}

impl Controller {
    /// Signs a browser in with API token `bearer`: the new session's cookie value and the
    /// session.
    pub async fn sign_in(&self, bearer: &str) -> Result<(String, WebSession)> {
        let caller = self.authenticate_console(bearer.trim()).await?;
        self.check_rate(&caller)?;
        let csrf = Secret::generate("").expose().to_string();
        let rec = WebSessionRecord {
            api_token_hash: Secret::from_string(bearer.trim().to_string())
                .hash()
                .to_vec(),
            tenant_id: caller.tenant.clone(),
            csrf: csrf.clone(),
            expires_at_unix: self.now_unix() + SESSION_SECS,
            operator: false,
        };
        let cookie = self.save_session(rec).await?;
        Ok((cookie, WebSession { caller, csrf }))
    }

    async fn save_session(&self, rec: WebSessionRecord) -> Result<String> {
        let cookie = Secret::generate(COOKIE_PREFIX);
        let key = keys::websession(&cookie.hash());
        let txn = Txn::new().then(Op::put(key, rec.encode_to_vec()));
        self.store.txn(txn).await?;
        Ok(cookie.expose().to_string())
    }

    /// Signs the provider's operator in with the operator credential: the cookie and the CSRF
    /// token of an operator session.
    pub async fn sign_in_operator(&self, credential: &str) -> Result<(String, String)> {
        self.authenticate_operator(credential.trim())?;
        let csrf = Secret::generate("").expose().to_string();
        let rec = WebSessionRecord {
            api_token_hash: Secret::from_string(credential.trim().to_string())
                .hash()
                .to_vec(),
            tenant_id: String::new(),
            csrf: csrf.clone(),
            expires_at_unix: self.now_unix() + SESSION_SECS,
            operator: true,
        };
        Ok((self.save_session(rec).await?, csrf))
    }

    /// The CSRF token of the operator session a cookie names, while it is current and the
    /// controller's operator credential is still the one it signed in with.
    pub async fn operator_session(&self, cookie: &str) -> Result<String> {
        let expired = || Error::Unauthenticated("signed out: sign in again".into());
        let rec = self.session_record(cookie).await?.ok_or_else(expired)?;
        let same = self.operator_token_hash.is_some_and(|h| {
            use subtle::ConstantTimeEq as _;
            bool::from(h.as_slice().ct_eq(&rec.api_token_hash))
        });
        if !rec.operator || !same {
            return Err(expired());
        }
        Ok(rec.csrf)
    }

    /// The current (unexpired) session record a cookie names.
    async fn session_record(&self, cookie: &str) -> Result<Option<WebSessionRecord>> {
        if !cookie.starts_with(COOKIE_PREFIX) || cookie.len() > 100 {
            return Ok(None);
        }
        let key = keys::websession(&Secret::from_string(cookie.to_string()).hash());
        let Some(kv) = self.store.get(key.as_bytes()).await? else {
            return Ok(None);
        };
        let rec: WebSessionRecord = decode(&kv)?;
        Ok((rec.expires_at_unix > self.now_unix()).then_some(rec))
    }

    /// The session a cookie names, if it is current and its API token still valid; counted
    /// against the tenant's rate limit like any console call.
    pub async fn web_session(&self, cookie: &str) -> Result<WebSession> {
        let expired = || Error::Unauthenticated("signed out: sign in again".into());
        let rec = self.session_record(cookie).await?.ok_or_else(expired)?;
        if rec.operator {
            return Err(expired());
        }
        let hash = <[u8; 32]>::try_from(rec.api_token_hash.as_slice()).map_err(|_| expired())?;
        let caller = self
            .authenticate_token_hash(&hash)
            .await
            .map_err(|_| expired())?;
        self.check_rate(&caller)?;
        Ok(WebSession {
            caller,
            csrf: rec.csrf,
        })
    }

    /// Ends the session a cookie names (nothing if there is none).
    pub async fn sign_out(&self, cookie: &str) -> Result<()> {
        let key = keys::websession(&Secret::from_string(cookie.to_string()).hash());
        self.store.txn(Txn::new().then(Op::delete(key))).await?;
        Ok(())
    }
}

/// Whether a form's CSRF token is the session's (compared in constant time).
pub fn csrf_matches(expected: &str, got: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    expected.len() == got.len() && bool::from(expected.as_bytes().ct_eq(got.as_bytes()))
}
