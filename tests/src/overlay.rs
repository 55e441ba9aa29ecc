//! Fixtures of the overlay tests: nodes with keys, wg-quick style files for `canopy-agent up`,
//! starting agents in a lab's namespaces, and checks on what a transfer delivered.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use canopy_agent::keys::{self, PrivateKey};

use crate::netns::{Host, Lab, Transfer, bin};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Node {
    pub key: PrivateKey,
    pub iface: String,
}

pub fn node(lab: &Lab, name: &str) -> Node {
    Node {
        key: PrivateKey::generate(),
        iface: format!("{}{name}", lab.id),
    }
}

pub fn pubkey(n: &Node) -> String {
    keys::encode(&n.key.public_key())
}

/// Writes `<iface>.conf` for a wg-quick style `canopy-agent up`.
pub fn conf(dir: &Path, n: &Node, addr: &str, peers: &[(&Node, &str, &str)]) -> PathBuf {
    let mut s = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {addr}\nListenPort = 51820\n",
        n.key.to_base64()
    );
    for (p, endpoint, allowed) in peers {
        s += &format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n",
            pubkey(p)
        );
    }
    let path = dir.join(format!("{}.conf", n.iface));
    std::fs::write(&path, s).unwrap();
    path
}

/// Configurations for A (host 1: 10.9.0.1, fd00:9::1) and B (host 2: .2, ::2), each the
/// other's only peer.
pub fn dual_stack_pair(dir: &Path, a: &Node, b: &Node) -> (PathBuf, PathBuf) {
    let ca = conf(
        dir,
        a,
        "10.9.0.1/24, fd00:9::1/64",
        &[(b, "192.0.2.2:51820", "10.9.0.2/32, fd00:9::2/128")],
    );
    let cb = conf(
        dir,
        b,
        "10.9.0.2/24, fd00:9::2/64",
        &[(a, "192.0.2.1:51820", "10.9.0.1/32, fd00:9::1/128")],
    );
    (ca, cb)
}

/// Starts `canopy-agent up CONF` in `ns` (killed with the lab); returns its pid.
pub fn up(lab: &Lab, ns: &str, conf: &Path, log: &Path) -> u32 {
    up_with(lab, ns, conf, log, &[])
}

/// [`up`] with environment settings (`NAME=value`) for the agent.
pub fn up_with(lab: &Lab, ns: &str, conf: &Path, log: &Path, env: &[&str]) -> u32 {
    let agent = agent();
    let mut cmd = vec!["env"];
    cmd.extend(env);
    cmd.extend([agent.as_str(), "up", conf.to_str().unwrap()]);
    lab.spawn(ns, &cmd, log)
}

pub fn agent() -> String {
    bin("canopy-agent").to_string_lossy().into_owned()
}

/// Every byte arrived, in order, and the sender never saw the tunnel reorder segments.
/// A TCP transfer of `mb` MiB from namespace `from` to `addr` in `to` arrives intact. Every
/// byte must arrive in order the first time; if the sender saw reordering, the transfer runs
/// once more and that one must see none (the kernel also counts a spurious retransmit, made
/// when a starved 2-core machine delays ACKs, as reordering: a tunnel that reorders does it
/// twice).
pub fn transfer_intact(lab: &Lab, from: &str, to: &str, addr: &str, mb: usize, what: &str) {
    let t = lab.tcp_transfer(from, to, addr, mb);
    if t.reordering <= 3 {
        return assert_intact(&t, what);
    }
    assert_eq!(t.sent, t.received, "{what}: data differs\n{}", t.log);
    eprintln!(
        "{what}: the sender saw reordering {} (retransmits {}); once more",
        t.reordering, t.retransmits
    );
    assert_intact(&lab.tcp_transfer(from, to, addr, mb), what);
}

/// Brings up each (host, wg-quick file), logging to `a.log`, `b.log`, … in `dir`.
pub fn up_both(lab: &Lab, nodes: [(&Host, &PathBuf); 2], dir: &Path) {
    for ((h, conf), log) in nodes.into_iter().zip(["a.log", "b.log"]) {
        up(lab, &h.ns, conf, &dir.join(log));
    }
}

pub fn assert_intact(t: &Transfer, what: &str) {
    assert_eq!(t.sent, t.received, "{what}: data differs\n{}", t.log);
    assert!(t.received_bytes > 0, "{what}: nothing arrived\n{}", t.log);
    assert!(
        t.reordering <= 3,
        "{what}: the sender saw reordering {} (retransmits {})\n{}",
        t.reordering,
        t.retransmits,
        t.log
    );
}

/// Bytes the interface has received from the peer with public key `from` (`wg show transfer`).
pub fn rx_from(lab: &Lab, ns: &str, iface: &str, from: &str) -> u64 {
    lab.wg(ns, iface, "transfer")
        .lines()
        .find(|l| l.starts_with(from))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The two-node set-up most overlay tests start from: a lab with hosts 1 and 2, nodes A and B,
/// and their dual-stack wg-quick files ([`dual_stack_pair`]), not started yet.
pub struct Duo {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub h1: Host,
    pub h2: Host,
    pub a: Node,
    pub b: Node,
    pub ca: PathBuf,
    pub cb: PathBuf,
}

impl Duo {
    pub fn new() -> Self {
        let lab = Lab::new();
        let dir = tempfile::tempdir().unwrap();
        let (h1, h2) = (lab.host(1), lab.host(2));
        let (a, b) = (node(&lab, "a"), node(&lab, "b"));
        let (ca, cb) = dual_stack_pair(dir.path(), &a, &b);
        Self {
            lab,
            dir,
            h1,
            h2,
            a,
            b,
            ca,
            cb,
        }
    }
}

impl Duo {
    /// IPv4 only: A is 10.9.0.1 routing `b_at_a` to B, B is 10.9.0.2 routing `a_at_b` to A,
    /// over the hosts' IPv4 addresses; both brought up.
    pub fn v4_up(b_at_a: &str, a_at_b: &str) -> Self {
        let mut d = Self::new();
        let dir = d.dir.path();
        d.ca = conf(
            dir,
            &d.a,
            "10.9.0.1/24",
            &[(&d.b, "192.0.2.2:51820", b_at_a)],
        );
        d.cb = conf(
            dir,
            &d.b,
            "10.9.0.2/24",
            &[(&d.a, "192.0.2.1:51820", a_at_b)],
        );
        up_both(&d.lab, [(&d.h1, &d.ca), (&d.h2, &d.cb)], dir);
        d
    }
}

impl Default for Duo {
    fn default() -> Self {
        Self::new()
    }
}
