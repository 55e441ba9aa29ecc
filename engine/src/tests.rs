//! Two engines talking through memory: no sockets, no clock but the one we pass. Timers
//! (retry, rekey, keepalive, expiry, the rate-limit window) are tested under a simulated clock
//! in `engine/sim`.

use super::*;
use crate::testing::*;

#[test]
fn packets_cross_both_ways_after_a_handshake_ipv4_and_ipv6() {
    let mut p = Pair::new(&["10.0.0.2/32", "fd00::2/128"]);
    let p1 = ipv4("10.0.0.1", "10.0.0.2", b"hello");
    let p6 = ipv6("fd00::1", "fd00::2", b"hello6");
    // The first packet triggers a handshake and is queued; it is delivered after the handshake.
    let init = p.send_a(&[p1.clone(), p6.clone()]);
    let (_, at_b) = p.exchange(vec![], init);
    assert_eq!(at_b, vec![p1.clone(), p6.clone()]);
    // Now B answers over the established session.
    let reply = ipv4("10.0.0.2", "10.0.0.1", b"world");
    let to_a = p.send_b(std::slice::from_ref(&reply));
    let (at_a, _) = p.exchange(to_a, vec![]);
    assert_eq!(at_a, vec![reply]);
    let st = p.a.peer(&pubkey(key(2))).unwrap();
    assert!(st.since_handshake.is_some() && st.tx_bytes > 0 && st.rx_bytes > 0);
}

#[test]
fn a_packet_from_outside_the_peers_allowed_ips_is_dropped() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let init = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"ok")]);
    let (at_a, _) = p.exchange(init, vec![]);
    assert_eq!(at_a.len(), 1);
    let spoofed = p.send_b(&[ipv4("10.0.0.99", "10.0.0.1", b"spoof")]);
    let (at_a, _) = p.exchange(spoofed, vec![]);
    assert!(at_a.is_empty());
    assert_eq!(p.a.drops.spoofed, 1);
}

#[test]
fn a_handshake_from_an_unknown_key_gets_no_answer() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let mut stranger = Engine::new(key(9));
    stranger.set_peer(peer_of(key(1), A_ADDR, &["0.0.0.0/0"]));
    let init = Pair::send(&mut stranger, p.now, &[ipv4("10.0.0.9", "10.0.0.1", b"hi")]);
    assert_eq!(init.len(), 1);
    let mut out = Outbox::default();
    p.a.handle_network(
        p.now,
        [("192.0.2.9:1".parse().unwrap(), init[0].as_slice())],
        &mut out,
    );
    assert!(out.net.is_empty() && out.tun_is_empty());
    assert_eq!(p.a.drops.invalid, 1);
}

#[test]
fn the_endpoint_follows_the_latest_authenticated_packet() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let init = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"x")]);
    p.exchange(init, vec![]);
    // B moves to a new address; its next packet comes from there.
    let moved: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let pkt = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"y")]);
    p.b_addr = moved;
    let (at_a, _) = p.exchange(pkt, vec![]);
    assert_eq!(at_a.len(), 1);
    assert_eq!(
        p.a.peer(&pubkey(key(2))).unwrap().config.endpoint,
        Some(moved)
    );
    // And A now sends to the new address.
    let mut out = Outbox::default();
    p.a.handle_tun(
        p.now,
        [ipv4("10.0.0.1", "10.0.0.2", b"z").as_slice()],
        &mut out,
    );
    assert_eq!(out.net[0].0, moved);
    // A forged datagram from elsewhere does not move it.
    let mut out = Outbox::default();
    let forged = [4u8, 0, 0, 0]
        .iter()
        .chain([0u8; 60].iter())
        .copied()
        .collect::<Vec<_>>();
    p.a.handle_network(
        p.now,
        [("203.0.113.1:1".parse().unwrap(), forged.as_slice())],
        &mut out,
    );
    assert_eq!(
        p.a.peer(&pubkey(key(2))).unwrap().config.endpoint,
        Some(moved)
    );
}

#[test]
fn updating_allowed_ips_keeps_the_session_and_removing_a_peer_drops_its_routes() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let init = p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"x")]);
    p.exchange(vec![], init);
    assert!(p.a.peer(&pubkey(key(2))).unwrap().since_handshake.is_some());
    let mut cfg = p.a.peer(&pubkey(key(2))).unwrap().config;
    cfg.allowed_ips.push(net("10.9.0.0/16"));
    p.a.set_peer(cfg);
    assert!(
        p.a.peer(&pubkey(key(2))).unwrap().since_handshake.is_some(),
        "session kept (a new session has no handshake yet)"
    );
    // Traffic to the new range goes out at once, over the same session (no new handshake).
    let out = p.send_a(&[ipv4("10.0.0.1", "10.9.1.1", b"x")]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0][0], 4, "a data message, not a handshake initiation");
    assert!(p.a.remove_peer(&pubkey(key(2))));
    assert!(p.send_a(&[ipv4("10.0.0.1", "10.0.0.2", b"x")]).is_empty());
    assert_eq!(p.a.drops.no_route, 1);
}

