//! The controller's metrics (`canopy serve --metrics ADDR`, `GET /metrics`): RPCs by method and
//! status code with their latency, live Sync sessions, pacing, enrollments, leader status, hole
//! punches, path reports, and the relay's traffic. Counters live where things happen; the rest
//! is read from live state at scrape time ([`Live`]). Labels are bounded: a method is one of the
//! API's own (anything else is "other"), a code one of gRPC's 17.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use canopy_proto::metrics::{put, put_family};
use canopy_proto::prometheus_client::collector::Collector;
use canopy_proto::prometheus_client::encoding::DescriptorEncoder;
use canopy_proto::prometheus_client::metrics::counter::{ConstCounter, Counter};
use canopy_proto::prometheus_client::metrics::family::Family;
use canopy_proto::prometheus_client::metrics::gauge::ConstGauge;
use canopy_proto::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use canopy_proto::prometheus_client::registry::{Registry, Unit};
use futures::future::BoxFuture;

use crate::server::relay::Relay;
use crate::service::Controller;

type MethodCode = [(&'static str, String); 2];
type Method = [(&'static str, String); 1];

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub struct Metrics {
    rpcs: Family<MethodCode, Counter>,
    rpc_seconds: Family<Method, Histogram, fn() -> Histogram>,
    pub enrollments: Counter,
    pub sessions_paced: Counter,
    pub punches: Counter,
    pub path_reports: Counter,
    /// The API's methods ("ConsoleService/ListPeers"), from the descriptor set.
    methods: HashSet<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            rpcs: Family::default(),
            rpc_seconds: Family::new_with_constructor(latency),
            enrollments: Counter::default(),
            sessions_paced: Counter::default(),
            punches: Counter::default(),
            path_reports: Counter::default(),
            methods: api_methods(),
        }
    }
}

/// "Service/Method" for every method of `canopy.v1`.
fn api_methods() -> HashSet<String> {
    use prost::Message as _;
    let Ok(set) = prost_types::FileDescriptorSet::decode(canopy_proto::v1::FILE_DESCRIPTOR_SET)
    else {
        return HashSet::new();
    };
    let services = set.file.iter().flat_map(|f| &f.service);
    services
        .flat_map(|s| {
            let name = s.name().to_string();
            s.method.iter().map(move |m| format!("{name}/{}", m.name()))
        })
        .collect()
}

impl Metrics {
    /// The method label of request path `path` ("/canopy.v1.ConsoleService/ListPeers").
    fn method(&self, path: &str) -> String {
        match path.strip_prefix("/canopy.v1.") {
            Some(m) if self.methods.contains(m) => m.to_string(),
            _ if path.starts_with("/grpc.health.") => "health".into(),
            _ if path.starts_with("/grpc.reflection.") => "reflection".into(),
            _ => "other".into(),
        }
    }

    fn record(&self, method: String, code: &str, started: Instant) {
        // grpc-go's names: OK, NotFound, Unavailable, …
        let code = match code.parse::<i32>() {
            Ok(0) => "OK".into(),
            Ok(c @ 1..=16) => format!("{:?}", tonic::Code::from(c)),
            _ => "unknown".into(),
        };
        self.rpc_seconds
            .get_or_create(&[("method", method.clone())])
            .observe(started.elapsed().as_secs_f64());
        self.rpcs
            .get_or_create(&[("method", method), ("code", code)])
            .inc();
    }

    /// The registry `/metrics` shows: these metrics and `live`'s.
    pub fn registry(&self, live: Live) -> Registry {
        let mut r = Registry::default();
        r.register(
            "canopy_rpc_requests",
            "gRPC calls by method and status code (a stream counts when it opens)",
            self.rpcs.clone(),
        );
        r.register_with_unit(
            "canopy_rpc_duration",
            "Time to a gRPC call's answer headers",
            Unit::Seconds,
            self.rpc_seconds.clone(),
        );
        r.register(
            "canopy_enrollments",
            "Peers enrolled",
            self.enrollments.clone(),
        );
        r.register(
            "canopy_sync_sessions_paced",
            "Sync sessions told to come back later (pacing)",
            self.sessions_paced.clone(),
        );
        r.register(
            "canopy_punches",
            "Hole punches written for agents",
            self.punches.clone(),
        );
        r.register(
            "canopy_path_reports",
            "Path reports agents made that were stored",
            self.path_reports.clone(),
        );
        r.register_collector(Box::new(live));
        r
    }
}

/// What is read at scrape time: live sessions, leadership, each network's revision, the relay.
pub struct Live {
    pub ctl: Controller,
    pub relay: Option<Arc<Mutex<Relay>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let ctl = &self.ctl;
        let sessions = ctl.sessions.len() as i64;
        put(
            &mut enc,
            "canopy_sync_sessions",
            "Live agent Sync sessions on this replica",
            None,
            ConstGauge::new(sessions),
        )?;
        let leading = i64::from(ctl.leading.load(std::sync::atomic::Ordering::Relaxed));
        put(
            &mut enc,
            "canopy_leader",
            "1 while this replica runs the background work",
            None,
            ConstGauge::new(leading),
        )?;
        put(
            &mut enc,
            "canopy_store_revision",
            "The store revision this replica's cache reflects",
            None,
            ConstGauge::new(ctl.cache.applied()),
        )?;
        convergence(ctl, &mut enc)?;
        tenants(ctl, &mut enc)?;
        store_writes(&mut enc)?;
        let Some(relay) = &self.relay else {
            return Ok(());
        };
        let (s, bindings) = {
            let r = relay.lock().unwrap_or_else(|e| e.into_inner());
            (r.stats, r.bindings() as i64)
        };
        put(
            &mut enc,
            "canopy_relay_datagrams",
            "Datagrams the relay forwarded",
            None,
            ConstCounter::new(s.forwarded),
        )?;
        put(
            &mut enc,
            "canopy_relay",
            "Payload the relay forwarded",
            Some(&Unit::Bytes),
            ConstCounter::new(s.bytes),
        )?;
        put(
            &mut enc,
            "canopy_relay_dropped",
            "Relay messages dropped (unbound, forged, over a limit or quota)",
            None,
            ConstCounter::new(s.dropped),
        )?;
        put(
            &mut enc,
            "canopy_relay_binds",
            "BINDs the relay took",
            None,
            ConstCounter::new(s.binds),
        )?;
        put_family(
            &mut enc,
            "canopy_relay_bindings",
            "Peers bound at the relay now",
            None,
            vec![(vec![], ConstGauge::new(bindings))],
        )
    }
}

/// The read → decide → write operations of this process (`txn::retry`).
fn store_writes(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &crate::txn::STATS;
    let ops = s.operations.load(Relaxed);
    put(
        enc,
        "canopy_store_operations",
        "Read-decide-write store operations that ended (committed or failed)",
        None,
        ConstCounter::new(ops),
    )?;
    put(
        enc,
        "canopy_store_conflicts",
        "Attempts lost to a conflicting write and retried",
        None,
        ConstCounter::new(s.conflicts.load(Relaxed)),
    )?;
    put(
        enc,
        "canopy_store_gave_up",
        "Operations that gave up after repeated conflicts (Unavailable)",
        None,
        ConstCounter::new(s.gave_up.load(Relaxed)),
    )?;
    let secs = s.micros.load(Relaxed) as f64 / 1e6;
    put(
        enc,
        "canopy_store_operation",
        "Time store operations took, summed (divide by canopy_store_operations_total)",
        Some(&Unit::Seconds),
        ConstCounter::new(secs),
    )
}

/// Per tenant (hosted: one label per subscriber, bounded by the tenants with networks): its
/// networks and peers, and its agents with a session on this replica.
fn tenants(ctl: &Controller, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let census = ctl.cache.census();
    let mut per: std::collections::BTreeMap<&str, [i64; 3]> = Default::default();
    for (tenant, peers) in census.values() {
        let t = per.entry(tenant).or_default();
        t[0] += 1;
        t[1] += *peers as i64;
    }
    for (net, acks) in ctl.sessions.by_network() {
        if let Some((tenant, _)) = census.get(&net) {
            per.entry(tenant).or_default()[2] += acks.len() as i64;
        }
    }
    let rows = |i: usize| -> Vec<(canopy_proto::metrics::Labels, ConstGauge<i64>)> {
        let row =
            |(t, v): (&&str, &[i64; 3])| (vec![("tenant", t.to_string())], ConstGauge::new(v[i]));
        per.iter().map(row).collect()
    };
    put_family(
        enc,
        "canopy_tenant_networks",
        "A tenant's networks",
        None,
        rows(0),
    )?;
    put_family(
        enc,
        "canopy_tenant_peers",
        "A tenant's peers",
        None,
        rows(1),
    )?;
    let help = "A tenant's agents with a Sync session on this replica";
    put_family(enc, "canopy_tenant_sync_sessions", help, None, rows(2))
}

/// Per network with sessions here: its revision, the lowest one an agent acknowledged (the gap
/// is how far the slowest agent lags), and how many sessions it has.
fn convergence(ctl: &Controller, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let (mut revs, mut acked, mut p99, mut live) = (vec![], vec![], vec![], vec![]);
    for (net, acks) in ctl.sessions.by_network() {
        let labels = vec![("network", net.clone())];
        let rev = ctl.cache.network_revision(&net).unwrap_or(0);
        revs.push((labels.clone(), ConstGauge::new(rev)));
        acked.push((labels.clone(), ConstGauge::new(acks[0])));
        // At least 99% of the agents acknowledged this revision (the slowest 1% may lag).
        p99.push((labels.clone(), ConstGauge::new(acks[acks.len() / 100])));
        live.push((labels, ConstGauge::new(acks.len() as i64)));
    }
    let help = "The lowest map revision an agent of the network acknowledged on this replica";
    put_family(
        enc,
        "canopy_network_revision",
        "A network's map revision",
        None,
        revs,
    )?;
    put_family(enc, "canopy_network_acked_revision_min", help, None, acked)?;
    let help = "A revision at least 99% of the network's agents on this replica acknowledged";
    put_family(enc, "canopy_network_acked_revision_p99", help, None, p99)?;
    let help = "Live Sync sessions of the network on this replica";
    put_family(enc, "canopy_network_sync_sessions", help, None, live)
}

/// Counts every gRPC call by method and code, and times it to its answer headers.
#[derive(Clone)]
pub struct RpcLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            m: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    m: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (m, started) = (self.m.clone(), Instant::now());
        let method = m.method(req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            if let Ok(resp) = &r {
                // An error answer carries its status in the headers; a success in trailers.
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok());
                m.record(method, code.unwrap_or("0"), started);
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_the_apis_own_and_anything_else_is_other() {
        let m = Metrics::default();
        assert_eq!(
            m.method("/canopy.v1.ConsoleService/ListPeers"),
            "ConsoleService/ListPeers"
        );
        assert_eq!(
            m.method("/canopy.v1.AgentService/Sync"),
            "AgentService/Sync"
        );
        assert_eq!(m.method("/canopy.v1.ConsoleService/Nope123"), "other");
        assert_eq!(m.method("/x/y"), "other");
        assert_eq!(m.method("/grpc.health.v1.Health/Check"), "health");
    }
}
