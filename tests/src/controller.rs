//! A controller in a lab: `canopy serve` in the hub namespace, the `canopy` console driving it
//! as a user would, and `canopy-agent status` read from a host namespace.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use std::path::PathBuf;

use crate::netns::{Host, Lab, bin};

pub const WAIT: Duration = Duration::from_secs(15);

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `canopy` console, as a user runs it in the hub.
pub struct Console<'a> {
    lab: &'a Lab,
    data: &'a Path,
    /// The `canopy serve` process.
    pub pid: u32,
}

impl Console<'_> {
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let token = std::fs::read_to_string(self.data.join("admin-token")).unwrap_or_default();
        self.run_as(token.trim(), args)
    }

    /// [`Console::run`] with another API token (another tenant's, a read-scope one).
    pub fn run_as(&self, token: &str, args: &[&str]) -> std::process::Output {
        let ca = self.data.join("ca.pem");
        let canopy = bin("canopy");
        let mut cmd = vec![
            canopy.to_str().unwrap(),
            "--server",
            "https://192.0.2.254:7443",
            "--token",
            token,
            "--ca",
            ca.to_str().unwrap(),
        ];
        cmd.extend_from_slice(args);
        self.lab.run(&self.lab.hub, &cmd)
    }
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_as(None, args)
    }

    /// [`Console::ok`] with another API token when `token` is given.
    pub fn ok_as(&self, token: Option<&str>, args: &[&str]) -> String {
        let o = match token {
            Some(t) => self.run_as(t, args),
            None => self.run(args),
        };
        assert!(
            o.status.success(),
            "canopy {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

/// `canopy-agent status --json` for the agent with state dir `state`; `None` when it fails.
pub fn status(lab: &Lab, ns: &str, state: &Path) -> Option<Value> {
    let agent = bin("canopy-agent");
    let o = lab.run(
        ns,
        &[
            agent.to_str().unwrap(),
            "status",
            "--json",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

/// Address `i` of an agent's status, without its prefix length.
pub fn addr(s: &Value, i: usize) -> String {
    s["addresses"][i]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// Starts `canopy serve` in the lab's hub and returns a console for it.
pub fn controller<'a>(lab: &'a Lab, dir: &Path, data: &'a Path) -> Console<'a> {
    controller_with(lab, dir, data, &[])
}

/// [`controller`] with more `serve` flags.
pub fn controller_with<'a>(lab: &'a Lab, dir: &Path, data: &'a Path, more: &[&str]) -> Console<'a> {
    let canopy = bin("canopy");
    let mut args = vec![
        canopy.to_str().unwrap(),
        "serve",
        "--listen",
        "192.0.2.254:7443",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend(more);
    let pid = lab.spawn(&lab.hub, &args, &dir.join("serve.log"));
    let con = Console { lab, data, pid };
    wait_until("the controller", || {
        data.join("admin-token").exists() && con.run(&["network", "list"]).status.success()
    });
    con
}

/// Creates network `name` on `cidr` and a join token for it with `uses` uses: the join string.
pub fn network_with_token(con: &Console, name: &str, cidr: &str, uses: u32) -> String {
    con.ok(&["network", "create", name, "--cidr", cidr]);
    let uses = uses.to_string();
    let join = con.ok(&["token", "create", "--network", name, "--uses", &uses]);
    join.trim().to_string()
}

/// A joined agent in a host namespace of a lab.
pub struct Node {
    pub host: Host,
    pub state: PathBuf,
    pub iface: String,
    /// The agent's process.
    pub pid: u32,
}

/// Starts `canopy-agent join` as `name` on host `n` with interface `<lab id><name>`.
pub fn start_agent(lab: &Lab, dir: &Path, join: &str, name: &str, n: u8) -> Node {
    start_agent_with(lab, dir, join, name, n, &[])
}

/// [`start_agent`] with more `join` flags.
pub fn start_agent_with(
    lab: &Lab,
    dir: &Path,
    join: &str,
    name: &str,
    n: u8,
    extra: &[&str],
) -> Node {
    spawn_agent(lab, dir, join, name, lab.host(n), extra)
}

/// Starts `canopy-agent join` as `name` on an existing host (again: an agent that ran there
/// before resumes with its state).
pub fn spawn_agent(
    lab: &Lab,
    dir: &Path,
    join: &str,
    name: &str,
    host: Host,
    extra: &[&str],
) -> Node {
    spawn_agent_as(lab, dir, join, (name, name), host, extra)
}

/// [`spawn_agent`] with state and interface named after `name`, reporting `hostname`.
pub fn spawn_agent_as(
    lab: &Lab,
    dir: &Path,
    join: &str,
    (name, hostname): (&str, &str),
    host: Host,
    extra: &[&str],
) -> Node {
    let (state, iface) = (dir.join(name), format!("{}{name}", lab.id));
    let agent = bin("canopy-agent");
    let args = [
        agent.to_str().unwrap(),
        "join",
        join,
        "--state-dir",
        state.to_str().unwrap(),
        "--interface",
        &iface,
        "--hostname",
        hostname,
    ];
    let pid = lab.spawn(
        &host.ns,
        &[&args[..], extra].concat(),
        &dir.join(format!("{name}.log")),
    );
    Node {
        host,
        state,
        iface,
        pid,
    }
}

/// The hostnames an agent sees, sorted (`None` when its status cannot be read).
pub fn peers_seen(lab: &Lab, n: &Node) -> Option<Vec<String>> {
    let s = status(lab, &n.host.ns, &n.state)?;
    let peers = s["peers"].as_array()?;
    let mut names: Vec<String> = peers
        .iter()
        .filter_map(|p| Some(p["hostname"].as_str()?.to_string()))
        .collect();
    names.sort();
    Some(names)
}
