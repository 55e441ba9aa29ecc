//! Fuzz targets: every parser that takes outside input, each a `fn(&[u8])` that must never
//! panic, however hostile the bytes.
//!
//! | target | what the bytes are |
//! |---|---|
//! | `join_string` | a join string pasted by a user (`canopy1:…`); what parses re-encodes to itself |
//! | `wg_quick` | a wg-quick file (`canopy-agent up FILE`) |
//! | `uapi_set` | a `set=1` request on the UAPI socket, parsed and applied to an engine |
//! | `engine_network` | UDP datagrams arriving at the WireGuard socket |
//! | `engine_tunnel` | a packet read from the TUN device, sent through an established tunnel both ways |
//! | `controller` | a console or agent request (first byte: which), as protobuf bytes, run by a real controller on an embedded store |
//! | `stun` | a datagram at the controller's STUN port, or an answer at an agent's WireGuard socket |
//! | `dns` | a question at an agent's resolver (UDP and TCP) |
//!
//! [`mutate`] is the driver's mutation engine (`src/bin/fuzz.rs` runs it for millions of
//! inputs; `tests/smoke.rs` runs a short burst of each target in CI and replays
//! `regressions/<target>/*`). Only the stable toolchain exists here, so the driver is
//! mutational without coverage feedback; the targets are plain functions, ready for a
//! coverage-guided engine (cargo-afl) where one can be installed.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Instant;

mod controller;
mod lock;
mod mutation;

use canopy_agent::engine::{Engine, Outbox, PeerConfig};
use controller::{controller, controller_seeds};
pub use mutation::{mutate, run};

pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Valid inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens worth inserting whole.
    pub dictionary: &'static [&'static str],
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "dns",
        run: dns,
        seeds: dns_seeds,
        dictionary: &[
            "\x04prod\x06canopy\x00",
            "\x00\x01\x00\x01",
            "\x00\x1c",
            "\x00\x29\x10\x00",
        ],
    },
    Target {
        name: "stun",
        run: stun,
        seeds: stun_seeds,
        dictionary: &["!\x12", "\x00\x01", "\x01\x01", "\x00\x20", "\x00\x08"],
    },
    Target {
        name: "join_string",
        run: join_string,
        seeds: join_seeds,
        dictionary: &["canopy1:", "https://", "=", "-", "_", "A"],
    },
    Target {
        name: "wg_quick",
        run: wg_quick,
        seeds: wg_quick_seeds,
        dictionary: &[
            "[Interface]\n",
            "[Peer]\n",
            "PrivateKey = ",
            "PublicKey = ",
            "AllowedIPs = ",
            "Endpoint = ",
            "Address = ",
            "ListenPort = ",
            "MTU = ",
            "PersistentKeepalive = ",
            "PresharedKey = ",
            "DNS = ",
            "0.0.0.0/0",
            "::/0",
            "[::1]:51820",
            "#",
            "\n",
            ",",
        ],
    },
    Target {
        name: "uapi_set",
        run: uapi_set,
        seeds: uapi_seeds,
        dictionary: &[
            "set=1\n",
            "private_key=",
            "listen_port=",
            "fwmark=",
            "replace_peers=true\n",
            "public_key=",
            "remove=true\n",
            "update_only=true\n",
            "preshared_key=",
            "endpoint=",
            "persistent_keepalive_interval=",
            "replace_allowed_ips=true\n",
            "allowed_ip=",
            "protocol_version=1\n",
            "\n",
        ],
    },
    Target {
        name: "engine_network",
        run: engine_network,
        seeds: engine_network_seeds,
        dictionary: &[
            "\x01\x00\x00\x00",
            "\x02\x00\x00\x00",
            "\x03\x00\x00\x00",
            "\x04\x00\x00\x00",
        ],
    },
    Target {
        name: "engine_tunnel",
        run: engine_tunnel,
        seeds: engine_tunnel_seeds,
        dictionary: &[
            "\x45\x00",
            "\x60\x00\x00\x00",
            "\x0a\x00\x00\x01",
            "\x0a\x00\x00\x02",
        ],
    },
    Target {
        name: "policy",
        run: policy,
        seeds: policy_seeds,
        dictionary: &[
            "[[rule]]\n",
            "from = [\"*\"]\n",
            "to = [\"tag:a\"]\n",
            "tags = [\"a\", \"b\"]\n",
            "[groups]\n",
            "proto = \"tcp\"\n",
            "ports = [\"1-65535\"]\n",
            "group:",
            "100.64.0.0/24",
        ],
    },
    Target {
        name: "lock",
        run: lock::lock,
        seeds: lock::lock_seeds,
        dictionary: &["100.64.0.0/24", "0.0.0.0/0", "net_fuzz", "peer_a"],
    },
    Target {
        name: "controller",
        run: controller,
        seeds: controller_seeds,
        dictionary: &[
            "100.64.0.0/24",
            "fd7a::/64",
            "net_",
            "peer_",
            "cjt_",
            "cpc_",
            "prod",
        ],
    },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

