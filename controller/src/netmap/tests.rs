use super::*;
use canopy_proto::netmap::apply_delta;
use proptest::prelude::*;

fn peer(i: u8, endpoint_gen: u8) -> PeerRecord {
    PeerRecord {
        id: format!("peer_{i:02}"),
        public_key: vec![i; 32],
        addresses: vec![format!("100.64.0.{}/32", u16::from(i) + 1)],
        endpoints: vec![format!("192.0.2.{i}:{}", 51820 + u16::from(endpoint_gen))],
        ..Default::default()
    }
}

#[derive(Clone, Debug)]
enum Change {
    Put(u8, u8),
    Delete(u8),
    /// Peer i's tags become those of the bits (of a, b, c); i = 0 is the agent itself.
    Tag(u8, u8),
    /// The policy becomes POLICIES[i], or none.
    Policy(Option<usize>),
    /// Peer i advertises prefix k (of 3).
    Route(u8, u8),
    /// The k-th route (if any) is withdrawn.
    Unroute(usize),
    /// Peer i's agent becomes live (since this revision) or not.
    Live(u8, bool),
    /// Peer i's agent advertises prefix k (a pending route).
    Advertise(u8, u8),
    /// The agent (peer_00) chooses peer i as its exit node (0: none).
    ExitVia(u8),
}

const POLICIES: [&str; 6] = [
    "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"tag:a\"]\nto = [\"tag:b\"]\nproto = \"tcp\"\nports = [\"5432\"]\n",
    "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"*\"]\nto = [\"tag:c\"]\n",
    "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"peer_00\", \"tag:b\"]\nto = [\"100.64.0.0/29\"]\nproto = \"icmp\"\n",
    "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"tag:a\"]\nto = [\"10.1.0.0/16\", \"10.2.3.0/24\"]\n",
    "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"*\"]\nto = [\"*\", \"10.0.0.0/8\"]\n[auto_approve]\n\"10.0.0.0/15\" = [\"tag:b\"]\n",
    "",
];

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (1u8..12, 0u8..3).prop_map(|(i, g)| Change::Put(i, g)),
        (1u8..12).prop_map(Change::Delete),
        (0u8..12, 0u8..8).prop_map(|(i, t)| Change::Tag(i, t)),
        proptest::option::of(0..POLICIES.len()).prop_map(Change::Policy),
        (0u8..12, 0u8..4).prop_map(|(i, k)| Change::Route(i, k)),
        (0usize..4).prop_map(Change::Unroute),
        (0u8..12, any::<bool>()).prop_map(|(i, up)| Change::Live(i, up)),
        (0u8..12, 0u8..3).prop_map(|(i, k)| Change::Advertise(i, k)),
        (0u8..4).prop_map(Change::ExitVia),
    ]
}

