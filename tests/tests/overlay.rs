//! The overlay for real: agents on real TUN devices in network namespaces, the real binaries,
//! `wg` against their UAPI sockets, and a `wireguard-go` peer for interop. Needs root.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use canopy_tests::netns::Lab;
use canopy_tests::overlay::*;

#[test]
fn two_agents_from_wg_quick_files_ping_over_ipv4_and_ipv6_and_wg_show_works() {
    let Duo {
        lab,
        dir,
        h1,
        h2,
        a,
        b,
        ca,
        cb,
    } = Duo::new();
    let pa = up(&lab, &h1.ns, &ca, &dir.path().join("a.log"));
    up(&lab, &h2.ns, &cb, &dir.path().join("b.log"));
    assert!(
        lab.ping(&h1.ns, "10.9.0.2", WAIT),
        "IPv4 across the overlay"
    );
    assert!(
        lab.ping(&h2.ns, "fd00:9::1", WAIT),
        "IPv6 across the overlay"
    );
    let dump = lab.wg(&h1.ns, &a.iface, "dump");
    assert!(
        dump.contains(&pubkey(&b)) && dump.contains("192.0.2.2:51820"),
        "{dump}"
    );
    let hs = lab.wg(&h1.ns, &a.iface, "latest-handshakes");
    let t: u64 = hs.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(t > 0, "a handshake time is reported: {hs}");

    // SIGTERM: the interface, its routes and its UAPI socket are gone.
    lab.stop(pa);
    assert!(
        !lab.run(&h1.ns, &["ip", "link", "show", &a.iface])
            .status
            .success(),
        "interface removed"
    );
    assert!(
        !Path::new(&format!("/var/run/wireguard/{}.sock", a.iface)).exists(),
        "UAPI socket removed"
    );
    let routes = String::from_utf8_lossy(&lab.run(&h1.ns, &["ip", "route"]).stdout).into_owned();
    assert!(!routes.contains("10.9.0."), "routes removed: {routes}");
}

/// wireguard-go as node `g` in namespace `ns` (10.9.0.2, port 51820), configured with `wg`
/// for one peer: `a` at 192.0.2.1:51820, 10.9.0.1.
fn wireguard_go_peer(lab: &Lab, ns: &str, dir: &Path, g: &Node, a: &Node) {
    lab.spawn(ns, &["wireguard-go", "-f", &g.iface], &dir.join("wggo.log"));
    let keyfile = dir.join("g.key");
    std::fs::write(&keyfile, g.key.to_base64()).unwrap();
    let sock = format!("/var/run/wireguard/{}.sock", g.iface);
    let t = std::time::Instant::now();
    while !Path::new(&sock).exists() {
        assert!(t.elapsed() < WAIT, "wireguard-go did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = keyfile.to_str().unwrap();
    let peer = [
        "peer",
        &pubkey(a),
        "endpoint",
        "192.0.2.1:51820",
        "allowed-ips",
        "10.9.0.1/32",
    ];
    let set = [
        "wg",
        "set",
        &g.iface,
        "private-key",
        key,
        "listen-port",
        "51820",
    ];
    let set = lab.run(ns, &[&set[..], &peer[..]].concat());
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    lab.run(ns, &["ip", "addr", "add", "10.9.0.2/24", "dev", &g.iface]);
    lab.run(ns, &["ip", "link", "set", &g.iface, "up"]);
}

#[test]
fn a_wireguard_go_peer_interoperates_with_either_side_initiating() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (lab.host(1), lab.host(2));
    let (a, g) = (node(&lab, "a"), node(&lab, "g"));
    let ca = conf(
        dir.path(),
        &a,
        "10.9.0.1/24",
        &[(&g, "192.0.2.2:51820", "10.9.0.2/32")],
    );
    // wireguard-go, configured with wg, in the second namespace.
    wireguard_go_peer(&lab, &h2.ns, dir.path(), &g, &a);

    // wireguard-go initiates.
    let pid = up(&lab, &h1.ns, &ca, &dir.path().join("a1.log"));
    assert!(lab.ping(&h2.ns, "10.9.0.1", WAIT), "wireguard-go → canopy");
    // A fresh canopy agent (no session) initiates.
    lab.stop(pid);
    up(&lab, &h1.ns, &ca, &dir.path().join("a2.log"));
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "canopy → wireguard-go");
    let seen = lab.wg(&h2.ns, &g.iface, "transfer");
    assert!(
        seen.split_whitespace().nth(1).is_some_and(|rx| rx != "0"),
        "{seen}"
    );
    // Bulk TCP both ways: canopy's offloaded segments reach wireguard-go as plain packets, and
    // wireguard-go's packets are coalesced on canopy's side.
    transfer_intact(
        &lab,
        &h1.ns,
        &h2.ns,
        "10.9.0.2",
        16,
        "canopy → wireguard-go",
    );
    transfer_intact(
        &lab,
        &h2.ns,
        &h1.ns,
        "10.9.0.1",
        16,
        "wireguard-go → canopy",
    );
}

