//! canopy-agent configured by the standard tools: bad files and malformed UAPI requests change
//! nothing, `wg set` moves the listen port and the fwmark live, and wg-quick runs canopy-agent
//! as its userspace implementation. Needs root.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use canopy_tests::netns::Lab;
use canopy_tests::overlay::*;
use canopy_tests::wg::uapi;

#[test]
fn a_bad_wg_quick_file_is_refused_naming_its_line_and_leaves_no_interface() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let h1 = lab.host(1);
    let a = node(&lab, "a");
    let bad = dir.path().join(format!("{}.conf", a.iface));
    std::fs::write(&bad, format!("[Interface]\nPrivateKey = {}\nAddress = 10.9.0.1/24\nListenPort = 51820\n\n[Peer]\nPublicKey = short\n", a.key.to_base64())).unwrap();
    let out = lab.run(&h1.ns, &[&agent(), "up", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 7: PublicKey: key is not valid base64"),
        "{err}"
    );
    let link = lab.run(&h1.ns, &["ip", "link", "show", &a.iface]);
    assert!(!link.status.success(), "no interface left behind");
}

#[test]
fn a_wg_quick_file_with_dns_comes_up_says_where_its_servers_go_and_serves_metrics() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let h1 = lab.host(1);
    let a = node(&lab, "a");
    let file = dir.path().join(format!("{}.conf", a.iface));
    let text = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 10.9.0.1/24\nDNS = 10.9.0.53, corp.example\n",
        a.key.to_base64()
    );
    std::fs::write(&file, text).unwrap();
    let log = dir.path().join("a.log");
    up_with(
        &lab,
        &h1.ns,
        &file,
        &log,
        &["CANOPY_AGENT_METRICS=127.0.0.1:9466"],
    );
    let t = std::time::Instant::now();
    let said = loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains("DNS") || t.elapsed() > WAIT {
            break said;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(said.contains("is up"), "{said}");
    // This machine has neither systemd-resolved nor resolvconf: the agent says what to do.
    assert!(
        said.contains("nameserver 10.9.0.53; search corp.example"),
        "{said}"
    );
    let link = lab.run(&h1.ns, &["ip", "link", "show", &a.iface]);
    assert!(link.status.success(), "the interface is up");
    // `up` serves metrics too.
    let get = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9466/metrics').read().decode())";
    let m = lab.run(&h1.ns, &["python3", "-c", get]);
    let m = String::from_utf8_lossy(&m.stdout);
    assert!(m.contains("canopy_agent_dropped_packets_total"), "{m}");
}

