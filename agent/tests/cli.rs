//! The `canopy-agent` binary for real, against an in-process controller over TLS on loopback.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use canopy_controller::server::{self, ServeConfig};

const BIN: &str = env!("CARGO_BIN_EXE_canopy-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("CANOPY_LOG", "warn")
        .output()
        .unwrap()
}

fn spawn_join(join: &str, state: &Path) -> Child {
    Command::new(BIN)
        .args(["join", join, "--hostname", "node-a", "--state-dir"])
        .arg(state)
        .env("CANOPY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn status(state: &Path) -> Option<serde_json::Value> {
    let o = agent(&["status", "--json", "--state-dir", state.to_str().unwrap()]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_keeps_key_and_address_across_restarts_and_exits_when_removed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("ctl"),
        store: None,
        advertise: None,
        tls_sans: vec![],
    };
    let srv = server::spawn(&cfg).await.unwrap();
    let ctl = srv.controller.clone();
    let caller = ctl.authenticate_console(&srv.admin_token).await.unwrap();
    ctl.create_network(&caller, "prod", &["100.64.0.0/24".into()])
        .await
        .unwrap();
    let (_, join) = ctl
        .create_join_token(&caller, "prod", 0, 3600, &[])
        .await
        .unwrap();
    let state = dir.path().join("state");

    let mut child = spawn_join(&join, &state);
    let st = tokio::task::block_in_place(|| {
        wait_for("enrollment", || status(&state).is_some());
        status(&state).unwrap()
    });
    assert_eq!(st["addresses"][0], "100.64.0.1/32");
    let mode = std::fs::metadata(state.join("private.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the private key is 0600");
    let private = std::fs::read_to_string(state.join("private.key")).unwrap();
    let peers = ctl.list_peers(&caller, "prod").await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_ne!(
        base64_of(&peers[0].public_key),
        private.trim(),
        "only the public key reaches the controller"
    );

    // A second node joins: the running agent's status shows it (pushed, persisted).
    let other = canopy_agent::keys::PrivateKey::generate();
    let jsn = canopy_proto::join::JoinString::parse(&join).unwrap();
    canopy_agent::control::enroll(&jsn, other.public_key(), "node-b")
        .await
        .unwrap();
    tokio::task::block_in_place(|| {
        wait_for("the pushed peer", || {
            status(&state).is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.len() == 1))
        })
    });

    // Restart the agent: same key, same peer, same address; no second enrollment.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn_join(&join, &state);
    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(500)));
    let st2 = status(&state).unwrap();
    assert_eq!(
        (&st2["peer_id"], &st2["addresses"], &st2["public_key"]),
        (&st["peer_id"], &st["addresses"], &st["public_key"])
    );
    assert_eq!(ctl.list_peers(&caller, "prod").await.unwrap().len(), 2);

    // Removed by the console: the agent clears its enrollment and exits non-zero saying why.
    ctl.remove_peer(&caller, st["peer_id"].as_str().unwrap())
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| {
        let t = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break child.wait_with_output().unwrap();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "agent did not exit after removal"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed from its network"));
    assert!(status(&state).is_none());
    srv.stop().await.unwrap();
}

fn base64_of(b: &[u8]) -> String {
    canopy_agent::keys::encode(b)
}

#[test]
fn bad_join_strings_and_keys_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = agent(&[
        "join",
        "canopy2:xyz",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("canopy-agent: join string must start with 'canopy1:'"),
        "{err}"
    );
    let o = agent(&[
        "join",
        "canopy1:AAAA",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("garbled"));
    let o = agent(&["status", "--state-dir", dir.path().to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not enrolled"));
}

#[test]
fn genkey_and_pubkey_agree_with_wg_format() {
    let k = agent(&["genkey"]);
    let key = String::from_utf8(k.stdout).unwrap();
    assert_eq!(canopy_agent::keys::decode32(&key).unwrap().len(), 32);
    let mut p = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    p.stdin
        .take()
        .unwrap()
        .write_all(b"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n")
        .unwrap();
    let out = p.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
    );
}