#[test]
fn bulk_tcp_arrives_intact_and_in_order_over_ipv4_and_ipv6_with_offloads_on_off_and_mixed() {
    let Duo {
        lab,
        dir,
        h1,
        h2,
        a: _,
        b: _,
        ca,
        cb,
    } = Duo::new();
    let path = |name: &str| dir.path().join(name);
    let (on, off) = (["CANOPY_TUN_OFFLOAD=1"], ["CANOPY_TUN_OFFLOAD=0"]);
    // Both with offloads: segmentation on one side, coalescing on the other, v4 and v6.
    let pa = up_with(&lab, &h1.ns, &ca, &path("a-on.log"), &on);
    up_with(&lab, &h2.ns, &cb, &path("b-on.log"), &on);
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "tunnel up");
    let log = std::fs::read_to_string(dir.path().join("a-on.log")).unwrap();
    assert!(log.contains("offload=true"), "offloads are on: {log}");
    transfer_intact(&lab, &h1.ns, &h2.ns, "10.9.0.2", 32, "IPv4, offloads on");
    transfer_intact(&lab, &h2.ns, &h1.ns, "fd00:9::1", 32, "IPv6, offloads on");
    // Both directions at once, each side encrypting and decrypting concurrently.
    std::thread::scope(|s| {
        let there = s.spawn(|| lab.tcp_transfer(&h1.ns, &h2.ns, "10.9.0.2", 32));
        let back = lab.tcp_transfer(&h2.ns, &h1.ns, "10.9.0.1", 32);
        assert_intact(&there.join().unwrap(), "both ways at once, A → B");
        assert_intact(&back, "both ways at once, B → A");
    });

    // A without offloads: plain packets into a coalescing peer, and segments into a plain one.
    lab.stop(pa);
    up_with(&lab, &h1.ns, &ca, &path("a-off.log"), &off);
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "tunnel up again");
    let log = std::fs::read_to_string(dir.path().join("a-off.log")).unwrap();
    assert!(log.contains("offload=false"), "offloads are off: {log}");
    transfer_intact(
        &lab,
        &h1.ns,
        &h2.ns,
        "fd00:9::2",
        16,
        "IPv6, plain → offloaded",
    );
    transfer_intact(
        &lab,
        &h2.ns,
        &h1.ns,
        "10.9.0.1",
        16,
        "IPv4, offloaded → plain",
    );
}

#[test]
fn a_packet_with_a_source_outside_the_peers_allowed_ips_is_not_delivered() {
    // A accepts only 10.9.0.2 from B; B sends all of 10.9.0.0/24 to A.
    let Duo {
        lab,
        dir: _dir,
        h1,
        h2,
        a,
        b,
        ..
    } = Duo::v4_up("10.9.0.2/32", "10.9.0.0/24");
    assert!(
        lab.ping_from(&h2.ns, Some("10.9.0.2"), "10.9.0.1", WAIT),
        "the allowed source gets through"
    );
    // B claims another source address; the tunnel carries it, A must drop it.
    lab.run(
        &h2.ns,
        &["ip", "addr", "add", "10.9.0.99/24", "dev", &b.iface],
    );
    let before = rx_from(&lab, &h1.ns, &a.iface, &pubkey(&b));
    assert!(
        !lab.ping_from(
            &h2.ns,
            Some("10.9.0.99"),
            "10.9.0.1",
            Duration::from_secs(3)
        ),
        "spoofed source was delivered"
    );
    let after = rx_from(&lab, &h1.ns, &a.iface, &pubkey(&b));
    assert!(
        after > before,
        "the spoofed packets did reach A's tunnel (and were dropped there)"
    );
}

#[test]
fn traffic_resumes_when_a_peer_changes_its_underlay_address() {
    let Duo {
        lab,
        dir: _dir,
        h1,
        h2,
        a,
        ..
    } = Duo::v4_up("10.9.0.2/32", "10.9.0.1/32");
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT));
    // B moves to a new underlay address; nobody reconfigures anything.
    lab.run(&h2.ns, &["ip", "addr", "flush", "dev", &h2.dev]);
    lab.run(
        &h2.ns,
        &["ip", "addr", "add", "192.0.2.22/24", "dev", &h2.dev],
    );
    assert!(
        lab.ping(&h2.ns, "10.9.0.1", WAIT),
        "B reaches A from its new address"
    );
    assert!(
        lab.ping(&h1.ns, "10.9.0.2", WAIT),
        "A reaches B at its new address"
    );
    let eps = lab.wg(&h1.ns, &a.iface, "endpoints");
    assert!(
        eps.contains("192.0.2.22:51820"),
        "A follows B's new endpoint: {eps}"
    );
}

