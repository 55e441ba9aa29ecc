//! Prometheus metrics of a real overlay: the controller's and two agents' `/metrics`, scraped
//! during a netns test and parsed with the reference OpenMetrics parser (Debian's
//! python3-prometheus-client); the counters move as enrollments, traffic and drops happen.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use canopy_tests::controller::*;
use canopy_tests::netns::Lab;

/// `url` scraped from namespace `ns` and parsed: sample (name and labels) → value.
fn scrape(lab: &Lab, ns: &str, url: &str) -> HashMap<String, f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/metrics.py");
    let out = lab.run(ns, &["/usr/bin/python3", script, url]);
    assert!(
        out.status.success(),
        "{url} is not valid OpenMetrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn get(m: &HashMap<String, f64>, sample: &str) -> f64 {
    *m.get(sample)
        .unwrap_or_else(|| panic!("no {sample} in {:?}", m.keys().collect::<Vec<_>>()))
}

/// The controller's metrics once two agents enrolled and follow their maps.
fn controller_counts(lab: &Lab, ctl_url: &str) {
    let c = scrape(lab, &lab.hub, ctl_url);
    assert_eq!(get(&c, "canopy_enrollments_total{}"), 2.0);
    assert_eq!(get(&c, "canopy_sync_sessions{}"), 2.0);
    assert_eq!(get(&c, "canopy_leader{}"), 1.0);
    let enrolls = r#"canopy_rpc_requests_total{code="OK",method="AgentService/Enroll"}"#;
    assert_eq!(get(&c, enrolls), 2.0);
    assert!(
        get(
            &c,
            r#"canopy_rpc_duration_seconds_count{method="AgentService/Enroll"}"#
        ) >= 2.0
    );

    assert!(
        get(&c, "canopy_store_operations_total{}") >= 2.0,
        "the enrollments"
    );
    // Converged: the slowest agent acknowledged the network's revision.
    let rev = c
        .keys()
        .find(|k| k.starts_with("canopy_network_revision{"))
        .unwrap()
        .clone();
    let acked = rev.replace("_revision{", "_acked_revision_min{");
    wait_until("the agents to acknowledge the network's revision", || {
        let c = scrape(lab, &lab.hub, ctl_url);
        get(&c, &acked) == get(&c, &rev)
    });
    assert_eq!(get(&c, &rev.replace("_revision{", "_sync_sessions{")), 2.0);
    let c = scrape(lab, &lab.hub, ctl_url);
    let p99 = rev.replace("_revision{", "_acked_revision_p99{");
    assert_eq!(get(&c, &p99), get(&c, &rev));
    // The one tenant of a self-managed controller: its network, peers and sessions.
    let tenant = |family: &str| {
        let k = c
            .keys()
            .find(|k| k.starts_with(&format!("{family}{{tenant=")));
        get(&c, k.unwrap_or_else(|| panic!("no {family}")))
    };
    assert_eq!(tenant("canopy_tenant_networks"), 1.0);
    assert_eq!(tenant("canopy_tenant_peers"), 2.0);
    assert_eq!(tenant("canopy_tenant_sync_sessions"), 2.0);
}

