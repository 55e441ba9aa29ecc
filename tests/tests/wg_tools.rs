//! canopy-agent as a drop-in userspace WireGuard: every scenario here is driven only by
//! `wg(8)`, `wg-quick(8)`, `ip` and the UAPI socket, and runs in the same test against
//! `wireguard-go` (the reference) and canopy-agent (with TUN offloads on and off). A scenario
//! that fails on wireguard-go says the machine or the scenario is wrong, not canopy.
//!
//! The scenarios follow the kernel's own selftest, tools/testing/selftests/wireguard/netns.sh,
//! where a userspace implementation can run it (two hosts on a bridge instead of sockets in a
//! third namespace's loopback):
//!
//! | netns.sh step                                   | here                                  |
//! |-------------------------------------------------|---------------------------------------|
//! | configure with `wg set`, keys, PSK, ports 1 / 2 | every scenario's [`Pair::new`]        |
//! | counters and handshake time after a flood ping  | `transport_counters_and_big_mtu`      |
//! | ping, TCP both ways, IPv4 outer transport       | `transport_counters_and_big_mtu`      |
//! | same over IPv6 outer transport                  | `transport_counters_and_big_mtu`      |
//! | big MTU on both interfaces, `tests` again       | `transport_counters_and_big_mtu`      |
//! | roaming: a new listen port, over IPv4 and IPv6  | `roaming_to_a_new_port_and_address`   |
//! | roaming: a new source address (canopy only)     | `roaming_to_a_new_source_address`     |
//! | crypto-RP filter (more specific peer wins)      | `allowed_ips_are_a_reverse_path_filter` |
//! | private key change, immediate handshake         | `a_private_key_change_handshakes_at_once` |
//! | peers and allowed IPs in big numbers            | `a_thousand_peers_by_setconf_and_syncconf` |
//! | (wg-quick, not in netns.sh) full tunnel, fwmark | `wg_quick_full_tunnel_with_save_config_and_hooks` |
//! | (UAPI document) every `set` key, answers        | `raw_uapi_requests_get_the_reference_answers` |
//!
//! Not run, kernel-only: sk_bound_dev_if, routing a device's own packets through a second
//! wg device in another namespace (netns moves of the interface), route-MTU padding (a TUN
//! device sees no route MTU), and the module's own netlink and memory-leak checks.
//! Needs root.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use canopy_agent::keys::{self, PrivateKey};
use canopy_tests::netns::{Host, Lab, bin};

const WAIT: Duration = Duration::from_secs(10);

/// The implementation under test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Impl {
    /// The reference.
    WireguardGo,
    /// canopy-agent with TUN offloads (GSO/GRO) on, its default.
    Canopy,
    /// canopy-agent with TUN offloads off.
    CanopyPlain,
}

const ALL: [Impl; 3] = [Impl::WireguardGo, Impl::Canopy, Impl::CanopyPlain];
const TWO: [Impl; 2] = [Impl::WireguardGo, Impl::Canopy];

impl Impl {
    /// The command line before `IFACE`: what `WG_QUICK_USERSPACE_IMPLEMENTATION` would run.
    fn command(self) -> Vec<String> {
        let agent = bin("canopy-agent").to_string_lossy().into_owned();
        match self {
            Impl::WireguardGo => vec!["wireguard-go".into()],
            Impl::Canopy => vec!["env".into(), "CANOPY_TUN_OFFLOAD=1".into(), agent],
            Impl::CanopyPlain => vec!["env".into(), "CANOPY_TUN_OFFLOAD=0".into(), agent],
        }
    }

    /// Environment for wg-quick to start this implementation.
    fn wg_quick_env(self) -> Vec<String> {
        let agent = bin("canopy-agent").to_string_lossy().into_owned();
        match self {
            Impl::WireguardGo => vec!["WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go".into()],
            Impl::Canopy => vec![
                format!("WG_QUICK_USERSPACE_IMPLEMENTATION={agent}"),
                "CANOPY_TUN_OFFLOAD=1".into(),
            ],
            Impl::CanopyPlain => vec![
                format!("WG_QUICK_USERSPACE_IMPLEMENTATION={agent}"),
                "CANOPY_TUN_OFFLOAD=0".into(),
            ],
        }
    }
}

type Step = Result<(), String>;

