//! Two engines talking through memory: no sockets, no clock but the one we pass.

use super::*;

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";

fn key(seed: u8) -> [u8; 32] {
    let mut k = [seed; 32];
    k[0] &= 248;
    k
}

fn pubkey(private: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private)).to_bytes()
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// A minimal IPv4 packet (20-byte header + payload).
fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let len = (20 + payload.len()) as u16;
    let mut p = vec![
        0x45,
        0,
        (len >> 8) as u8,
        len as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(payload);
    p
}

fn ipv6(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let len = payload.len() as u16;
    let mut p = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, 17, 64];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(payload);
    p
}

/// A and B configured as each other's peer: A is 10.0.0.1, B is 10.0.0.2 (and fd00::1/2).
fn pair(b_allowed_at_a: &[&str]) -> (Engine, Engine) {
    let (ka, kb) = (key(1), key(2));
    let mut a = Engine::new(ka);
    let mut b = Engine::new(kb);
    a.set_peer(PeerConfig {
        public_key: pubkey(kb),
        preshared_key: None,
        endpoint: Some(B_ADDR.parse().unwrap()),
        allowed_ips: b_allowed_at_a.iter().map(|s| net(s)).collect(),
        persistent_keepalive: None,
    });
    b.set_peer(PeerConfig {
        public_key: pubkey(ka),
        preshared_key: None,
        endpoint: Some(A_ADDR.parse().unwrap()),
        allowed_ips: vec![net("0.0.0.0/0"), net("::/0")],
        persistent_keepalive: None,
    });
    (a, b)
}

/// Shuttles datagrams between A (at `a_addr`) and B until both are quiet; returns what each
/// delivered to its TUN.
fn exchange(
    a: &mut Engine,
    b: &mut Engine,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    mut to_a: Vec<Vec<u8>>,
    mut to_b: Vec<Vec<u8>>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
    let mut out = Outbox::default();
    for _ in 0..10 {
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        out.clear();
        a.handle_network(to_a.iter().map(|d| (b_addr, d.as_slice())), &mut out);
        to_a.clear();
        at_a.extend(out.tun_packets().map(<[u8]>::to_vec));
        to_b.extend(out.net_packets().map(|(_, d)| d.to_vec()));
        out.clear();
        b.handle_network(to_b.iter().map(|d| (a_addr, d.as_slice())), &mut out);
        to_b.clear();
        at_b.extend(out.tun_packets().map(<[u8]>::to_vec));
        to_a.extend(out.net_packets().map(|(_, d)| d.to_vec()));
    }
    (at_a, at_b)
}

fn send(from: &mut Engine, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Outbox::default();
    from.handle_tun(pkts.iter().map(Vec::as_slice), &mut out);
    out.net_packets().map(|(_, d)| d.to_vec()).collect()
}

#[test]
fn packets_cross_both_ways_after_a_handshake_ipv4_and_ipv6() {
    let (mut a, mut b) = pair(&["10.0.0.2/32", "fd00::2/128"]);
    let (aa, ba) = (A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap());
    let p1 = ipv4("10.0.0.1", "10.0.0.2", b"hello");
    let p6 = ipv6("fd00::1", "fd00::2", b"hello6");
    // The first packet triggers a handshake and is queued; it is delivered after the handshake.
    let init = send(&mut a, &[p1.clone(), p6.clone()]);
    let (_, at_b) = exchange(&mut a, &mut b, aa, ba, vec![], init);
    assert_eq!(at_b, vec![p1.clone(), p6.clone()]);
    // Now B answers over the established session.
    let reply = ipv4("10.0.0.2", "10.0.0.1", b"world");
    let to_a = send(&mut b, std::slice::from_ref(&reply));
    let (at_a, _) = exchange(&mut a, &mut b, aa, ba, to_a, vec![]);
    assert_eq!(at_a, vec![reply]);
    let st = a.peer(&pubkey(key(2))).unwrap();
    assert!(st.last_handshake.is_some() && st.tx_bytes > 0 && st.rx_bytes > 0);
}

#[test]
fn a_packet_from_outside_the_peers_allowed_ips_is_dropped() {
    let (mut a, mut b) = pair(&["10.0.0.2/32"]);
    let (aa, ba) = (A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap());
    let init = send(&mut b, &[ipv4("10.0.0.2", "10.0.0.1", b"ok")]);
    let (at_a, _) = exchange(&mut a, &mut b, aa, ba, init, vec![]);
    assert_eq!(at_a.len(), 1);
    let spoofed = send(&mut b, &[ipv4("10.0.0.99", "10.0.0.1", b"spoof")]);
    let (at_a, _) = exchange(&mut a, &mut b, aa, ba, spoofed, vec![]);
    assert!(at_a.is_empty());
    assert_eq!(a.drops.spoofed, 1);
}

#[test]
fn a_handshake_from_an_unknown_key_gets_no_answer() {
    let (mut a, _) = pair(&["10.0.0.2/32"]);
    let mut stranger = Engine::new(key(9));
    stranger.set_peer(PeerConfig {
        public_key: a.public_key(),
        preshared_key: None,
        endpoint: Some(A_ADDR.parse().unwrap()),
        allowed_ips: vec![net("0.0.0.0/0")],
        persistent_keepalive: None,
    });
    let init = send(&mut stranger, &[ipv4("10.0.0.9", "10.0.0.1", b"hi")]);
    assert_eq!(init.len(), 1);
    let mut out = Outbox::default();
    a.handle_network(
        [("192.0.2.9:1".parse().unwrap(), init[0].as_slice())],
        &mut out,
    );
    assert!(out.net.is_empty() && out.tun_is_empty());
    assert_eq!(a.drops.invalid, 1);
}

