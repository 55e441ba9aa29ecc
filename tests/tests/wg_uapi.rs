//! The UAPI document's `set` keys as raw requests on the socket, against wireguard-go and
//! canopy-agent in one run: the same answers, the same resulting configuration. Needs root.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use canopy_tests::netns::Lab;
use canopy_tests::wg::*;

/// The UAPI document's `set` keys, as raw requests on the socket: each gets the answer
/// wireguard-go gives, and leaves the configuration as wireguard-go's (compared through `get`,
/// without timestamps and counters).
/// The requests both implementations get, in order; `K1`..`K9`, `K0` stand for 32-byte keys
/// of that byte, in hex.
const REQUESTS: &[(&str, &str)] = &[
    ("protocol_version 1", "public_key=K1\nprotocol_version=1"),
    ("protocol_version 2", "public_key=K1\nprotocol_version=2"),
    (
        "update_only of an absent peer",
        "public_key=K3\nupdate_only=true\nendpoint=192.0.2.9:9",
    ),
    (
        "update_only of a present peer",
        "public_key=K1\nupdate_only=true\npersistent_keepalive_interval=7",
    ),
    ("remove of an absent peer", "public_key=K4\nremove=true"),
    (
        "replace_allowed_ips",
        "public_key=K1\nallowed_ip=10.1.0.0/16\nallowed_ip=10.2.0.0/16\nreplace_allowed_ips=true\nallowed_ip=10.3.0.0/16",
    ),
    (
        "keepalive too big",
        "public_key=K1\npersistent_keepalive_interval=65536",
    ),
    ("bad endpoint", "public_key=K1\nendpoint=nowhere"),
    ("bad allowed ip", "public_key=K1\nallowed_ip=10.0.0.0/33"),
    ("key of the wrong length", "public_key=abcd"),
    ("unknown key", "frobnicate=1"),
    ("a peer key before public_key", "endpoint=192.0.2.9:9"),
    ("preshared_key", "public_key=K1\npreshared_key=K9"),
    ("fwmark", "fwmark=4660"),
    ("fwmark 0", "fwmark=0"),
    ("private_key", "private_key=K5"),
    (
        "a second peer",
        "public_key=K6\nendpoint=[2001:db8::1]:51820\nallowed_ip=fd00::/8",
    ),
    (
        "replace_peers",
        "replace_peers=true\npublic_key=K7\nallowed_ip=10.9.0.0/24",
    ),
    ("private_key zero clears it", "private_key=K0"),
];

/// `body` as a whole `set` request, its key placeholders filled in.
fn set_request(body: &str) -> String {
    let mut body = body.to_string();
    for n in 0..10u8 {
        body = body.replace(&format!("K{n}"), &hex::encode([n; 32]));
    }
    format!("set=1\n{body}\n\n")
}

/// Starts `imp` on a fresh interface and sends it every request: each answer, with the
/// device's state after it.
fn answers_of(imp: Impl) -> Vec<(String, String)> {
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
    for (_, body) in REQUESTS {
        let answer = uapi(&iface, &set_request(body));
        got.push((answer.trim().to_string(), normalized_get(&iface)));
    }
    // All or nothing, where wireguard-go applies the lines before a bad one: a request
    // that adds a peer and then fails leaves no peer behind.
    if imp == Impl::Canopy {
        let before = normalized_get(&iface);
        let bad = set_request("public_key=K8\nallowed_ip=10.8.0.0/16\nendpoint=nowhere");
        assert_eq!(uapi(&iface, &bad), "errno=-22\n\n");
        assert_eq!(
            normalized_get(&iface),
            before,
            "a refused request changed nothing"
        );
    }
    got
}

#[test]
fn raw_uapi_requests_get_the_reference_answers() {
    let answers: Vec<Vec<(String, String)>> = TWO.iter().map(|imp| answers_of(*imp)).collect();
    let mut differ = Vec::new();
    for (n, (what, _)) in REQUESTS.iter().enumerate() {
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