#[test]
fn without_a_private_key_no_handshake_is_made_or_answered_and_setting_one_starts_them() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    p.a.set_private_key([0; 32]);
    let pkt = ipv4("10.0.0.1", "10.0.0.2", b"hi");
    assert!(
        p.send_a(std::slice::from_ref(&pkt)).is_empty(),
        "no initiation without a key"
    );
    // B initiates: A, keyless, does not answer.
    let init = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"yo")]);
    assert_eq!(init.len(), 1);
    let mut out = Outbox::default();
    p.a.handle_network(
        p.now,
        [(B_ADDR.parse().unwrap(), init[0].as_slice())],
        &mut out,
    );
    assert_eq!(out.net_packets().count(), 0, "no response without a key");
    // The key back (as `wg set private-key` does): A initiates again.
    p.a.set_private_key(key(1));
    assert_eq!(p.send_a(&[pkt]).len(), 1);
}

/// A UDP datagram from port `sport` to `dport`.
fn udp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = sport.to_be_bytes().to_vec();
    l4.extend(dport.to_be_bytes());
    l4.extend([0, 12, 0, 0, b'h', b'i', b'!', b'!']);
    ipv4(src, dst, &l4)
}

#[test]
fn under_a_policy_a_peer_opens_only_what_its_rules_allow_and_replies_pass() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    p.connect();
    let dns = filter::Allow {
        proto: filter::Proto::Udp,
        ports: vec![(53, 53)],
        dst: vec![],
    };
    p.a.set_policy(Some([(pubkey(key(2)), vec![dns])].into_iter().collect()));
    // B opens port 53 on A: allowed; port 22: refused and counted against B.
    let ok = udp4("10.0.0.2", "10.0.0.1", 40000, 53);
    let to_a = p.send_b(std::slice::from_ref(&ok));
    assert_eq!(p.exchange(to_a, vec![]).0, vec![ok.clone()]);
    let to_a = p.send_b(&[udp4("10.0.0.2", "10.0.0.1", 40000, 22)]);
    assert!(p.exchange(to_a, vec![]).0.is_empty());
    assert_eq!(p.a.drops.policy, 1);
    assert_eq!(p.a.peer(&pubkey(key(2))).unwrap().policy_drops, 1);
    // A opens port 9000 on B: B's answer from 9000 is a reply, so it passes.
    p.send_a(&[udp4("10.0.0.1", "10.0.0.2", 41000, 9000)]);
    let answer = udp4("10.0.0.2", "10.0.0.1", 9000, 41000);
    let to_a = p.send_b(std::slice::from_ref(&answer));
    assert_eq!(p.exchange(to_a, vec![]).0, vec![answer]);
    // The rule gone: even port 53 is refused at once. The policy lifted: everything passes.
    p.a.set_policy(Some(HashMap::new()));
    let to_a = p.send_b(std::slice::from_ref(&ok));
    assert!(p.exchange(to_a, vec![]).0.is_empty());
    p.a.set_policy(None);
    let any = udp4("10.0.0.2", "10.0.0.1", 1, 2);
    let to_a = p.send_b(std::slice::from_ref(&any));
    assert_eq!(p.exchange(to_a, vec![]).0, vec![any]);
}

#[test]
fn a_handshake_goes_to_every_candidate_and_the_one_that_answers_becomes_the_endpoint() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let dead: SocketAddr = "198.51.100.9:51820".parse().unwrap();
    let mut cfg = peer_of(key(2), "198.51.100.9:51820", &["10.0.0.2/32"]);
    p.a.set_peer(cfg.clone());
    p.a.set_candidates(&cfg.public_key, vec![dead, p.b_addr]);
    let mut out = Outbox::default();
    let pkt = ipv4("10.0.0.1", "10.0.0.2", b"first");
    p.a.handle_tun(p.now, [pkt.as_slice()], &mut out);
    let to: Vec<SocketAddr> = out.net_packets().map(|(a, _)| a).collect();
    assert_eq!(
        to,
        [dead, p.b_addr],
        "the initiation, to the endpoint and the other candidate"
    );
    let init: Vec<Vec<u8>> = out.net_packets().skip(1).map(|(_, d)| d.to_vec()).collect();
    let (_, at_b) = p.exchange(vec![], init);
    assert_eq!(at_b, vec![pkt], "queued behind the handshake, delivered");
    assert_eq!(
        p.a.peer(&cfg.public_key).unwrap().config.endpoint,
        Some(p.b_addr)
    );
    // Data goes to the endpoint only.
    out.clear();
    p.a.handle_tun(
        p.now,
        [ipv4("10.0.0.1", "10.0.0.2", b"more").as_slice()],
        &mut out,
    );
    let to: Vec<SocketAddr> = out.net_packets().map(|(a, _)| a).collect();
    assert_eq!(to, [p.b_addr]);
    // No endpoint at all, candidates only: still reachable.
    cfg.endpoint = None;
    let mut c = Engine::new(key(3));
    c.set_peer(cfg.clone());
    c.set_candidates(&cfg.public_key, vec![p.b_addr]);
    out.clear();
    c.handle_tun(
        p.now,
        [ipv4("10.0.0.3", "10.0.0.2", b"x").as_slice()],
        &mut out,
    );
    assert_eq!(out.net_packets().count(), 1);
}

