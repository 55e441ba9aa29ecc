//! NAT traversal: agents behind Linux MASQUERADE routers (namespaces), the controller and a
//! public peer on the lab bridge. Needs root and nft.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use canopy_tests::controller::*;
use canopy_tests::nat::{Nats, behind_nat, natted_pair, relax};
use canopy_tests::netns::Lab;

/// A peer behind a NAT learns its outside address (the router's, by STUN on its WireGuard
/// socket) and reports it; it and a public peer reach each other directly within 5 s.
#[test]
fn a_peer_behind_nat_reports_its_outside_address_and_reaches_a_public_peer_directly() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "nat", "100.64.20.0/24", 3);
    let router = lab.host(2);
    let inside = lab.host(3);
    behind_nat(&lab, &router, &inside, 1, "");
    let public = start_agent(&lab, dir.path(), &join, "public", 1);
    let t = Instant::now();
    let started = t;
    let natted = spawn_agent(&lab, dir.path(), &join, "natted", inside.clone(), &[]);
    // Its endpoints as the controller has them: its own, and the router's outside address.
    let outside = format!("{}:", router.ip);
    wait_until("the NATed peer's outside address", || {
        let out = con.ok(&["peer", "list", "--network", "nat", "--json"]);
        out.contains(&outside)
    });
    println!(
        "outside address reported {:?} after the agent started",
        t.elapsed()
    );
    let (pa, na) = (
        addr(&status(&lab, &public.host.ns, &public.state).unwrap(), 0),
        addr(&status(&lab, &natted.host.ns, &natted.state).unwrap(), 0),
    );
    let t = Instant::now();
    assert!(
        lab.ping(&natted.host.ns, &pa, Duration::from_secs(5)),
        "inside → public"
    );
    assert!(
        lab.ping(&public.host.ns, &na, Duration::from_secs(5)),
        "public → inside"
    );
    println!("both ways within {:?}", t.elapsed());
    // Direct, once a probe at the better path got through (the first handshake may have
    // gone through the relay): the public peer hears the NATed one from the router's outside
    // address, and the NATed one the public one at its own address.
    wait_until("both sides on the direct path", || {
        lab.wg(&public.host.ns, &public.iface, "endpoints")
            .contains(&outside)
            && lab
                .wg(&natted.host.ns, &natted.iface, "endpoints")
                .contains(&public.host.ip)
    });
    println!(
        "direct both ways {:?} after the agents started",
        started.elapsed()
    );
    wait_until("status to say direct", || {
        path_why(&lab, &public).0 == "direct"
    });
}

/// Two peers each behind its own bare MASQUERADE router (no input firewall). They meet through
/// the relay; the punch then races: a probe that reaches the other router before that router's
/// node has sent out is accepted by the router itself, and the conntrack entry it leaves makes
/// the router remap its node's port. With namespaces' microsecond latency one side's probe
/// nearly always arrives first, so the pair mostly stays relayed (over the internet both probes
/// are in flight at once and cross); the test asserts the connection and says which path won.
#[test]
fn two_peers_behind_their_own_nats_connect_within_10_s() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "nat", "100.64.21.0/24", 3);
    let nats = Nats {
        extra: ["", ""],
        firewalled: false,
    };
    let (a, b, _, _, t) = natted_pair(&lab, dir.path(), &join, nats);
    let ba = addr(&status(&lab, &b.host.ns, &b.state).unwrap(), 0);
    assert!(
        lab.ping(&a.host.ns, &ba, Duration::from_secs(10)),
        "a → b within 10 s"
    );
    println!("a → b {:?} after the agents started", t.elapsed());
    let eps = lab.wg(&a.host.ns, &a.iface, "endpoints");
    println!("a's endpoint for b: {eps}");
    wait_until("status to say how a reaches b", || {
        !path_why(&lab, &a).0.is_empty()
    });
    println!("a reaches b: {}", path_why(&lab, &a).0);
    let ab = addr(&status(&lab, &a.host.ns, &a.state).unwrap(), 0);
    assert!(lab.ping(&b.host.ns, &ab, Duration::from_secs(5)), "b → a");
}

/// Two peers behind one NAT talk over their LAN addresses: no hairpin through the router,
/// no relay.
#[test]
fn two_peers_behind_one_nat_use_their_lan_addresses() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "nat", "100.64.22.0/24", 3);
    let (r, h1, h2) = (lab.host(2), lab.host(3), lab.host(4));
    canopy_tests::nat::behind_one_nat(&lab, &r, &[&h1, &h2], 3);
    let a = spawn_agent(&lab, dir.path(), &join, "a", h1, &[]);
    let b = spawn_agent(&lab, dir.path(), &join, "b", h2, &[]);
    for n in [&a, &b] {
        wait_until("the agents to see each other", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 1)
        });
    }
    let ba = addr(&status(&lab, &b.host.ns, &b.state).unwrap(), 0);
    assert!(lab.ping(&a.host.ns, &ba, Duration::from_secs(5)));
    wait_until("a to reach b over the LAN", || {
        lab.wg(&a.host.ns, &a.iface, "endpoints")
            .contains("10.93.0.3:")
    });
    wait_until("status to say direct", || path_why(&lab, &a).0 == "direct");
}