fn apply(s: &mut NetState, c: &Change, rev: Revision) {
    match c {
        Change::Put(i, g) => {
            let mut p = peer(*i, *g);
            p.tags = s
                .peer(&p.id)
                .map(|old| old.tags.clone())
                .unwrap_or_default();
            s.put_peer(p, rev);
        }
        Change::Delete(i) => s.delete_peer(&format!("peer_{i:02}"), rev),
        Change::Tag(i, bits) => {
            if let Some(mut p) = s.peer(&format!("peer_{i:02}")).cloned() {
                p.tags = ["a", "b", "c"]
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| bits & (1 << k) != 0)
                    .map(|(_, t)| t.to_string())
                    .collect();
                s.put_peer(p, rev);
            }
        }
        Change::Policy(p) => {
            let policy = p.map(|i| crate::policy::parse(POLICIES[i]).unwrap());
            s.set_policy(policy, rev);
        }
        Change::Route(i, k) => {
            let id = format!("peer_{i:02}");
            if s.peer(&id).is_some() {
                // k = 3: an exit route.
                let prefix = match k {
                    3 => "0.0.0.0/0".to_string(),
                    _ => format!("10.{k}.0.0/16"),
                };
                let r = RouteRecord {
                    id: format!("route_{rev:04}"),
                    peer_id: id,
                    prefix,
                    created_at_unix: rev,
                    ..Default::default()
                };
                s.put_route(r, rev);
            }
        }
        Change::Unroute(k) => {
            if let Some(id) = s.routes.keys().nth(*k).cloned() {
                s.delete_route(&id, rev);
            }
        }
        Change::Live(i, up) => {
            s.set_live(&format!("peer_{i:02}"), up.then_some(rev), rev);
        }
        Change::ExitVia(i) => {
            if let Some(mut p) = s.peer("peer_00").cloned() {
                p.exit_node = if *i == 0 {
                    String::new()
                } else {
                    format!("peer_{i:02}")
                };
                s.put_peer(p, rev);
            }
        }
        Change::Advertise(i, k) => {
            let id = format!("peer_{i:02}");
            if s.peer(&id).is_some() {
                let r = RouteRecord {
                    id: format!("route_{rev:04}"),
                    peer_id: id,
                    prefix: format!("10.{k}.0.0/16"),
                    created_at_unix: rev,
                    pending: true,
                    from_agent: true,
                    ..Default::default()
                };
                s.put_route(r, rev);
            }
        }
    }
}

#[test]
fn a_removed_peer_gets_no_map() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    s.put_peer(peer(0, 0), 1);
    s.delete_peer("peer_00", 2);
    assert_eq!(s.update_since("peer_00", 1, 2), None);
}

#[test]
fn a_base_older_than_the_tombstone_history_gets_a_full_map() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    s.put_peer(peer(0, 0), 1);
    let mut rev = 1;
    for i in 0..(TOMBSTONES + 5) {
        rev += 1;
        let mut p = peer(1, 0);
        p.id = format!("tmp_{i}");
        s.put_peer(p.clone(), rev);
        rev += 1;
        s.delete_peer(&p.id, rev);
    }
    assert!(matches!(
        s.update_since("peer_00", 2, rev),
        Some(Update::Full(_))
    ));
    assert!(matches!(
        s.update_since("peer_00", rev - 2, rev),
        Some(Update::Delta(_))
    ));
}

proptest! {
    /// For any history (peers joining, leaving, changing endpoints and tags, the policy
    /// changing), the update from any earlier revision applied to the map at that revision
    /// equals the full map now; and it is a delta unless the agent's own tags changed
    /// under a policy or the policy changed twice.
    #[test]
    fn delta_applied_to_old_map_equals_new_full_map(
        before in proptest::collection::vec(change(), 0..20),
        after in proptest::collection::vec(change(), 0..20),
    ) {
        // Four peers to start with, so routes, exits and tags often land on existing ones.
        let mut s = NetState::new(NetworkRecord::default(), 0);
        for i in 0..4u8 {
            s.put_peer(peer(i, 0), i64::from(i) + 1);
        }
        let mut rev = 4;
        for c in &before { rev += 1; apply(&mut s, c, rev); }
        let base = rev;
        let mut old = s.full_map("peer_00", base).unwrap();
        for c in &after { rev += 1; apply(&mut s, c, rev); }
        let now = s.full_map("peer_00", rev).unwrap();
        let policy_changes = after.iter().filter(|c| matches!(c, Change::Policy(_))).count();
        let own_tags = after.iter().any(|c| matches!(c, Change::Tag(0, _)));
        let own_routes = base < s.peers.get("peer_00").map_or(0, |e| e.routes_rev.max(e.exit_rev));
        match s.update_since("peer_00", base, rev).unwrap() {
            Update::Delta(d) => {
                apply_delta(&mut old, &d).unwrap();
                prop_assert_eq!(old, now);
            }
            Update::Full(m) => {
                prop_assert!(policy_changes > 1 || own_tags || own_routes, "a full map for {after:?}");
                prop_assert_eq!(*m, now);
            }
        }
    }
}

