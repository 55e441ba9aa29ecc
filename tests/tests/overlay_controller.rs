//! Controller end to end: `canopy serve` in the hub namespace, three `canopy-agent join`s in
//! three host namespaces on real TUN devices. Needs root.
#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

use std::path::Path;
use std::time::{Duration, Instant};

use canopy_tests::controller::*;
use canopy_tests::netns::{Lab, bin};
use serde_json::Value;

/// Three agents joined to one dual-stack network, each in a host namespace of its own.
struct Three<'a> {
    lab: &'a Lab,
    dir: &'a Path,
    join: String,
    hosts: Vec<canopy_tests::netns::Host>,
    states: Vec<std::path::PathBuf>,
    ifaces: Vec<String>,
}

impl Three<'_> {
    /// Starts agent `i` (again); its log is `agent{i}-*.log` in the test directory.
    fn start(&self, i: usize) -> u32 {
        let agent = bin("canopy-agent");
        let log = self.dir.join(format!(
            "agent{i}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let args = [
            agent.to_str().unwrap(),
            "join",
            &self.join,
            "--state-dir",
            self.states[i].to_str().unwrap(),
            "--interface",
            &self.ifaces[i],
            "--hostname",
            &format!("n{i}"),
        ];
        self.lab.spawn(&self.hosts[i].ns, &args, &log)
    }

    fn status(&self, i: usize) -> Option<Value> {
        status(self.lab, &self.hosts[i].ns, &self.states[i])
    }

    /// Waits until agent `i` has `n` peers, each with endpoints; returns its status.
    fn wait_for_peers(&self, i: usize, n: usize) -> Value {
        wait_until("each agent to see the others", || {
            self.status(i).is_some_and(|s| {
                s["peers"].as_array().is_some_and(|p| {
                    p.len() == n
                        && p.iter()
                            .all(|x| !x["endpoints"].as_array().unwrap().is_empty())
                })
            })
        });
        self.status(i).unwrap()
    }

    /// When agent `i` last completed a handshake with agent `j` (`wg show latest-handshakes`).
    fn handshake(&self, st: &[Value], i: usize, j: usize) -> String {
        let hs = self
            .lab
            .wg(&self.hosts[i].ns, &self.ifaces[i], "latest-handshakes");
        let key = st[j]["public_key"].as_str().unwrap();
        hs.lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap_or_default()
    }

    fn ping_all_pairs(&self, st: &[Value]) {
        for i in 0..3 {
            for j in (0..3).filter(|j| *j != i) {
                let ns = &self.hosts[i].ns;
                assert!(self.lab.ping(ns, &addr(&st[j], 0), WAIT), "IPv4 {i} → {j}");
                assert!(self.lab.ping(ns, &addr(&st[j], 1), WAIT), "IPv6 {i} → {j}");
            }
        }
    }

    /// The removed agent `i` exited with the removal message and cleared its state.
    fn saw_its_removal(&self, i: usize) {
        wait_until("the removed agent to exit and clear its state", || {
            self.status(i).is_none()
        });
        let log = std::fs::read_dir(self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("agent{i}-"))
            })
            .unwrap();
        let log = std::fs::read_to_string(log.path()).unwrap();
        assert!(
            log.contains("canopy-agent: this node was removed from its network"),
            "{log}"
        );
    }
}