/// B takes A's handshake initiation `init` (from A's address); its answer reaches A from
/// `relay`, into `out`: the handshake completes through the relay.
fn answer_through(p: &mut Pair, init: &[Vec<u8>], relay: SocketAddr, out: &mut Outbox) {
    let mut at_b = Outbox::default();
    p.b.handle_network(
        p.now,
        init.iter().map(|d| (p.a_addr, d.as_slice())),
        &mut at_b,
    );
    let answer: Vec<Vec<u8>> = at_b.net_packets().map(|(_, d)| d.to_vec()).collect();
    out.clear();
    p.a.handle_network(p.now, answer.iter().map(|d| (relay, d.as_slice())), out);
}

#[test]
fn a_peer_reached_by_a_worse_path_is_probed_at_the_better_one_and_stays_there() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let relay: SocketAddr = "192.0.2.250:1".parse().unwrap();
    let cfg = peer_of(key(2), "192.0.2.250:1", &["10.0.0.2/32"]);
    p.a.set_peer(cfg.clone());
    p.a.set_candidates(&cfg.public_key, vec![p.b_addr, relay]);
    let endpoint = |p: &Pair| p.a.peer(&cfg.public_key).unwrap().config.endpoint;
    // The handshake completes through the relay (its answer comes from there).
    let mut out = Outbox::default();
    p.a.handle_tun(
        p.now,
        [ipv4("10.0.0.1", "10.0.0.2", b"hi").as_slice()],
        &mut out,
    );
    let init: Vec<Vec<u8>> = out.net_packets().take(1).map(|(_, d)| d.to_vec()).collect();
    answer_through(&mut p, &init, relay, &mut out);
    assert_eq!(endpoint(&p), Some(relay));
    // The queued packet follows through the relay; B, confirmed, may send now.
    let queued: Vec<Vec<u8>> = out.net_packets().map(|(_, d)| d.to_vec()).collect();
    let mut at_b = Outbox::default();
    p.b.handle_network(
        p.now,
        queued.iter().map(|d| (p.a_addr, d.as_slice())),
        &mut at_b,
    );
    assert_eq!(at_b.tun_packets().count(), 1);
    // Five seconds on, a keepalive goes to the better candidate.
    p.advance(Duration::from_secs(6));
    out.clear();
    p.a.handle_timeout(p.now, &mut out);
    let probes: Vec<SocketAddr> = out.net_packets().map(|(a, _)| a).collect();
    assert!(probes.contains(&p.b_addr), "{probes:?}");
    // B's packets arrive directly: A moves there, and a late relayed one does not move it back.
    let direct = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"direct")]);
    out.clear();
    p.a.handle_network(
        p.now,
        direct.iter().map(|d| (p.b_addr, d.as_slice())),
        &mut out,
    );
    assert_eq!(endpoint(&p), Some(p.b_addr));
    let late = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"late")]);
    out.clear();
    p.a.handle_network(p.now, late.iter().map(|d| (relay, d.as_slice())), &mut out);
    assert_eq!(
        endpoint(&p),
        Some(p.b_addr),
        "held: the direct path was heard just now"
    );
    assert_eq!(
        out.tun_packets().count(),
        1,
        "the late packet is delivered all the same"
    );
}