fn allowed(m: &NetworkMap, id: &str) -> Vec<String> {
    let p = m.peers.iter().find(|p| p.peer_id == id).unwrap();
    p.allowed_ips.clone()
}

fn route(id: &str, gw: &str, at: i64) -> RouteRecord {
    RouteRecord {
        id: id.into(),
        peer_id: gw.into(),
        prefix: "10.20.0.0/16".into(),
        created_at_unix: at,
        ..Default::default()
    }
}

#[test]
fn a_routes_prefix_goes_to_its_oldest_gateway_and_moves_when_that_one_leaves() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    for i in 0..3u8 {
        s.put_peer(peer(i, 0), i64::from(i) + 1);
    }
    s.put_route(route("route_a", "peer_01", 10), 10);
    s.put_route(route("route_b", "peer_02", 11), 11);
    let m = s.full_map("peer_00", 11).unwrap();
    assert_eq!(allowed(&m, "peer_01"), ["100.64.0.2/32", "10.20.0.0/16"]);
    assert_eq!(
        allowed(&m, "peer_02"),
        ["100.64.0.3/32"],
        "the second gateway stands by"
    );
    assert_eq!(s.full_map("peer_01", 11).unwrap().routes, ["10.20.0.0/16"]);
    assert_eq!(
        s.full_map("peer_02", 11).unwrap().routes,
        ["10.20.0.0/16"],
        "a standby gateway forwards the prefix too, ready to take it"
    );
    // The primary leaves: the other takes the prefix, and a client hears it as a delta.
    s.delete_peer("peer_01", 12);
    let Some(Update::Delta(d)) = s.update_since("peer_00", 11, 12) else {
        panic!("a delta");
    };
    assert_eq!(d.removed, ["peer_01"]);
    assert_eq!(d.upserted[0].allowed_ips, ["100.64.0.3/32", "10.20.0.0/16"]);
    assert!(
        matches!(s.update_since("peer_02", 11, 12), Some(Update::Delta(_))),
        "the new primary's own map did not change: it forwarded the prefix already"
    );
}

#[test]
fn a_live_gateway_carries_the_prefix_and_one_that_comes_back_does_not_take_it_back() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    for i in 0..3u8 {
        s.put_peer(peer(i, 0), i64::from(i) + 1);
    }
    s.put_route(route("route_a", "peer_01", 10), 10);
    s.put_route(route("route_b", "peer_02", 11), 11);
    // Neither live: the oldest route. peer_02's agent comes up first: it takes the prefix.
    assert!(s.is_primary("route_a"));
    assert!(s.set_live("peer_02", Some(1_000), 12));
    assert!(!s.set_live("peer_01", Some(2_000), 13), "nothing moves");
    assert!(
        !s.set_live("peer_01", Some(2_000), 14),
        "a renewal moves nothing"
    );
    assert_eq!(s.revision, 12, "and does not touch the network");
    assert!(s.is_primary("route_b"));
    // peer_02's agent goes away: the prefix moves to the live one, as a delta to clients.
    assert!(s.set_live("peer_02", None, 15));
    assert!(s.is_primary("route_a"));
    let Some(Update::Delta(d)) = s.update_since("peer_00", 14, 15) else {
        panic!("a delta");
    };
    let mut got: Vec<(String, Vec<String>)> = d
        .upserted
        .iter()
        .map(|p| (p.peer_id.clone(), p.allowed_ips.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "peer_01".to_string(),
                vec!["100.64.0.2/32".to_string(), "10.20.0.0/16".to_string()]
            ),
            ("peer_02".to_string(), vec!["100.64.0.3/32".to_string()]),
        ]
    );
    // It comes back: live since later than peer_01, so peer_01 keeps the prefix (no flap).
    assert!(!s.set_live("peer_02", Some(9_000), 16));
    assert!(s.is_primary("route_a"));
    // peer_01 goes: peer_02 takes it; with no gateway live, the oldest route carries it (the
    // prefix never falls back to the hosts' own routes).
    assert!(s.set_live("peer_01", None, 17));
    assert!(s.is_primary("route_b"));
    assert!(s.set_live("peer_02", None, 18));
    assert!(s.is_primary("route_a"));
}

