//! Network-namespace test hosts. A [`Lab`] makes a hub namespace with a bridge and host
//! namespaces joined to it by veth pairs, addressed in 192.0.2.0/24 (the hub is .254). Every
//! process it starts is killed, and every namespace it made deleted, when it is dropped.
//! Needs root (CI runs as root); traffic stays inside the namespaces it made.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A built binary of this workspace (`canopy`, `canopy-agent`), next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --bins` (cargo test --workspace does)",
        path.display()
    );
    path
}

pub struct Lab {
    /// Short unique prefix for namespace, interface and socket names.
    pub id: String,
    pub hub: String,
    hosts: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
}

/// A host namespace on the lab's bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub ip: String,
    /// The host-side veth.
    pub dev: String,
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Lab {
    pub fn new() -> Self {
        let uid = String::from_utf8(Command::new("id").arg("-u").output().expect("id").stdout)
            .unwrap_or_default();
        assert_eq!(
            uid.trim(),
            "0",
            "namespace tests need root (CI runs as root)"
        );
        let id = format!(
            "c{}{}",
            std::process::id() % 1000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{id}hub");
        sh(&["ip", "netns", "add", &hub]);
        sh(&["ip", "-n", &hub, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            &hub,
            "addr",
            "add",
            "192.0.2.254/24",
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        Self {
            id,
            hub,
            hosts: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        }
    }

    /// Adds host number `n` (1..=200) at 192.0.2.n.
    pub fn host(&self, n: u8) -> Host {
        let ns = format!("{}h{n}", self.id);
        let (a, b) = (format!("{}a{n}", self.id), format!("{}b{n}", self.id));
        sh(&["ip", "netns", "add", &ns]);
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ns.clone());
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
        sh(&["ip", "link", "set", &a, "netns", &ns]);
        sh(&["ip", "link", "set", &b, "netns", &self.hub]);
        sh(&[
            "ip", "-n", &self.hub, "link", "set", &b, "master", "br0", "up",
        ]);
        let ip = format!("192.0.2.{n}");
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &a,
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &a, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        Host { ns, ip, dev: a }
    }

    /// Runs a command in a namespace and waits for it.
    pub fn run(&self, ns: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// Starts a long-running command in a namespace (killed when the lab is dropped).
    pub fn spawn(&self, ns: &str, cmd: &[&str], log: &std::path::Path) -> u32 {
        let f = std::fs::File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .env("CANOPY_LOG", "info")
            .stdout(Stdio::from(f.try_clone().expect("log")))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        pid
    }

    /// Stops a process started with [`spawn`](Self::spawn) (SIGTERM, then waits).
    pub fn stop(&self, pid: u32) {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let mut kids = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = kids.iter().position(|c| c.id() == pid) {
            let mut c = kids.remove(i);
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether `dst` answers one ping from `ns` within `within`, retrying.
    pub fn ping(&self, ns: &str, dst: &str, within: Duration) -> bool {
        self.ping_from(ns, None, dst, within)
    }

    pub fn ping_from(&self, ns: &str, src: Option<&str>, dst: &str, within: Duration) -> bool {
        let t = Instant::now();
        loop {
            let mut cmd = vec!["ping", "-c", "1", "-W", "1"];
            if let Some(s) = src {
                cmd.extend(["-I", s]);
            }
            cmd.push(dst);
            if self.run(ns, &cmd).status.success() {
                return true;
            }
            if t.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `wg show <iface> <what>` inside a namespace.
    pub fn wg(&self, ns: &str, iface: &str, what: &str) -> String {
        let out = self.run(ns, &["wg", "show", iface, what]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let hosts: Vec<String> = self
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for ns in hosts.iter().chain(std::iter::once(&self.hub)) {
            // Anything still running in the namespace goes with it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
