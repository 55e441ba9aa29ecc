//! Hosts behind NAT routers for the NAT traversal tests: a router namespace on the lab's
//! bridge that masquerades a private subnet of its own, as a home router or a cloud NAT
//! gateway does (Linux MASQUERADE: address-and-port-dependent filtering, ports kept when
//! free).

use crate::controller::{Node, peers_seen, spawn_agent, wait_until};
use crate::netns::{Host, Lab};

/// Puts `inside` behind router `router` (a host on the lab bridge): `inside` loses its own
/// link to the bridge and gets 10.(90+n).0.2/24 on a veth to the router (10.(90+n).0.1),
/// with its default route there; the router forwards and masquerades what leaves by its
/// bridge link, with `extra` appended to the masquerade rule (e.g. "fully-random", iptables' --random-fully).
pub fn behind_nat(lab: &Lab, router: &Host, inside: &Host, n: u8, extra: &str) {
    let run = |ns: &str, cmd: &[&str]| lab.ok(ns, cmd);
    run(&inside.ns, &["ip", "link", "del", &inside.dev]);
    let (r, i) = (format!("{}r{n}", lab.id), format!("{}i{n}", lab.id));
    run(
        &router.ns,
        &[
            "ip", "link", "add", &r, "type", "veth", "peer", "name", &i, "netns", &inside.ns,
        ],
    );
    let (gw, me) = (
        format!("10.{}.0.1", 90 + n),
        format!("10.{}.0.2/24", 90 + n),
    );
    run(
        &router.ns,
        &["ip", "addr", "add", &format!("{gw}/24"), "dev", &r],
    );
    run(&router.ns, &["ip", "link", "set", &r, "up"]);
    run(&inside.ns, &["ip", "addr", "add", &me, "dev", &i]);
    run(&inside.ns, &["ip", "link", "set", &i, "up"]);
    run(&inside.ns, &["ip", "route", "add", "default", "via", &gw]);
    masquerade(lab, router, extra);
}

/// Puts several hosts behind one router: a bridge in the router at 10.(90+n).0.1/24, host `i`
/// at 10.(90+n).0.(2+i) on a veth into it, default route via the router, which masquerades
/// what leaves by its bridge link (no hairpin: the router's outside address is not reachable
/// from inside).
pub fn behind_one_nat(lab: &Lab, router: &Host, inside: &[&Host], n: u8) {
    let run = |ns: &str, cmd: &[&str]| lab.ok(ns, cmd);
    let br = format!("{}nb{n}", lab.id);
    let gw = format!("10.{}.0.1", 90 + n);
    run(&router.ns, &["ip", "link", "add", &br, "type", "bridge"]);
    run(
        &router.ns,
        &["ip", "addr", "add", &format!("{gw}/24"), "dev", &br],
    );
    run(&router.ns, &["ip", "link", "set", &br, "up"]);
    for (i, h) in inside.iter().enumerate() {
        run(&h.ns, &["ip", "link", "del", &h.dev]);
        let (r, x) = (format!("{}q{n}{i}", lab.id), format!("{}x{n}{i}", lab.id));
        run(
            &router.ns,
            &[
                "ip", "link", "add", &r, "type", "veth", "peer", "name", &x, "netns", &h.ns,
            ],
        );
        run(&router.ns, &["ip", "link", "set", &r, "master", &br, "up"]);
        let me = format!("10.{}.0.{}/24", 90 + n, 2 + i);
        run(&h.ns, &["ip", "addr", "add", &me, "dev", &x]);
        run(&h.ns, &["ip", "link", "set", &x, "up"]);
        run(&h.ns, &["ip", "route", "add", "default", "via", &gw]);
    }
    masquerade(lab, router, "");
}

/// Makes `router` forward and masquerade what leaves by its bridge link, with `extra` appended
/// to the rule (e.g. "fully-random", iptables' --random-fully).
fn masquerade(lab: &Lab, router: &Host, extra: &str) {
    lab.ok(&router.ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    lab.ok(&router.ns, &["nft", "add", "table", "ip", "nat"]);
    let chain = "add chain ip nat post { type nat hook postrouting priority srcnat; }";
    lab.ok(&router.ns, &["nft", chain]);
    masquerade_rule(lab, router, extra);
}

/// The masquerade rule for what leaves `router` by its bridge link, with `extra` appended.
fn masquerade_rule(lab: &Lab, router: &Host, extra: &str) {
    let mut rule = vec![
        "nft",
        "add",
        "rule",
        "ip",
        "nat",
        "post",
        "oifname",
        &router.dev,
    ];
    rule.push("masquerade");
    rule.extend(extra.split_whitespace());
    lab.ok(&router.ns, &rule);
}

/// Makes `router` drop what arrives unasked on its outside link for the router itself, as
/// home routers and cloud NAT gateways do: a peer's probe that arrives before the node behind
/// has sent out is dropped and leaves no conntrack entry behind (a bare Linux router accepts
/// it, and the entry makes it remap its node's port).
pub fn drop_unsolicited(lab: &Lab, router: &Host) {
    lab.ok(&router.ns, &["nft", "add", "table", "ip", "fw"]);
    let chain = "add chain ip fw input { type filter hook input priority filter; }";
    lab.ok(&router.ns, &["nft", chain]);
    lab.ok(
        &router.ns,
        &[
            "nft",
            "add",
            "rule",
            "ip",
            "fw",
            "input",
            "iifname",
            &router.dev,
            "ct",
            "state",
            "new",
            "drop",
        ],
    );
}

/// Replaces `router`'s masquerade rule with a plain one (ports kept when free): a NAT that
/// scrambled ports (`fully-random`) relaxed. Mappings it made stay until they expire.
pub fn relax(lab: &Lab, router: &Host) {
    lab.ok(&router.ns, &["nft", "flush", "chain", "ip", "nat", "post"]);
    masquerade_rule(lab, router, "");
}

/// How [`natted_pair`] puts its two agents behind their routers.
pub struct Nats {
    /// Appended to each router's masquerade rule ("" or "fully-random").
    pub extra: [&'static str; 2],
    /// Whether the routers drop unsolicited inbound ([`drop_unsolicited`]).
    pub firewalled: bool,
}

/// Agents `a` (host 3, behind router host 2) and `b` (host 5, behind router host 4) joined
/// with `join`, started once the routers are set up; returns when each sees the other:
/// (a, b, a's router, b's router) and when the agents were started.
pub fn natted_pair(
    lab: &Lab,
    dir: &std::path::Path,
    join: &str,
    nats: Nats,
) -> (Node, Node, Host, Host, std::time::Instant) {
    let (r1, in1, r2, in2) = (lab.host(2), lab.host(3), lab.host(4), lab.host(5));
    behind_nat(lab, &r1, &in1, 1, nats.extra[0]);
    behind_nat(lab, &r2, &in2, 2, nats.extra[1]);
    if nats.firewalled {
        drop_unsolicited(lab, &r1);
        drop_unsolicited(lab, &r2);
    }
    let t = std::time::Instant::now();
    let a = spawn_agent(lab, dir, join, "a", in1, &[]);
    let b = spawn_agent(lab, dir, join, "b", in2, &[]);
    for n in [&a, &b] {
        wait_until("the agents to see each other", || {
            peers_seen(lab, n).is_some_and(|p| p.len() == 1)
        });
    }
    (a, b, r1, r2, t)
}