// ----- join string -----

fn join_string(data: &[u8]) {
    use canopy_proto::join::JoinString;
    if let Ok(j) = JoinString::parse(&text(data)) {
        let again = JoinString::parse(&j.encode()).expect("an encoded join string parses");
        assert_eq!(again.encode(), j.encode(), "join string round trip");
    }
}

fn join_seeds() -> Vec<Vec<u8>> {
    let j = canopy_proto::join::JoinString {
        controller_url: "https://ctrl.example.com:7443".into(),
        token: "cjt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        ca_sha256: [7; 32],
        lock_sha256: Some([9; 32]),
        lock_delegate: Some((canopy_proto::v1::Signed::default(), [3; 32])),
    };
    vec![j.encode().into_bytes(), b"canopy1:".to_vec()]
}

// ----- STUN -----

/// A STUN datagram: a request must answer with a response that parses back to the sender;
/// a response parses or not, never panics.
fn stun(data: &[u8]) {
    use canopy_proto::stun;
    if let Some(id) = stun::parse_request(data) {
        let from: SocketAddr = "[2001:db8::1]:9".parse().expect("addr");
        let resp = stun::binding_response(&id, from);
        assert_eq!(
            stun::parse_response(&resp),
            Some((id, from)),
            "answer round trip"
        );
    }
    let _ = stun::parse_response(data);
    let _ = stun::is_stun(data);
}

fn stun_seeds() -> Vec<Vec<u8>> {
    use canopy_proto::stun;
    let id = [3; 12];
    vec![
        stun::binding_request(&id),
        stun::binding_response(&id, "192.0.2.1:51820".parse().expect("addr")),
        stun::binding_response(&id, "[2001:db8::1]:51820".parse().expect("addr")),
    ]
}

// ----- DNS -----

thread_local! {
    static ZONE: canopy_agent::dns::Zone = {
        let peer = canopy_proto::v1::RemotePeer {
            dns_name: "web1".into(),
            allowed_ips: vec!["100.64.0.2/32".into(), "fd7a::2/128".into()],
            ..Default::default()
        };
        let map = canopy_proto::v1::NetworkMap {
            dns_domain: "prod.canopy".into(),
            dns_name: "me".into(),
            cidrs: vec!["100.64.0.0/24".into(), "fd7a::/64".into()],
            addresses: vec!["100.64.0.1/32".into()],
            peers: vec![peer],
            ..Default::default()
        };
        canopy_agent::dns::Zone::from_map(&map).expect("zone")
    };
}

/// A question at an agent's resolver: answered (within UDP's size, with the question's id)
/// or dropped, over UDP and TCP; never a panic.
fn dns(data: &[u8]) {
    use canopy_agent::dns::{Transport, answer};
    ZONE.with(|z| {
        if let Some(out) = answer(Some(z), data, Transport::Udp) {
            assert!(out.len() <= 1232, "UDP answer of {} bytes", out.len());
            assert_eq!(out[..2], data[..2], "the question's id");
        }
        let _ = answer(Some(z), data, Transport::Tcp);
        let _ = answer(None, data, Transport::Udp);
    });
}

