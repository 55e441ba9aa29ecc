//! The web console in a real browser: Debian's headless Chromium driven by Selenium
//! (`tests/py/web_journey.py`) against `canopy serve --web` in a lab namespace, with a real
//! agent joining from another namespace. Screenshots of every page are written to
//! `target/tmp/web-console/` for a person to look at.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use canopy_tests::controller::*;
use canopy_tests::netns::{Lab, bin};

const URL: &str = "https://192.0.2.254:8443";

fn shots() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-console");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a journey of `web_journey.py` in the hub namespace; its JSON line.
fn browse(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/web_journey.py");
    let shots = shots();
    let mut cmd = vec![
        "/usr/bin/python3",
        script,
        args[0],
        URL,
        args[1],
        shots.to_str().unwrap(),
    ];
    cmd.extend(&args[2..]);
    let out = lab.run(&lab.hub, &cmd);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{}: {stdout}\n{stderr}", args[0]);
    serde_json::from_str(stdout.trim().lines().last().unwrap_or("{}")).unwrap()
}

#[test]
fn a_browser_signs_in_creates_a_network_and_token_sees_an_agent_join_live_and_removes_it() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let con = controller_with(&lab, dir.path(), &data, &["--web", "192.0.2.254:8443"]);
    let admin = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let h = lab.host(1);
    let (agent, state) = (bin("canopy-agent"), dir.path().join("node1"));
    let iface = format!("{}w1", lab.id);
    let join = [
        "--",
        "ip",
        "netns",
        "exec",
        &h.ns,
        agent.to_str().unwrap(),
        "join",
        "--state-dir",
        state.to_str().unwrap(),
        "--interface",
        &iface,
        "--hostname",
        "node1",
    ];
    let mut args = vec!["journey", admin.trim()];
    args.extend(join);
    let m = browse(&lab, &args);
    let appeared = m["peer_appeared_after_agent_start_s"].as_f64().unwrap();
    eprintln!("the new peer was on the page {appeared} s after its agent started");
    assert!(
        appeared < 5.0,
        "the peer appeared {appeared} s after its agent started"
    );

    // The read-scope token the journey made on the API tokens page: no write controls, and a
    // write it forges is refused.
    let viewer = m["read_token"].as_str().unwrap().to_string();
    let listed = con.ok(&["apitoken", "list"]);
    assert!(listed.contains("viewer"), "{listed}");
    let m = browse(&lab, &["readonly", &viewer, "webnet"]);
    assert_eq!(m["forged_write_status"], 403);
}

/// Signs up tenant `org` on the hosted controller: its API token.
fn sign_up(con: &Console, org: &str) -> String {
    let email = format!("{org}@example.test");
    let out = con.ok(&[
        "--json", "tenant", "signup", "--org", org, "--email", &email,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["api_token"].as_str().unwrap().to_string()
}

#[test]
fn a_tenant_cannot_reach_another_tenants_objects_by_url() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let operator = dir.path().join("operator-token");
    std::fs::write(&operator, "operator-credential-for-the-web-test").unwrap();
    let op = operator.to_str().unwrap();
    let more = [
        "--hosted",
        "--web",
        "192.0.2.254:8443",
        "--operator-token-file",
        op,
    ];
    let con = controller_with(&lab, dir.path(), &data, &more);
    let a_token = sign_up(&con, "tenant-a");
    let a = Some(a_token.as_str());
    con.ok_as(
        a,
        &["network", "create", "anet", "--cidr", "100.64.88.0/24"],
    );
    let join = con.ok_as(a, &["token", "create", "--network", "anet", "--uses", "2"]);
    let node = start_agent(&lab, dir.path(), join.trim(), "pa", 1);
    wait_until("A's agent to enroll", || {
        status(&lab, &node.host.ns, &node.state).is_some()
    });
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend(args);
        serde_json::from_str(&con.ok_as(a, &all)).unwrap()
    };
    let net = json(&["network", "get", "anet"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let peer = json(&["peer", "list", "--network", "anet"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = json(&["token", "list", "--network", "anet"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let paths = [
        format!("/networks/{net}"),
        "/networks/anet".to_string(),
        format!("/networks/{net}/peers"),
        format!("/peers/{peer}/remove"),
        format!("/tokens/{token}/revoke"),
    ];
    // Tenant B signs up on the page, then tries A's objects.
    let mut args = vec!["isolation", "signup"];
    args.extend(paths.iter().map(String::as_str));
    let m = browse(&lab, &args);
    // B exists, signed up on the page, and has nothing.
    let b = m["b_token"].as_str().unwrap();
    let b_nets = con.ok_as(Some(b), &["--json", "network", "list"]);
    assert_eq!(b_nets.trim(), "[]");
    // A's objects are all still there.
    let peers = json(&["peer", "list", "--network", "anet"]);
    assert_eq!(peers.as_array().unwrap().len(), 1);
    assert_eq!(
        json(&["token", "list", "--network", "anet"])[0]["revoked"],
        false
    );

    // The operator suspends A on the tenants page: A's writes are refused; resumed, they work.
    let credential = "operator-credential-for-the-web-test";
    browse(&lab, &["operator", credential, "Suspend", "tenant-a"]);
    let more = ["network", "create", "more", "--cidr", "100.64.89.0/24"];
    assert!(!con.run_as(&a_token, &more).status.success(), "suspended");
    browse(&lab, &["operator", credential, "Resume", "tenant-a"]);
    con.ok_as(a, &more);
}
