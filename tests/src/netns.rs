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

    /// Runs a command in a namespace that must succeed (else the test fails with its stderr).
    pub fn ok(&self, ns: &str, cmd: &[&str]) {
        let out = self.run(ns, cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

    /// Sends `megabytes` of pseudo-random data over one TCP connection from `from_ns` to
    /// `to_addr` (a listener started in `to_ns`), and reports what arrived and how the sending
    /// socket saw the path.
    pub fn tcp_transfer(
        &self,
        from_ns: &str,
        to_ns: &str,
        to_addr: &str,
        megabytes: usize,
    ) -> Transfer {
        static PORT: AtomicUsize = AtomicUsize::new(0);
        let port = (5301 + PORT.fetch_add(1, Ordering::Relaxed) % 500).to_string();
        let server = Command::new("ip")
            .args(["netns", "exec", to_ns, "python3", "-c", TCP_SINK, &port])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 (TCP sink)");
        let client = self.run(
            from_ns,
            &[
                "python3",
                "-c",
                TCP_SOURCE,
                to_addr,
                &port,
                &megabytes.to_string(),
            ],
        );
        let server = server.wait_with_output().expect("TCP sink");
        let text = |o: &Output| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        let (c, s) = (text(&client), text(&server));
        let field = |t: &str, i: usize| t.split_whitespace().nth(i).unwrap_or("?").to_string();
        Transfer {
            sent: field(&c, 0),
            received: field(&s, 0),
            received_bytes: field(&s, 1).parse().unwrap_or(0),
            retransmits: field(&c, 1).parse().unwrap_or(u32::MAX),
            reordering: field(&c, 2).parse().unwrap_or(u32::MAX),
            log: format!("source: {c}\nsink: {s}"),
        }
    }

    /// Sends `count` UDP datagrams of varied sizes (up to `max_len` bytes) from `from_ns` to
    /// `to_addr`, a receiver in `to_ns`; returns (intact, damaged) as the receiver counted
    /// them: every datagram carries its sequence number and content derived from it.
    pub fn udp_datagrams(
        &self,
        from_ns: &str,
        to_ns: &str,
        to_addr: &str,
        count: usize,
        max_len: usize,
    ) -> (usize, usize, String) {
        static PORT: AtomicUsize = AtomicUsize::new(0);
        let port = (5901 + PORT.fetch_add(1, Ordering::Relaxed) % 90).to_string();
        let (count, max_len) = (count.to_string(), max_len.to_string());
        let sink = Command::new("ip")
            .args(["netns", "exec", to_ns, "python3", "-c"])
            .arg(format!("{UDP_GEN}{UDP_SINK}"))
            .args([&port, &max_len])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 (UDP sink)");
        std::thread::sleep(Duration::from_millis(300));
        let source = self.run(
            from_ns,
            &[
                "python3",
                "-c",
                &format!("{UDP_GEN}{UDP_SOURCE}"),
                to_addr,
                &port,
                &count,
                &max_len,
            ],
        );
        let sink = sink.wait_with_output().expect("UDP sink");
        let out = String::from_utf8_lossy(&sink.stdout).into_owned();
        let mut f = out
            .split_whitespace()
            .map(|n| n.parse().unwrap_or(usize::MAX));
        let (ok, bad) = (f.next().unwrap_or(0), f.next().unwrap_or(usize::MAX));
        let log = format!(
            "source: {}{}\nsink: {out}{}",
            String::from_utf8_lossy(&source.stdout),
            String::from_utf8_lossy(&source.stderr),
            String::from_utf8_lossy(&sink.stderr)
        );
        (ok, bad, log)
    }

    /// `wg show <iface> <what>` inside a namespace.
    pub fn wg(&self, ns: &str, iface: &str, what: &str) -> String {
        let out = self.run(ns, &["wg", "show", iface, what]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// What [`Lab::tcp_transfer`] saw.
#[derive(Debug)]
pub struct Transfer {
    /// SHA-256 of what was sent and of what arrived.
    pub sent: String,
    pub received: String,
    pub received_bytes: usize,
    /// The sender's `tcpi_total_retrans` and `tcpi_reordering` (the kernel raises the latter
    /// above `net.ipv4.tcp_reordering`, 3, when it sees segments arrive out of order).
    pub retransmits: u32,
    pub reordering: u32,
    pub log: String,
}

/// Accepts one connection on the port in argv[1] (IPv4 and IPv6), reads to the end and
/// prints the SHA-256 and the length of what arrived.
const TCP_SINK: &str = r#"
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen(1); s.settimeout(30)
c, _ = s.accept(); c.settimeout(30)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(h.hexdigest(), n)
"#;

/// Connects to argv[1]:argv[2] (retrying while the sink starts), sends argv[3] MiB of
/// seeded pseudo-random bytes, and prints their SHA-256, tcpi_total_retrans, tcpi_reordering.
const TCP_SOURCE: &str = r#"
import hashlib, random, socket, struct, sys, time
r = random.Random(7)
data = b"".join(r.randbytes(1 << 20) for _ in range(int(sys.argv[3])))
deadline = time.time() + 10
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.1)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
u32 = struct.unpack("=8x24I", info)
print(hashlib.sha256(data).hexdigest(), u32[23], u32[20])
"#;

/// The content of datagram `i` of [`Lab::udp_datagrams`]: its number, then bytes derived from
/// it, of a length that cycles through small, medium and full-size datagrams.
const UDP_GEN: &str = r#"
import hashlib, struct
def gen(i, max_len):
    n = [1, 64, 700, max_len][i % 4]
    body = hashlib.sha256(struct.pack("!I", i)).digest() * (max_len // 32 + 1)
    return (struct.pack("!I", i) + body)[:max(n, 4)]
"#;

/// Receives on the port in argv[1] (datagrams of up to argv[2] bytes) until 2 s pass without
/// one; prints how many are exactly what was sent and how many are not.
const UDP_SINK: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("::", int(sys.argv[1])))
max_len = int(sys.argv[2])
s.settimeout(10)
ok = bad = 0
while True:
    try:
        d = s.recv(65536)
    except socket.timeout:
        break
    s.settimeout(2)
    if len(d) >= 4 and d == gen(struct.unpack("!I", d[:4])[0], max_len):
        ok += 1
    else:
        bad += 1
print(ok, bad)
"#;

/// Sends argv[3] datagrams of up to argv[4] bytes to argv[1]:argv[2], pausing briefly every
/// 64 so a receiver that is not the tunnel's bottleneck keeps up.
const UDP_SOURCE: &str = r#"
import socket, sys, time
c = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
max_len = int(sys.argv[4])
for i in range(int(sys.argv[3])):
    c.sendto(gen(i, max_len), (sys.argv[1], int(sys.argv[2])))
    if i % 64 == 63:
        time.sleep(0.002)
print("sent", sys.argv[3])
"#;

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
