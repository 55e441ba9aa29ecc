//! Controller end to end: `canopy serve` in the hub namespace, three `canopy-agent join`s in
//! three host namespaces on real TUN devices. Needs root.
#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

use std::path::Path;
use std::time::{Duration, Instant};

use canopy_tests::netns::{Lab, bin};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Console<'a> {
    lab: &'a Lab,
    data: &'a Path,
}

impl Console<'_> {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let token = std::fs::read_to_string(self.data.join("admin-token")).unwrap_or_default();
        let ca = self.data.join("ca.pem");
        let canopy = bin("canopy");
        let mut cmd = vec![
            canopy.to_str().unwrap(),
            "--server",
            "https://192.0.2.254:7443",
            "--token",
            token.trim(),
            "--ca",
            ca.to_str().unwrap(),
        ];
        cmd.extend_from_slice(args);
        self.lab.run(&self.lab.hub, &cmd)
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "canopy {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

fn status(lab: &Lab, ns: &str, state: &Path) -> Option<Value> {
    let agent = bin("canopy-agent");
    let o = lab.run(
        ns,
        &[
            agent.to_str().unwrap(),
            "status",
            "--json",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn addr(s: &Value, i: usize) -> String {
    s["addresses"][i]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn joined_agents_ping_all_pairs_and_a_removed_peer_is_cut_off_without_disturbing_the_rest() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller(&lab, dir.path(), &data);
    con.ok(&[
        "network",
        "create",
        "e2e",
        "--cidr",
        "100.64.7.0/24",
        "--cidr",
        "fd7a:115c:7::/64",
    ]);
    let join = con
        .ok(&["token", "create", "--network", "e2e", "--uses", "3"])
        .trim()
        .to_string();

    let agent = bin("canopy-agent");
    let hosts: Vec<_> = (1..=3).map(|i| lab.host(i)).collect();
    let states: Vec<_> = (1..=3).map(|i| dir.path().join(format!("s{i}"))).collect();
    let ifaces: Vec<String> = (1..=3).map(|i| format!("{}w{i}", lab.id)).collect();
    let start = |i: usize| {
        lab.spawn(
            &hosts[i].ns,
            &[
                agent.to_str().unwrap(),
                "join",
                &join,
                "--state-dir",
                states[i].to_str().unwrap(),
                "--interface",
                &ifaces[i],
                "--hostname",
                &format!("n{i}"),
            ],
            &dir.path().join(format!(
                "agent{i}-{}.log",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            )),
        )
    };
    let mut pids: Vec<u32> = (0..3).map(start).collect();
    let mut st: Vec<Value> = Vec::new();
    for i in 0..3 {
        wait_until("each agent to see the other two", || {
            status(&lab, &hosts[i].ns, &states[i]).is_some_and(|s| {
                s["peers"].as_array().is_some_and(|p| {
                    p.len() == 2
                        && p.iter()
                            .all(|x| !x["endpoints"].as_array().unwrap().is_empty())
                })
            })
        });
        st.push(status(&lab, &hosts[i].ns, &states[i]).unwrap());
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                assert!(
                    lab.ping(&hosts[i].ns, &addr(&st[j], 0), WAIT),
                    "IPv4 {i} → {j}"
                );
                assert!(
                    lab.ping(&hosts[i].ns, &addr(&st[j], 1), WAIT),
                    "IPv6 {i} → {j}"
                );
            }
        }
    }

    // Remove peer 3: it is cut off at once; 1 and 2 keep their session (same handshake time).
    let handshake = |i: usize, j: usize| -> String {
        let hs = lab.wg(&hosts[i].ns, &ifaces[i], "latest-handshakes");
        let key = st[j]["public_key"].as_str().unwrap();
        hs.lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap_or_default()
    };
    let before = handshake(0, 1);
    assert_ne!(before, "0");
    con.ok(&["peer", "remove", st[2]["peer_id"].as_str().unwrap()]);
    let gone_key = st[2]["public_key"].as_str().unwrap().to_string();
    wait_until("the removed peer to leave 1's interface", || {
        !lab.wg(&hosts[0].ns, &ifaces[0], "peers")
            .contains(&gone_key)
    });
    assert!(
        !lab.ping(&hosts[0].ns, &addr(&st[2], 0), Duration::from_secs(2)),
        "a removed peer must be unreachable"
    );
    assert!(
        lab.ping(&hosts[0].ns, &addr(&st[1], 0), WAIT),
        "the others still reach each other"
    );
    assert_eq!(
        handshake(0, 1),
        before,
        "removing a peer did not reset other sessions"
    );
    wait_until("the removed agent to exit and clear its state", || {
        status(&lab, &hosts[2].ns, &states[2]).is_none()
    });
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("agent2-"))
        .unwrap();
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        log.contains("canopy-agent: this node was removed from its network"),
        "{log}"
    );

    // The private key stayed on the host, 0600; the controller holds only the public key.
    use std::os::unix::fs::PermissionsExt as _;
    let key_file = states[0].join("private.key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let private = std::fs::read_to_string(&key_file).unwrap();
    let listed = con.ok(&["peer", "list", "--network", "e2e", "--json"]);
    assert!(!listed.contains(private.trim()));
    assert!(listed.contains(st[0]["public_key"].as_str().unwrap()));

    // Restart agent 1: same key, same address, traffic flows again.
    lab.stop(pids[0]);
    pids[0] = start(0);
    wait_until("agent 1 back", || {
        lab.ping(&hosts[0].ns, &addr(&st[1], 0), Duration::from_secs(1))
    });
    let again = status(&lab, &hosts[0].ns, &states[0]).unwrap();
    assert_eq!(
        (&again["public_key"], &again["addresses"]),
        (&st[0]["public_key"], &st[0]["addresses"])
    );
    let peers = con.ok(&["peer", "list", "--network", "e2e", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&peers)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let _ = pids;
}

/// Starts `canopy serve` in the lab's hub and returns a console for it.
fn controller<'a>(lab: &'a Lab, dir: &Path, data: &'a Path) -> Console<'a> {
    let canopy = bin("canopy");
    lab.spawn(
        &lab.hub,
        &[
            canopy.to_str().unwrap(),
            "serve",
            "--listen",
            "192.0.2.254:7443",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &dir.join("serve.log"),
    );
    let con = Console { lab, data };
    wait_until("the controller", || {
        data.join("admin-token").exists() && con.run(&["network", "list"]).status.success()
    });
    con
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
    let mut joins = Vec::new();
    for (n, cidr) in [("blue", "100.64.8.0/24"), ("green", "100.64.9.0/24")] {
        con.ok(&["network", "create", n, "--cidr", cidr]);
        joins.push(
            con.ok(&["token", "create", "--network", n, "--uses", "2"])
                .trim()
                .to_string(),
        );
    }
    let hosts = [lab.host(1), lab.host(2)];
    // Instance (host, network) → interface name.
    let iface = |h: usize, n: usize| format!("{}{}{}", lab.id, ["b", "g"][n], h);
    let start = |h: usize, n: usize| -> u32 {
        let name = iface(h, n);
        std::fs::write(root.join("etc").join(format!("{name}.join")), &joins[n]).unwrap();
        let script = template_command(&root, &name);
        lab.spawn(
            &hosts[h].ns,
            &["/bin/sh", "-c", &script],
            &dir.path().join(format!(
                "{name}-{}.log",
                Instant::now().elapsed().as_nanos()
            )),
        )
    };
    let state = |h: usize, n: usize| root.join("var").join(iface(h, n));
    let mut pids = std::collections::HashMap::new();
    for h in 0..2 {
        for n in 0..2 {
            pids.insert((h, n), start(h, n));
        }
    }
    let mut st = std::collections::HashMap::new();
    for h in 0..2 {
        for n in 0..2 {
            wait_until("each agent to see its one peer with endpoints", || {
                status(&lab, &hosts[h].ns, &state(h, n)).is_some_and(|s| {
                    s["peers"].as_array().is_some_and(|p| {
                        p.len() == 1 && !p[0]["endpoints"].as_array().unwrap().is_empty()
                    })
                })
            });
            st.insert((h, n), status(&lab, &hosts[h].ns, &state(h, n)).unwrap());
        }
    }
    let port = |h: usize, n: usize| -> u16 {
        lab.wg(&hosts[h].ns, &iface(h, n), "listen-port")
            .trim()
            .parse()
            .unwrap()
    };
    for h in 0..2 {
        let (a, b) = (port(h, 0), port(h, 1));
        assert!(a != b && a != 0 && b != 0, "host {h}: ports {a} and {b}");
    }
    for n in 0..2 {
        assert!(
            lab.ping(&hosts[0].ns, &addr(&st[&(1, n)], 0), WAIT),
            "network {n}: host 0 → host 1\n{:?}\n{}\n{}\n{}",
            st,
            lab.wg(&hosts[0].ns, &iface(0, n), "dump"),
            lab.wg(&hosts[1].ns, &iface(1, n), "dump"),
            String::from_utf8_lossy(&lab.run(&hosts[0].ns, &["ip", "route"]).stdout)
        );
        assert!(
            lab.ping(&hosts[1].ns, &addr(&st[&(0, n)], 0), WAIT),
            "network {n}: host 1 → host 0"
        );
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
        || {
            status(&lab, &hosts[1].ns, &state(1, 0)).is_some_and(|s| {
                s["peers"][0]["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e.as_str().unwrap().ends_with(":40001"))
            })
        },
    );
    assert!(
        lab.ping(&hosts[1].ns, &addr(&st[&(0, 0)], 0), WAIT),
        "host 1 → host 0 at its new port\n{}\n{}\n{:?}",
        lab.wg(&hosts[0].ns, &iface(0, 0), "dump"),
        lab.wg(&hosts[1].ns, &iface(1, 0), "dump"),
        status(&lab, &hosts[1].ns, &state(1, 0))
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
