use canopy_proto::v1::RemotePeer;
use hickory_proto::op::Query;
use proptest::prelude::*;

use super::*;

fn map() -> NetworkMap {
    let peer = |name: &str, ips: &[&str]| RemotePeer {
        dns_name: name.into(),
        allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    NetworkMap {
        revision: 42,
        dns_domain: "prod.canopy".into(),
        dns_name: "me".into(),
        cidrs: vec!["100.64.0.0/24".into(), "fd7a:1::/64".into()],
        addresses: vec!["100.64.0.1/32".into(), "fd7a:1::1/128".into()],
        peers: vec![
            // A gateway: its site's prefix is not its address.
            peer("web1", &["100.64.0.2/32", "fd7a:1::2/128", "10.30.0.0/24"]),
            peer("db", &["100.64.0.3/32"]),
            peer("bad.label", &["100.64.0.4/32"]),
        ],
        ..Default::default()
    }
}

fn ask_with(zone: Option<&Zone>, name: &str, t: RecordType, edns: bool) -> Message {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        q.set_edns(Edns::new());
    }
    let out = answer(zone, &q.to_vec().unwrap(), Transport::Udp).expect("an answer");
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(!m.metadata.recursion_available, "we recurse for nobody");
    m
}

fn ask(zone: &Zone, name: &str, t: RecordType) -> Message {
    ask_with(Some(zone), name, t, false)
}

fn addrs(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

#[test]
fn peers_resolve_to_their_overlay_addresses_only() {
    let z = Zone::from_map(&map()).unwrap();
    assert_eq!(z.domain(), "prod.canopy");
    let a = ask(&z, "web1.prod.canopy.", RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(addrs(&a), ["100.64.0.2"]);
    assert_eq!(a.answers[0].ttl, TTL);
    let aaaa = ask(&z, "WEB1.Prod.Canopy.", RecordType::AAAA);
    assert_eq!(addrs(&aaaa), ["fd7a:1::2"]);
    assert_eq!(
        aaaa.answers[0].name.to_ascii(),
        "WEB1.Prod.Canopy.",
        "the question's case is kept"
    );
    assert_eq!(
        addrs(&ask(&z, "me.prod.canopy.", RecordType::A)),
        ["100.64.0.1"]
    );
    let any = ask(&z, "web1.prod.canopy.", RecordType::ANY);
    assert_eq!(any.answers.len(), 2);
}

#[test]
fn unknown_names_in_the_zone_are_nxdomain_with_the_soa() {
    let z = Zone::from_map(&map()).unwrap();
    for name in [
        "gone.prod.canopy.",
        "x.web1.prod.canopy.",
        "bad.label.prod.canopy.",
    ] {
        let m = ask(&z, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(m.authorities[0].ttl, TTL);
    }
}

#[test]
fn a_name_without_that_type_is_nodata() {
    let z = Zone::from_map(&map()).unwrap();
    for (name, t) in [
        ("db.prod.canopy.", RecordType::AAAA),
        ("db.prod.canopy.", RecordType::MX),
        ("prod.canopy.", RecordType::A),
    ] {
        let m = ask(&z, name, t);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NoError,
            "{name} {t}"
        );
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
    }
    let soa = ask(&z, "prod.canopy.", RecordType::SOA);
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    assert!(
        soa.answers[0].data.to_string().contains("42"),
        "serial: the revision"
    );
}

#[test]
fn names_outside_the_zone_are_refused_not_forwarded() {
    let z = Zone::from_map(&map()).unwrap();
    for name in ["example.com.", "canopy.", "other.canopy.", "prodxcanopy."] {
        let m = ask(&z, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(m.answers.is_empty() && !m.metadata.authoritative);
    }
    let before_map = ask_with(None, "web1.prod.canopy.", RecordType::A, false);
    assert_eq!(before_map.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn edns_is_answered_with_edns_and_oversized_answers_are_truncated() {
    let z = Zone::from_map(&map()).unwrap();
    let m = ask_with(Some(&z), "web1.prod.canopy.", RecordType::A, true);
    assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(UDP_MAX));
    // 200 addresses under one name (several legacy peers sharing it) do not fit 512 bytes.
    let mut big = map();
    for i in 0..200u32 {
        big.peers.push(RemotePeer {
            dns_name: "many".into(),
            allowed_ips: vec![format!("fd7a:1::{:x}/128", 0x100 + i)],
            ..Default::default()
        });
    }
    let z = Zone::from_map(&big).unwrap();
    let m = ask(&z, "many.prod.canopy.", RecordType::AAAA);
    assert!(m.metadata.truncation && m.answers.is_empty());
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("many.prod.canopy.").unwrap(),
        RecordType::AAAA,
    ));
    let tcp = answer(Some(&z), &q.to_vec().unwrap(), Transport::Tcp).unwrap();
    assert_eq!(Message::from_vec(&tcp).unwrap().answers.len(), 200);
}

#[test]
fn garbage_gets_formerr_or_nothing_and_responses_are_never_answered() {
    let z = Zone::from_map(&map()).unwrap();
    assert_eq!(answer(Some(&z), &[1, 2, 3], Transport::Udp), None);
    let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 7]);
    let m = Message::from_vec(&answer(Some(&z), &junk, Transport::Udp).unwrap()).unwrap();
    assert_eq!(m.metadata.id, 0xabcd);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A response (QR set), even a well-formed one: no answer, so no loops or reflection.
    let mut r = Message::query();
    r.metadata.message_type = MessageType::Response;
    assert_eq!(answer(Some(&z), &r.to_vec().unwrap(), Transport::Udp), None);
    // Two questions: FORMERR. An update: NOTIMP.
    let mut two = Message::query();
    for n in ["a.prod.canopy.", "b.prod.canopy."] {
        two.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
    }
    let m = Message::from_vec(&answer(Some(&z), &two.to_vec().unwrap(), Transport::Udp).unwrap());
    assert_eq!(m.unwrap().metadata.response_code, ResponseCode::FormErr);
    let mut upd = Message::query();
    upd.metadata.op_code = OpCode::Update;
    let m = Message::from_vec(&answer(Some(&z), &upd.to_vec().unwrap(), Transport::Udp).unwrap());
    assert_eq!(m.unwrap().metadata.response_code, ResponseCode::NotImp);
}

#[test]
fn a_map_without_a_zone_gives_none() {
    let mut m = map();
    m.dns_domain.clear();
    assert!(Zone::from_map(&m).is_none());
    m.dns_domain = "bad..zone".into();
    assert!(Zone::from_map(&m).is_none());
}

proptest! {
    /// Hostile packets: random bytes, and valid questions with bytes flipped, cut or appended,
    /// never panic and never get an answer larger than UDP allows.
    #[test]
    fn any_packet_is_answered_within_bounds_or_dropped(
        raw in proptest::collection::vec(any::<u8>(), 0..600),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
    ) {
        let z = Zone::from_map(&map()).unwrap();
        if let Some(out) = answer(Some(&z), &raw, Transport::Udp) {
            prop_assert!(out.len() <= usize::from(UDP_MAX));
        }
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii("web1.prod.canopy.").unwrap(), RecordType::A));
        q.set_edns(Edns::new());
        let mut p = q.to_vec().unwrap();
        for (at, b) in flips {
            let n = p.len();
            p[at % n] ^= b;
        }
        p.truncate(cut % (p.len() + 1));
        p.extend_from_slice(&raw[..raw.len().min(40)]);
        if let Some(out) = answer(Some(&z), &p, Transport::Udp) {
            prop_assert!(out.len() <= usize::from(UDP_MAX));
        }
    }
}
