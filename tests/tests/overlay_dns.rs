//! Peer names over a real overlay, asked with `dig` as users do: each agent answers
//! NAME.NETWORK.canopy on its overlay addresses (UDP and TCP, v4 and v6), refuses other names,
//! follows joins, removals and a new zone within a second, and survives garbage.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use canopy_tests::controller::*;
use canopy_tests::netns::Lab;

/// `dig @server name type` from namespace `ns`: the status and the answers' data.
fn dig(
    lab: &Lab,
    ns: &str,
    server: &str,
    name: &str,
    rtype: &str,
    tcp: bool,
) -> (String, Vec<String>) {
    let at = format!("@{server}");
    let mut args = vec!["dig", &at, name, rtype, "+noall", "+comments", "+answer"];
    args.extend(["+time=1", "+tries=1"]);
    if tcp {
        args.push("+tcp");
    }
    let out = lab.run(ns, &args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("no answer: {text}"));
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    (status, answers)
}

/// How long until `dig` from `ns` says `want` (status) for `name`, asked every 50 ms for 5 s.
fn until_status(lab: &Lab, ns: &str, server: &str, name: &str, want: &str) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if dig(lab, ns, server, name, "A", false).0 == want {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} never became {want} at {server}");
}

/// The overlay addresses of agent `n` (v4, v6).
fn addresses(lab: &Lab, n: &Node) -> (String, String) {
    let s = status(lab, &n.host.ns, &n.state).unwrap();
    (addr(&s, 0), addr(&s, 1))
}

#[test]
fn agents_answer_peer_names_with_dig_and_follow_changes_within_a_second() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    con.ok(&[
        "network",
        "create",
        "prod",
        "--cidr",
        "100.64.40.0/24",
        "--cidr",
        "fd7a:40::/64",
    ]);
    let join = con.ok(&["token", "create", "--network", "prod", "--uses", "0"]);
    let join = join.trim();
    let a = spawn_agent_as(&lab, dir.path(), join, ("a", "web1"), lab.host(1), &[]);
    let b = spawn_agent_as(&lab, dir.path(), join, ("b", "db"), lab.host(2), &[]);
    let c = spawn_agent_as(&lab, dir.path(), join, ("c", "web1.eu"), lab.host(3), &[]);
    for n in [&a, &b, &c] {
        wait_until("the agents to see each other", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 2)
        });
    }
    let (a4, a6) = addresses(&lab, &a);
    let (b4, b6) = addresses(&lab, &b);
    let (c4, _) = addresses(&lab, &c);
    let ns = &a.host.ns;
    // The first "web1" has the plain name, the second web1-2; over UDP and TCP, v4 and v6.
    assert_eq!(
        dig(&lab, ns, &a4, "db.prod.canopy", "A", false),
        ("NOERROR".into(), vec![b4.clone()])
    );
    assert_eq!(
        dig(&lab, ns, &a4, "db.prod.canopy", "AAAA", true).1,
        [b6.as_str()]
    );
    assert_eq!(
        dig(&lab, ns, &a6, "web1-2.prod.canopy", "A", false).1,
        [c4.as_str()]
    );
    assert_eq!(
        dig(&lab, ns, &a4, "web1.prod.canopy", "AAAA", false).1,
        [a6.as_str()]
    );
    // b's own resolver, asked over the tunnel from a.
    assert_eq!(dig(&lab, ns, &b4, "web1-2.prod.canopy", "A", false).1, [c4]);
    assert_eq!(
        dig(&lab, ns, &a4, "nobody.prod.canopy", "A", false).0,
        "NXDOMAIN"
    );
    assert_eq!(
        dig(&lab, ns, &a4, "example.com", "A", false).0,
        "REFUSED",
        "nothing is forwarded"
    );

    let list = con.ok(&["peer", "list", "--network", "prod", "--json"]);
    let peers: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id_of = |host: &str| {
        let p = peers
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["hostname"] == host);
        p.unwrap()["id"].as_str().unwrap().to_string()
    };
    status_in_the_console(&lab, &con, (&a, &id_of("web1")), (&b4, &id_of("db")));

    changes_within_a_second(&lab, &con, dir.path(), join, (ns, &a4), &id_of("db"));
    garbage_is_survived(&lab, ns, &a4);
}