fn check(ok: bool, what: impl std::fmt::Display) -> Step {
    if ok { Ok(()) } else { Err(what.to_string()) }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `scenario` against each implementation, each in a lab of its own, and fails naming
/// every implementation and step that failed. The reference must pass too.
fn side_by_side(impls: &[Impl], scenario: fn(&Lab, Impl, &Path) -> Step) {
    let mut failed = Vec::new();
    for &imp in impls {
        let lab = Lab::new();
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let result = scenario(&lab, imp, dir.path());
        eprintln!(
            "{imp:?}: {} in {:.1} s",
            if result.is_ok() { "pass" } else { "FAIL" },
            t.elapsed().as_secs_f64()
        );
        if let Err(e) = result {
            let logs: String = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| {
                    let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = body.lines().rev().take(30).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {}\n{}\n", e.path().display(), tail.join("\n"))
                })
                .collect();
            failed.push(format!("{imp:?}: {e}\n{logs}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Two hosts, each with one interface of the implementation under test, configured with `wg`
/// the way netns.sh does: private keys, a preshared key, ports 1 and 2, each the other's peer.
struct Pair<'a> {
    lab: &'a Lab,
    dir: &'a Path,
    imp: Impl,
    hosts: [Host; 2],
    ifaces: [String; 2],
    keys: [PrivateKey; 2],
    psk: PathBuf,
}

/// Inner addresses of host `i` (0 or 1).
fn inner4(i: usize) -> String {
    format!("192.168.241.{}", i + 1)
}
fn inner6(i: usize) -> String {
    format!("fd00:241::{}", i + 1)
}
/// Underlay IPv6 address of host `i`.
fn outer6(i: usize) -> String {
    format!("fd00:192::{}", i + 1)
}

impl<'a> Pair<'a> {
    fn new(lab: &'a Lab, imp: Impl, dir: &'a Path) -> Result<Self, String> {
        let hosts = [lab.host(1), lab.host(2)];
        let ifaces = [format!("{}w1", lab.id), format!("{}w2", lab.id)];
        let psk = dir.join("psk");
        std::fs::write(&psk, PrivateKey::generate().to_base64()).unwrap();
        let pair = Pair {
            lab,
            dir,
            imp,
            hosts,
            ifaces,
            keys: [PrivateKey::generate(), PrivateKey::generate()],
            psk,
        };
        for i in 0..2 {
            let h = &pair.hosts[i];
            pair.ip(
                i,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", outer6(i)),
                    "dev",
                    &h.dev,
                    "nodad",
                ],
            )?;
            pair.start(i)?;
            let key = pair.key_file(&pair.keys[i], &format!("k{i}"));
            let j = 1 - i;
            pair.wg(
                i,
                &[
                    "set",
                    &pair.ifaces[i],
                    "private-key",
                    &key,
                    "listen-port",
                    &(i + 1).to_string(),
                    "peer",
                    &pair.public(j),
                    "preshared-key",
                    pair.psk.to_str().unwrap(),
                    "allowed-ips",
                    &format!("{}/32,{}/128", inner4(j), inner6(j)),
                    "endpoint",
                    &format!("192.0.2.{}:{}", j + 1, j + 1),
                ],
            )?;
            pair.ip(
                i,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", inner4(i)),
                    "dev",
                    &pair.ifaces[i],
                ],
            )?;
            pair.ip(
                i,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", inner6(i)),
                    "dev",
                    &pair.ifaces[i],
                    "nodad",
                ],
            )?;
            pair.ip(i, &["link", "set", &pair.ifaces[i], "up"])?;
        }
        Ok(pair)
    }

    /// Starts the implementation in the foreground on host `i` (killed with the lab), and
    /// waits for its UAPI socket.
    fn start(&self, i: usize) -> Step {
        let mut cmd = self.imp.command();
        cmd.extend(["-f".to_string(), self.ifaces[i].clone()]);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("{:?}-{i}.log", self.imp));
        self.lab.spawn(&self.hosts[i].ns, &cmd, &log);
        let sock = uapi_path(&self.ifaces[i]);
        let t = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            check(t.elapsed() < WAIT, format!("{:?} did not start", self.imp))?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn public(&self, i: usize) -> String {
        keys::encode(&self.keys[i].public_key())
    }

    fn key_file(&self, key: &PrivateKey, name: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, key.to_base64()).unwrap();
        path.to_string_lossy().into_owned()
    }

    fn run(&self, i: usize, cmd: &[&str]) -> Result<String, String> {
        let out = self.lab.run(&self.hosts[i].ns, cmd);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("host {i}: {cmd:?} failed: {}", text(&out)))
        }
    }

    fn wg(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec!["wg"];
        cmd.extend(args);
        self.run(i, &cmd)
    }

    fn ip(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec!["ip"];
        cmd.extend(args);
        self.run(i, &cmd)
    }

    /// `wg show IFACE what` on host `i`.
    fn show(&self, i: usize, what: &str) -> String {
        self.lab.wg(&self.hosts[i].ns, &self.ifaces[i], what)
    }

    /// One ping of `size` bytes from host `i` to `dst` answers within [`WAIT`].
    fn ping(&self, i: usize, dst: &str, size: usize) -> Step {
        let t = Instant::now();
        let size = size.to_string();
        loop {
            let out = self.lab.run(
                &self.hosts[i].ns,
                &["ping", "-c", "1", "-W", "1", "-s", &size, dst],
            );
            if out.status.success() {
                return Ok(());
            }
            if t.elapsed() > WAIT {
                return Err(format!(
                    "host {i}: ping -s {size} {dst} failed: {}",
                    text(&out)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// netns.sh's `tests`: pings both ways over both inner families, then TCP both ways.
    fn traffic(&self, size: usize, megabytes: usize) -> Step {
        for (i, j) in [(0, 1), (1, 0)] {
            self.ping(i, &inner4(j), size)?;
            self.ping(i, &inner6(j), size)?;
        }
        for (i, j, dst) in [(0, 1, inner4(1)), (1, 0, inner6(0))] {
            let t = self
                .lab
                .tcp_transfer(&self.hosts[i].ns, &self.hosts[j].ns, &dst, megabytes);
            check(
                t.received == t.sent && t.received_bytes == megabytes << 20,
                format!("TCP {i} → {j} ({dst}) arrived damaged: {}", t.log),
            )?;
        }
        Ok(())
    }

    /// `wg show IFACE transfer` of host `i` for its one peer: (rx, tx).
    fn transfer(&self, i: usize) -> (u64, u64) {
        let s = self.show(i, "transfer");
        let f: Vec<u64> = s
            .split_whitespace()
            .skip(1)
            .take(2)
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        (
            f.first().copied().unwrap_or(0),
            f.get(1).copied().unwrap_or(0),
        )
    }

    /// Sets the endpoint host `i` uses for the other.
    fn endpoint(&self, i: usize, endpoint: &str) -> Step {
        self.wg(
            i,
            &[
                "set",
                &self.ifaces[i],
                "peer",
                &self.public(1 - i),
                "endpoint",
                endpoint,
            ],
        )?;
        Ok(())
    }
}

fn uapi_path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{iface}.sock"))
}

/// netns.sh's first block: after a flood ping the counters agree between the two ends and a
/// handshake time is reported; then pings and TCP both ways over IPv4 and IPv6 outer
/// transport, each at the default MTU and at MTU 8000 on a 1500-byte underlay (the outer
/// datagram is fragmented on the way, as the kernel's is), with offloads on and off.
#[test]
fn transport_counters_and_big_mtu() {
    side_by_side(&ALL, |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        p.run(1, &["ping", "-c", "10", "-f", "-W", "1", &inner4(0)])?;
        // Every byte one side sent (handshake, data, keepalives) is a byte the other received.
        let t = Instant::now();
        loop {
            let ((rx0, tx0), (rx1, tx1)) = (p.transfer(0), p.transfer(1));
            if rx0 == tx1 && rx1 == tx0 && rx0 > 0 && rx1 > 0 {
                break;
            }
            check(
                t.elapsed() < Duration::from_secs(3),
                format!(
                    "transfer counters disagree: host 0 rx {rx0} tx {tx0}, host 1 rx {rx1} tx {tx1}"
                ),
            )?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let hs = p.show(0, "latest-handshakes");
        let when: u64 = hs
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        check(when > 0, format!("no handshake time: {hs}"))?;

        p.traffic(56, 8)?;
        for i in 0..2 {
            p.ip(i, &["link", "set", &p.ifaces[i], "mtu", "8000"])?;
        }
        p.traffic(7000, 8)
            .map_err(|e| format!("MTU 8000, IPv4 outer: {e}"))?;

        // IPv6 outer transport, default and big MTU.
        for i in 0..2 {
            p.ip(i, &["link", "set", &p.ifaces[i], "mtu", "1420"])?;
            let j = 1 - i;
            p.endpoint(i, &format!("[{}]:{}", outer6(j), j + 1))?;
        }
        p.traffic(56, 8).map_err(|e| format!("IPv6 outer: {e}"))?;
        let eps = p.show(0, "endpoints");
        check(
            eps.contains(&format!("[{}]:2", outer6(1))),
            format!("endpoint: {eps}"),
        )?;
        for i in 0..2 {
            p.ip(i, &["link", "set", &p.ifaces[i], "mtu", "8000"])?;
        }
        p.traffic(7000, 8)
            .map_err(|e| format!("MTU 8000, IPv6 outer: {e}"))
    });
}

/// netns.sh's roaming steps: a new listen port with `wg set` (and, here, a new underlay
/// address) on one side; the other learns the new source from the first authenticated packet.
#[test]
fn roaming_to_a_new_port_and_address() {
    side_by_side(&ALL, |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        p.ping(0, &inner4(1), 56)?;
        p.wg(0, &["set", &p.ifaces[0], "listen-port", "9999"])?;
        check(
            p.show(0, "listen-port").trim() == "9999",
            "listen-port shows 9999",
        )?;
        p.ping(0, &inner4(1), 56)?;
        let eps = p.show(1, "endpoints");
        check(
            eps.trim() == format!("{}\t192.0.2.1:9999", p.public(0)),
            format!("the peer learned the new port: {eps}"),
        )?;
        // The same over IPv6.
        p.wg(0, &["set", &p.ifaces[0], "listen-port", "9998"])?;
        p.endpoint(0, &format!("[{}]:2", outer6(1)))?;
        p.ping(0, &inner6(1), 56)?;
        let eps = p.show(1, "endpoints");
        check(
            eps.trim() == format!("{}\t[{}]:9998", p.public(0), outer6(0)),
            format!("the peer learned the new IPv6 source: {eps}"),
        )?;
        p.ping(1, &inner4(0), 56)
    });
}

/// netns.sh's roaming step proper: the sender's source address changes under it (its old
/// address is deleted), it keeps sending from the new one, and the peer follows. The kernel
/// passes this; wireguard-go 0.0.20220316 (Debian's) does not: it keeps the deleted address
/// as a sticky source and its sends fail, so it runs here against canopy only.
#[test]
fn roaming_to_a_new_source_address() {
    side_by_side(&[Impl::Canopy, Impl::CanopyPlain], |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        p.ping(0, &inner4(1), 56)?;
        p.wg(0, &["set", &p.ifaces[0], "listen-port", "9999"])?;
        // A new underlay address.
        let dev = &p.hosts[0].dev;
        p.run(
            0,
            &[
                "sysctl",
                "-q",
                &format!("net.ipv4.conf.{dev}.promote_secondaries=1"),
            ],
        )?;
        p.ip(0, &["addr", "add", "192.0.2.101/24", "dev", dev])?;
        p.ip(0, &["addr", "del", "192.0.2.1/24", "dev", dev])?;
        p.ping(0, &inner4(1), 56)
            .map_err(|e| format!("after the address change: {e}"))?;
        let eps = p.show(1, "endpoints");
        check(
            eps.trim() == format!("{}\t192.0.2.101:9999", p.public(0)),
            format!("the peer learned the new address: {eps}"),
        )?;
        p.ping(1, &inner6(0), 56)
    });
}

/// Whether one UDP datagram from host `from` reaches a listener on host `to` (bound to `::`,
/// port 1111), sent to `dst`.
fn udp_arrives(p: &Pair, from: usize, to: usize, dst: &str) -> bool {
    let mut rx = Command::new("ip")
        .args(["netns", "exec", &p.hosts[to].ns, "python3", "-c"])
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
             s.bind(('::',1111)); print('ready',flush=True); s.settimeout(2)\n\
             try: print(s.recv(10).decode())\n\
             except socket.timeout: print('none')",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(rx.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let _ = p.lab.run(
        &p.hosts[from].ns,
        &[
            "python3",
            "-c",
            &format!(
                "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.sendto(b'X',('{dst}',1111))"
            ),
        ],
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = rx.wait();
    rest.trim() == "X"
}

/// netns.sh's crypto-RP filter: a packet is delivered only when the peer it authenticated as
/// is the one that owns its source address; a second peer with a more specific allowed IP
/// takes the address away, and the authenticated packet still updates the endpoint.
#[test]
fn allowed_ips_are_a_reverse_path_filter() {
    side_by_side(&TWO, |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        p.wg(
            0,
            &[
                "set",
                &p.ifaces[0],
                "peer",
                &p.public(1),
                "allowed-ips",
                "192.168.241.0/24",
            ],
        )?;
        p.ping(1, &inner4(0), 56)?;
        check(
            udp_arrives(&p, 1, 0, &inner4(0)),
            "a datagram from the owner of the source",
        )?;
        let other = keys::encode(&PrivateKey::generate().public_key());
        p.wg(
            0,
            &[
                "set",
                &p.ifaces[0],
                "peer",
                &other,
                "allowed-ips",
                "192.168.241.2/32",
            ],
        )?;
        p.wg(1, &["set", &p.ifaces[1], "listen-port", "9997"])?;
        check(
            !udp_arrives(&p, 1, 0, &inner4(0)),
            "a datagram whose source another peer owns is dropped",
        )?;
        p.wg(0, &["set", &p.ifaces[0], "peer", &other, "remove"])?;
        let eps = p.show(0, "endpoints");
        check(
            eps.trim() == format!("{}\t192.0.2.2:9997", p.public(1)),
            format!("the endpoint follows the authenticated packet: {eps}"),
        )
    });
}

