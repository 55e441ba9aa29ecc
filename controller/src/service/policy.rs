//! A network's access policy: get, set (checked whole, versioned, within the plan), test.

use std::net::IpAddr;

use canopy_proto::v1::{
    PeerRecord, Policy as PolicyView, PolicyRecord, RouteRecord, TestPolicyResponse,
};
use ipnetwork::IpNetwork;
use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::plans::Plan;
use crate::policy::eval::{self, Packet, PeerView, Verdict};
use crate::policy::{self, Policy, Proto};
use crate::store::{Compare, Op, Txn};

/// Bytes of the audit entry's diff, at most.
const DIFF_BYTES: usize = 2048;

/// What a set changes, for the audit log: the changed lines, clipped.
pub(super) fn diff(old: &str, new: &str) -> String {
    let d = similar::TextDiff::from_lines(old, new);
    let mut out = String::new();
    for change in d.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => continue,
        };
        let line = format!("{sign}{}", change.value().trim_end());
        if out.len() + line.len() + 1 > DIFF_BYTES {
            out.push('…');
            break;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Whether a checked `policy` fits `plan`.
pub(super) fn check_policy_quota(plan: Plan, policy: &Policy) -> Result<()> {
    let limit = plan.policy_rules();
    if policy.rules.len() as u64 > u64::from(limit) {
        return Err(Error::ResourceExhausted(format!(
            "the {} plan allows {limit} rules per network policy (this one has {})",
            plan.name(),
            policy.rules.len()
        )));
    }
    Ok(())
}

fn view(network_id: &str, rec: Option<(PolicyRecord, i64)>) -> PolicyView {
    match rec {
        Some((r, rev)) => PolicyView {
            network_id: network_id.to_string(),
            text: r.text,
            revision: rev,
            updated_at_unix: r.updated_at_unix,
            updated_by: r.updated_by,
            lock: r.lock,
        },
        None => PolicyView {
            network_id: network_id.to_string(),
            ..Default::default()
        },
    }
}

impl Controller {
    async fn policy_record(&self, network_id: &str) -> Result<Option<(PolicyRecord, i64)>> {
        let kv = self.store.get(keys::policy(network_id).as_bytes()).await?;
        kv.map(|kv| Ok((decode::<PolicyRecord>(&kv)?, kv.mod_revision)))
            .transpose()
    }

    pub async fn get_policy(&self, c: &Caller, network: &str) -> Result<PolicyView> {
        let (net, _) = self.resolve_network(c, network).await?;
        Ok(view(&net.id, self.policy_record(&net.id).await?))
    }

    /// Sets (or with `text` = None removes) a network's policy; `if_revision` refuses a stale
    /// write. Returns the new policy and the diff against the old one.
    pub async fn set_policy(
        &self,
        c: &Caller,
        network: &str,
        text: Option<&str>,
        if_revision: Option<i64>,
        lock: Option<&canopy_proto::v1::Signed>,
    ) -> Result<(PolicyView, String)> {
        c.require_admin()?;
        let checked = text
            .map(policy::parse)
            .transpose()
            .map_err(|e| Error::InvalidArgument(format!("policy: {e}")))?;
        let checked = &checked;
        crate::txn::retry("set policy", |_| async move {
            let tenant = self.tenant_guard(&c.tenant).await?;
            if let Some(p) = checked {
                check_policy_quota(tenant.plan, p)?;
            }
            let (net, net_rev) = self.resolve_network(c, network).await?;
            let old = self.policy_record(&net.id).await?;
            let old_rev = old.as_ref().map_or(0, |(_, r)| *r);
            if let Some(want) = if_revision
                && want != old_rev
            {
                return Err(Error::FailedPrecondition(format!(
                    "the policy is at revision {old_rev}, not {want}: someone changed it; get it again"
                )));
            }
            let signed = super::lock::check_policy(&net, old.as_ref().map(|o| &o.0), text, lock)?;
            let key = keys::policy(&net.id);
            let mut txn = Txn::new()
                .when(tenant.compare)
                .when(Compare::unchanged(keys::network(&c.tenant, &net.id), net_rev))
                .when(Compare::unchanged(key.clone(), old_rev));
            let rec = text.map(|t| PolicyRecord {
                network_id: net.id.clone(),
                text: t.to_string(),
                updated_at_unix: self.now_unix(),
                updated_by: c.token_id.clone(),
                lock: signed.clone(),
            });
            txn = match &rec {
                Some(r) => txn.then(Op::put(key, r.encode_to_vec())),
                None => txn.then(Op::delete(key)),
            };
            let res = self.store.txn(txn).await?;
            if !res.succeeded {
                return Ok(None);
            }
            let old_text = old.map(|(r, _)| r.text).unwrap_or_default();
            let d = diff(&old_text, text.unwrap_or_default());
            tracing::info!(network = %net.id, removed = text.is_none(), "policy set");
            Ok(Some((view(&net.id, rec.map(|r| (r, res.revision))), d)))
        })
        .await
    }

    /// Whether peer `from` may open `proto`/`port` on `to` (a peer by id or hostname, or an
    /// address: a peer's, or one in a site behind a gateway), and why.
    pub async fn test_policy(
        &self,
        c: &Caller,
        network: &str,
        from: &str,
        to: &str,
        proto: &str,
        port: u32,
    ) -> Result<TestPolicyResponse> {
        let proto: Proto = proto.parse().map_err(Error::InvalidArgument)?;
        if proto == Proto::Any {
            return Err(Error::InvalidArgument(
                "test one protocol: tcp, udp or icmp".into(),
            ));
        }
        let port = u16::try_from(port)
            .map_err(|_| Error::InvalidArgument(format!("port {port} is not 0-65535")))?;
        let (net, _) = self.resolve_network(c, network).await?;
        let peers: Vec<PeerRecord> = self.records(&keys::peers(&net.id)).await?;
        let routes: Vec<RouteRecord> = self.records(&keys::routes(&net.id)).await?;
        let find = |r: &str| find_peer(&peers, r, &net.name);
        let a = find(from)?;
        let (b, dst) = match to.parse::<IpAddr>() {
            Ok(ip) => self.destination(&peers, &routes, ip).ok_or_else(|| {
                Error::NotFound(format!(
                    "{ip} is no peer's address and in no route of network {}",
                    net.name
                ))
            })?,
            Err(_) => {
                let b = find(to)?;
                let dst = addresses(b).first().map(IpNetwork::ip).ok_or_else(|| {
                    Error::FailedPrecondition(format!("peer {} has no address", b.id))
                })?;
                (b, dst)
            }
        };
        let (aa, ba) = (addresses(a), addresses(b));
        let routed = |p: &PeerRecord| -> Vec<IpNetwork> {
            let of_p = routes.iter().filter(|r| r.peer_id == p.id);
            of_p.filter_map(|r| r.prefix.parse().ok()).collect()
        };
        let (ar, br) = (routed(a), routed(b));
        let policy =
            match self.policy_record(&net.id).await? {
                Some((r, _)) => Some(policy::parse(&r.text).map_err(|e| {
                    Error::Internal(format!("the stored policy does not parse: {e}"))
                })?),
                None => None,
            };
        let from_view = PeerView {
            id: &a.id,
            tags: &a.tags,
            addresses: &aa,
            routes: &ar,
        };
        let to_view = PeerView {
            id: &b.id,
            tags: &b.tags,
            addresses: &ba,
            routes: &br,
        };
        let pkt = Packet { proto, port, dst };
        let (verdict, explanation) = eval::explain(policy.as_ref(), &from_view, &to_view, &pkt);
        let (rule, line) = match (verdict, &policy) {
            (Verdict::Allowed(i), Some(p)) => (p.rules[i].name.clone(), p.rules[i].line as u32),
            _ => (String::new(), 0),
        };
        Ok(TestPolicyResponse {
            allowed: verdict.allowed(),
            rule,
            line,
            explanation,
        })
    }
}

impl Controller {
    /// Every record under `prefix`, decoded.
    async fn records<M: prost::Message + Default>(&self, prefix: &str) -> Result<Vec<M>> {
        let r = self.store.range(prefix.as_bytes()).await?;
        r.kvs.iter().map(decode).collect()
    }

    /// Where a packet to `ip` ends: the peer with that address, or the gateway carrying the
    /// most specific route that holds it (the primary one, else the oldest).
    fn destination<'a>(
        &self,
        peers: &'a [PeerRecord],
        routes: &[RouteRecord],
        ip: IpAddr,
    ) -> Option<(&'a PeerRecord, IpAddr)> {
        if let Some(p) = peers
            .iter()
            .find(|p| addresses(p).iter().any(|a| a.ip() == ip))
        {
            return Some((p, ip));
        }
        let holds = |r: &&RouteRecord| r.prefix.parse::<IpNetwork>().is_ok_and(|n| n.contains(ip));
        let rank = |r: &&RouteRecord| {
            let len = r.prefix.parse::<IpNetwork>().map_or(0, |n| n.prefix());
            let primary = self.cache.route_is_primary(&r.network_id, &r.id);
            (std::cmp::Reverse(len), !primary, r.created_at_unix)
        };
        let r = routes.iter().filter(holds).min_by_key(rank)?;
        Some((peers.iter().find(|p| p.id == r.peer_id)?, ip))
    }
}