#[test]
fn bulk_tcp_arrives_intact_over_an_ipv6_underlay() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (lab.host(1), lab.host(2));
    for (h, ip) in [(&h1, "fd00:192::1/64"), (&h2, "fd00:192::2/64")] {
        let out = lab.run(&h.ns, &["ip", "addr", "add", ip, "dev", &h.dev, "nodad"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (a, b) = (node(&lab, "a"), node(&lab, "b"));
    let ca = conf(
        dir.path(),
        &a,
        "10.9.0.1/24",
        &[(&b, "[fd00:192::2]:51820", "10.9.0.2/32")],
    );
    let cb = conf(
        dir.path(),
        &b,
        "10.9.0.2/24",
        &[(&a, "[fd00:192::1]:51820", "10.9.0.1/32")],
    );
    up_both(&lab, [(&h1, &ca), (&h2, &cb)], dir.path());
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "tunnel up over IPv6");
    let eps = lab.wg(&h1.ns, &a.iface, "endpoints");
    assert!(eps.contains("[fd00:192::2]:51820"), "{eps}");
    transfer_intact(&lab, &h1.ns, &h2.ns, "10.9.0.2", 32, "A → B over IPv6");
    transfer_intact(&lab, &h2.ns, &h1.ns, "10.9.0.1", 32, "B → A over IPv6");
}

#[test]
fn udp_datagrams_keep_their_boundaries_and_content_through_the_offloaded_tunnel() {
    let Duo {
        lab,
        dir,
        h1,
        h2,
        a: _,
        b: _,
        ca,
        cb,
    } = Duo::new();
    up_both(&lab, [(&h1, &ca), (&h2, &cb)], dir.path());
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "tunnel up");
    // Full-size datagrams: 1420 (MTU) minus the IPv4 + UDP or IPv6 + UDP headers.
    for (to, max_len, what) in [("10.9.0.2", 1392, "IPv4"), ("fd00:9::2", 1372, "IPv6")] {
        let sent = 4000;
        let (ok, bad, log) = lab.udp_datagrams(&h1.ns, &h2.ns, to, sent, max_len);
        assert_eq!(bad, 0, "{what}: damaged or merged datagrams\n{log}");
        assert!(
            ok * 10 >= sent * 9,
            "{what}: only {ok} of {sent} arrived\n{log}"
        );
    }
}

#[test]
fn a_new_peer_handshakes_and_wg_show_answers_while_another_peer_saturates_the_tunnel() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2, h3) = (lab.host(1), lab.host(2), lab.host(3));
    let (a, b, c) = (node(&lab, "a"), node(&lab, "b"), node(&lab, "c"));
    let ca = conf(
        dir.path(),
        &a,
        "10.9.0.1/24",
        &[
            (&b, "192.0.2.2:51820", "10.9.0.2/32"),
            (&c, "192.0.2.3:51820", "10.9.0.3/32"),
        ],
    );
    let peer_a = [(&a, "192.0.2.1:51820", "10.9.0.1/32")];
    let cb = conf(dir.path(), &b, "10.9.0.2/24", &peer_a);
    let cc = conf(dir.path(), &c, "10.9.0.3/24", &peer_a);
    let log = |name: &str| dir.path().join(name);
    up(&lab, &h1.ns, &ca, &log("a.log"));
    up(&lab, &h2.ns, &cb, &log("b.log"));
    assert!(lab.ping(&h2.ns, "10.9.0.1", WAIT), "B reaches A");
    std::thread::scope(|s| {
        let flood = s.spawn(|| lab.tcp_transfer(&h2.ns, &h1.ns, "10.9.0.1", 256));
        // Wait until the flood is under way.
        let t = std::time::Instant::now();
        while rx_from(&lab, &h1.ns, &a.iface, &pubkey(&b)) < 16 << 20 {
            assert!(
                t.elapsed() < WAIT * 3,
                "the flood never started: {}",
                lab.wg(&h1.ns, &a.iface, "transfer")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        up(&lab, &h3.ns, &cc, &log("c.log"));
        assert!(
            lab.ping(&h3.ns, "10.9.0.1", WAIT),
            "C's first handshake with A went through during the flood"
        );
        let handshakes = lab.wg(&h1.ns, &a.iface, "latest-handshakes");
        let flooding = !flood.is_finished();
        assert!(
            handshakes.contains(&pubkey(&c)),
            "wg show answers during the flood: {handshakes}"
        );
        assert_intact(&flood.join().unwrap(), "B → A");
        assert!(
            flooding,
            "C got through only after the flood ended: its handshake was starved (or the flood is too short for this machine)"
        );
    });
}
