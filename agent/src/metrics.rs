//! The agent's metrics (`canopy-agent join … --metrics ADDR`, `GET /metrics`), read from the
//! data plane and the control client at scrape time: per peer (labelled by hostname, bounded by
//! the map) bytes each way, last handshake age and whether it is relayed; packets dropped by
//! reason; the map revision applied; whether the controller stream is up.

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

pub struct AgentLive {
    pub dp: Arc<Dataplane>,
    pub maps: watch::Receiver<Option<NetworkMap>>,
    pub connected: watch::Receiver<bool>,
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

impl Collector for AgentLive {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let (drops, peers) = self.dp.counters();
        let (revision, names) = {
            let map = self.maps.borrow();
            let m = map.as_ref();
            let names: std::collections::HashMap<Vec<u8>, String> = m
                .iter()
                .flat_map(|m| &m.peers)
                .map(|p| (p.public_key.clone(), p.hostname.clone()))
                .collect();
            (m.map_or(0, |m| m.revision), names)
        };
        let peer = |k: &[u8; 32]| -> Labels {
            let name = names.get(k.as_slice()).cloned();
            vec![("peer", name.unwrap_or_else(|| crate::keys::encode(k)))]
        };
        let rows = |f: &dyn Fn(&crate::engine::PeerStatus) -> Option<u64>| {
            let rows = peers
                .iter()
                .filter_map(|p| Some((peer(&p.config.public_key), f(p)?)));
            rows.collect::<Vec<_>>()
        };
        let counters = |v: Vec<(Labels, u64)>| {
            v.into_iter()
                .map(|(l, n)| (l, ConstCounter::new(n)))
                .collect()
        };
        let gauges = |v: Vec<(Labels, u64)>| {
            v.into_iter()
                .map(|(l, n)| (l, ConstGauge::new(n as i64)))
                .collect()
        };
        let bytes = Some(&Unit::Bytes);
        put_family(
            &mut enc,
            "canopy_agent_peer_received",
            "Bytes received from each peer",
            bytes,
            counters(rows(&|p| Some(p.rx_bytes))),
        )?;
        put_family(
            &mut enc,
            "canopy_agent_peer_sent",
            "Bytes sent to each peer",
            bytes,
            counters(rows(&|p| Some(p.tx_bytes))),
        )?;
        let age = rows(&|p| p.since_handshake.map(|d| d.as_secs()));
        put_family(
            &mut enc,
            "canopy_agent_peer_last_handshake",
            "Time since the last handshake with each peer",
            Some(&Unit::Seconds),
            gauges(age),
        )?;
        let relayed = rows(&|p| {
            Some(u64::from(
                p.config.endpoint.is_some_and(|e| dataplane::is_relayed(&e)),
            ))
        });
        put_family(
            &mut enc,
            "canopy_agent_peer_relayed",
            "1 while a peer is reached through the relay",
            None,
            gauges(relayed),
        )?;
        let reasons = [
            ("spoofed", drops.spoofed),
            ("no_route", drops.no_route),
            ("invalid", drops.invalid),
            ("policy", drops.policy),
        ];
        let dropped = reasons
            .iter()
            .map(|(r, n)| (vec![("reason", (*r).to_string())], ConstCounter::new(*n)))
            .collect();
        put_family(
            &mut enc,
            "canopy_agent_dropped_packets",
            "Packets the engine refused, by reason",
            None,
            dropped,
        )?;
        put(
            &mut enc,
            "canopy_agent_map_revision",
            "The network map revision applied",
            None,
            ConstGauge::new(revision),
        )?;
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