fn dns_seeds() -> Vec<Vec<u8>> {
    let q = |name: &[u8], qtype: u8, edns: bool| {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        p.extend_from_slice(name);
        p.extend_from_slice(&[0, qtype, 0, 1]);
        if edns {
            p.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        p
    };
    vec![
        q(b"\x04web1\x04prod\x06canopy\x00", 1, false),
        q(b"\x04web1\x04prod\x06canopy\x00", 28, true),
        q(b"\x04prod\x06canopy\x00", 6, true),
        q(b"\x07example\x03com\x00", 1, false),
    ]
}

// ----- wg-quick -----

// ----- policy -----

/// A policy document: checked, then compiled for every peer of a small network and tested
/// against the evaluator (a parse that succeeds must compile without panicking).
fn policy(data: &[u8]) {
    use canopy_controller::policy::{self, compile, eval};
    let Ok(p) = policy::parse(&text(data)) else {
        return;
    };
    let tags: Vec<Vec<String>> = vec![vec!["a".into()], vec!["b".into()], vec![]];
    let addrs: Vec<Vec<ipnetwork::IpNetwork>> = (1..=3)
        .map(|i| vec![format!("100.64.0.{i}/32").parse().expect("cidr")])
        .collect();
    let ids = ["peer_1", "peer_2", "peer_3"];
    let views: Vec<eval::PeerView> = (0..3)
        .map(|i| eval::PeerView {
            id: ids[i],
            tags: &tags[i],
            addresses: &addrs[i],
            routes: &[],
        })
        .collect();
    let peers = compile::Peers::new(views.clone());
    for me in &views {
        let part = compile::part(&p, &peers, me);
        for other in &views {
            let pkt = eval::Packet {
                proto: policy::Proto::Tcp,
                port: 22,
                dst: me.addresses[0].ip(),
            };
            let naive = eval::allows(Some(&p), other, me, &pkt).allowed();
            assert_eq!(part.admits(other, &pkt), naive && other.id != me.id);
        }
    }
}

fn policy_seeds() -> Vec<Vec<u8>> {
    vec![
        b"tags = [\"a\", \"b\"]\n[groups]\nab = [\"a\", \"b\"]\n[[rule]]\nname = \"x\"\nfrom = [\"tag:a\"]\nto = [\"group:ab\", \"100.64.0.0/30\"]\nproto = \"tcp\"\nports = [\"22\", \"8000-8100\"]\n".to_vec(),
        b"[[rule]]\nfrom = [\"*\"]\nto = [\"peer_2\"]\n".to_vec(),
    ]
}

fn wg_quick(data: &[u8]) {
    let _ = canopy_agent::config::parse(&text(data));
}

fn key_b64(seed: u8) -> String {
    canopy_agent::keys::encode(&public(seed))
}

pub(crate) fn public(seed: u8) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([seed; 32])).to_bytes()
}

fn wg_quick_seeds() -> Vec<Vec<u8>> {
    vec![
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.0.0.1/24, fd00::1/64\nListenPort = 51820\nMTU = 1420\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 10.0.0.2/32, 0.0.0.0/0\nEndpoint = 192.0.2.2:51820\nPersistentKeepalive = 25\n",
            key_b64(1),
            key_b64(2)
        )
        .into_bytes(),
    ]
}

// ----- UAPI -----

fn uapi_set(data: &[u8]) {
    let t = text(data);
    if let Ok(req) = canopy_agent::uapi::parse_set(t.lines()) {
        let mut engine = Engine::new([1; 32]);
        let _ = req.apply(&mut engine);
        let _ = canopy_agent::uapi::format_get(&engine, 51820, 0, std::time::SystemTime::now());
    }
}

fn uapi_seeds() -> Vec<Vec<u8>> {
    vec![
        format!(
            "private_key={}\nlisten_port=51820\nreplace_peers=true\npublic_key={}\nendpoint=192.0.2.2:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n",
            hex::encode([3u8; 32]),
            hex::encode(public(2))
        )
        .into_bytes(),
        format!("public_key={}\nremove=true\n", hex::encode(public(2))).into_bytes(),
    ]
}

// ----- engine -----

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";

fn engine_with_peer(private: u8, peer: u8, endpoint: &str) -> Engine {
    let mut e = Engine::new(clamped(private));
    e.set_peer(PeerConfig {
        public_key: x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(clamped(peer)))
            .to_bytes(),
        preshared_key: None,
        endpoint: endpoint.parse().ok(),
        allowed_ips: vec![
            "10.0.0.0/24".parse().expect("cidr"),
            "fd00::/64".parse().expect("cidr"),
        ],
        persistent_keepalive: None,
    });
    e
}

fn clamped(seed: u8) -> [u8; 32] {
    let mut k = [seed; 32];
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

/// Input split into datagrams: each is a one-byte length, then that many bytes.
fn datagrams(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = (n as usize).min(tail.len());
        out.push(&tail[..n]);
        rest = &tail[n..];
        if out.len() == 64 {
            break;
        }
    }
    out
}

fn engine_network(data: &[u8]) {
    thread_local! {
        static E: RefCell<(Engine, Outbox)> =
            RefCell::new((engine_with_peer(1, 2, B_ADDR), Outbox::default()));
    }
    let from: SocketAddr = B_ADDR.parse().expect("addr");
    E.with(|e| {
        let (engine, out) = &mut *e.borrow_mut();
        out.clear();
        engine.handle_network(
            Instant::now(),
            datagrams(data).into_iter().map(|d| (from, d)),
            out,
        );
        let _ = out.net_packets().count();
        let _ = out.tun_packets().count();
    });
}

