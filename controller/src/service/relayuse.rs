//! Relay use, counted against hosted plans. The controller's relay counts the bytes it forwards
//! per network; every flush this replica adds them to each tenant's count for the calendar
//! month (UTC) in the store (`relayuse/<tenant>/<yyyy-mm>`, read-modify-write, so replicas add
//! up), and its relay refuses the networks of a tenant past its plan's quota until the month
//! ends.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_proto::v1::RelayUseRecord;
use prost::Message;

use super::{Controller, decode};
use crate::error::Result;
use crate::keys;
use crate::server::relay::Relay;
use crate::store::{Compare, Op, Txn};

/// How often a replica takes its relay's counts into the store.
pub const FLUSH: Duration = Duration::from_secs(30);

/// "2026-11" for a Unix time (UTC), by Howard Hinnant's civil-from-days.
pub fn month_of(unix: i64) -> String {
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}")
}

impl Controller {
    /// Adds relayed bytes (per network) to their tenants' counts for this month; returns the
    /// networks whose tenant is now past its plan's relay quota.
    pub async fn account_relay(
        &self,
        per_network: &HashMap<String, u64>,
    ) -> Result<HashSet<String>> {
        let month = month_of(self.now_unix());
        let mut per_tenant: HashMap<String, (u64, Vec<&String>)> = HashMap::new();
        for (net, bytes) in per_network {
            if let Some(t) = self.cache.network(net).map(|n| n.tenant_id) {
                let e = per_tenant.entry(t).or_default();
                e.0 += bytes;
                e.1.push(net);
            }
        }
        let mut over = HashSet::new();
        for (tenant, (bytes, nets)) in per_tenant {
            let total = self.add_relay_use(&tenant, &month, bytes).await?;
            let quota = self.tenant_plan(&tenant).await?.relay_mib_per_month();
            if quota.is_some_and(|mib| total >= mib << 20) {
                tracing::warn!(%tenant, total, "the tenant used up its relay quota for the month");
                over.extend(nets.into_iter().cloned());
            }
        }
        Ok(over)
    }

    async fn add_relay_use(&self, tenant: &str, month: &str, bytes: u64) -> Result<u64> {
        let key = &keys::relayuse(tenant, month);
        crate::txn::retry("count relay use", |_| async move {
            let kv = self.store.get(key.as_bytes()).await?;
            let (old, rev) = match &kv {
                Some(kv) => (decode::<RelayUseRecord>(kv)?.bytes, kv.mod_revision),
                None => (0, 0),
            };
            let total = old.saturating_add(bytes);
            let record = RelayUseRecord { bytes: total };
            let txn = Txn::new()
                .when(Compare::unchanged(key.clone(), rev))
                .then(Op::put(key.clone(), record.encode_to_vec()));
            Ok(self.store.txn(txn).await?.succeeded.then_some(total))
        })
        .await
    }

    /// Bytes relayed for `tenant` this month.
    pub async fn relay_used(&self, tenant: &str) -> Result<u64> {
        let key = keys::relayuse(tenant, &month_of(self.now_unix()));
        Ok(match self.store.get(key.as_bytes()).await? {
            Some(kv) => decode::<RelayUseRecord>(&kv)?.bytes,
            None => 0,
        })
    }
}

/// Every `every`: takes the relay's counts into the store, and has it refuse the networks of
/// tenants past their quota for the rest of the month. Counts that could not be stored go
/// back to the relay for the next try.
pub async fn follow(ctl: Controller, relay: Arc<Mutex<Relay>>, every: Duration) {
    let lock = || relay.lock().unwrap_or_else(|e| e.into_inner());
    let mut blocked: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let usage = lock().take_usage();
        let month = month_of(ctl.now_unix());
        let before = blocked.len();
        blocked.retain(|_, m| *m == month);
        if usage.is_empty() && blocked.len() == before {
            continue;
        }
        match ctl.account_relay(&usage).await {
            Ok(over) => blocked.extend(over.into_iter().map(|n| (n, month.clone()))),
            Err(e) => {
                tracing::warn!(error = %e, "could not count relay use; trying again later");
                lock().restore_usage(usage);
            }
        }
        lock().set_blocked(blocked.keys().cloned().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_time_falls_in_its_calendar_month() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(1_796_083_199), "2026-11"); // 2026-11-30 23:59:59
        assert_eq!(month_of(1_796_083_200), "2026-12");
        assert_eq!(month_of(1_709_164_800), "2024-02"); // 2024-02-29 00:00:00
        assert_eq!(month_of(1_709_251_200), "2024-03");
    }
}