/// Peer `r` (an id or a hostname) of `peers`, or NotFound naming network `net`.
fn find_peer<'a>(peers: &'a [PeerRecord], r: &str, net: &str) -> Result<&'a PeerRecord> {
    peers
        .iter()
        .find(|p| p.id == r)
        .or_else(|| peers.iter().find(|p| p.hostname == r))
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no peer {} in network {net}",
                canopy_proto::text::quoted(r)
            ))
        })
}

fn addresses(p: &PeerRecord) -> Vec<IpNetwork> {
    p.addresses.iter().filter_map(|s| s.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_diff_lists_changed_lines_only_and_is_clipped() {
        let d = diff("a\nb\nc\n", "a\nB\nc\nd\n");
        assert_eq!(d, "-b\n+B\n+d\n");
        let big = "x\n".repeat(5000);
        let d = diff("", &big);
        assert!(d.len() <= DIFF_BYTES + 4 && d.ends_with('…'), "{}", d.len());
    }

    #[test]
    fn a_policy_over_the_plans_rules_is_refused() {
        let rule = "[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\n";
        let p = policy::parse(&rule.repeat(21)).unwrap();
        let e = check_policy_quota(Plan::Free, &p).unwrap_err();
        assert!(e.to_string().contains("allows 20 rules"), "{e}");
        assert!(check_policy_quota(Plan::Team, &p).is_ok());
    }
}
