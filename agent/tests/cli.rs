//! The `canopy-agent` binary for real. (`join` brings up a real interface, so its end-to-end
//! tests run in network namespaces: `tests/tests/overlay_controller.rs`.)
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_canopy-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("CANOPY_LOG", "warn")
        .output()
        .unwrap()
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
