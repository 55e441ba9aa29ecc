//! The agent's metrics (`canopy-agent join … --metrics ADDR`, `GET /metrics`), read from the
//! data plane and the control client at scrape time: per peer (labelled by hostname, bounded by
//! the map) bytes each way, last handshake age and whether it is relayed; packets dropped by
//! reason; the map revision applied; whether the controller stream is up; questions to the
//! resolver by answer.

use std::collections::HashMap;
use std::sync::Arc;

use canopy_proto::metrics::{Labels, put, put_family};
use canopy_proto::prometheus_client::collector::Collector;
use canopy_proto::prometheus_client::encoding::DescriptorEncoder;
use canopy_proto::prometheus_client::metrics::counter::ConstCounter;
use canopy_proto::prometheus_client::metrics::gauge::ConstGauge;
use canopy_proto::prometheus_client::registry::{Registry, Unit};
use canopy_proto::v1::NetworkMap;
use tokio::sync::watch;

use crate::dataplane::{self, Dataplane};
use crate::engine::PeerStatus;

pub struct AgentLive {
    pub dp: Arc<Dataplane>,
    pub maps: watch::Receiver<Option<NetworkMap>>,
    pub connected: watch::Receiver<bool>,
    pub lock: Arc<crate::lock::LockStats>,
}

impl std::fmt::Debug for AgentLive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentLive")
    }
}

impl AgentLive {
    pub fn registry(self) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(self));
        r
    }
}

type Row = (Labels, u64);

fn counters(v: Vec<Row>) -> Vec<(Labels, ConstCounter<u64>)> {
    v.into_iter()
        .map(|(l, n)| (l, ConstCounter::new(n)))
        .collect()
}

fn gauges(v: Vec<Row>) -> Vec<(Labels, ConstGauge<i64>)> {
    let g = |n: u64| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
    v.into_iter().map(|(l, n)| (l, g(n))).collect()
}

impl AgentLive {
    /// The map's revision, and peer hostnames by key (the `peer` label; bounded by the map).
    fn map_view(&self) -> (i64, HashMap<Vec<u8>, String>) {
        let map = self.maps.borrow();
        let m = map.as_ref();
        let names = m.iter().flat_map(|m| &m.peers);
        let names = names.map(|p| (p.public_key.clone(), p.hostname.clone()));
        (m.map_or(0, |m| m.revision), names.collect())
    }
}

/// The per-peer families.
fn per_peer(
    enc: &mut DescriptorEncoder,
    peers: &[PeerStatus],
    names: &HashMap<Vec<u8>, String>,
) -> std::fmt::Result {
    let label = |k: &[u8; 32]| -> Labels {
        let name = names.get(k.as_slice()).cloned();
        vec![("peer", name.unwrap_or_else(|| crate::keys::encode(k)))]
    };
    let rows = |f: &dyn Fn(&PeerStatus) -> Option<u64>| -> Vec<Row> {
        let rows = peers
            .iter()
            .filter_map(|p| Some((label(&p.config.public_key), f(p)?)));
        rows.collect()
    };
    let bytes = Some(&Unit::Bytes);
    put_family(
        enc,
        "canopy_agent_peer_received",
        "Bytes received from each peer",
        bytes,
        counters(rows(&|p| Some(p.rx_bytes))),
    )?;
    put_family(
        enc,
        "canopy_agent_peer_sent",
        "Bytes sent to each peer",
        bytes,
        counters(rows(&|p| Some(p.tx_bytes))),
    )?;
    let age = rows(&|p| p.since_handshake.map(|d| d.as_secs()));
    put_family(
        enc,
        "canopy_agent_peer_last_handshake",
        "Time since the last handshake with each peer",
        Some(&Unit::Seconds),
        gauges(age),
    )?;
    put_family(
        enc,
        "canopy_agent_peer_handshake_attempts",
        "Handshake initiations sent to each peer",
        None,
        counters(rows(&|p| Some(p.handshake_attempts))),
    )?;
    put_family(
        enc,
        "canopy_agent_peer_handshake_failures",
        "Handshakes with each peer given up unanswered (after 90 s of retries)",
        None,
        counters(rows(&|p| Some(p.handshake_failures))),
    )?;
    let relayed = |p: &PeerStatus| p.config.endpoint.is_some_and(|e| dataplane::is_relayed(&e));
    let relayed = rows(&|p| Some(u64::from(relayed(p))));
    put_family(
        enc,
        "canopy_agent_peer_relayed",
        "1 while a peer is reached through the relay",
        None,
        gauges(relayed),
    )
}

impl AgentLive {
    fn encode_lock(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let g = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        put(
            enc,
            "canopy_agent_lock_refused",
            "Peers and routes of the map held now not signed by a trusted lock key (not applied)",
            None,
            g(n(&self.lock.refused_now)),
        )?;
        put(
            enc,
            "canopy_agent_lock_refusals",
            "Peers and routes refused by the network lock since start",
            None,
            ConstCounter::new(n(&self.lock.refused_total)),
        )?;
        put(
            enc,
            "canopy_agent_lock_key_set_serial",
            "Serial of the network lock key set this node trusts (0: not locked)",
            None,
            g(n(&self.lock.serial)),
        )
    }
}

impl Collector for AgentLive {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let (drops, peers) = self.dp.counters();
        let (revision, names) = self.map_view();
        per_peer(&mut enc, &peers, &names)?;
        let reasons = [
            ("spoofed", drops.spoofed),
            ("no_route", drops.no_route),
            ("invalid", drops.invalid),
            ("policy", drops.policy),
        ];
        let dropped = reasons
            .iter()
            .map(|(r, n)| (vec![("reason", (*r).to_string())], *n))
            .collect();
        put_family(
            &mut enc,
            "canopy_agent_dropped_packets",
            "Packets the engine refused, by reason",
            None,
            counters(dropped),
        )?;
        put(
            &mut enc,
            "canopy_agent_map_revision",
            "The network map revision applied",
            None,
            ConstGauge::new(revision),
        )?;
        let dns = crate::dns::serve::RCODES
            .iter()
            .zip(&crate::dns::serve::ANSWERED);
        let dns = dns.map(|(c, n)| {
            (
                vec![("rcode", (*c).to_string())],
                n.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        put_family(
            &mut enc,
            "canopy_agent_dns_queries",
            "Questions to the agent's resolver, by answer (dropped: none sent)",
            None,
            counters(dns.collect()),
        )?;
        self.encode_lock(&mut enc)?;
        let up = i64::from(*self.connected.borrow());
        put(
            &mut enc,
            "canopy_agent_controller_connected",
            "1 while the controller stream is up",
            None,
            ConstGauge::new(up),
        )
    }
}