#[test]
fn quiet_candidates_are_probed_only_while_a_punch_is_on() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let relay: SocketAddr = "192.0.2.250:1".parse().unwrap();
    let cfg = peer_of(key(2), "192.0.2.250:1", &["10.0.0.2/32"]);
    let k = cfg.public_key;
    p.a.set_peer(cfg);
    p.a.set_candidates(&k, vec![p.b_addr, relay]);
    p.a.set_quiet(&k, vec![p.b_addr]);
    let endpoint = |p: &Pair| p.a.peer(&k).unwrap().config.endpoint;
    let sent_to = |out: &Outbox| out.net_packets().map(|(a, _)| a).collect::<Vec<_>>();
    let mut out = Outbox::default();
    p.a.handle_tun(
        p.now,
        [ipv4("10.0.0.1", "10.0.0.2", b"hi").as_slice()],
        &mut out,
    );
    assert_eq!(
        sent_to(&out),
        [relay],
        "the initiation skips the quiet NAT address"
    );
    // Through the relay: B answers, A's queued packet follows.
    let init: Vec<Vec<u8>> = out.net_packets().map(|(_, d)| d.to_vec()).collect();
    answer_through(&mut p, &init, relay, &mut out);
    assert_eq!(endpoint(&p), Some(relay));
    p.advance(Duration::from_secs(6));
    out.clear();
    p.a.handle_timeout(p.now, &mut out);
    assert!(
        !sent_to(&out).contains(&p.b_addr),
        "no blind probe of a NAT"
    );
    // The controller says punch: probed at once, and on each tick for the window.
    out.clear();
    p.a.punch(&k, p.now, &mut out);
    assert_eq!(sent_to(&out), [p.b_addr]);
    p.advance(Duration::from_secs(1));
    out.clear();
    p.a.handle_timeout(p.now, &mut out);
    assert!(sent_to(&out).contains(&p.b_addr), "still punching");
    p.advance(Duration::from_secs(3));
    out.clear();
    p.a.handle_timeout(p.now, &mut out);
    assert!(!sent_to(&out).contains(&p.b_addr), "the window closed");
    // A punch that gets through: B's packet from the NAT address moves A off the relay.
    out.clear();
    p.a.punch(&k, p.now, &mut out);
    let direct = p.send_b(&[ipv4("10.0.0.2", "10.0.0.1", b"direct")]);
    p.a.handle_network(
        p.now,
        direct.iter().map(|d| (p.b_addr, d.as_slice())),
        &mut out,
    );
    assert_eq!(endpoint(&p), Some(p.b_addr));
}

#[test]
fn a_waiting_handshake_goes_to_a_candidate_added_later_at_once() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let relay: SocketAddr = "192.0.2.250:1".parse().unwrap();
    let cfg = peer_of(key(2), "198.51.100.9:9", &["10.0.0.2/32"]);
    let k = cfg.public_key;
    p.a.set_peer(cfg);
    let mut out = Outbox::default();
    p.a.add_candidate(&k, "198.51.100.8:8".parse().unwrap(), &mut out);
    assert_eq!(out.net_packets().count(), 0, "no handshake was waiting");
    p.a.handle_tun(
        p.now,
        [ipv4("10.0.0.1", "10.0.0.2", b"hi").as_slice()],
        &mut out,
    );
    out.clear();
    p.a.add_candidate(&k, relay, &mut out);
    let to: Vec<SocketAddr> = out.net_packets().map(|(a, _)| a).collect();
    assert!(to.contains(&relay), "{to:?}");
    let init: Vec<Vec<u8>> = out.net_packets().take(1).map(|(_, d)| d.to_vec()).collect();
    assert_eq!(init[0].len(), 148, "a handshake initiation");
}

#[test]
fn an_unanswered_handshake_to_a_managed_peer_is_sent_again_once_after_a_second() {
    let mut p = Pair::new(&["10.0.0.2/32"]);
    let cfg = peer_of(key(2), "198.51.100.9:9", &["10.0.0.2/32"]);
    let k = cfg.public_key;
    p.a.set_peer(cfg);
    let relay: SocketAddr = "192.0.2.250:1".parse().unwrap();
    p.a.set_candidates(&k, vec!["198.51.100.9:9".parse().unwrap(), relay]);
    let mut out = Outbox::default();
    p.a.handle_tun(
        p.now,
        [ipv4("10.0.0.1", "10.0.0.2", b"hi").as_slice()],
        &mut out,
    );
    // Initiations to the relay (each goes to the endpoint as well).
    let initiations = |out: &Outbox| {
        out.net_packets()
            .filter(|(to, d)| *to == relay && d.len() == 148 && d[0] == 1)
            .count()
    };
    assert_eq!(initiations(&out), 1);
    let mut sent_again = 0;
    for _ in 0..12 {
        p.advance(Duration::from_millis(250));
        out.clear();
        p.a.handle_timeout(p.now, &mut out);
        sent_again += initiations(&out);
    }
    assert_eq!(
        sent_again, 1,
        "once within 3 s (WireGuard's own retry is at 5 s)"
    );
}