/// Node `a` up in namespace `ns` from a wg-quick file with one peer, its UAPI socket there.
fn one_node_up(lab: &Lab, ns: &str, dir: &Path) -> Node {
    let (a, b) = (node(lab, "a"), node(lab, "b"));
    let ca = conf(
        dir,
        &a,
        "10.9.0.1/24",
        &[(&b, "192.0.2.2:51820", "10.9.0.2/32")],
    );
    up(lab, ns, &ca, &dir.join("a.log"));
    let sock = format!("/var/run/wireguard/{}.sock", a.iface);
    let t = std::time::Instant::now();
    while !Path::new(&sock).exists() {
        assert!(t.elapsed() < WAIT, "agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    a
}

#[test]
fn malformed_uapi_requests_change_nothing_and_a_valid_wg_set_applies_with_its_route() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let h1 = lab.host(1);
    let a = one_node_up(&lab, &h1.ns, dir.path());
    let before = lab.wg(&h1.ns, &a.iface, "dump");
    let k = hex::encode([3u8; 32]);
    for req in [
        format!("set=1\npublic_key={k}\nallowed_ip=10.0.0.0/40\n\n"),
        format!("set=1\npublic_key={k}\nendpoint=nowhere\n\n"),
        "set=1\npublic_key=zz\n\n".to_string(),
        "set=1\nlisten_port=99999\n\n".to_string(),
        format!("set=1\nreplace_peers=true\npublic_key={k}\nbogus=1\n\n"),
        "frobnicate=1\n\n".to_string(),
    ] {
        assert_eq!(uapi(&a.iface, &req), "errno=-22\n\n", "{req:?}");
    }
    let after = lab.wg(&h1.ns, &a.iface, "dump");
    assert_eq!(after, before, "refused requests changed nothing");

    // A valid `wg set` takes effect live, with its route.
    let c = pubkey(&node(&lab, "c"));
    let set = [
        "wg",
        "set",
        &a.iface,
        "peer",
        &c,
        "allowed-ips",
        "10.77.0.0/16",
    ];
    let ok = lab.run(
        &h1.ns,
        &[&set[..], &["endpoint", "192.0.2.3:51820"]].concat(),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let allowed = lab.wg(&h1.ns, &a.iface, "allowed-ips");
    assert!(allowed.contains("10.77.0.0/16"));
    let routes = lab.run(&h1.ns, &["ip", "route", "show", "dev", &a.iface]);
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(routes.contains("10.77.0.0/16"), "{routes}");
}

/// fwmark, as wg-quick sets it for a full tunnel: on the socket, shown by `wg show`, cleared
/// by 0; a set with a bad line besides it changes neither.
#[test]
fn the_fwmark_is_set_on_the_socket_live_and_cleared_by_zero() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let h1 = lab.host(1);
    let a = one_node_up(&lab, &h1.ns, dir.path());
    let wg_set =
        |args: &[&str]| lab.run(&h1.ns, &[&["wg", "set", a.iface.as_str()], args].concat());
    let fwmark = || lab.wg(&h1.ns, &a.iface, "fwmark").trim().to_string();
    assert!(wg_set(&["fwmark", "0x1234"]).status.success());
    assert_eq!(fwmark(), "0x1234");
    let sockets = lab.run(&h1.ns, &["ss", "-u", "-a", "-n", "-e"]);
    let sockets = String::from_utf8_lossy(&sockets.stdout).into_owned();
    assert!(
        sockets.contains("fwmark:0x1234"),
        "SO_MARK on the socket: {sockets}"
    );
    let k = hex::encode([3u8; 32]);
    let bad = format!("set=1\nfwmark=7\npublic_key={k}\nallowed_ip=10.0.0.0/40\n\n");
    assert_eq!(uapi(&a.iface, &bad), "errno=-22\n\n");
    assert_eq!(fwmark(), "0x1234", "unchanged");
    assert!(wg_set(&["fwmark", "0"]).status.success());
    assert_eq!(fwmark(), "off");
}

/// `wg set IFACE listen-port N` on a running interface, as the kernel and wireguard-go take
/// it: both sockets move, the session survives, the peer learns the new source from the
/// next authenticated packet, and traffic flows on. 0 picks a random port; a port in use is
/// refused and changes nothing.
#[test]
fn the_listen_port_changes_live_with_traffic_flowing() {
    let Duo {
        lab,
        dir,
        h1,
        h2,
        a,
        b,
        ca,
        cb,
    } = Duo::new();
    up(&lab, &h1.ns, &ca, &dir.path().join("a.log"));
    up(&lab, &h2.ns, &cb, &dir.path().join("b.log"));
    assert!(lab.ping(&h2.ns, "10.9.0.1", WAIT));
    let rx_before = rx_from(&lab, &h2.ns, &b.iface, &pubkey(&a));

    let set = |port: &str| lab.run(&h1.ns, &["wg", "set", &a.iface, "listen-port", port]);
    let out = set("51999");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.wg(&h1.ns, &a.iface, "listen-port").trim(), "51999");
    // A talks first from its new port; B learns it and answers there.
    if !lab.ping(&h1.ns, "10.9.0.2", WAIT) {
        let log = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
        panic!(
            "traffic after the port change\nA: {}\nB: {}\nA wg: {}\nB wg: {}\nss: {}",
            log("a.log"),
            log("b.log"),
            lab.wg(&h1.ns, &a.iface, "dump"),
            lab.wg(&h2.ns, &b.iface, "dump"),
            String::from_utf8_lossy(&lab.run(&h1.ns, &["ss", "-u", "-a", "-n"]).stdout)
        );
    }
    let endpoints = lab.wg(&h2.ns, &b.iface, "endpoints");
    assert!(
        endpoints.contains(":51999"),
        "B learned A's new port: {endpoints}"
    );
    assert!(lab.ping(&h2.ns, "fd00:9::1", WAIT), "and B reaches A there");
    assert!(
        rx_from(&lab, &h2.ns, &b.iface, &pubkey(&a)) > rx_before,
        "counters carried on"
    );

    // 0: a random free port. A port in use: refused, nothing changes.
    assert!(set("0").status.success());
    let random: u16 = lab
        .wg(&h1.ns, &a.iface, "listen-port")
        .trim()
        .parse()
        .unwrap();
    assert!(random != 0 && random != 51999);
    let mut busy = std::process::Command::new("ip")
        .args(["netns", "exec", &h1.ns, "python3", "-c"])
        .arg("import socket,time; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('::', 51777)); print('bound', flush=True); time.sleep(30)")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(busy.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "bound");
    let out = set("51777");
    assert!(!out.status.success(), "a port in use is refused");
    assert_eq!(
        lab.wg(&h1.ns, &a.iface, "listen-port").trim(),
        random.to_string(),
        "nothing changed"
    );
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "still forwarding");
    let _ = busy.kill();
    let _ = busy.wait();
}

/// wg-quick with canopy-agent as its userspace implementation, the way the stock
/// `wg-quick@.service` runs it: `canopy-agent IFACE` makes a bare interface and returns once
/// its UAPI socket answers, wg-quick configures it with `wg setconf` and `ip`, traffic flows,
/// and `wg-quick down` deletes the interface, which ends the agent.
#[test]
fn wg_quick_runs_canopy_agent_as_its_userspace_implementation() {
    let Duo {
        lab,
        dir,
        h1,
        h2,
        a,
        b: _,
        ca,
        cb,
    } = Duo::new();
    up(&lab, &h2.ns, &cb, &dir.path().join("b.log"));
    let impl_env = format!("WG_QUICK_USERSPACE_IMPLEMENTATION={}", agent());
    let quick = |verb: &str| {
        lab.run(
            &h1.ns,
            &["env", &impl_env, "wg-quick", verb, ca.to_str().unwrap()],
        )
    };
    let out = quick("up");
    assert!(
        out.status.success(),
        "wg-quick up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.wg(&h1.ns, &a.iface, "listen-port").trim(), "51820");
    assert!(lab.ping(&h1.ns, "10.9.0.2", WAIT), "IPv4 after wg-quick up");
    assert!(
        lab.ping(&h1.ns, "fd00:9::2", WAIT),
        "IPv6 after wg-quick up"
    );
    let out = quick("down");
    assert!(
        out.status.success(),
        "wg-quick down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = format!("/var/run/wireguard/{}.sock", a.iface);
    let t = std::time::Instant::now();
    while Path::new(&sock).exists() {
        assert!(
            t.elapsed() < WAIT,
            "the agent did not stop after wg-quick down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !lab.run(&h1.ns, &["ip", "link", "show", &a.iface])
            .status
            .success(),
        "interface gone"
    );
}
