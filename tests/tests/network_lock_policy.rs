//! A locked network's policy: set only with the tenant's signature, compiled by each agent
//! from the signed document and its peers' signed tags. An operator who writes into the store
//! (embedded and etcd) an open policy, a tag, or an older signed policy widens nothing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use canopy_controller::console::Client;
use canopy_controller::keys;
use canopy_controller::server::Running;
use canopy_controller::store::Store;
use canopy_proto::lock::{self, Kind, SigningKey};
use canopy_proto::v1::*;
use canopy_tests::TestAgent;
use canopy_tests::etcd::Etcd;
use canopy_tests::lock::*;
use prost::Message as _;

const POLICY: &str = r#"
tags = ["web", "db", "admin"]

[[rule]]
from = ["tag:web"]
to = ["tag:db"]
proto = "tcp"
ports = ["5432"]

[[rule]]
from = ["tag:admin"]
to = ["tag:db"]
"#;

const OPEN: &str = r#"
[[rule]]
from = ["*"]
to = ["*"]
"#;

fn policy_sig(net: &str, text: &str, serial: u64, k: &SigningKey) -> Signed {
    let s = LockedPolicy {
        network_id: net.into(),
        text_sha256: canopy_proto::sha256(text.as_bytes()).to_vec(),
        serial,
    };
    lock::sign(Kind::Policy, &s, k)
}

fn set_policy(net: &str, text: &str, lock: Option<Signed>) -> SetPolicyRequest {
    SetPolicyRequest {
        network: net.into(),
        text: text.into(),
        lock,
        ..Default::default()
    }
}

/// An agent's inbound rules: (from tags, port ranges) of each.
fn rules(a: &TestAgent) -> Vec<(Vec<String>, usize)> {
    let part = a.map().policy.unwrap_or_default();
    part.inbound
        .iter()
        .map(|r| (r.from_tags.clone(), r.ports.len()))
        .collect()
}

/// What db's part is under POLICY.
fn web_and_admin() -> Vec<(Vec<String>, usize)> {
    vec![(vec!["web".to_string()], 1), (vec!["admin".to_string()], 0)]
}

struct Net {
    store: Arc<dyn Store>,
    c: Client,
    id: String,
    k: SigningKey,
    web: TestAgent,
    db: TestAgent,
}

/// A locked network with a web and a db peer; its policy can be set only signed, and db
/// compiles its own part from the signed one.
async fn locked_with_a_signed_policy(r: &Running) -> Net {
    let mut c = console(r).await;
    let req = CreateNetworkRequest {
        name: "pol".into(),
        cidrs: vec!["100.64.1.0/24".into()],
    };
    let id = c.create_network(req).await.unwrap().into_inner().id;
    let k = lock::signing_key([2; 32]);
    let web = tagged_token(&mut c, &id, "web").await;
    let web = TestAgent::join(&web, "web").await.unwrap();
    let db = tagged_token(&mut c, &id, "db").await;
    let mut db = TestAgent::join(&db, "db").await.unwrap();
    sign_peers(&mut c, &id, &[&web.peer_id, &db.peer_id], &k).await;
    set_keys(&mut c, &id, &key_set(&id, &[&k], 1, vec![]), &k).await;
    // Unsigned, or signed for another text: refused.
    let e = c.set_policy(set_policy(&id, POLICY, None)).await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let other = Some(policy_sig(&id, OPEN, 1, &k));
    let e = c.set_policy(set_policy(&id, POLICY, other)).await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);
    let signed = Some(policy_sig(&id, POLICY, 1, &k));
    c.set_policy(set_policy(&id, POLICY, signed)).await.unwrap();
    let two = |m: &NetworkMap| m.policy.as_ref().is_some_and(|p| p.inbound.len() == 2);
    assert!(db.wait_map(5 * SECOND, two).await);
    assert_eq!(rules(&db), web_and_admin());
    Net {
        store: r.controller.store.clone(),
        c,
        id,
        k,
        web,
        db,
    }
}

/// The operator opens the policy (signed with its own key, then with the tenant's signature of
/// the old text) and gives web the admin tag: db's part and web's tags stay as signed.
async fn operator_opens_the_policy(n: &mut Net) -> PolicyRecord {
    let evil = lock::signing_key([66; 32]);
    let mut rec: PolicyRecord = record(&n.store, &keys::policy(&n.id)).await;
    let tenants = rec.lock.clone();
    rec.text = OPEN.into();
    rec.lock = Some(policy_sig(&n.id, OPEN, 9, &evil));
    let mut web: PeerRecord = record(&n.store, &keys::peer(&n.id, &n.web.peer_id)).await;
    web.tags.push("admin".into());
    let writes = vec![
        (keys::policy(&n.id), rec.encode_to_vec()),
        (keys::peer(&n.id, &n.web.peer_id), web.encode_to_vec()),
    ];
    tamper(&n.store, writes).await;
    wait_refused(&n.db, 1).await;
    assert_eq!(
        rules(&n.db),
        web_and_admin(),
        "the open policy is not applied"
    );
    let peers = n.db.map().peers;
    let seen = peers.iter().find(|p| p.peer_id == n.web.peer_id).unwrap();
    assert_eq!(
        seen.tags,
        vec!["web".to_string()],
        "the unsigned tag is not"
    );
    rec.lock = tenants;
    let rev = tamper(&n.store, vec![(keys::policy(&n.id), rec.encode_to_vec())]).await;
    assert!(n.db.wait_map(5 * SECOND, |m| m.revision >= rev).await);
    let why = "a signature of another text does not open it";
    assert_eq!(rules(&n.db), web_and_admin(), "{why}");
    rec
}

/// The tenant moves to serial 2 (applied within a second); the operator replays serial 1.
async fn an_older_signed_policy_does_not_come_back(n: &mut Net, rec: PolicyRecord) {
    let admin = "\n[[rule]]\nfrom = [\"tag:admin\"]\nto = [\"tag:db\"]\n";
    let narrow = POLICY.replace(admin, "");
    let signed = Some(policy_sig(&n.id, &narrow, 2, &n.k));
    n.c.set_policy(set_policy(&n.id, &narrow, signed))
        .await
        .unwrap();
    let one = |m: &NetworkMap| m.policy.as_ref().is_some_and(|p| p.inbound.len() == 1);
    assert!(
        n.db.wait_map(SECOND, one).await,
        "a signed change applies within 1 s"
    );
    let replay = PolicyRecord {
        text: POLICY.into(),
        lock: Some(policy_sig(&n.id, POLICY, 1, &n.k)),
        ..rec
    };
    let before = n.db.client.lock_stats().refused_now.load(Relaxed);
    tamper(
        &n.store,
        vec![(keys::policy(&n.id), replay.encode_to_vec())],
    )
    .await;
    wait_refused(&n.db, before + 1).await;
    assert_eq!(rules(&n.db), vec![(vec!["web".to_string()], 1)]);
}

async fn a_compromised_store_cannot_widen_a_locked_policy(r: &Running) {
    let mut n = locked_with_a_signed_policy(r).await;
    let rec = operator_opens_the_policy(&mut n).await;
    an_older_signed_policy_does_not_come_back(&mut n, rec).await;
    n.web.stop().await;
    n.db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_store_a_locked_policy_cannot_be_widened() {
    let dir = tempfile::tempdir().unwrap();
    let r = controller_on(dir.path(), None).await;
    a_compromised_store_cannot_widen_a_locked_policy(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_a_locked_policy_cannot_be_widened() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let r = controller_on(dir.path(), Some(&etcd)).await;
    a_compromised_store_cannot_widen_a_locked_policy(&r).await;
}
