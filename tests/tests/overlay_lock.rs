//! The network lock as a tenant drives it, over a real overlay: `canopy network lock init`
//! signs the network on the admin's machine, a newcomer waits for `sign-pending`, and an
//! operator who writes into the embedded store (a peer and a route of its own) changes nothing
//! `wg show` shows on any node; `canopy peer remove` revokes. Needs root.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use canopy_controller::keys;
use canopy_controller::store::embedded::EmbeddedStore;
use canopy_controller::store::{Op, Store as _, Txn};
use canopy_proto::lock::{self, Kind};
use canopy_proto::v1::{LockedPeer, LockedRoute, PeerRecord, RouteRecord};
use canopy_tests::controller::*;
use canopy_tests::netns::Lab;
use prost::Message as _;
use serde_json::Value;

fn wg_peers(lab: &Lab, n: &Node) -> Vec<String> {
    let mut v: Vec<String> = lab
        .wg(&n.host.ns, &n.iface, "peers")
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn lock_of(lab: &Lab, n: &Node) -> Value {
    status(lab, &n.host.ns, &n.state).map_or(Value::Null, |s| s["lock"].clone())
}

/// Writes a peer and a route of the operator's own into the stopped controller's store, each
/// signed with the operator's key (so the controller passes them on to agents).
fn tamper(data: &Path, net: &str, gateway: &PeerRecord) {
    let evil = lock::signing_key([66; 32]);
    let store = EmbeddedStore::open(&data.join("store.redb")).unwrap();
    let peer = PeerRecord {
        id: "peer_evil".into(),
        tenant_id: gateway.tenant_id.clone(),
        network_id: net.into(),
        public_key: vec![99; 32],
        addresses: vec!["100.64.50.99/32".into()],
        hostname: "evil".into(),
        endpoints: vec!["192.0.2.99:51820".into()],
        lock: Some(lock::sign(
            Kind::Peer,
            &LockedPeer {
                network_id: net.into(),
                public_key: vec![99; 32],
                addresses: vec!["100.64.50.99/32".into()],
                peer_id: "peer_evil".into(),
                ..Default::default()
            },
            &evil,
        )),
        ..Default::default()
    };
    let route = RouteRecord {
        id: "route_evil".into(),
        network_id: net.into(),
        peer_id: gateway.id.clone(),
        prefix: "10.99.0.0/16".into(),
        lock: Some(lock::sign(
            Kind::Route,
            &LockedRoute {
                network_id: net.into(),
                gateway_public_key: gateway.public_key.clone(),
                prefix: "10.99.0.0/16".into(),
            },
            &evil,
        )),
        ..Default::default()
    };
    let txn = Txn::new()
        .then(Op::put(keys::peer(net, &peer.id), peer.encode_to_vec()))
        .then(Op::put(keys::route(net, &route.id), route.encode_to_vec()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert!(rt.block_on(store.txn(txn)).unwrap().succeeded);
}

/// The peer record of `id` in the stopped controller's store.
fn peer_record(data: &Path, net: &str, id: &str) -> PeerRecord {
    let store = EmbeddedStore::open(&data.join("store.redb")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let key = keys::peer(net, id);
    let kv = rt.block_on(store.get(key.as_bytes())).unwrap().unwrap();
    PeerRecord::decode(kv.value.as_slice()).unwrap()
}

/// The admin locks the network from the CLI (the key made here, 0600); a newcomer with a join
/// string made then is on no node until `sign-pending`. Returns c's status.
fn lock_and_sign_a_newcomer(lab: &Lab, dir: &Path, con: &Console, a: &Node) -> Value {
    let key = dir.join("lock.key");
    let key = key.to_str().unwrap();
    let out = con.ok(&["network", "lock", "init", "prod", "--key", key]);
    assert!(out.contains("locked network"), "{out}");
    assert!(out.contains("signed 2 peers"), "{out}");
    let mode = std::fs::metadata(key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    wait_until("a to trust the key set", || lock_of(lab, a)["serial"] == 1);
    // The console keeps the key set it made (lock.pin) and checks join strings against it.
    let pin_file = dir.join("lock.pin");
    let kept = std::fs::read_to_string(&pin_file).unwrap();
    std::fs::write(&pin_file, format!("{}\n", "00".repeat(32))).unwrap();
    let token = [
        "token",
        "create",
        "--network",
        "prod",
        "--uses",
        "1",
        "--key",
        key,
    ];
    let o = con.run(&token);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("does not pin"), "{err}");
    std::fs::write(&pin_file, kept).unwrap();
    let pinned = con.ok(&token);
    let c = start_agent(lab, dir, pinned.trim(), "c", 3);
    wait_until("c to enroll", || {
        status(lab, &c.host.ns, &c.state).is_some()
    });
    let list = con.ok(&["peer", "list", "--network", "prod"]);
    assert!(list.contains("PENDING SIGNATURE"), "{list}");
    let st = con.ok(&["network", "lock", "status", "prod"]);
    assert!(st.contains("1 peers"), "{st}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(wg_peers(lab, a).len(), 1, "a pending peer is on no node");
    let signed = con.ok(&["network", "lock", "sign-pending", "prod", "--key", key]);
    assert!(signed.contains("1 peers and 0 routes signed"), "{signed}");
    wait_until("a to take c", || wg_peers(lab, a).len() == 2);
    let c_status = status(lab, &c.host.ns, &c.state).unwrap();
    assert!(lab.ping(&a.host.ns, &addr(&c_status, 0), Duration::from_secs(5)));
    c_status
}

#[test]
fn a_locked_network_applies_only_what_the_tenant_signed_with_wg_show_as_witness() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let join = network_with_token(&con, "prod", "100.64.50.0/24", 0);
    let a = start_agent(&lab, dir.path(), &join, "a", 1);
    let b = start_agent(&lab, dir.path(), &join, "b", 2);
    wait_until("a and b to see each other", || {
        wg_peers(&lab, &a).len() == 1
    });
    let b_status = status(&lab, &b.host.ns, &b.state).unwrap();
    let b_addr = addr(&b_status, 0);
    let c_status = lock_and_sign_a_newcomer(&lab, dir.path(), &con, &a);
    let before = wg_peers(&lab, &a);
    let allowed_before = lab.wg(&a.host.ns, &a.iface, "allowed-ips");

    // The operator stops the controller, writes into its store, starts it again.
    lab.stop(con.pid);
    let net = c_status["network_id"].as_str().unwrap();
    let b_id = b_status["peer_id"].as_str().unwrap();
    tamper(&data, net, &peer_record(&data, net, b_id));
    let con = controller(&lab, dir.path(), &data);
    wait_until("a to refuse the peer and the route", || {
        lock_of(&lab, &a)["refused"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    });
    assert_eq!(wg_peers(&lab, &a), before, "wg show: no new peer");
    let allowed = lab.wg(&a.host.ns, &a.iface, "allowed-ips");
    assert_eq!(allowed, allowed_before, "wg show: no route through b");
    assert!(lab.ping(&a.host.ns, &b_addr, Duration::from_secs(5)));
    wait_until("the controller to show the refusals", || {
        let st = con.ok(&["network", "lock", "status", "prod", "--json"]);
        serde_json::from_str::<Value>(&st).unwrap()["refused"].as_u64() >= Some(2)
    });

    // Removing c with the key revokes it.
    let key = dir.path().join("lock.key");
    let c_id = c_status["peer_id"].as_str().unwrap();
    let out = con.ok(&["peer", "remove", c_id, "--key", key.to_str().unwrap()]);
    assert!(out.contains("revoked"), "{out}");
    wait_until("a to drop c", || wg_peers(&lab, &a).len() == 1);
    let st = con.ok(&["network", "lock", "status", "prod", "--json"]);
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["serial"], 2);
    assert_eq!(st["revoked"], 1);
    rotate_keys(&lab, dir.path(), &con, &a);
    a_presigned_join_string_needs_no_signing(&lab, dir.path(), &con, &a);
}

/// A second key is made offline and trusted; the first is removed, signed with the second, which
/// signs again what the first signed: no agent drops anyone.
fn rotate_keys(lab: &Lab, dir: &Path, con: &Console, a: &Node) {
    let (first, second) = (dir.join("lock.key"), dir.join("second.key"));
    let (first, second) = (first.to_str().unwrap(), second.to_str().unwrap());
    let made = con.ok(&["network", "lock", "new-key", second, "--json"]);
    let new: Value = serde_json::from_str(&made).unwrap();
    let new = new["public_key"].as_str().unwrap();
    let st = con.ok(&["network", "lock", "status", "prod", "--json"]);
    let old: Value = serde_json::from_str(&st).unwrap();
    let old = old["keys"][0].as_str().unwrap().to_string();
    con.ok(&["network", "lock", "add-key", "prod", new, "--key", first]);
    let o = con.run(&[
        "network",
        "lock",
        "remove-key",
        "prod",
        &old,
        "--key",
        first,
    ]);
    assert!(!o.status.success(), "a key does not sign its own removal");
    con.ok(&[
        "network",
        "lock",
        "remove-key",
        "prod",
        &old,
        "--key",
        second,
    ]);
    wait_until("a to follow the key sets", || {
        lock_of(lab, a)["serial"] == 4
    });
    let st = con.ok(&["network", "lock", "status", "prod", "--json"]);
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["keys"], serde_json::json!([new]));
    assert_eq!(st["pending_peers"], 0);
    assert_eq!(
        wg_peers(lab, a).len(),
        1,
        "b, signed again with the second key"
    );
}

/// Unattended: a presigned join string (a delegation signed with the lock key) enrolls a node
/// that every agent takes at once, with the token's tags.
fn a_presigned_join_string_needs_no_signing(lab: &Lab, dir: &Path, con: &Console, a: &Node) {
    let key = dir.join("second.key");
    let args = ["token", "create", "--network", "prod", "--tag", "ci"];
    let more = [
        "--presigned",
        "--key",
        key.to_str().unwrap(),
        "--signed-for",
        "7d",
    ];
    let join = con.ok(&[&args[..], &more[..]].concat());
    let d = start_agent(lab, dir, join.trim(), "d", 4);
    wait_until("a to take d, signed by its join string", || {
        wg_peers(lab, a).len() == 2
    });
    let d_status = status(lab, &d.host.ns, &d.state).unwrap();
    assert!(lab.ping(&a.host.ns, &addr(&d_status, 0), Duration::from_secs(5)));
    let list = con.ok(&["peer", "list", "--network", "prod"]);
    assert!(!list.contains("PENDING"), "{list}");
    let refused = lock_of(lab, a)["refused"].as_array().unwrap().len();
    assert_eq!(refused, 2, "only the operator's peer and route");
}
