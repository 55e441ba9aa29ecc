//! Sites: a client reaches a host in a site (10.20.0.0/24) behind a gateway peer, through the
//! overlay, with `canopy route advertise`; and stops reaching it when the route is withdrawn.
//! `canopy serve` in the hub, agents on real TUN devices, the site a namespace of its own
//! behind the gateway's second interface. Needs root (and nft for masquerade).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use canopy_tests::controller::*;
use canopy_tests::netns::Lab;
use canopy_tests::overlay::transfer_intact;
use canopy_tests::sites::*;

#[test]
fn a_client_reaches_a_site_through_its_gateway_and_not_once_the_route_is_withdrawn() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let (con, client, gw, site) = client_gateway_site(&lab, dir.path(), &data, &[]);
    site_behind(&lab, &gw.host, &site, None);
    assert!(
        !lab.ping(&client.host.ns, "10.20.0.5", Duration::from_secs(1)),
        "no route yet"
    );

    let out = con.ok(&[
        "route",
        "advertise",
        "--peer",
        &gateway_peer_id(&lab, &gw),
        "10.20.0.0/24",
        "--json",
    ]);
    let route: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(route[0]["primary"], true, "{out}");
    assert!(
        lab.ping(&client.host.ns, "10.20.0.5", WAIT),
        "client → site through the gateway"
    );
    transfer_intact(
        &lab,
        &client.host.ns,
        &site.ns,
        "10.20.0.5",
        8,
        "client → site",
    );
    let tables = |n: &Node| {
        String::from_utf8_lossy(&lab.run(&n.host.ns, &["nft", "list", "tables"]).stdout)
            .into_owned()
    };
    assert!(
        tables(&gw).contains("canopy_gw_"),
        "the gateway's masquerade table: {}",
        tables(&gw)
    );
    let routes = lab.run(&client.host.ns, &["ip", "route"]);
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains("10.20.0.0/24 dev"),
        "the client's kernel route"
    );

    // Withdrawn: the client stops reaching the site within a second.
    con.ok(&["route", "remove", route[0]["id"].as_str().unwrap()]);
    let t = Instant::now();
    wait_until("the route to leave the client's interface", || {
        !lab.wg(&client.host.ns, &client.iface, "allowed-ips")
            .contains("10.20.0.0/24")
    });
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "withdrawn after {:?}",
        t.elapsed()
    );
    assert!(!lab.ping(&client.host.ns, "10.20.0.5", Duration::from_secs(1)));
    wait_until("the gateway to remove its table", || {
        !tables(&gw).contains("canopy_gw_")
    });
}

/// Without masquerade the site sees the client's overlay address and routes replies back
/// through the gateway itself.
#[test]
fn without_masquerade_the_site_routes_back_to_the_overlay() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let (con, client, gw, site) =
        client_gateway_site(&lab, dir.path(), &data, &["--no-masquerade"]);
    site_behind(&lab, &gw.host, &site, Some("100.64.10.0/24"));
    con.ok(&[
        "route",
        "advertise",
        "--peer",
        &gateway_peer_id(&lab, &gw),
        "10.20.0.0/24",
    ]);
    assert!(
        lab.ping(&client.host.ns, "10.20.0.5", WAIT),
        "client → site, replies routed back"
    );
    let client_ip = addr(&status(&lab, &client.host.ns, &client.state).unwrap(), 0);
    transfer_intact(
        &lab,
        &site.ns,
        &client.host.ns,
        &client_ip,
        8,
        "site → client: the site opens it",
    );
    let ruleset = lab.run(&gw.host.ns, &["nft", "list", "ruleset"]);
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert!(
        ruleset.contains("canopy_gw_") && !ruleset.contains("masquerade"),
        "the forwarding filter, no masquerade: {ruleset}"
    );
}

/// An IPv6 site (fd20::/64) behind the gateway of a dual-stack network, masqueraded.
#[test]
fn an_ipv6_site_is_reached_through_its_gateway() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let cidrs = ["--cidr", "100.64.11.0/24", "--cidr", "fd7a:11::/64"];
    con.ok(&[&["network", "create", "v6sites"][..], &cidrs].concat());
    let join = || {
        con.ok(&["token", "create", "--network", "v6sites"])
            .trim()
            .to_string()
    };
    let client = start_agent(&lab, dir.path(), &join(), "client", 1);
    let gw = start_agent(&lab, dir.path(), &join(), "gw", 2);
    for n in [&client, &gw] {
        wait_until("both agents to see each other", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 1)
        });
    }
    let site = lab.host(3);
    site_behind_at(&lab, &gw.host, &site, None, ("fd20::1/64", "fd20::5/64"));
    con.ok(&[
        "route",
        "advertise",
        "--peer",
        &gateway_peer_id(&lab, &gw),
        "fd20::/64",
    ]);
    assert!(
        lab.ping(&client.host.ns, "fd20::5", WAIT),
        "client → IPv6 site through the gateway"
    );
    transfer_intact(
        &lab,
        &client.host.ns,
        &site.ns,
        "fd20::5",
        8,
        "client → IPv6 site",
    );
}

/// A controller with network "sites" and agents ops (tagged ops), other and gw on hosts 1-3.
fn tagged_nodes<'a>(
    lab: &'a Lab,
    dir: &'a std::path::Path,
    data: &'a std::path::Path,
) -> (Console<'a>, [Node; 3]) {
    let con = controller(lab, dir, data);
    con.ok(&["network", "create", "sites", "--cidr", "100.64.12.0/24"]);
    let join = |tags: &[&str]| {
        let mut args = vec!["token", "create", "--network", "sites"];
        for t in tags {
            args.extend(["--tag", t]);
        }
        con.ok(&args).trim().to_string()
    };
    let ops = start_agent(lab, dir, &join(&["ops"]), "ops", 1);
    let other = start_agent(lab, dir, &join(&[]), "other", 2);
    let gw = start_agent(lab, dir, &join(&[]), "gw", 3);
    for n in [&ops, &other, &gw] {
        wait_until("the agents to see each other", || {
            peers_seen(lab, n).is_some_and(|p| p.len() == 2)
        });
    }
    (con, [ops, other, gw])
}

