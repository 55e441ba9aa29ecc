//! Access policy end to end: `canopy serve` in the hub, three joined agents on real TUN devices
//! (web, db and a peer with no tag), the policy set with `canopy policy set` and enforced by the
//! agents' engines. TCP through the tunnel with python3 sockets. Needs root.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy_tests::controller::*;
use canopy_tests::netns::Lab;

use canopy_tests::WEB_DB_POLICY as POLICY;

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

/// A controller in the hub with network "pol", and one agent per `(hostname, tags)` on hosts
/// 1, 2, …, each seeing all the others and running an echo server on 5432 and 22.
fn network<'a>(
    lab: &'a Lab,
    dir: &'a Path,
    data: &'a Path,
    members: &[(&str, &[&str])],
) -> (Console<'a>, Vec<Node>) {
    let con = controller(lab, dir, data);
    con.ok(&["network", "create", "pol", "--cidr", "100.64.9.0/24"]);
    let mut nodes = Vec::new();
    for (i, (name, tags)) in members.iter().enumerate() {
        let mut args = vec!["token", "create", "--network", "pol", "--uses", "1"];
        for t in *tags {
            args.extend(["--tag", t]);
        }
        let join = con.ok(&args).trim().to_string();
        nodes.push(start_agent(
            lab,
            dir,
            &join,
            name,
            u8::try_from(i + 1).unwrap(),
        ));
    }
    for n in &nodes {
        wait_until("every agent to see the others", || {
            peers_seen(lab, n).is_some_and(|p| p.len() == members.len() - 1)
        });
        let log = dir.join(format!("echo-{}.log", n.iface));
        lab.spawn(&n.host.ns, &["python3", "-c", ECHO, "5432", "22"], &log);
    }
    (con, nodes)
}

fn addr_of(lab: &Lab, n: &Node) -> String {
    addr(&status(lab, &n.host.ns, &n.state).unwrap(), 0)
}

/// Sets the network's policy from `text`.
fn set_policy(con: &Console, dir: &Path, text: &str) {
    let file = dir.join("policy.toml");
    std::fs::write(&file, text).unwrap();
    con.ok(&["policy", "set", "pol", file.to_str().unwrap()]);
}

/// An established flow web → db:5432 stops within a second of the rule's removal.
fn flow_stops_within_a_second_of_its_rules_removal(
    lab: &Lab,
    con: &Console,
    dir: &Path,
    web: &Node,
    db_ip: &str,
) {
    // An established flow stops within a second of the rule's removal.
    let log = dir.join("pinger.log");
    lab.spawn(
        &web.host.ns,
        &["python3", "-c", PINGER, db_ip, "5432", "8"],
        &log,
    );
    wait_until("the flow to echo", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ok")
    });
    // Still peers of each other (a udp rule), but tcp/5432 no longer allowed: the engine's
    // filter, not the map, stops the flow.
    let udp_only = POLICY
        .replace("proto = \"tcp\"", "proto = \"udp\"")
        .replace("5432", "9999");
    set_policy(con, dir, &udp_only);
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
}

#[test]
fn web_reaches_the_database_port_only_and_a_removed_rule_stops_the_flow_within_a_second() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let members: [(&str, &[&str]); 3] = [("web", &["web"]), ("db", &["db"]), ("lone", &[])];
    let (con, nodes) = network(&lab, dir.path(), &data, &members);
    let [web, db, lone] = <[Node; 3]>::try_from(nodes).ok().unwrap();
    let (web_ip, db_ip) = (addr_of(&lab, &web), addr_of(&lab, &db));
    wait_until("no policy: web opens db's ssh port", || {
        connects(&lab, &web, &db_ip, 22)
    });

    set_policy(&con, dir.path(), POLICY);
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

    flow_stops_within_a_second_of_its_rules_removal(&lab, &con, dir.path(), &web, &db_ip);
    assert_eq!(
        peers_seen(&lab, &web),
        Some(vec!["db".into()]),
        "still peers"
    );
}

/// iperf3 web → db while the policy changes five times (other ports come and go): the flow
/// never stalls, and a port the policy never opens stays closed throughout.
#[test]
fn policy_changes_under_load_neither_stall_the_flow_nor_open_what_is_closed() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let members: [(&str, &[&str]); 2] = [("web", &["web"]), ("db", &["db"])];
    let (con, nodes) = network(&lab, dir.path(), &data, &members);
    let [web, db] = <[Node; 2]>::try_from(nodes).ok().unwrap();
    let db_ip = addr_of(&lab, &db);
    let with = |extra: u16| {
        POLICY.replace(
            "ports = [\"5432\"]",
            &format!("ports = [\"5432\", \"5201\", \"{extra}\"]"),
        )
    };
    set_policy(&con, dir.path(), &with(7000));
    let server = dir.path().join("iperf-server.log");
    lab.spawn(&db.host.ns, &["iperf3", "-s", "-1", "-p", "5201"], &server);
    std::thread::sleep(Duration::from_millis(300));
    let log = dir.path().join("iperf.json");
    lab.spawn(
        &web.host.ns,
        &[
            "iperf3", "-c", &db_ip, "-p", "5201", "-t", "15", "-i", "0.5", "-J",
        ],
        &log,
    );
    std::thread::sleep(Duration::from_secs(1));
    for k in 1..=5 {
        set_policy(&con, dir.path(), &with(7000 + k));
        assert!(!connects(&lab, &web, &db_ip, 22), "change {k}: ssh opened");
    }
    wait_until("iperf3 to finish", || {
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(&log).unwrap_or_default(),
        )
        .is_ok_and(|v| v.get("end").is_some())
    });
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    let rates: Vec<f64> = v["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap())
        .collect();
    assert!(rates.len() >= 20, "{rates:?}");
    assert!(
        rates.iter().all(|r| *r > 1e6),
        "a half second with (almost) nothing: {rates:?}"
    );
}