#[test]
fn controller_and_agent_metrics_count_enrollments_traffic_and_drops() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let ctl_url = "http://192.0.2.254:9464/metrics";
    let con = controller_with(&lab, dir.path(), &data, &["--metrics", "192.0.2.254:9464"]);
    let join = network_with_token(&con, "m", "100.64.30.0/24", 2);
    let metrics = ["--metrics", "127.0.0.1:9465"];
    let a = start_agent_with(&lab, dir.path(), &join, "a", 1, &metrics);
    let b = start_agent_with(&lab, dir.path(), &join, "b", 2, &metrics);
    for n in [&a, &b] {
        wait_until("the agents to see each other", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 1)
        });
    }
    controller_counts(&lab, ctl_url);

    let agent_url = "http://127.0.0.1:9465/metrics";
    let before = scrape(&lab, &a.host.ns, agent_url);
    assert_eq!(get(&before, "canopy_agent_controller_connected{}"), 1.0);
    assert!(get(&before, "canopy_agent_map_revision{}") > 0.0);
    let sent = r#"canopy_agent_peer_sent_bytes_total{peer="b"}"#;
    let ba = addr(&status(&lab, &b.host.ns, &b.state).unwrap(), 0);
    assert!(lab.ping(&a.host.ns, &ba, Duration::from_secs(5)));
    canopy_tests::overlay::transfer_intact(&lab, &a.host.ns, &b.host.ns, &ba, 1, "a → b");
    let after = scrape(&lab, &a.host.ns, agent_url);
    let moved = get(&after, sent) - before.get(sent).copied().unwrap_or(0.0);
    assert!(
        moved > 1_000_000.0,
        "a sent {moved} bytes to b by its metrics"
    );
    assert!(
        get(
            &after,
            r#"canopy_agent_peer_last_handshake_seconds{peer="b"}"#
        ) < 30.0
    );
    // One of the two initiated the handshake; neither gave one up.
    let count = |ns: &str, family: &str, peer: &str| {
        let m = scrape(&lab, ns, agent_url);
        get(
            &m,
            &format!(r#"canopy_agent_peer_handshake_{family}_total{{peer="{peer}"}}"#),
        )
    };
    let initiated = count(&a.host.ns, "attempts", "b") + count(&b.host.ns, "attempts", "a");
    assert!(initiated >= 1.0);
    assert_eq!(count(&a.host.ns, "failures", "b"), 0.0);
    // On one LAN the pair settles on the direct path (a first handshake may go by the relay).
    wait_until("a reaches b directly, by its metrics", || {
        let m = scrape(&lab, &a.host.ns, agent_url);
        get(&m, r#"canopy_agent_peer_relayed{peer="b"}"#) == 0.0
    });

    // b sends to an overlay address no peer has: dropped for no route, counted.
    let no_route = r#"canopy_agent_dropped_packets_total{reason="no_route"}"#;
    let was = get(&scrape(&lab, &b.host.ns, agent_url), no_route);
    lab.run(
        &b.host.ns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "1", "100.64.30.250"],
    );
    let now = get(&scrape(&lab, &b.host.ns, agent_url), no_route);
    assert!(now >= was + 3.0, "no-route drops {was} → {now}");

    dns_answers_are_counted(&lab, &a, &ba);
    dashboard_names_exist(&[
        scrape(&lab, &lab.hub, "http://192.0.2.254:9464/metrics"),
        scrape(&lab, &a.host.ns, agent_url),
    ]);
}

/// Every metric the Grafana dashboard in deploy/ queries is one the endpoints serve.
fn dashboard_names_exist(scrapes: &[HashMap<String, f64>]) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/monitoring/grafana-dashboard.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let served: std::collections::HashSet<&str> = scrapes
        .iter()
        .flat_map(|m| m.keys())
        .map(|k| k.split('{').next().unwrap())
        .collect();
    let mut queried: Vec<&str> = text
        .match_indices("canopy_")
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            &rest[..end.unwrap_or(rest.len())]
        })
        .filter(|n| n.contains('_') && *n != "canopy_")
        .collect();
    queried.sort_unstable();
    queried.dedup();
    assert!(queried.len() > 10, "{queried:?}");
    for n in queried {
        assert!(
            served.contains(n),
            "the dashboard queries {n}, which no endpoint serves"
        );
    }
}

/// Questions to a's resolver (`dig` for b, a missing name, a name outside the zone), counted
/// by answer.
fn dns_answers_are_counted(lab: &Lab, a: &Node, ba: &str) {
    let agent_url = "http://127.0.0.1:9465/metrics";
    // Questions to a's resolver, by answer.
    let aa = addr(&status(lab, &a.host.ns, &a.state).unwrap(), 0);
    let ask = |name: &str| {
        let at = format!("@{aa}");
        lab.run(
            &a.host.ns,
            &["dig", &at, name, "+short", "+time=1", "+tries=1"],
        )
    };
    let out = ask("b.m.canopy");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ba);
    ask("nobody.m.canopy");
    ask("example.com");
    let m = scrape(lab, &a.host.ns, agent_url);
    for rcode in ["noerror", "nxdomain", "refused"] {
        let q = format!(r#"canopy_agent_dns_queries_total{{rcode="{rcode}"}}"#);
        assert!(get(&m, &q) >= 1.0, "{q}");
    }
}