/// netns.sh: a new private key on one side, the other side swaps the old public key for the
/// new one, and the next ping handshakes at once.
#[test]
fn a_private_key_change_handshakes_at_once() {
    side_by_side(&TWO, |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        p.ping(0, &inner4(1), 56)?;
        let new = PrivateKey::generate();
        let file = p.key_file(&new, "k-new");
        p.wg(0, &["set", &p.ifaces[0], "private-key", &file])?;
        let shown = p.wg(0, &["show", &p.ifaces[0], "public-key"])?;
        let new_pub = keys::encode(&new.public_key());
        check(
            shown.trim() == new_pub,
            format!("public key shown: {shown}"),
        )?;
        p.wg(
            1,
            &[
                "set",
                &p.ifaces[1],
                "peer",
                &new_pub,
                "preshared-key",
                p.psk.to_str().unwrap(),
                "allowed-ips",
                &format!("{}/32,{}/128", inner4(0), inner6(0)),
                "peer",
                &p.public(0),
                "remove",
            ],
        )?;
        // No endpoint for the new key on host 1: host 0 must initiate, and does at once.
        let t = Instant::now();
        p.ping(0, &inner4(1), 56)?;
        check(
            t.elapsed() < Duration::from_secs(3),
            format!("the handshake took {:?}", t.elapsed()),
        )?;
        p.ping(1, &inner6(0), 56)
    });
}

