//! Two gateways to one site (10.20.0.0/24 on a bridge behind both): the controller routes the
//! prefix through the live one; when its agent is killed during a ping flood, traffic resumes
//! through the other, and a gateway that comes back does not take the prefix back.
//! `canopy serve` in the hub, agents on real TUN devices. Needs root and nft.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use canopy_tests::controller::*;
use canopy_tests::netns::Lab;
use canopy_tests::sites::*;

/// Sent every this often by the ping flood.
const PING_INTERVAL_MS: u64 = 50;

/// The prefix's routes as `canopy route list` shows them: (gateway peer id, primary).
fn routes(con: &Console) -> Vec<(String, bool)> {
    let out = con.ok(&["route", "list", "--network", "sites", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let gw = r["peer_id"].as_str().unwrap().to_string();
            (gw, r["primary"].as_bool().unwrap_or(false))
        })
        .collect()
}

fn primary(con: &Console) -> Option<String> {
    routes(con).into_iter().find(|r| r.1).map(|r| r.0)
}

/// The ICMP sequence numbers answered in a `ping` log.
fn answered(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn when_the_primary_gateway_dies_traffic_resumes_through_the_other_and_stays_there() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    con.ok(&["network", "create", "sites", "--cidr", "100.64.10.0/24"]);
    let join = || {
        con.ok(&["token", "create", "--network", "sites"])
            .trim()
            .to_string()
    };
    let client = start_agent(&lab, dir.path(), &join(), "client", 1);
    let joins = [join(), join()];
    let gws = [
        start_agent(&lab, dir.path(), &joins[0], "gw1", 2),
        start_agent(&lab, dir.path(), &joins[1], "gw2", 3),
    ];
    for n in [&client, &gws[0], &gws[1]] {
        wait_until("the agents to see each other", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 2)
        });
    }
    let site = lab.host(4);
    site_behind_all(&lab, &[&gws[0].host, &gws[1].host], &site);
    let ids: Vec<String> = gws.iter().map(|g| gateway_peer_id(&lab, g)).collect();
    for id in &ids {
        con.ok(&["route", "advertise", "--peer", id, "10.20.0.0/24"]);
    }
    assert!(
        lab.ping(&client.host.ns, "10.20.0.5", WAIT),
        "client → site"
    );
    let first = primary(&con).unwrap();
    let (dead, other) = if first == ids[0] { (0, 1) } else { (1, 0) };

    // A ping flood (every 50 ms, 40 s at most); kill the primary's agent 3 s in.
    let log = dir.path().join("flood.log");
    let flood = lab.spawn(
        &client.host.ns,
        &[
            "ping",
            "-n",
            "-i",
            "0.05",
            "-c",
            "800",
            "-W",
            "1",
            "10.20.0.5",
        ],
        &log,
    );
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", &gws[dead].pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let seq_at_kill = answered(&std::fs::read_to_string(&log).unwrap())
        .last()
        .copied()
        .unwrap();
    let resumed = || {
        let seqs = answered(&std::fs::read_to_string(&log).unwrap());
        seqs.last().is_some_and(|s| *s > seq_at_kill + 5)
    };
    while !resumed() && killed.elapsed() < Duration::from_secs(35) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let resumed_after = killed.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    lab.stop(flood);
    let text = std::fs::read_to_string(&log).unwrap();
    let dups = text.lines().filter(|l| l.contains("DUP!")).count();
    let mut seqs = answered(&text);
    seqs.sort_unstable();
    seqs.dedup();
    let gap = seqs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    println!(
        "{dups} duplicate replies; {}",
        text.lines().last().unwrap_or("")
    );
    let outage = Duration::from_millis(gap * PING_INTERVAL_MS);
    println!(
        "failover: traffic resumed {resumed_after:?} after the kill; longest gap {gap} pings ({outage:?})"
    );
    if !resumed() {
        eprintln!("routes: {:?}", routes(&con));
        eprintln!(
            "client: {}",
            lab.wg(&client.host.ns, &client.iface, "allowed-ips")
        );
        let serve = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
        eprintln!("serve.log: {}", &serve[serve.len().saturating_sub(6000)..]);
    }
    assert!(resumed(), "traffic resumed through the other gateway");
    assert!(
        outage < Duration::from_secs(30),
        "the outage lasted {outage:?}"
    );
    assert_eq!(primary(&con).as_ref(), Some(&ids[other]));

    // The dead gateway comes back (same state: same key, same credential): the prefix stays
    // with the one that stood in.
    let name = ["gw1", "gw2"][dead];
    let back = spawn_agent(
        &lab,
        dir.path(),
        &joins[dead],
        name,
        gws[dead].host.clone(),
        &[],
    );
    wait_until("the returning gateway to see its peers", || {
        peers_seen(&lab, &back).is_some_and(|p| p.len() == 2)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        primary(&con).as_ref(),
        Some(&ids[other]),
        "no flap back: {:?}",
        routes(&con)
    );
    assert!(lab.ping(&client.host.ns, "10.20.0.5", WAIT));
}