#[test]
fn an_advertised_route_is_in_force_once_approved_or_while_the_policy_auto_approves_it() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    for i in 0..2u8 {
        s.put_peer(peer(i, 0), i64::from(i) + 1);
    }
    let mut r = route("route_a", "peer_01", 10);
    r.pending = true;
    s.put_route(r.clone(), 10);
    assert_eq!(s.route_state("route_a"), "pending");
    assert_eq!(
        allowed(&s.full_map("peer_00", 10).unwrap(), "peer_01"),
        ["100.64.0.2/32"]
    );
    assert!(
        s.full_map("peer_01", 10).unwrap().routes.is_empty(),
        "nothing to forward yet"
    );
    // The policy auto-approves 10.0.0.0/8 for tag b; peer_01 gets the tag.
    let text = "tags = [\"b\"]\n[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\n[auto_approve]\n\"10.0.0.0/8\" = [\"tag:b\"]\n";
    s.set_policy(Some(crate::policy::parse(text).unwrap()), 11);
    assert_eq!(s.route_state("route_a"), "pending", "not tagged yet");
    let mut gw = peer(1, 0);
    gw.tags = vec!["b".into()];
    s.put_peer(gw, 12);
    assert_eq!(s.route_state("route_a"), "auto-approved");
    let Some(Update::Delta(d)) = s.update_since("peer_00", 11, 12) else {
        panic!("a delta");
    };
    assert_eq!(d.upserted[0].allowed_ips, ["100.64.0.2/32", "10.20.0.0/16"]);
    assert_eq!(s.full_map("peer_01", 12).unwrap().routes, ["10.20.0.0/16"]);
    // The policy goes: out of force again; an admin approves it: in force for good.
    s.set_policy(None, 13);
    assert_eq!(s.route_state("route_a"), "pending");
    assert_eq!(
        allowed(&s.full_map("peer_00", 13).unwrap(), "peer_01"),
        ["100.64.0.2/32"]
    );
    r.pending = false;
    s.put_route(r, 14);
    assert_eq!(s.route_state("route_a"), "approved");
    assert!(s.is_primary("route_a"));
}

#[test]
fn a_rule_naming_a_site_reaches_its_gateways_and_no_further() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    for i in 0..3u8 {
        let mut p = peer(i, 0);
        if i == 0 {
            p.tags = vec!["a".into()];
        }
        s.put_peer(p, i64::from(i) + 1);
    }
    s.put_route(route("route_a", "peer_01", 10), 10);
    s.set_policy(Some(crate::policy::parse(POLICIES[3]).unwrap()), 11);
    // a → 10.1.0.0/16 and 10.2.3.0/24; peer_01 routes 10.20.0.0/16: nothing for it yet.
    assert!(s.full_map("peer_00", 11).unwrap().peers.is_empty());
    let mut r = route("route_b", "peer_01", 12);
    r.prefix = "10.2.0.0/16".into();
    s.put_route(r, 12);
    let Some(Update::Delta(d)) = s.update_since("peer_00", 11, 12) else {
        panic!("a delta");
    };
    assert_eq!(d.upserted.len(), 1, "peer_00 now sees the gateway");
    let Some(Update::Full(m)) = s.update_since("peer_01", 11, 12) else {
        panic!("the gateway's routes changed: a full map");
    };
    let inbound = &m.policy.unwrap().inbound;
    assert_eq!(
        inbound[0].dst,
        ["10.2.3.0/24"],
        "only the part of its site the rule names"
    );
    assert!(s.full_map("peer_02", 12).unwrap().peers.is_empty());
}

