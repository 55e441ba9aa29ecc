use super::*;
use crate::testing::{ipv4, ipv6};

fn tcp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    segment(src, dst, sport, dport, 0x10) // ACK
}

fn syn4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    segment(src, dst, sport, dport, 0x02)
}

fn segment(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = sport.to_be_bytes().to_vec();
    l4.extend(dport.to_be_bytes());
    l4.extend([0u8; 16]);
    l4[13] = flags;
    let mut p = ipv4(src, dst, &l4);
    p[9] = TCP;
    p
}

fn ping4(src: &str, dst: &str, kind: u8, id: u16) -> Vec<u8> {
    let mut l4 = vec![kind, 0, 0, 0];
    l4.extend(id.to_be_bytes());
    l4.extend([0, 1]);
    let mut p = ipv4(src, dst, &l4);
    p[9] = ICMP;
    p
}

fn none() -> Rules {
    Rules::new(&[])
}

proptest::proptest! {
    /// The compiled rules let in exactly what checking each rule would.
    #[test]
    fn compiled_rules_admit_what_the_rules_admit(
        rules in proptest::collection::vec(
            (0..4usize, proptest::collection::vec((0u16..60, 0u16..8), 0..3), proptest::bool::ANY),
            0..6,
        ),
        probes in proptest::collection::vec((0..4usize, 0u16..70, proptest::bool::ANY, proptest::bool::ANY), 1..40),
    ) {
        let protos = [Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp];
        let rules: Vec<Allow> = rules
            .into_iter()
            .map(|(p, ports, narrow)| Allow {
                proto: protos[p],
                ports: ports.into_iter().map(|(a, n)| (a, a + n)).collect(),
                dst: if narrow { vec!["10.0.0.1/32".parse().unwrap()] } else { vec![] },
            })
            .collect();
        let compiled = Rules::new(&rules);
        for (p, port, has_ports, to_one) in probes {
            let f = Flow {
                proto: [TCP, UDP, ICMP, 47][p],
                src: "10.0.0.9".parse().unwrap(),
                dst: if to_one { "10.0.0.1" } else { "10.0.0.2" }.parse().unwrap(),
                src_port: 1,
                dst_port: port,
                // Only TCP and UDP packets carry ports (a non-first fragment does not).
                has_ports: has_ports && p < 2,
                icmp_error: false,
                syn: false,
            };
            proptest::prop_assert_eq!(compiled.admits(&f), rules.iter().any(|r| r.admits(&f)), "{:?} {:?}", f, rules);
        }
    }
}

