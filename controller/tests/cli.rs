//! The `canopy` binary for real: `serve` in a temp data dir, the console against it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_canopy");

struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path) -> Serve {
    serve_with(data, &[])
}

fn serve_with(data: &Path, extra: &[&str]) -> Serve {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("CANOPY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("serve exited before printing its URL")
            .unwrap();
        if let Some(rest) = line.strip_prefix("canopy: controller at ") {
            break rest.split(';').next().unwrap().to_string();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Serve { child, url }
}

fn canopy(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("HOME", home)
        .env_remove("CANOPY_SERVER")
        .env_remove("CANOPY_TOKEN")
        .env_remove("CANOPY_CA")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A failed command prints exactly one line on stderr, starting `canopy: `, and exits non-zero.
fn fails(o: &Output, says: &str) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(
        err.starts_with("canopy: ") && err.contains(says),
        "{err:?} should mention {says:?}"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `--server URL --token TOKEN --ca CA`, as a console invocation starts.
fn connection_args(url: &str, token: &str, ca: &std::path::Path) -> Vec<String> {
    let ca = ca.to_str().unwrap();
    ["--server", url, "--token", token.trim(), "--ca", ca]
        .map(String::from)
        .to_vec()
}

#[test]
fn first_start_creates_ca_and_admin_token_and_the_console_drives_the_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, home) = (tmp.path().join("data"), tmp.path().join("home"));
    let s = serve(&data);
    assert_eq!(mode(&data.join("admin-token")), 0o600);
    assert_eq!(mode(&data.join("ca.key")), 0o600);
    assert_eq!(mode(&data.join("server.key")), 0o600);
    // The store holds e-mails, hostnames and the audit log: owner only, like the dir.
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("store.redb")), 0o600);

    let ca = data.join("ca.pem");
    let token_file = data.join("admin-token");
    let out = ok(&canopy(
        &home,
        &[
            "login",
            "--server",
            &s.url,
            "--ca",
            ca.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("logged in"));
    let config = home.join(".config/canopy/console.toml");
    assert_eq!(mode(&config), 0o600);

    // From here on the console uses only the saved config (CA pinned by hash).
    ok(&canopy(
        &home,
        &[
            "network",
            "create",
            "prod",
            "--cidr",
            "100.64.0.0/24",
            "--cidr",
            "fd7a:1::/64",
        ],
    ));
    let list = ok(&canopy(&home, &["network", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["name"], "prod");
    assert_eq!(v[0]["cidrs"][1], "fd7a:1::/64");
    let table = ok(&canopy(&home, &["network", "list"]));
    assert!(table.starts_with("ID") && table.contains("prod"), "{table}");

    let join = ok(&canopy(
        &home,
        &[
            "token",
            "create",
            "--network",
            "prod",
            "--uses",
            "3",
            "--ttl",
            "1h",
            "--tag",
            "web",
        ],
    ));
    assert!(join.trim().starts_with("canopy1:"), "{join}");
    assert_eq!(
        join.trim().lines().count(),
        1,
        "the join string is one copy-pasteable line"
    );
    let tokens: serde_json::Value =
        serde_json::from_str(&ok(&canopy(&home, &["token", "list", "--json"]))).unwrap();
    assert_eq!(tokens[0]["max_uses"], 3);
    assert_eq!(tokens[0]["tags"][0], "web");
    let id = tokens[0]["id"].as_str().unwrap().to_string();
    ok(&canopy(&home, &["token", "revoke", &id]));
    let tokens: serde_json::Value =
        serde_json::from_str(&ok(&canopy(&home, &["token", "list", "--json"]))).unwrap();
    assert_eq!(tokens[0]["revoked"], true);

    fails(
        &canopy(
            &home,
            &["network", "create", "x", "--cidr", "100.64.0.128/25"],
        ),
        "overlaps",
    );
    fails(&canopy(&home, &["network", "get", "nope"]), "not found");
    fails(
        &canopy(
            &home,
            &["token", "create", "--network", "prod", "--ttl", "3x"],
        ),
        "unknown time unit",
    );
    fails(
        &canopy(
            &home,
            &["--token", "cat_wrong", "peer", "list", "--network", "prod"],
        ),
        "API token is not valid",
    );
    ok(&canopy(&home, &["network", "delete", "prod"]));
    assert_eq!(
        ok(&canopy(&home, &["network", "list", "--json"])).trim(),
        "[]"
    );
}

#[test]
fn the_console_explains_what_is_missing_and_refuses_an_untrusted_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fails(&canopy(&home, &["network", "list"]), "no server");
    fails(
        &canopy(
            &home,
            &["--server", "https://127.0.0.1:1", "network", "list"],
        ),
        "no API token",
    );
    fails(
        &canopy(
            &home,
            &[
                "--server",
                "https://127.0.0.1:1",
                "--token",
                "cat_x",
                "network",
                "list",
            ],
        ),
        "no CA to trust",
    );

    // A controller whose CA is not the one we were given is refused.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let sa = serve(&a);
    let _sb = serve(&b);
    let token = std::fs::read_to_string(a.join("admin-token")).unwrap();
    let other_ca = b.join("ca.pem");
    fails(
        &canopy(
            &home,
            &[
                "--server",
                &sa.url,
                "--token",
                token.trim(),
                "--ca",
                other_ca.to_str().unwrap(),
                "network",
                "list",
            ],
        ),
        "invalid peer certificate",
    );
}

#[test]
fn serve_stops_promptly_on_sigterm_and_keeps_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, home) = (tmp.path().join("data"), tmp.path().join("home"));
    let mut s = serve(&data);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let ca = data.join("ca.pem");
    let conn = |url: &str| connection_args(url, &token, &ca);
    let mut args = conn(&s.url);
    args.extend(["network", "create", "kept", "--cidr", "10.20.0.0/24"].map(String::from));
    ok(&canopy(
        &home,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));

    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful stop exits 0");

    // Same data dir: same admin token, same network.
    let s2 = serve(&data);
    assert_eq!(
        std::fs::read_to_string(data.join("admin-token")).unwrap(),
        token
    );
    let mut args = conn(&s2.url);
    args.extend(["network", "list", "--json"].map(String::from));
    let v: serde_json::Value = serde_json::from_str(&ok(&canopy(
        &home,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )))
    .unwrap();
    assert_eq!(v[0]["name"], "kept");
}

#[test]
fn a_hosted_customer_signs_up_and_works_within_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, home) = (tmp.path().join("data"), tmp.path().join("home"));
    let s = serve_with(&data, &["--hosted"]);
    let ca = data.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let out = ok(&canopy(
        &home,
        &[
            "--server",
            &s.url,
            "--ca",
            ca,
            "tenant",
            "signup",
            "--org",
            "acme",
            "--email",
            "ops@acme.example",
            "--plan",
            "free",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["api_token"].as_str().unwrap().to_string();
    assert_eq!(v["subscription"]["quotas"]["networks"], 3);
    let conn = ["--server", &s.url, "--ca", ca, "--token", &token];
    let run = |args: &[&str]| canopy(&home, &[&conn[..], args].concat());
    for i in 0..3 {
        ok(&run(&[
            "network",
            "create",
            &format!("n{i}"),
            "--cidr",
            &format!("10.{i}.0.0/24"),
        ]));
    }
    fails(
        &run(&["network", "create", "n3", "--cidr", "10.3.0.0/24"]),
        "the free plan allows 3 networks (ResourceExhausted)",
    );
    let usage = ok(&run(&["usage"]));
    assert!(usage.contains("plan free: 3 of 3 networks"), "{usage}");
    ok(&run(&["plan", "set", "team"]));
    assert!(ok(&run(&["plan"])).contains("plan:     team"));
    ok(&run(&["network", "create", "n3", "--cidr", "10.3.0.0/24"]));
    let ro = ok(&run(&[
        "apitoken",
        "create",
        "dashboard",
        "--scope",
        "read",
    ]))
    .trim()
    .to_string();
    let listed = ok(&canopy(
        &home,
        &[
            "--server", &s.url, "--ca", ca, "--token", &ro, "network", "list",
        ],
    ));
    assert!(listed.contains("n3"));
    fails(
        &canopy(
            &home,
            &[
                "--server", &s.url, "--ca", ca, "--token", &ro, "network", "delete", "n3",
            ],
        ),
        "read-only",
    );
    fails(
        &canopy(
            &home,
            &[
                "--server", &s.url, "--ca", ca, "tenant", "signup", "--org", "x", "--email",
                "nope", "--plan", "free",
            ],
        ),
        "not an email address",
    );
}

/// A self-managed admin who revoked (or lost) the admin token gets back in with
/// `serve --reset-admin-token`; the last admin token cannot be revoked to begin with.
#[test]
fn the_last_admin_token_stays_and_reset_admin_token_recovers_a_lost_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, home) = (tmp.path().join("data"), tmp.path().join("home"));
    let s = serve(&data);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let ca = data.join("ca.pem");
    let conn = |url: &str, token: &str| connection_args(url, token, &ca);
    let run = |url: &str, token: &str, rest: &[&str]| {
        let mut a = conn(url, token);
        a.extend(rest.iter().map(|s| s.to_string()));
        canopy(&home, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let list: serde_json::Value =
        serde_json::from_str(&ok(&run(&s.url, &token, &["apitoken", "list", "--json"]))).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    fails(
        &run(&s.url, &token, &["apitoken", "revoke", &id]),
        "last admin API token",
    );
    // A token created without --scope is read-only.
    let created = ok(&run(
        &s.url,
        &token,
        &["apitoken", "create", "ci", "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(v["token"]["scope"], "read", "{created}");
    drop(s);

    // The token file is lost: a restart with --reset-admin-token writes a new one that works.
    std::fs::remove_file(data.join("admin-token")).unwrap();
    let s = serve_with(&data, &["--reset-admin-token"]);
    let new = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert_ne!(new, token);
    assert_eq!(mode(&data.join("admin-token")), 0o600);
    ok(&run(
        &s.url,
        &new,
        &["network", "create", "back", "--cidr", "10.30.0.0/24"],
    ));
}

/// Names a client chose cannot forge lines or rewrite the terminal: refused on the way in,
/// and an error that echoes them prints one escaped line.
#[test]
fn hostile_names_come_back_as_one_escaped_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, home) = (tmp.path().join("data"), tmp.path().join("home"));
    let s = serve(&data);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let ca = data.join("ca.pem");
    let mut args: Vec<String> = vec![
        "--server".into(),
        s.url.clone(),
        "--token".into(),
        token.trim().into(),
        "--ca".into(),
        ca.to_str().unwrap().into(),
    ];
    args.extend(
        [
            "network",
            "create",
            "evil\x1b[2J\r\nforged line",
            "--cidr",
            "10.40.0.0/24",
        ]
        .map(String::from),
    );
    let o = canopy(&home, &args.iter().map(String::as_str).collect::<Vec<_>>());
    fails(&o, "network name");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains('\x1b') && !err.contains('\r'),
        "raw control characters reached the terminal: {err:?}"
    );
    assert!(err.contains("\\x1b"), "shown escaped: {err:?}");
}