/// Under a policy, a site is reached only as far as a rule names it: the gateway's engine
/// filters forwarded traffic like its own (ops may ping 10.20.0.5 only; a peer without a rule
/// reaches nothing in the site).
#[test]
fn a_policy_rule_naming_part_of_a_site_is_enforced_at_its_gateway() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let (con, [ops, other, gw]) = tagged_nodes(&lab, dir.path(), &data);
    let site = lab.host(4);
    site_behind(&lab, &gw.host, &site, None);
    let out = lab.run(
        &site.ns,
        &[
            "ip",
            "addr",
            "add",
            "10.20.0.6/24",
            "dev",
            &format!("{}sg", lab.id),
        ],
    );
    assert!(out.status.success());
    con.ok(&[
        "route",
        "advertise",
        "--peer",
        &gateway_peer_id(&lab, &gw),
        "10.20.0.0/24",
    ]);
    assert!(
        lab.ping(&other.host.ns, "10.20.0.6", WAIT),
        "no policy: everyone"
    );

    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "tags = [\"ops\"]\n[[rule]]\nfrom = [\"tag:ops\"]\nto = [\"10.20.0.5/32\"]\nproto = \"icmp\"\n",
    )
    .unwrap();
    con.ok(&["policy", "set", "sites", file.to_str().unwrap()]);
    let test = con.ok(&[
        "policy",
        "test",
        "sites",
        "--from",
        "ops",
        "--to",
        "10.20.0.5",
        "--proto",
        "icmp",
    ]);
    assert!(test.contains("allowed"), "{test}");
    wait_until("the other peer to lose the gateway", || {
        peers_seen(&lab, &other).is_some_and(|p| p.is_empty())
    });
    assert!(
        lab.ping(&ops.host.ns, "10.20.0.5", WAIT),
        "ops → the named host"
    );
    assert!(
        !lab.ping(&ops.host.ns, "10.20.0.6", Duration::from_secs(2)),
        "ops → another host of the site: refused at the gateway"
    );
    assert!(!lab.ping(&other.host.ns, "10.20.0.5", Duration::from_secs(1)));
    // Counters are written every 5 s.
    wait_until("the gateway to count what it refused", || {
        status(&lab, &gw.host.ns, &gw.state)
            .is_some_and(|s| s["dropped"]["policy"].as_u64() > Some(0))
    });
}

/// An exit node: the client's internet traffic (here 203.0.113.5, which it has no route to)
/// goes through the tunnel to the exit node, while its controller connection and WireGuard's
/// own packets stay direct; clearing the choice takes the routing back.
#[test]
fn an_exit_node_carries_a_clients_internet_traffic_and_nothing_of_its_own() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let (con, client, exit, internet) =
        client_gateway_site(&lab, dir.path(), &data, &["--advertise-exit-node"]);
    site_behind_at(
        &lab,
        &exit.host,
        &internet,
        None,
        ("203.0.113.1/24", "203.0.113.5/24"),
    );
    let ns = &client.host.ns;
    assert!(
        !lab.ping(ns, "203.0.113.5", Duration::from_secs(1)),
        "no route yet"
    );
    let mut pending = Vec::new();
    wait_until("the exit routes the agent advertised", || {
        let out = con.ok(&["route", "list", "--network", "sites", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        pending = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        pending.len() == 2
    });
    for id in &pending {
        con.ok(&["route", "approve", id]);
    }
    let client_id = gateway_peer_id(&lab, &client);
    con.ok(&["peer", "set-exit-node", &client_id, "gw"]);
    assert!(
        lab.ping(ns, "203.0.113.5", WAIT),
        "client → the internet through the exit node"
    );

    let text = |cmd: &[&str]| String::from_utf8_lossy(&lab.run(ns, cmd).stdout).into_owned();
    let get = |to: &[&str]| text(&[&["ip", "route", "get"][..], to].concat());
    let via_tunnel = get(&["203.0.113.5"]);
    assert!(
        via_tunnel.contains(&client.iface) && via_tunnel.contains("table 51820"),
        "{via_tunnel}"
    );
    let control = get(&["192.0.2.254"]);
    assert!(
        !control.contains(&client.iface),
        "the controller stays direct: {control}"
    );
    let wireguard = get(&[&exit.host.ip, "mark", "51820"]);
    assert!(
        !wireguard.contains(&client.iface),
        "WireGuard's own packets stay direct: {wireguard}"
    );
    let rules = text(&["ip", "rule"]);
    assert!(rules.contains("to 192.0.2.254 lookup main"), "{rules}");
    assert!(
        rules.contains("not from all fwmark 0xca6c lookup 51820"),
        "{rules}"
    );
    assert_eq!(lab.wg(ns, &client.iface, "fwmark").trim(), "0xca6c");

    // The control connection works through all this: clearing the exit node reaches the agent.
    con.ok(&["peer", "set-exit-node", &client_id, "none"]);
    wait_until("the client to stop using the exit node", || {
        !text(&["ip", "rule"]).contains("51820")
    });
    assert!(!lab.ping(ns, "203.0.113.5", Duration::from_secs(1)));
    assert_eq!(lab.wg(ns, &client.iface, "fwmark").trim(), "off");
}
