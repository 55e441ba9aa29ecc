//! Access policy end to end: `canopy serve` in the hub, three joined agents on real TUN devices
//! (web, db and a peer with no tag), the policy set with `canopy policy set` and enforced by the
//! agents' engines. TCP through the tunnel with python3 sockets. Needs root.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy_tests::controller::*;
use canopy_tests::netns::{Host, Lab, bin};

const POLICY: &str = r#"tags = ["web", "db"]

[[rule]]
name = "web reaches the database"
from = ["tag:web"]
to = ["tag:db"]
proto = "tcp"
ports = ["5432"]
"#;

/// An echo server on `ports` (TCP, every address): what it reads it writes back.
const ECHO: &str = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")], daemon=True).start()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"#;

/// Connects to HOST PORT and, every 100 ms for SECONDS, sends a line and waits up to 300 ms
/// for its echo; prints "ok T" or "fail T" (T: Unix time) for each. Exits 3 if it cannot
/// connect.
const PINGER: &str = r#"
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    s = socket.create_connection((host, port), timeout=2)
except OSError:
    print("connect failed", flush=True); sys.exit(3)
s.settimeout(0.3)
end = time.time() + secs
while time.time() < end:
    try:
        s.sendall(b"x\n"); ok = s.recv(16) == b"x\n"
    except OSError:
        ok = False
    print(("ok" if ok else "fail"), time.time(), flush=True)
    time.sleep(0.1)
"#;

struct Node {
    host: Host,
    state: PathBuf,
    iface: String,
}

fn start_agent(lab: &Lab, dir: &Path, join: &str, name: &str, n: u8) -> Node {
    let host = lab.host(n);
    let (state, iface) = (dir.join(name), format!("{}{name}", lab.id));
    let agent = bin("canopy-agent");
    let args = [
        agent.to_str().unwrap(),
        "join",
        join,
        "--state-dir",
        state.to_str().unwrap(),
        "--interface",
        &iface,
        "--hostname",
        name,
    ];
    lab.spawn(&host.ns, &args, &dir.join(format!("{name}.log")));
    Node { host, state, iface }
}

fn peers_seen(lab: &Lab, n: &Node) -> Option<Vec<String>> {
    let s = status(lab, &n.host.ns, &n.state)?;
    let peers = s["peers"].as_array()?;
    let mut names: Vec<String> = peers
        .iter()
        .filter_map(|p| Some(p["hostname"].as_str()?.to_string()))
        .collect();
    names.sort();
    Some(names)
}

/// Whether a TCP connection from `from` to `addr:port` opens within 2 s.
fn connects(lab: &Lab, from: &Node, addr: &str, port: u16) -> bool {
    let out = lab.run(
        &from.host.ns,
        &["python3", "-c", PINGER, addr, &port.to_string(), "0.3"],
    );
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok")
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn web_reaches_the_database_port_only_and_a_removed_rule_stops_the_flow_within_a_second() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    con.ok(&["network", "create", "pol", "--cidr", "100.64.9.0/24"]);
    let token = |tag: &[&str]| {
        let mut args = vec!["token", "create", "--network", "pol", "--uses", "1"];
        args.extend(tag);
        con.ok(&args).trim().to_string()
    };
    let web = start_agent(&lab, dir.path(), &token(&["--tag", "web"]), "web", 1);
    let db = start_agent(&lab, dir.path(), &token(&["--tag", "db"]), "db", 2);
    let lone = start_agent(&lab, dir.path(), &token(&[]), "lone", 3);
    for n in [&web, &db, &lone] {
        wait_until("every agent to see the other two", || {
            peers_seen(&lab, n).is_some_and(|p| p.len() == 2)
        });
    }
    let addr_of = |n: &Node| addr(&status(&lab, &n.host.ns, &n.state).unwrap(), 0);
    let (web_ip, db_ip) = (addr_of(&web), addr_of(&db));
    for n in [&web, &db] {
        lab.spawn(
            &n.host.ns,
            &["python3", "-c", ECHO, "5432", "22"],
            &dir.path().join(format!("echo-{}.log", n.iface)),
        );
    }
    wait_until("no policy: web opens db's ssh port", || {
        connects(&lab, &web, &db_ip, 22)
    });

    let file = dir.path().join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    con.ok(&["policy", "set", "pol", file.to_str().unwrap()]);
    // The peer no rule names leaves every map (and `wg show`), and sees nobody.
    wait_until("lone to see nobody", || {
        peers_seen(&lab, &lone).is_some_and(|p| p.is_empty())
    });
    wait_until("web to see db only", || {
        peers_seen(&lab, &web) == Some(vec!["db".into()])
    });
    let peers = lab.wg(&lone.host.ns, &lone.iface, "peers");
    assert!(
        peers.trim().is_empty(),
        "lone's interface still has peers: {peers}"
    );
    // web → db tcp/5432 opens and echoes (db's replies pass web's filter as replies); ssh and
    // ping are refused; db cannot open the same port on web.
    assert!(connects(&lab, &web, &db_ip, 5432), "web → db:5432");
    assert!(
        !connects(&lab, &web, &db_ip, 22),
        "web → db:22 must be refused"
    );
    assert!(
        !lab.ping(&web.host.ns, &db_ip, Duration::from_secs(1)),
        "web → db ping must be refused"
    );
    assert!(
        !connects(&lab, &db, &web_ip, 5432),
        "db → web:5432 must be refused"
    );
    let test = con.run(&[
        "policy", "test", "pol", "--from", "db", "--to", "web", "--port", "5432",
    ]);
    assert_eq!(test.status.code(), Some(1), "denied: exit 1");
    assert!(String::from_utf8_lossy(&test.stdout).starts_with("denied"));
    let test = con.ok(&[
        "policy", "test", "pol", "--from", "web", "--to", "db", "--port", "5432",
    ]);
    assert!(
        test.contains("allowed by web reaches the database (line 3)"),
        "{test}"
    );

    // An established flow stops within a second of the rule's removal.
    let log = dir.path().join("pinger.log");
    lab.spawn(
        &web.host.ns,
        &["python3", "-c", PINGER, &db_ip, "5432", "8"],
        &log,
    );
    wait_until("the flow to echo", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ok")
    });
    // Still peers of each other (a udp rule), but tcp/5432 no longer allowed: the engine's
    // filter, not the map, stops the flow.
    let narrower = dir.path().join("narrower.toml");
    let udp_only = POLICY
        .replace("proto = \"tcp\"", "proto = \"udp\"")
        .replace("5432", "9999");
    std::fs::write(&narrower, udp_only).unwrap();
    con.ok(&["policy", "set", "pol", narrower.to_str().unwrap()]);
    let changed = now();
    std::thread::sleep(Duration::from_secs(3));
    let lines = std::fs::read_to_string(&log).unwrap();
    let late_ok: Vec<&str> = lines
        .lines()
        .filter(|l| l.starts_with("ok"))
        .filter(|l| l[3..].parse::<f64>().unwrap() > changed + 1.0)
        .collect();
    assert!(
        late_ok.is_empty(),
        "echoes more than 1 s after the change: {late_ok:?}\n{lines}"
    );
    assert!(lines.contains("fail"), "{lines}");
    assert_eq!(
        peers_seen(&lab, &web),
        Some(vec!["db".into()]),
        "still peers"
    );
}