#[test]
fn a_policy_change_sends_each_agent_only_the_peers_it_gains_or_loses() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    let tags = ["a", "b", "c", "", "", "", "", ""];
    for i in 0..8u8 {
        let mut p = peer(i, 0);
        p.tags = (!tags[usize::from(i)].is_empty())
            .then(|| tags[usize::from(i)].to_string())
            .into_iter()
            .collect();
        s.put_peer(p, i64::from(i) + 1);
    }
    s.set_policy(Some(crate::policy::parse(POLICIES[0]).unwrap()), 10);
    // a → b on tcp/5432: peer_00 (a) sees only peer_01 (b).
    let m = s.full_map("peer_00", 10).unwrap();
    let ids: Vec<&str> = m.peers.iter().map(|p| p.peer_id.as_str()).collect();
    assert_eq!(ids, ["peer_01"]);
    assert_eq!(
        m.policy.unwrap().inbound.len(),
        0,
        "nobody may open anything on a"
    );
    let lone = s.full_map("peer_05", 10).unwrap();
    assert!(lone.peers.is_empty() && lone.policy.is_some());
    // Now everyone may reach c: peer_05 gains c only; peer_00 gains c, keeps b? no: loses b.
    s.set_policy(Some(crate::policy::parse(POLICIES[1]).unwrap()), 11);
    let Some(Update::Delta(d)) = s.update_since("peer_05", 10, 11) else {
        panic!("a delta");
    };
    let up: Vec<&str> = d.upserted.iter().map(|p| p.peer_id.as_str()).collect();
    assert_eq!((up, d.removed.len()), (vec!["peer_02"], 0));
    let Some(Update::Delta(d)) = s.update_since("peer_00", 10, 11) else {
        panic!("a delta");
    };
    let up: Vec<&str> = d.upserted.iter().map(|p| p.peer_id.as_str()).collect();
    assert_eq!(
        (up, d.removed),
        (vec!["peer_02"], vec!["peer_01".to_string()])
    );
    // An endpoint change of a peer peer_05 may not see reaches peer_05 as nothing.
    s.put_peer(peer(1, 2), 12);
    let Some(Update::Delta(d)) = s.update_since("peer_05", 11, 12) else {
        panic!("a delta");
    };
    assert!(d.upserted.is_empty() && !d.policy_changed);
    assert_eq!(
        d.removed,
        ["peer_01"],
        "(told again that it is not in its map: harmless)"
    );
}

#[test]
fn choosing_and_clearing_an_exit_node_changes_only_that_peers_map() {
    let mut s = NetState::new(NetworkRecord::default(), 0);
    for i in 0..3u8 {
        s.put_peer(peer(i, 0), i64::from(i) + 1);
    }
    let mut r = route("route_x", "peer_01", 10);
    r.prefix = "0.0.0.0/0".into();
    s.put_route(r, 10);
    assert_eq!(
        allowed(&s.full_map("peer_00", 10).unwrap(), "peer_01"),
        ["100.64.0.2/32"]
    );
    assert_eq!(
        s.full_map("peer_01", 10).unwrap().routes,
        ["0.0.0.0/0"],
        "it forwards"
    );
    let mut me = s.peer("peer_00").unwrap().clone();
    me.exit_node = "peer_01".into();
    s.put_peer(me.clone(), 11);
    let Some(Update::Full(m)) = s.update_since("peer_00", 10, 11) else {
        panic!("a full map: its exit node changed");
    };
    assert_eq!(allowed(&m, "peer_01"), ["100.64.0.2/32", "0.0.0.0/0"]);
    assert_eq!(
        allowed(&s.full_map("peer_02", 11).unwrap(), "peer_01"),
        ["100.64.0.2/32"],
        "the others route nothing there"
    );
    me.exit_node.clear();
    s.put_peer(me, 12);
    let Some(Update::Full(m)) = s.update_since("peer_00", 11, 12) else {
        panic!("a full map: its exit node changed");
    };
    assert_eq!(allowed(&m, "peer_01"), ["100.64.0.2/32"]);
}
