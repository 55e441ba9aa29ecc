//! Two gateways to one site (10.20.0.0/24 on a bridge behind both): the controller routes the
//! prefix through the live one; when its agent is killed during a ping flood, traffic resumes
//! through the other, and a gateway that comes back does not take the prefix back.
//! `canopy serve` in the hub, agents on real TUN devices. Needs root and nft.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use canopy_tests::controller::*;
use canopy_tests::netns::Lab;
use canopy_tests::sites::*;

/// The prefix's routes as `canopy route list` shows them: (gateway peer id, primary,
/// gateway live).
fn routes(con: &Console) -> Vec<(String, bool, bool)> {
    let out = con.ok(&["route", "list", "--network", "sites", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let gw = r["peer_id"].as_str().unwrap().to_string();
            let flag = |k: &str| r[k].as_bool().unwrap_or(false);
            (gw, flag("primary"), flag("gateway_live"))
        })
        .collect()
}

/// Whether gateway `id` is live, as `canopy route list` says.
fn live(con: &Console, id: &str) -> bool {
    routes(con).iter().any(|r| r.0 == id && r.2)
}

fn primary(con: &Console) -> Option<String> {
    routes(con).into_iter().find(|r| r.1).map(|r| r.0)
}

/// The answers in a `ping -D` log: (Unix time, ICMP sequence number).
fn answered(log: &str) -> Vec<(f64, u64)> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some((ts, seq))
        })
        .collect()
}

fn unix_now() -> f64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    t.unwrap().as_secs_f64()
}

/// A client on host 1 and gateways gw1, gw2 on hosts 2 and 3, both routing 10.20.0.0/24 (the
/// site, host 4, on a bridge behind both): the console, the client, the gateways, their join
/// strings and peer ids.
fn two_gateways<'a>(
    lab: &'a Lab,
    dir: &'a std::path::Path,
    data: &'a std::path::Path,
) -> (Console<'a>, Node, [Node; 2], [String; 2], Vec<String>) {
    let con = controller(lab, dir, data);
    con.ok(&["network", "create", "sites", "--cidr", "100.64.10.0/24"]);
    let join = || {
        con.ok(&["token", "create", "--network", "sites"])
            .trim()
            .to_string()
    };
    let client = start_agent(lab, dir, &join(), "client", 1);
    let joins = [join(), join()];
    let gws = [
        start_agent(lab, dir, &joins[0], "gw1", 2),
        start_agent(lab, dir, &joins[1], "gw2", 3),
    ];
    for n in [&client, &gws[0], &gws[1]] {
        wait_until("the agents to see each other", || {
            peers_seen(lab, n).is_some_and(|p| p.len() == 2)
        });
    }
    let site = lab.host(4);
    site_behind_all(lab, &[&gws[0].host, &gws[1].host], &site);
    let ids: Vec<String> = gws.iter().map(|g| gateway_peer_id(lab, g)).collect();
    for id in &ids {
        con.ok(&["route", "advertise", "--peer", id, "10.20.0.0/24"]);
    }
    (con, client, gws, joins, ids)
}

/// Pings the site from `client` every 50 ms, SIGKILLs process `victim` 3 s in, and waits (up
/// to 35 s) for replies to come back: how long after the kill the first reply after the
/// longest silence came (`None`: replies never resumed), and that silence.
fn flood_and_kill(
    lab: &Lab,
    client: &Node,
    victim: u32,
    log: &std::path::Path,
) -> (Option<Duration>, Duration) {
    let ping = [
        "stdbuf",
        "-oL",
        "ping",
        "-D",
        "-n",
        "-i",
        "0.05",
        "-c",
        "800",
        "-W",
        "1",
        "10.20.0.5",
    ];
    let flood = lab.spawn(&client.host.ns, &ping, log);
    std::thread::sleep(Duration::from_secs(3));
    let killed = unix_now();
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let replies = || answered(&std::fs::read_to_string(log).unwrap());
    let seq_at_kill = replies().last().unwrap().1;
    let resumed = || replies().last().is_some_and(|r| r.1 > seq_at_kill + 5);
    while !resumed() && unix_now() - killed < 35.0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let came_back = resumed();
    std::thread::sleep(Duration::from_secs(1));
    lab.stop(flood);
    let mut r = replies();
    r.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (silence, end) = r
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[1].0))
        .fold((0.0, killed), |best, x| if x.0 > best.0 { x } else { best });
    let after = came_back.then(|| Duration::from_secs_f64((end - killed).max(0.0)));
    (after, Duration::from_secs_f64(silence))
}

#[test]
fn when_the_primary_gateway_dies_traffic_resumes_through_the_other_and_stays_there() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let (con, client, gws, joins, ids) = two_gateways(&lab, dir.path(), &data);
    assert!(
        lab.ping(&client.host.ns, "10.20.0.5", WAIT),
        "client → site"
    );
    // Both live first: the primary is the one live longest, which may change until the
    // second gateway's record lands (it may have started its session earlier).
    wait_until("both gateways live", || ids.iter().all(|id| live(&con, id)));
    let first = primary(&con).unwrap();
    let (dead, other) = if first == ids[0] { (0, 1) } else { (1, 0) };

    let log = dir.path().join("flood.log");
    let (resumed, outage) = flood_and_kill(&lab, &client, gws[dead].pid, &log);
    println!(
        "failover: replies resumed {resumed:?} after the kill; the longest silence {outage:?}"
    );
    // Shown when the test fails: what the controller did about the gateways.
    println!("routes: {:?}", routes(&con));
    let serve = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    for l in serve
        .lines()
        .filter(|l| l.contains("gateway") || l.contains("connected"))
    {
        println!("serve.log: {l}");
    }
    assert!(
        resumed.is_some(),
        "traffic resumed through the other gateway"
    );
    assert!(
        outage < Duration::from_secs(30),
        "the outage lasted {outage:?}"
    );
    assert_eq!(primary(&con).as_ref(), Some(&ids[other]));
    assert!(
        !live(&con, &ids[dead]),
        "route list says the gateway is offline"
    );

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