#[test]
fn joined_agents_ping_all_pairs_and_a_removed_peer_is_cut_off_without_disturbing_the_rest() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let cidrs = ["--cidr", "100.64.7.0/24", "--cidr", "fd7a:115c:7::/64"];
    con.ok(&[&["network", "create", "e2e"][..], &cidrs].concat());
    let join = con.ok(&["token", "create", "--network", "e2e", "--uses", "3"]);
    let three = Three {
        lab: &lab,
        dir: dir.path(),
        join: join.trim().to_string(),
        hosts: (1..=3).map(|i| lab.host(i)).collect(),
        states: (1..=3).map(|i| dir.path().join(format!("s{i}"))).collect(),
        ifaces: (1..=3).map(|i| format!("{}w{i}", lab.id)).collect(),
    };
    let mut pids: Vec<u32> = (0..3).map(|i| three.start(i)).collect();
    let st: Vec<Value> = (0..3).map(|i| three.wait_for_peers(i, 2)).collect();
    three.ping_all_pairs(&st);

    // Remove peer 3: it is cut off at once; 1 and 2 keep their session (same handshake time).
    let before = three.handshake(&st, 0, 1);
    assert_ne!(before, "0");
    con.ok(&["peer", "remove", st[2]["peer_id"].as_str().unwrap()]);
    let gone_key = st[2]["public_key"].as_str().unwrap().to_string();
    wait_until("the removed peer to leave 1's interface", || {
        !lab.wg(&three.hosts[0].ns, &three.ifaces[0], "peers")
            .contains(&gone_key)
    });
    let ns0 = &three.hosts[0].ns;
    let cut = !lab.ping(ns0, &addr(&st[2], 0), Duration::from_secs(2));
    assert!(cut, "a removed peer must be unreachable");
    assert!(
        lab.ping(ns0, &addr(&st[1], 0), WAIT),
        "the others still reach each other"
    );
    assert_eq!(three.handshake(&st, 0, 1), before, "other sessions kept");
    three.saw_its_removal(2);

    // The private key stayed on the host, 0600; the controller holds only the public key.
    use std::os::unix::fs::PermissionsExt as _;
    let key_file = three.states[0].join("private.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let private = std::fs::read_to_string(&key_file).unwrap();
    let listed = con.ok(&["peer", "list", "--network", "e2e", "--json"]);
    assert!(!listed.contains(private.trim()));
    assert!(listed.contains(st[0]["public_key"].as_str().unwrap()));

    // Restart agent 1: same key, same address, traffic flows again.
    lab.stop(pids[0]);
    pids[0] = three.start(0);
    wait_until("agent 1 back", || {
        lab.ping(ns0, &addr(&st[1], 0), Duration::from_secs(1))
    });
    let again = three.status(0).unwrap();
    assert_eq!(
        (&again["public_key"], &again["addresses"]),
        (&st[0]["public_key"], &st[0]["addresses"])
    );
    let peers: Value =
        serde_json::from_str(&con.ok(&["peer", "list", "--network", "e2e", "--json"])).unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 2);
    let _ = pids;
}

/// Waits until the agent with state `state` sees one peer, with endpoints; its status.
fn wait_for_one_peer(lab: &Lab, ns: &str, state: &Path) -> Value {
    wait_until("each agent to see its one peer with endpoints", || {
        status(lab, ns, state).is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 1 && !p[0]["endpoints"].as_array().unwrap().is_empty())
        })
    });
    status(lab, ns, state).unwrap()
}

/// Whether the first peer in status `s` has an endpoint at `port`.
fn has_endpoint_port(s: &Value, port: u16) -> bool {
    s["peers"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap().ends_with(&format!(":{port}")))
}

fn listen_port(lab: &Lab, ns: &str, iface: &str) -> u16 {
    lab.wg(ns, iface, "listen-port").trim().parse().unwrap()
}

/// Starts instance `name` of the systemd template in `ns`, with join string `join` in its
/// `/etc` file under `root`; logs into `logs`.
fn start_from_template(
    lab: &Lab,
    ns: &str,
    root: &Path,
    name: &str,
    join: &str,
    logs: &Path,
) -> u32 {
    std::fs::write(root.join("etc").join(format!("{name}.join")), join).unwrap();
    let script = template_command(root, name);
    let log = logs.join(format!(
        "{name}-{}.log",
        Instant::now().elapsed().as_nanos()
    ));
    lab.spawn(ns, &["/bin/sh", "-c", &script], &log)
}

/// The `ExecStart` of deploy/systemd/canopy-agent@.service for instance `iface`, as systemd
/// would run it, with its fixed paths moved under `root` and the built binary in place of
/// /usr/local/bin/canopy-agent: the shell script after `/bin/sh -c`.
fn template_command(root: &Path, iface: &str) -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/canopy-agent@.service"),
    )
    .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/bin/sh -c '"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("the template's ExecStart is /bin/sh -c '...'");
    exec.replace(
        "/usr/local/bin/canopy-agent",
        bin("canopy-agent").to_str().unwrap(),
    )
    .replace("/etc/canopy", root.join("etc").to_str().unwrap())
    .replace("/var/lib/canopy", root.join("var").to_str().unwrap())
    .replace("%i", iface)
}