fn engine_network_seeds() -> Vec<Vec<u8>> {
    // A real handshake initiation from B to A, length-prefixed.
    let mut b = engine_with_peer(2, 1, A_ADDR);
    let mut out = Outbox::default();
    let pkt = ipv4_packet([10, 0, 0, 2], [10, 0, 0, 1], b"hello");
    b.handle_tun(Instant::now(), [pkt.as_slice()], &mut out);
    let mut seeds = Vec::new();
    for (_, d) in out.net_packets() {
        let mut s = vec![d.len().min(255) as u8];
        s.extend_from_slice(&d[..d.len().min(255)]);
        seeds.push(s);
    }
    seeds.push(vec![4, 4, 0, 0, 0]);
    seeds
}

fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
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
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// Moves datagrams between A and B until both are quiet; returns what reached each TUN.
fn shuttle(a: &mut Engine, b: &mut Engine, mut to_b: Vec<Vec<u8>>) -> (usize, usize) {
    let (a_from, b_from): (SocketAddr, SocketAddr) =
        (A_ADDR.parse().expect("addr"), B_ADDR.parse().expect("addr"));
    let (mut at_a, mut at_b) = (0, 0);
    let mut out = Outbox::default();
    let mut to_a: Vec<Vec<u8>> = Vec::new();
    for _ in 0..8 {
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        out.clear();
        b.handle_network(
            Instant::now(),
            to_b.iter().map(|d| (a_from, d.as_slice())),
            &mut out,
        );
        at_b += out.tun_packets().count();
        let from_b: Vec<Vec<u8>> = out.net_packets().map(|(_, d)| d.to_vec()).collect();
        out.clear();
        a.handle_network(
            Instant::now(),
            to_a.iter().map(|d| (b_from, d.as_slice())),
            &mut out,
        );
        at_a += out.tun_packets().count();
        to_b = out.net_packets().map(|(_, d)| d.to_vec()).collect();
        to_a = from_b;
    }
    (at_a, at_b)
}

fn engine_tunnel(data: &[u8]) {
    // Blind mutation rarely keeps a routable destination: for half the inputs (the low bit of
    // the second byte) the destination is set to the other end's address, so the packet
    // really is encrypted, sent, decrypted and source-checked.
    let mut p = data.to_vec();
    if p.get(1).is_some_and(|b| b & 1 == 1) {
        match p[0] >> 4 {
            4 if p.len() >= 20 => p[16..20].copy_from_slice(&[10, 0, 0, 2]),
            6 if p.len() >= 40 => {
                let dst: std::net::Ipv6Addr = "fd00::2".parse().expect("v6");
                p[24..40].copy_from_slice(&dst.octets());
            }
            _ => {}
        }
    }
    tunnel_roundtrip(&p);
}

/// Sends `data` as a TUN packet from A to B and from B to A through an established session;
/// returns how many packets reached B's TUN and A's TUN.
pub fn tunnel_roundtrip(data: &[u8]) -> (usize, usize) {
    thread_local! {
        static PAIR: RefCell<(Engine, Engine)> = RefCell::new({
            let mut a = engine_with_peer(1, 2, B_ADDR);
            let mut b = engine_with_peer(2, 1, A_ADDR);
            // Establish the session: a first packet starts the handshake.
            let mut out = Outbox::default();
            let hello = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], b"hi");
            a.handle_tun(Instant::now(), [hello.as_slice()], &mut out);
            let first: Vec<Vec<u8>> = out.net_packets().map(|(_, d)| d.to_vec()).collect();
            shuttle(&mut a, &mut b, first);
            (a, b)
        });
    }
    PAIR.with(|p| {
        let (a, b) = &mut *p.borrow_mut();
        let mut out = Outbox::default();
        // A → B: whatever the TUN gave A, through the tunnel, into B's source checks.
        a.handle_tun(Instant::now(), [data], &mut out);
        let sent: Vec<Vec<u8>> = out.net_packets().map(|(_, d)| d.to_vec()).collect();
        let (_, at_b) = shuttle(a, b, sent);
        // B → A, the other direction.
        out.clear();
        b.handle_tun(Instant::now(), [data], &mut out);
        let sent: Vec<Vec<u8>> = out.net_packets().map(|(_, d)| d.to_vec()).collect();
        let (_, at_a) = shuttle(b, a, sent);
        (at_b, at_a)
    })
}

fn engine_tunnel_seeds() -> Vec<Vec<u8>> {
    vec![
        ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], b"payload"),
        ipv4_packet([10, 0, 1, 9], [10, 0, 0, 2], b"spoofed source"),
        {
            let mut p = vec![0x60, 0, 0, 0, 0, 4, 17, 64];
            p.extend_from_slice(
                &"fd00::1"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("v6")
                    .octets(),
            );
            p.extend_from_slice(
                &"fd00::2"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("v6")
                    .octets(),
            );
            p.extend_from_slice(b"abcd");
            p
        },
    ]
}