/// The path `n`'s status reports to its peer named `host`.
fn path_to(lab: &Lab, n: &Node, host: &str) -> String {
    let s = status(lab, &n.host.ns, &n.state).unwrap_or_default();
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    let p = peers.iter().find(|p| p["hostname"] == host);
    p.and_then(|p| p["path"]["path"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The controller dies: a direct pair keeps its traffic (the data plane needs no controller);
/// a relayed pair, whose relay was that controller, comes back when it does.
#[test]
fn without_the_controller_direct_paths_keep_flowing_and_relayed_ones_return_with_it() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "nat", "100.64.23.0/24", 3);
    let (r1, in1, r2, in2) = (lab.host(2), lab.host(3), lab.host(4), lab.host(5));
    behind_nat(&lab, &r1, &in1, 1, "");
    // Port-scrambling: no punch meets it, so n1 ↔ n2 stays relayed.
    behind_nat(&lab, &r2, &in2, 2, "fully-random");
    let public = start_agent(&lab, dir.path(), &join, "public", 1);
    let n1 = spawn_agent(&lab, dir.path(), &join, "n1", in1, &[]);
    let n2 = spawn_agent(&lab, dir.path(), &join, "n2", in2, &[]);
    for n in [&public, &n1, &n2] {
        wait_until("the agents to see each other", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 2)
        });
    }
    let (a1, a2) = (
        addr(&status(&lab, &n1.host.ns, &n1.state).unwrap(), 0),
        addr(&status(&lab, &n2.host.ns, &n2.state).unwrap(), 0),
    );
    assert!(lab.ping(&public.host.ns, &a1, WAIT));
    assert!(lab.ping(&n1.host.ns, &a2, WAIT));
    wait_until("public ↔ n1 direct", || {
        path_to(&lab, &public, "n1") == "direct"
    });
    wait_until("n1 ↔ n2 relayed", || {
        path_to(&lab, &n1, "n2") == "relayed"
    });

    lab.stop(con.pid);
    for _ in 0..5 {
        assert!(
            lab.ping(&public.host.ns, &a1, Duration::from_secs(1)),
            "the direct pair without a controller"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !lab.ping(&n1.host.ns, &a2, Duration::from_secs(1)),
        "its relay is gone"
    );

    let t = Instant::now();
    let _con = controller(&lab, dir.path(), &data);
    assert!(
        lab.ping(&n1.host.ns, &a2, Duration::from_secs(40)),
        "the relayed pair, back with the controller"
    );
    println!(
        "relayed pair back {:?} after the controller restarted",
        t.elapsed()
    );
}

/// `n`'s status of its one peer: (path, why it is not direct).
fn path_why(lab: &Lab, n: &Node) -> (String, String) {
    let s = status(lab, &n.host.ns, &n.state).unwrap_or_default();
    let p = &s["peers"][0]["path"];
    let text = |k: &str| p[k].as_str().unwrap_or("").to_string();
    (text("path"), text("why"))
}

/// Two peers, each behind a home router (MASQUERADE, unsolicited inbound dropped): they meet
/// through the relay, the controller has both punch at once, and they go direct.
#[test]
fn two_peers_behind_home_routers_punch_through_to_a_direct_path() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "nat", "100.64.24.0/24", 3);
    let nats = Nats {
        extra: ["", ""],
        firewalled: true,
    };
    let (a, b, r1, r2, t) = natted_pair(&lab, dir.path(), &join, nats);
    let ba = addr(&status(&lab, &b.host.ns, &b.state).unwrap(), 0);
    assert!(lab.ping(&a.host.ns, &ba, Duration::from_secs(10)));
    println!("a → b {:?} after the agents started", t.elapsed());
    // Each hears the other from the other's router.
    wait_until("both sides direct, at the other's router", || {
        lab.wg(&a.host.ns, &a.iface, "endpoints")
            .contains(&format!("{}:", r2.ip))
            && lab
                .wg(&b.host.ns, &b.iface, "endpoints")
                .contains(&format!("{}:", r1.ip))
    });
    println!(
        "direct both ways {:?} after the agents started",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "direct within 10 s");
    wait_until("status to say direct", || path_why(&lab, &a).0 == "direct");
    let ab = addr(&status(&lab, &a.host.ns, &a.state).unwrap(), 0);
    assert!(lab.ping(&b.host.ns, &ab, Duration::from_secs(2)), "b → a");
    // The console shows it too, from the agents' reports.
    wait_until("peer list --paths to say direct", || {
        let out = con.ok(&["peer", "list", "--network", "nat", "--paths"]);
        out.contains(&format!("a → b: direct {}:", r2.ip))
            && out.contains(&format!("b → a: direct {}:", r1.ip))
    });
}

