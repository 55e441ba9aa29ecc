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