#[test]
fn the_endpoint_follows_the_latest_authenticated_packet() {
    let (mut a, mut b) = pair(&["10.0.0.2/32"]);
    let (aa, ba) = (A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap());
    let init = send(&mut b, &[ipv4("10.0.0.2", "10.0.0.1", b"x")]);
    exchange(&mut a, &mut b, aa, ba, init, vec![]);
    // B moves to a new address; its next packet comes from there.
    let moved: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let pkt = send(&mut b, &[ipv4("10.0.0.2", "10.0.0.1", b"y")]);
    let (at_a, _) = exchange(&mut a, &mut b, aa, moved, pkt, vec![]);
    assert_eq!(at_a.len(), 1);
    assert_eq!(
        a.peer(&pubkey(key(2))).unwrap().config.endpoint,
        Some(moved)
    );
    // And A now sends to the new address.
    let mut out = Outbox::default();
    a.handle_tun([ipv4("10.0.0.1", "10.0.0.2", b"z").as_slice()], &mut out);
    assert_eq!(out.net[0].0, moved);
    // A forged datagram from elsewhere does not move it.
    let mut out = Outbox::default();
    let forged = [4u8, 0, 0, 0]
        .iter()
        .chain([0u8; 60].iter())
        .copied()
        .collect::<Vec<_>>();
    a.handle_network(
        [("203.0.113.1:1".parse().unwrap(), forged.as_slice())],
        &mut out,
    );
    assert_eq!(
        a.peer(&pubkey(key(2))).unwrap().config.endpoint,
        Some(moved)
    );
}

#[test]
fn handshakes_over_the_rate_limit_get_cookie_replies_to_their_sender() {
    let (mut a, mut b) = pair(&["10.0.0.2/32"]);
    let init = send(&mut b, &[ipv4("10.0.0.2", "10.0.0.1", b"x")]);
    let now = Instant::now();
    let mut out = Outbox::default();
    a.tick(now, &mut out);
    out.clear();
    let from: SocketAddr = "198.51.100.9:5000".parse().unwrap();
    a.handle_network(
        (0..(HANDSHAKE_RATE_LIMIT + 20)).map(|_| (from, init[0].as_slice())),
        &mut out,
    );
    let cookies = out
        .net_packets()
        .filter(|(to, d)| *to == from && d[0] == 3)
        .count();
    assert!(
        cookies >= 19,
        "expected cookie replies once over the limit, got {cookies}"
    );
    // A second later the limiter is reset: no cookies. (boringtun's limiter also checks the
    // real clock before resetting, so this waits for real.)
    std::thread::sleep(Duration::from_millis(1100));
    a.tick(now + Duration::from_millis(1100), &mut out);
    out.clear();
    a.handle_network([(from, init[0].as_slice())], &mut out);
    assert_eq!(out.net_packets().filter(|(_, d)| d[0] == 3).count(), 0);
}

#[test]
fn updating_allowed_ips_keeps_the_session_and_removing_a_peer_drops_its_routes() {
    let (mut a, mut b) = pair(&["10.0.0.2/32"]);
    let (aa, ba) = (A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap());
    let init = send(&mut a, &[ipv4("10.0.0.1", "10.0.0.2", b"x")]);
    exchange(&mut a, &mut b, aa, ba, vec![], init);
    let hs = a.peer(&pubkey(key(2))).unwrap().last_handshake;
    let mut cfg = a.peer(&pubkey(key(2))).unwrap().config;
    cfg.allowed_ips.push(net("10.9.0.0/16"));
    a.set_peer(cfg);
    let hs2 = a.peer(&pubkey(key(2))).unwrap().last_handshake.unwrap();
    let drift = hs2
        .duration_since(hs.unwrap())
        .unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_millis(50),
        "session kept (no new handshake)"
    );
    // Traffic to the new range goes out at once, over the same session (no new handshake).
    let out = send(&mut a, &[ipv4("10.0.0.1", "10.9.1.1", b"x")]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0][0], 4, "a data message, not a handshake initiation");
    assert!(a.remove_peer(&pubkey(key(2))));
    assert!(send(&mut a, &[ipv4("10.0.0.1", "10.0.0.2", b"x")]).is_empty());
    assert_eq!(a.drops.no_route, 1);
}

#[test]
fn without_a_private_key_no_handshake_is_made_or_answered_and_setting_one_starts_them() {
    let (mut a, mut b) = pair(&["10.0.0.2/32"]);
    a.set_private_key([0; 32]);
    let pkt = ipv4("10.0.0.1", "10.0.0.2", b"hi");
    assert!(
        send(&mut a, std::slice::from_ref(&pkt)).is_empty(),
        "no initiation without a key"
    );
    // B initiates: A, keyless, does not answer.
    let init = send(&mut b, &[ipv4("10.0.0.2", "10.0.0.1", b"yo")]);
    assert_eq!(init.len(), 1);
    let mut out = Outbox::default();
    a.handle_network([(B_ADDR.parse().unwrap(), init[0].as_slice())], &mut out);
    assert_eq!(out.net_packets().count(), 0, "no response without a key");
    // The key back (as `wg set private-key` does): A initiates again.
    a.set_private_key(key(1));
    assert_eq!(send(&mut a, &[pkt]).len(), 1);
}
