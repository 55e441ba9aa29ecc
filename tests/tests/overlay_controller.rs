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
        &dir.path().join("serve.log"),
    );
    let con = Console {
        lab: &lab,
        data: &data,
    };
    wait_until("the controller", || {
        data.join("admin-token").exists() && con.run(&["network", "list"]).status.success()
    });
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
