//! The per-tenant audit log.

use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::Result;
use crate::keys;
use crate::secret;
use crate::store::{Op, Txn};

/// The per-tenant audit log: `audit/<tenant>/<millis, 20 digits>-<random>` → AuditEntry, so a
/// range read in key order is oldest first.
impl Controller {
    /// Records a change. Written after the change commits: an entry can be missing if the
    /// store fails in between, never present for a change that did not happen.
    pub async fn audit(&self, tenant: &str, actor: &str, action: &str, object: &str, detail: &str) {
        let at = self.clock.now_ms();
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