/// `wg showconf` → `wg setconf` gives back the same configuration; `wg syncconf` applies only
/// the difference (the unchanged peer keeps its session), `wg addconf` adds; then a thousand
/// peers with two allowed IPs each, set and removed as a file.
#[test]
fn a_thousand_peers_by_setconf_and_syncconf() {
    side_by_side(&TWO, |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        let iface = &p.ifaces[0];
        p.ping(0, &inner4(1), 56)?;
        let conf = p.wg(0, &["showconf", iface])?;
        let dump = |p: &Pair| -> String {
            // Without the handshake time and counters, which move.
            p.show(0, "dump")
                .lines()
                .map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    // The peer lines' handshake time and counters move; the rest must not.
                    if f.len() == 8 {
                        [&f[..4], &f[7..]].concat().join("\t")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let before = dump(&p);
        let file = dir.join("showconf.conf");
        std::fs::write(&file, &conf).unwrap();
        p.wg(0, &["setconf", iface, file.to_str().unwrap()])?;
        check(
            dump(&p) == before,
            format!("setconf of showconf: {}\n≠\n{before}", dump(&p)),
        )?;
        p.ping(0, &inner4(1), 56)?;

        // A thousand more peers, two allowed IPs each.
        let mut big = conf.clone();
        let mut extra = Vec::new();
        for n in 0..1000u32 {
            let k = keys::encode(&PrivateKey::generate().public_key());
            big += &format!(
                "\n[Peer]\nPublicKey = {k}\nAllowedIPs = 10.{}.{}.0/24, fd10:{n:x}::/64\n",
                n / 256,
                n % 256
            );
            extra.push(k);
        }
        let big_file = dir.join("big.conf");
        std::fs::write(&big_file, &big).unwrap();
        let handshake = || {
            p.show(0, "latest-handshakes")
                .lines()
                .find(|l| l.starts_with(&p.public(1)))
                .unwrap_or("")
                .to_string()
        };
        let hs = handshake();
        p.wg(0, &["syncconf", iface, big_file.to_str().unwrap()])?;
        let peers = p.show(0, "peers");
        check(
            peers.lines().count() == 1001,
            format!("{} peers after syncconf", peers.lines().count()),
        )?;
        let allowed = p.show(0, "allowed-ips");
        check(
            allowed.contains(&format!("{}\t10.3.231.0/24 fd10:3e7::/64", extra[999])),
            "the last peer's allowed IPs",
        )?;
        check(
            handshake() == hs,
            "syncconf left the unchanged peer's session alone",
        )?;
        p.ping(0, &inner4(1), 56)?;
        // Back to the one peer: syncconf removes the thousand.
        p.wg(0, &["syncconf", iface, file.to_str().unwrap()])?;
        check(
            p.show(0, "peers").lines().count() == 1,
            "syncconf removed the extra peers",
        )?;
        check(handshake() == hs, "and still left the session alone")?;
        // addconf adds without removing.
        let one = dir.join("one.conf");
        std::fs::write(
            &one,
            format!(
                "[Peer]\nPublicKey = {}\nAllowedIPs = 10.77.0.0/16\n",
                extra[0]
            ),
        )
        .unwrap();
        p.wg(0, &["addconf", iface, one.to_str().unwrap()])?;
        check(p.show(0, "peers").lines().count() == 2, "addconf added one")?;
        p.ping(0, &inner6(1), 56)
    });
}

/// A full-tunnel wg-quick configuration (`AllowedIPs = 0.0.0.0/0, ::/0`): wg-quick sets a
/// fwmark on the interface and routes everything else through the tunnel by policy; the
/// endpoint stays reachable because the tunnel's own datagrams carry the mark. PostUp and
/// PostDown run, and SaveConfig writes a peer added at runtime back to the file on down.
#[test]
fn wg_quick_full_tunnel_with_save_config_and_hooks() {
    side_by_side(&TWO, |lab, imp, dir| {
        let p = Pair::new(lab, imp, dir)?;
        // Host 1 stands for "the internet" behind the tunnel: 198.51.100.1 on its loopback,
        // reached from host 0 only through the tunnel.
        p.ip(1, &["addr", "add", "198.51.100.1/32", "dev", "lo"])?;
        // Host 0's own interface is replaced by one that wg-quick brings up.
        p.ip(0, &["link", "del", &p.ifaces[0]])?;
        let iface = format!("{}q0", lab.id);
        let marker = dir.join("hooks");
        let conf = dir.join(format!("{iface}.conf"));
        std::fs::write(
            &conf,
            format!(
                "[Interface]\nPrivateKey = {}\nAddress = {}/24, {}/64\nListenPort = 1\nSaveConfig = true\n\
                 PostUp = echo up %i >> {m}\nPostDown = echo down %i >> {m}\n\n\
                 [Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = 192.0.2.2:2\nAllowedIPs = 0.0.0.0/0, ::/0\n",
                p.keys[0].to_base64(),
                inner4(0),
                inner6(0),
                p.public(1),
                std::fs::read_to_string(&p.psk).unwrap().trim(),
                m = marker.display(),
            ),
        )
        .unwrap();
        let quick = |verb: &str| -> Step {
            let mut cmd: Vec<String> = vec!["env".into()];
            cmd.extend(imp.wg_quick_env());
            cmd.extend([
                "wg-quick".into(),
                verb.into(),
                conf.to_string_lossy().into_owned(),
            ]);
            let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let out = lab.run(&p.hosts[0].ns, &cmd);
            check(
                out.status.success(),
                format!("wg-quick {verb}: {}", text(&out)),
            )
        };
        quick("up")?;
        let mark = p.run(0, &["wg", "show", &iface, "fwmark"])?;
        check(
            mark.trim() == "0xca6c",
            format!("wg-quick set fwmark 51820: {mark}"),
        )?;
        let rules = p.ip(0, &["rule"])?;
        check(
            rules.contains("not from all fwmark 0xca6c lookup 51820"),
            format!("ip rule: {rules}"),
        )?;
        // The tunnel peer, and "the internet" behind it, over the tunnel; the endpoint stays
        // on the underlay (the handshake would fail otherwise).
        p.ping(0, &inner4(1), 56)?;
        p.ping(0, "198.51.100.1", 56)?;
        p.ping(0, &inner6(1), 56)?;
        let route = p.ip(0, &["route", "get", "198.51.100.1"])?;
        check(
            route.contains(&iface),
            format!("the default goes through the tunnel: {route}"),
        )?;
        // A peer added at runtime is saved on down.
        let extra = keys::encode(&PrivateKey::generate().public_key());
        p.run(
            0,
            &[
                "wg",
                "set",
                &iface,
                "peer",
                &extra,
                "allowed-ips",
                "10.99.0.0/16",
            ],
        )?;
        quick("down")?;
        let saved = std::fs::read_to_string(&conf).unwrap();
        check(
            saved.contains(&extra),
            format!("SaveConfig wrote the new peer: {saved}"),
        )?;
        let hooks = std::fs::read_to_string(&marker).unwrap_or_default();
        check(
            hooks == format!("up {iface}\ndown {iface}\n"),
            format!("PostUp and PostDown ran: {hooks:?}"),
        )?;
        let rules = p.ip(0, &["rule"])?;
        check(
            !rules.contains("51820"),
            format!("wg-quick down removed its rules: {rules}"),
        )?;
        check(
            p.ip(0, &["link", "show", &iface]).is_err(),
            "the interface is gone",
        )
    });
}

/// Sends one raw UAPI request and returns the answer.
fn uapi(iface: &str, request: &str) -> String {
    let mut s = UnixStream::connect(uapi_path(iface)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the blank line that ends an answer.
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.ends_with(b"\n\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// `get=1` without what moves (handshake times, counters) or is random (the port), with the
/// peers in key order and each peer's allowed IPs sorted (wireguard-go lists peers in map
/// order and allowed IPs in trie order).
fn normalized_get(iface: &str) -> String {
    let answer = uapi(iface, "get=1\n\n");
    let mut head = Vec::new();
    let mut peers: Vec<Vec<String>> = Vec::new();
    for l in answer.lines() {
        if ["last_handshake", "rx_bytes", "tx_bytes", "listen_port"]
            .iter()
            .any(|p| l.starts_with(p))
        {
            continue;
        }
        if l.starts_with("public_key=") {
            peers.push(Vec::new());
        }
        match peers.last_mut() {
            Some(p) => p.push(l.to_string()),
            None => head.push(l.to_string()),
        }
    }
    for p in &mut peers {
        p[1..].sort_by_key(|l| l.starts_with("allowed_ip"));
        let first = p
            .iter()
            .position(|l| l.starts_with("allowed_ip"))
            .unwrap_or(p.len());
        p[first..].sort();
    }
    peers.sort();
    let peers: Vec<String> = peers.into_iter().map(|p| p.join(" ")).collect();
    format!("{} | {}", head.join(" "), peers.join(" | "))
}

/// The UAPI document's `set` keys, as raw requests on the socket: each gets the answer
/// wireguard-go gives, and leaves the configuration as wireguard-go's (compared through `get`,
/// without timestamps and counters).
#[test]
fn raw_uapi_requests_get_the_reference_answers() {
    let k = |n: u8| hex::encode([n; 32]);
    let requests: Vec<(&str, String)> = vec![
        (
            "protocol_version 1",
            format!("set=1\npublic_key={}\nprotocol_version=1\n\n", k(1)),
        ),
        (
            "protocol_version 2",
            format!("set=1\npublic_key={}\nprotocol_version=2\n\n", k(1)),
        ),
        (
            "update_only of an absent peer",
            format!(
                "set=1\npublic_key={}\nupdate_only=true\nendpoint=192.0.2.9:9\n\n",
                k(3)
            ),
        ),
        (
            "update_only of a present peer",
            format!(
                "set=1\npublic_key={}\nupdate_only=true\npersistent_keepalive_interval=7\n\n",
                k(1)
            ),
        ),
        (
            "remove of an absent peer",
            format!("set=1\npublic_key={}\nremove=true\n\n", k(4)),
        ),
        (
            "replace_allowed_ips",
            format!(
                "set=1\npublic_key={}\nallowed_ip=10.1.0.0/16\nallowed_ip=10.2.0.0/16\nreplace_allowed_ips=true\nallowed_ip=10.3.0.0/16\n\n",
                k(1)
            ),
        ),
        (
            "keepalive too big",
            format!(
                "set=1\npublic_key={}\npersistent_keepalive_interval=65536\n\n",
                k(1)
            ),
        ),
        (
            "bad endpoint",
            format!("set=1\npublic_key={}\nendpoint=nowhere\n\n", k(1)),
        ),
        (
            "bad allowed ip",
            format!("set=1\npublic_key={}\nallowed_ip=10.0.0.0/33\n\n", k(1)),
        ),
        (
            "key of the wrong length",
            "set=1\npublic_key=abcd\n\n".to_string(),
        ),
        ("unknown key", "set=1\nfrobnicate=1\n\n".to_string()),
        (
            "a peer key before public_key",
            "set=1\nendpoint=192.0.2.9:9\n\n".to_string(),
        ),
        (
            "preshared_key",
            format!("set=1\npublic_key={}\npreshared_key={}\n\n", k(1), k(9)),
        ),
        ("fwmark", "set=1\nfwmark=4660\n\n".to_string()),
        ("fwmark 0", "set=1\nfwmark=0\n\n".to_string()),
        ("private_key", format!("set=1\nprivate_key={}\n\n", k(5))),
        (
            "a second peer",
            format!(
                "set=1\npublic_key={}\nendpoint=[2001:db8::1]:51820\nallowed_ip=fd00::/8\n\n",
                k(6)
            ),
        ),
        (
            "replace_peers",
            format!(
                "set=1\nreplace_peers=true\npublic_key={}\nallowed_ip=10.9.0.0/24\n\n",
                k(7)
            ),
        ),
        (
            "private_key zero clears it",
            format!("set=1\nprivate_key={}\n\n", k(0)),
        ),
    ];
    let mut answers: Vec<Vec<(String, String)>> = Vec::new();
    for imp in TWO {
        let lab = Lab::new();
        let h = lab.host(1);
        let iface = format!("{}u", lab.id);
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = imp.command();
        cmd.extend(["-f".to_string(), iface.clone()]);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        lab.spawn(&h.ns, &cmd, &dir.path().join("uapi.log"));
        let t = Instant::now();
        while UnixStream::connect(uapi_path(&iface)).is_err() {
            assert!(t.elapsed() < WAIT, "{imp:?} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut got = Vec::new();
        for (_, req) in &requests {
            let answer = uapi(&iface, req);
            got.push((answer.trim().to_string(), normalized_get(&iface)));
        }
        // All or nothing, where wireguard-go applies the lines before a bad one: a request
        // that adds a peer and then fails leaves no peer behind.
        if imp == Impl::Canopy {
            let before = normalized_get(&iface);
            let answer = uapi(
                &iface,
                &format!(
                    "set=1\npublic_key={}\nallowed_ip=10.8.0.0/16\nendpoint=nowhere\n\n",
                    k(8)
                ),
            );
            assert_eq!(answer, "errno=-22\n\n");
            assert_eq!(
                normalized_get(&iface),
                before,
                "a refused request changed nothing"
            );
        }
        answers.push(got);
    }
    let mut differ = Vec::new();
    for (n, (what, _)) in requests.iter().enumerate() {
        let (go, canopy) = (&answers[0][n], &answers[1][n]);
        if go != canopy {
            differ.push(format!(
                "{what}:\n  wireguard-go: {} | {}\n  canopy:       {} | {}",
                go.0, go.1, canopy.0, canopy.1
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