/// From `a` (its namespace and address): db removed is NXDOMAIN, a new peer resolves, and a
/// new zone is answered, each within a second.
fn changes_within_a_second(
    lab: &Lab,
    con: &Console,
    dir: &std::path::Path,
    join: &str,
    (ns, a4): (&str, &str),
    db_id: &str,
) {
    // Removed: NXDOMAIN at the other agents within a second.
    let t0 = Instant::now();
    con.ok(&["peer", "remove", db_id]);
    until_status(lab, ns, a4, "db.prod.canopy", "NXDOMAIN");
    let gone = t0.elapsed();
    eprintln!("removed peer NXDOMAIN after {gone:?}");
    assert!(
        gone < Duration::from_secs(1),
        "removed peer still resolved after {gone:?}"
    );

    // A new peer resolves within a second of its enrollment (its agent starting).
    let t0 = Instant::now();
    let _d = spawn_agent_as(lab, dir, join, ("d", "cache"), lab.host(4), &[]);
    until_status(lab, ns, a4, "cache.prod.canopy", "NOERROR");
    let new = t0.elapsed();
    eprintln!("new peer resolved {new:?} after its agent started");
    assert!(new < Duration::from_secs(1), "{new:?}");
    // The name is answered once the controller committed the enrollment, which can be before
    // the agent has written that it enrolled.
    wait_until("d to say it enrolled", || {
        std::fs::read_to_string(dir.join("d.log")).is_ok_and(|l| l.contains("enrolled"))
    });

    // Another zone: the new names within a second, the old ones refused.
    let t0 = Instant::now();
    con.ok(&["network", "set-dns", "prod", "--domain", "corp.example"]);
    until_status(lab, ns, a4, "cache.corp.example", "NOERROR");
    let moved = t0.elapsed();
    eprintln!("new zone answered after {moved:?}");
    assert!(moved < Duration::from_secs(1), "{moved:?}");
    assert_eq!(
        dig(lab, ns, a4, "cache.prod.canopy", "A", false).0,
        "REFUSED"
    );
}

/// 2,000 malformed datagrams and 50 half-open TCP connections, then a normal question.
fn garbage_is_survived(lab: &Lab, ns: &str, server: &str) {
    let script = format!(
        r#"
import os, random, socket
random.seed(7)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
good = bytes.fromhex("abcd01000001000000000000") + b"\x05cache\x04corp\x07example\x00\x00\x01\x00\x01"
for i in range(2000):
    p = bytearray(good if i % 2 else os.urandom(random.randint(0, 600)))
    for _ in range(random.randint(0, 6)):
        if p: p[random.randrange(len(p))] = random.randrange(256)
    u.sendto(bytes(p[:random.randint(0, len(p))]), ("{server}", 53))
held = []
for i in range(50):
    t = socket.create_connection(("{server}", 53), timeout=2)
    t.send(b"\xff\xff" + os.urandom(100))
    held.append(t)
print("sent")
"#
    );
    let out = lab.run(ns, &["python3", "-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, answers) = dig(lab, ns, server, "cache.corp.example", "A", false);
    assert_eq!(status, "NOERROR");
    assert_eq!(answers.len(), 1);
    assert_eq!(
        dig(lab, ns, server, "cache.corp.example", "A", true).0,
        "NOERROR",
        "TCP still served"
    );
}

/// `canopy peer show` tells how `a` reaches `b` (direct, with a handshake, as a's agent
/// reported), and `peer list` shows both online under their DNS names, not flagged.
fn status_in_the_console(
    lab: &Lab,
    con: &Console,
    (a, a_id): (&Node, &str),
    (b4, b_id): (&str, &str),
) {
    assert!(lab.ping(&a.host.ns, b4, Duration::from_secs(5)));
    wait_until("a's path to b in peer show", || {
        let v: serde_json::Value =
            serde_json::from_str(&con.ok(&["peer", "show", a_id, "--json"])).unwrap();
        v["dns_name"] == "web1.prod.canopy"
            && v["paths"].as_array().unwrap().iter().any(|p| {
                p["peer_id"] == b_id
                    && p["path"] == "direct"
                    && p["last_handshake_secs"].as_i64() >= Some(0)
            })
    });
    let text = con.ok(&["peer", "show", a_id]);
    assert!(text.contains("→ db: direct"), "{text}");
    let list = con.ok(&["peer", "list", "--network", "prod"]);
    assert!(list.contains("db.prod.canopy"), "{list}");
    assert!(!list.contains("NO HANDSHAKE"), "{list}");
}