/// Two managed agents of two networks on each of two hosts, all started by the stock
/// `canopy-agent@` template with no port given: each interface gets a free port of its own
/// (no clash on 51820), both overlays carry traffic, a `wg set IFACE listen-port` reaches the
/// other side through the controller, and a restart keeps the port.
#[test]
fn managed_agents_of_two_networks_share_a_host_from_the_systemd_template_with_no_port() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let joins = [("blue", "100.64.8.0/24"), ("green", "100.64.9.0/24")]
        .map(|(n, cidr)| network_with_token(&con, n, cidr, 2));
    let hosts = [lab.host(1), lab.host(2)];
    // Instance (host, network) → interface name.
    let iface = |h: usize, n: usize| format!("{}{}{}", lab.id, ["b", "g"][n], h);
    let start = |h: usize, n: usize| {
        start_from_template(
            &lab,
            &hosts[h].ns,
            &root,
            &iface(h, n),
            &joins[n],
            dir.path(),
        )
    };
    let state = |h: usize, n: usize| root.join("var").join(iface(h, n));
    let instances = [(0, 0), (0, 1), (1, 0), (1, 1)];
    let pids: std::collections::HashMap<_, _> = instances
        .iter()
        .map(|&(h, n)| ((h, n), start(h, n)))
        .collect();
    let st: std::collections::HashMap<_, _> = instances
        .iter()
        .map(|&(h, n)| ((h, n), wait_for_one_peer(&lab, &hosts[h].ns, &state(h, n))))
        .collect();
    let port = |h: usize, n: usize| listen_port(&lab, &hosts[h].ns, &iface(h, n));
    for h in 0..2 {
        let (a, b) = (port(h, 0), port(h, 1));
        assert!(a != b && a != 0 && b != 0, "host {h}: ports {a} and {b}");
    }
    for n in 0..2 {
        for (from, to) in [(0, 1), (1, 0)] {
            let dst = addr(&st[&(to, n)], 0);
            assert!(
                lab.ping(&hosts[from].ns, &dst, WAIT),
                "network {n}: {from} → {to}"
            );
        }
    }

    // A new port on host 0's blue interface: host 1 hears of it from the controller (its
    // saved map, which only the controller writes, carries the new endpoint).
    let out = lab.run(
        &hosts[0].ns,
        &["wg", "set", &iface(0, 0), "listen-port", "40001"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "host 1 to get host 0's new port from the controller",
        || status(&lab, &hosts[1].ns, &state(1, 0)).is_some_and(|s| has_endpoint_port(&s, 40001)),
    );
    let to0 = addr(&st[&(0, 0)], 0);
    assert!(
        lab.ping(&hosts[1].ns, &to0, WAIT),
        "host 1 → host 0 at its new port"
    );

    // A restart listens on the same port again.
    lab.stop(pids[&(0, 0)]);
    start(0, 0);
    wait_until("the restarted agent", || {
        lab.run(&hosts[0].ns, &["wg", "show", &iface(0, 0), "listen-port"])
            .status
            .success()
    });
    assert_eq!(port(0, 0), 40001);
    assert!(lab.ping(&hosts[0].ns, &addr(&st[&(1, 0)], 0), WAIT));
}

/// A host with more global addresses than a peer may report (bridges, many IPv6 addresses)
/// still connects: the agent reports the first eight instead of being refused over and over.
#[test]
fn an_agent_on_a_host_with_many_addresses_reports_the_first_eight_and_connects() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    con.ok(&["network", "create", "many", "--cidr", "100.64.11.0/24"]);
    let join = con
        .ok(&["token", "create", "--network", "many"])
        .trim()
        .to_string();
    let h = lab.host(1);
    for i in 1..=12 {
        let out = lab.run(
            &h.ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("198.18.0.{i}/32"),
                "dev",
                "lo",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agent = bin("canopy-agent");
    let state = dir.path().join("s");
    lab.spawn(
        &h.ns,
        &[
            agent.to_str().unwrap(),
            "join",
            &join,
            "--state-dir",
            state.to_str().unwrap(),
            "--interface",
            &format!("{}m", lab.id),
        ],
        &dir.path().join("agent.log"),
    );
    wait_until("the agent to be online with its endpoints", || {
        let out = con.run(&["peer", "list", "--network", "many", "--json"]);
        let peers: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        peers[0]["online"] == true
            && peers[0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 8)
    });
}
