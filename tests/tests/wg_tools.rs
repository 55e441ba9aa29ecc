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
//! | (UAPI document) every `set` key, answers        | `wg_uapi.rs`                          |
//!
//! Not run, kernel-only: sk_bound_dev_if, routing a device's own packets through a second
//! wg device in another namespace (netns moves of the interface), route-MTU padding (a TUN
//! device sees no route MTU), and the module's own netlink and memory-leak checks.
//! Needs root.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use canopy_agent::keys::{self, PrivateKey};
use canopy_tests::wg::*;

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

/// Host 0's `wg show dump` without what moves (peers' handshake time and counters).
fn stable_dump(p: &Pair) -> String {
    p.show(0, "dump")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() == 8 {
                [&f[..4], &f[7..]].concat().join("\t")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `conf` with a thousand more peers of two allowed IPs each; their public keys, in order.
fn with_a_thousand_peers(conf: &str) -> (String, Vec<String>) {
    let mut big = conf.to_string();
    let mut keys = Vec::new();
    for n in 0..1000u32 {
        let k = keys::encode(&PrivateKey::generate().public_key());
        let (a, b) = (n / 256, n % 256);
        big +=
            &format!("\n[Peer]\nPublicKey = {k}\nAllowedIPs = 10.{a}.{b}.0/24, fd10:{n:x}::/64\n");
        keys.push(k);
    }
    (big, keys)
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
        let dump = stable_dump;
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
        let (big, extra) = with_a_thousand_peers(&conf);
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
        let one_peer = format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = 10.77.0.0/16\n",
            extra[0]
        );
        std::fs::write(&one, one_peer).unwrap();
        p.wg(0, &["addconf", iface, one.to_str().unwrap()])?;
        check(p.show(0, "peers").lines().count() == 2, "addconf added one")?;
        p.ping(0, &inner6(1), 56)
    });
}

/// Host 0's wg-quick file for a full tunnel to host 1, with SaveConfig and hooks that append
/// to `marker`.
fn full_tunnel_conf(p: &Pair, marker: &std::path::Path) -> String {
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
    )
}

/// Deletes host 0's interface and waits for its process to exit and free port 1 (within
/// milliseconds, but under a loaded test run the next bind can be faster).
fn delete_host0_interface(p: &Pair) -> Step {
    p.ip(0, &["link", "del", &p.ifaces[0]])?;
    let t = Instant::now();
    while uapi_path(&p.ifaces[0]).exists() {
        check(
            t.elapsed() < WAIT,
            "the old interface's process did not exit",
        )?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// After `wg-quick down`: its rules are gone, and so is the interface.
fn wg_quick_cleaned_up(p: &Pair, iface: &str) -> Step {
    let rules = p.ip(0, &["rule"])?;
    check(
        !rules.contains("51820"),
        format!("wg-quick down removed its rules: {rules}"),
    )?;
    check(
        p.ip(0, &["link", "show", iface]).is_err(),
        "the interface is gone",
    )
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
        delete_host0_interface(&p)?;
        let iface = format!("{}q0", lab.id);
        let marker = dir.join("hooks");
        let conf = dir.join(format!("{iface}.conf"));
        std::fs::write(&conf, full_tunnel_conf(&p, &marker)).unwrap();
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
        let set = [
            "wg",
            "set",
            &iface,
            "peer",
            &extra,
            "allowed-ips",
            "10.99.0.0/16",
        ];
        p.run(0, &set)?;
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
        wg_quick_cleaned_up(&p, &iface)
    });
}