#[test]
fn flows_are_read_from_ipv4_and_ipv6_tcp_udp_and_icmp() {
    let f = flow(&tcp4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
    assert_eq!(
        (f.proto, f.src_port, f.dst_port, f.has_ports),
        (TCP, 40000, 5432, true)
    );
    let mut l4 = 53u16.to_be_bytes().to_vec();
    l4.extend(5353u16.to_be_bytes());
    l4.extend([0u8; 4]);
    let f = flow(&ipv6("fd00::1", "fd00::2", &l4)).unwrap();
    assert_eq!(
        (f.proto, f.src_port, f.dst_port),
        (UDP, 53, 5353),
        "ipv6() builds UDP"
    );
    let f = flow(&ping4("10.0.0.1", "10.0.0.2", 8, 77)).unwrap();
    assert_eq!((f.proto, f.src_port, f.icmp_error), (ICMP, 77, false));
    assert!(
        flow(&ping4("10.0.0.1", "10.0.0.2", 3, 0))
            .unwrap()
            .icmp_error
    );
    let mut frag = tcp4("10.0.0.1", "10.0.0.2", 1, 2);
    frag[7] = 10; // fragment offset 80 bytes: no ports here
    assert!(!flow(&frag).unwrap().has_ports);
    assert!(flow(&[0x45, 0, 0]).is_none() && flow(&[0x10; 40]).is_none());
}

#[test]
fn replies_to_flows_this_node_opened_pass_and_others_need_a_rule() {
    let now = Instant::now();
    let mut ct = Conntrack::default();
    let web_to_db = flow(&syn4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
    let reply = flow(&tcp4("10.0.0.2", "10.0.0.1", 5432, 40000)).unwrap();
    assert!(
        !admits(&mut ct, 7, &none(), &reply, now),
        "nothing opened yet"
    );
    ct.outbound(7, &web_to_db, now);
    assert!(admits(&mut ct, 7, &none(), &reply, now));
    assert!(
        !admits(&mut ct, 8, &none(), &reply, now),
        "the same packet from another peer"
    );
    let db_opens = flow(&tcp4("10.0.0.2", "10.0.0.1", 5432, 22)).unwrap();
    assert!(!admits(&mut ct, 7, &none(), &db_opens, now));
    let ssh = Allow {
        proto: Proto::Tcp,
        ports: vec![(22, 22)],
        dst: vec![],
    };
    assert!(admits(
        &mut ct,
        7,
        &Rules::new(std::slice::from_ref(&ssh)),
        &db_opens,
        now
    ));
    let elsewhere = Allow {
        dst: vec!["10.0.0.9/32".parse().unwrap()],
        ..ssh
    };
    assert!(!admits(
        &mut ct,
        7,
        &Rules::new(&[elsewhere]),
        &db_opens,
        now
    ));
    // Idle past its timeout, the flow is gone.
    assert!(!admits(
        &mut ct,
        7,
        &none(),
        &reply,
        now + TCP_IDLE + Duration::from_secs(1)
    ));
    // Pings: the echo id ties the reply to the request.
    ct.outbound(7, &flow(&ping4("10.0.0.1", "10.0.0.2", 8, 5)).unwrap(), now);
    assert!(admits(
        &mut ct,
        7,
        &none(),
        &flow(&ping4("10.0.0.2", "10.0.0.1", 0, 5)).unwrap(),
        now
    ));
    assert!(!admits(
        &mut ct,
        7,
        &none(),
        &flow(&ping4("10.0.0.2", "10.0.0.1", 8, 5)).unwrap(),
        now + ICMP_IDLE * 2
    ));
}

#[test]
fn answering_a_peers_flow_never_makes_it_this_nodes_own() {
    let now = Instant::now();
    let mut ct = Conntrack::default();
    let pg = Allow {
        proto: Proto::Any,
        ports: vec![(5432, 5432)],
        dst: vec![],
    };
    // TCP: the peer's SYN is let in by the rule; this node's answers are not SYNs.
    let syn = flow(&syn4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
    assert!(admits(
        &mut ct,
        7,
        &Rules::new(std::slice::from_ref(&pg)),
        &syn,
        now
    ));
    ct.outbound(
        7,
        &flow(&tcp4("10.0.0.2", "10.0.0.1", 5432, 40000)).unwrap(),
        now,
    );
    let next = flow(&tcp4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
    assert!(
        !admits(&mut ct, 7, &none(), &next, now),
        "without the rule, the flow stops"
    );
    // UDP: the same, by remembering the peer opened it.
    let mut udp = syn;
    udp.proto = UDP;
    assert!(admits(
        &mut ct,
        7,
        &Rules::new(std::slice::from_ref(&pg)),
        &udp,
        now
    ));
    let answer = Flow {
        src: udp.dst,
        dst: udp.src,
        src_port: udp.dst_port,
        dst_port: udp.src_port,
        ..udp
    };
    ct.outbound(7, &answer, now);
    assert!(!admits(&mut ct, 7, &none(), &udp, now));
    // A mid-stream TCP packet this node sends opens nothing either.
    let stray = flow(&tcp4("10.0.0.2", "10.0.0.3", 1000, 2000)).unwrap();
    ct.outbound(7, &stray, now);
    let back = flow(&tcp4("10.0.0.3", "10.0.0.2", 2000, 1000)).unwrap();
    assert!(!admits(&mut ct, 7, &none(), &back, now));
}

#[test]
fn the_tracker_holds_a_bounded_number_of_flows() {
    let now = Instant::now();
    let mut ct = Conntrack::default();
    for i in 0..(MAX_FLOWS + 100) {
        let port = u16::try_from(i % 65_000).unwrap();
        let host = format!("10.1.{}.{}", i / 65_000, 1);
        ct.outbound(1, &flow(&syn4("10.0.0.1", &host, port, 80)).unwrap(), now);
    }
    assert_eq!(ct.len(), MAX_FLOWS);
    // Once they are idle, a sweep makes room.
    let later = now + TCP_IDLE * 2;
    ct.outbound(
        1,
        &flow(&syn4("10.0.0.1", "10.9.9.9", 1, 80)).unwrap(),
        later,
    );
    assert_eq!(ct.len(), 1);
}