/// One NAT scrambles ports (nft `fully-random`, iptables `--random-fully`: what a symmetric NAT does): no punch can meet its
/// mapping, so the pair is relayed within 5 s, says why, and carries a TCP transfer intact.
/// The NAT relaxed to plain MASQUERADE, the next paced punch goes direct.
#[test]
fn a_port_scrambling_nat_is_relayed_then_goes_direct_once_relaxed() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "nat", "100.64.25.0/24", 3);
    let nats = Nats {
        extra: ["", "fully-random"],
        firewalled: true,
    };
    let (a, b, _, r2, t) = natted_pair(&lab, dir.path(), &join, nats);
    let ba = addr(&status(&lab, &b.host.ns, &b.state).unwrap(), 0);
    assert!(lab.ping(&a.host.ns, &ba, Duration::from_secs(5)));
    let connected = t.elapsed();
    println!("a → b {connected:?} after the agents started");
    assert!(connected < Duration::from_secs(5), "connected within 5 s");
    // Through the relay (the status file is written every 5 s).
    wait_until("a relayed path", || path_why(&lab, &a).0 == "relayed");
    canopy_tests::overlay::transfer_intact(&lab, &a.host.ns, &b.host.ns, &ba, 4, "relayed");
    wait_until("status to say why not direct", || {
        path_why(&lab, &a).1.starts_with("punched")
    });
    println!("a's status: relayed, {}", path_why(&lab, &a).1);
    wait_until("peer list --paths to say relayed and why", || {
        let out = con.ok(&["peer", "list", "--network", "nat", "--paths"]);
        out.contains("a → b: relayed") && out.contains("(not direct: punched")
    });
    println!(
        "{}",
        con.ok(&["peer", "list", "--network", "nat", "--paths"])
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        path_why(&lab, &a).0,
        "relayed",
        "the punch cannot meet a scrambled port"
    );

    relax(&lab, &r2);
    let t = Instant::now();
    while path_why(&lab, &a).0 != "direct" || path_why(&lab, &b).0 != "direct" {
        assert!(
            t.elapsed() < Duration::from_secs(150),
            "direct after the NAT relaxed"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("direct {:?} after the NAT relaxed", t.elapsed());
    assert!(lab.ping(&a.host.ns, &ba, Duration::from_secs(2)));
}

/// A relayed pair's relay dies (here the controller's own, with the controller): the pair
/// carries on through another relay (`canopy relay`, which the controller told the agents of).
#[test]
fn a_relayed_pair_fails_over_to_another_relay_when_its_relay_dies() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let relay_at = "192.0.2.254:3478";
    let con = controller_with(&lab, dir.path(), &data, &["--relay", relay_at]);
    let secret = data.join("relay-secret");
    let canopy = canopy_tests::netns::bin("canopy");
    let relay = lab.spawn(
        &lab.hub,
        &[
            canopy.to_str().unwrap(),
            "relay",
            "--listen",
            relay_at,
            "--secret-file",
            secret.to_str().unwrap(),
        ],
        &dir.path().join("relay.log"),
    );
    let join = network_with_token(&con, "nat", "100.64.26.0/24", 3);
    let nats = Nats {
        extra: ["", "fully-random"],
        firewalled: true,
    };
    let (a, b, _, _, _) = natted_pair(&lab, dir.path(), &join, nats);
    let ba = addr(&status(&lab, &b.host.ns, &b.state).unwrap(), 0);
    assert!(lab.ping(&a.host.ns, &ba, WAIT));
    wait_until("a relayed path", || path_why(&lab, &a).0 == "relayed");
    lab.stop(con.pid);
    let t = Instant::now();
    assert!(
        lab.ping(&a.host.ns, &ba, Duration::from_secs(10)),
        "through the other relay within 10 s"
    );
    println!("relayed again {:?} after its relay died", t.elapsed());
    // And the other way round: the survivor dies too, the controller comes back.
    lab.stop(relay);
    let _con = controller_with(&lab, dir.path(), &data, &["--relay", relay_at]);
    let t = Instant::now();
    assert!(lab.ping(
        &b.host.ns,
        &addr(&status(&lab, &a.host.ns, &a.state).unwrap(), 0),
        Duration::from_secs(40)
    ));
    println!(
        "relayed again {:?} after the controller came back",
        t.elapsed()
    );
}
