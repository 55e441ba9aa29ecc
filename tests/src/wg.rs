//! The side-by-side harness for `wg`/`wg-quick` scenarios: each runs against wireguard-go
//! (the reference) and canopy-agent, in labs of their own ([`side_by_side`]); [`Pair`] is
//! netns.sh's two configured peers; raw UAPI helpers talk to the socket directly.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use canopy_agent::keys::{self, PrivateKey};

use crate::netns::{Host, Lab, bin};

pub const WAIT: Duration = Duration::from_secs(10);

/// The implementation under test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Impl {
    /// The reference.
    WireguardGo,
    /// canopy-agent with TUN offloads (GSO/GRO) on, its default.
    Canopy,
    /// canopy-agent with TUN offloads off.
    CanopyPlain,
}

pub const ALL: [Impl; 3] = [Impl::WireguardGo, Impl::Canopy, Impl::CanopyPlain];
pub const TWO: [Impl; 2] = [Impl::WireguardGo, Impl::Canopy];

impl Impl {
    /// The command line before `IFACE`: what `WG_QUICK_USERSPACE_IMPLEMENTATION` would run.
    pub fn command(self) -> Vec<String> {
        let agent = bin("canopy-agent").to_string_lossy().into_owned();
        match self {
            Impl::WireguardGo => vec!["wireguard-go".into()],
            Impl::Canopy => vec!["env".into(), "CANOPY_TUN_OFFLOAD=1".into(), agent],
            Impl::CanopyPlain => vec!["env".into(), "CANOPY_TUN_OFFLOAD=0".into(), agent],
        }
    }

    /// Environment for wg-quick to start this implementation.
    pub fn wg_quick_env(self) -> Vec<String> {
        let agent = bin("canopy-agent").to_string_lossy().into_owned();
        match self {
            Impl::WireguardGo => vec!["WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go".into()],
            Impl::Canopy => vec![
                format!("WG_QUICK_USERSPACE_IMPLEMENTATION={agent}"),
                "CANOPY_TUN_OFFLOAD=1".into(),
            ],
            Impl::CanopyPlain => vec![
                format!("WG_QUICK_USERSPACE_IMPLEMENTATION={agent}"),
                "CANOPY_TUN_OFFLOAD=0".into(),
            ],
        }
    }
}

pub type Step = Result<(), String>;

pub fn check(ok: bool, what: impl std::fmt::Display) -> Step {
    if ok { Ok(()) } else { Err(what.to_string()) }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `scenario` against each implementation, each in a lab of its own, and fails naming
/// every implementation and step that failed. The reference must pass too.
pub fn side_by_side(impls: &[Impl], scenario: fn(&Lab, Impl, &Path) -> Step) {
    let mut failed = Vec::new();
    for &imp in impls {
        let lab = Lab::new();
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let result = scenario(&lab, imp, dir.path());
        eprintln!(
            "{imp:?}: {} in {:.1} s",
            if result.is_ok() { "pass" } else { "FAIL" },
            t.elapsed().as_secs_f64()
        );
        if let Err(e) = result {
            let logs: String = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| {
                    let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = body.lines().rev().take(30).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {}\n{}\n", e.path().display(), tail.join("\n"))
                })
                .collect();
            failed.push(format!("{imp:?}: {e}\n{logs}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Two hosts, each with one interface of the implementation under test, configured with `wg`
/// the way netns.sh does: private keys, a preshared key, ports 1 and 2, each the other's peer.
pub struct Pair<'a> {
    pub lab: &'a Lab,
    pub dir: &'a Path,
    pub imp: Impl,
    pub hosts: [Host; 2],
    pub ifaces: [String; 2],
    pub keys: [PrivateKey; 2],
    pub psk: PathBuf,
}

/// Inner addresses of host `i` (0 or 1).
pub fn inner4(i: usize) -> String {
    format!("192.168.241.{}", i + 1)
}
pub fn inner6(i: usize) -> String {
    format!("fd00:241::{}", i + 1)
}
/// Underlay IPv6 address of host `i`.
pub fn outer6(i: usize) -> String {
    format!("fd00:192::{}", i + 1)
}

impl<'a> Pair<'a> {
    pub fn new(lab: &'a Lab, imp: Impl, dir: &'a Path) -> Result<Self, String> {
        let hosts = [lab.host(1), lab.host(2)];
        let ifaces = [format!("{}w1", lab.id), format!("{}w2", lab.id)];
        let psk = dir.join("psk");
        std::fs::write(&psk, PrivateKey::generate().to_base64()).unwrap();
        let pair = Pair {
            lab,
            dir,
            imp,
            hosts,
            ifaces,
            keys: [PrivateKey::generate(), PrivateKey::generate()],
            psk,
        };
        for i in 0..2 {
            let h = &pair.hosts[i];
            pair.ip(
                i,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", outer6(i)),
                    "dev",
                    &h.dev,
                    "nodad",
                ],
            )?;
            pair.start(i)?;
            let key = pair.key_file(&pair.keys[i], &format!("k{i}"));
            let j = 1 - i;
            pair.wg(
                i,
                &[
                    "set",
                    &pair.ifaces[i],
                    "private-key",
                    &key,
                    "listen-port",
                    &(i + 1).to_string(),
                    "peer",
                    &pair.public(j),
                    "preshared-key",
                    pair.psk.to_str().unwrap(),
                    "allowed-ips",
                    &format!("{}/32,{}/128", inner4(j), inner6(j)),
                    "endpoint",
                    &format!("192.0.2.{}:{}", j + 1, j + 1),
                ],
            )?;
            let dev = pair.ifaces[i].as_str();
            let (v4, v6) = (format!("{}/24", inner4(i)), format!("{}/64", inner6(i)));
            pair.ip(i, &["addr", "add", &v4, "dev", dev])?;
            pair.ip(i, &["addr", "add", &v6, "dev", dev, "nodad"])?;
            pair.ip(i, &["link", "set", &pair.ifaces[i], "up"])?;
        }
        Ok(pair)
    }

    /// Starts the implementation in the foreground on host `i` (killed with the lab), and
    /// waits for its UAPI socket.
    pub fn start(&self, i: usize) -> Step {
        let mut cmd = self.imp.command();
        cmd.extend(["-f".to_string(), self.ifaces[i].clone()]);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("{:?}-{i}.log", self.imp));
        self.lab.spawn(&self.hosts[i].ns, &cmd, &log);
        let sock = uapi_path(&self.ifaces[i]);
        let t = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            check(t.elapsed() < WAIT, format!("{:?} did not start", self.imp))?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn public(&self, i: usize) -> String {
        keys::encode(&self.keys[i].public_key())
    }

    pub fn key_file(&self, key: &PrivateKey, name: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, key.to_base64()).unwrap();
        path.to_string_lossy().into_owned()
    }

    pub fn run(&self, i: usize, cmd: &[&str]) -> Result<String, String> {
        let out = self.lab.run(&self.hosts[i].ns, cmd);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("host {i}: {cmd:?} failed: {}", text(&out)))
        }
    }

    pub fn wg(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec!["wg"];
        cmd.extend(args);
        self.run(i, &cmd)
    }

    pub fn ip(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = vec!["ip"];
        cmd.extend(args);
        self.run(i, &cmd)
    }

    /// `wg show IFACE what` on host `i`.
    pub fn show(&self, i: usize, what: &str) -> String {
        self.lab.wg(&self.hosts[i].ns, &self.ifaces[i], what)
    }

    /// One ping of `size` bytes from host `i` to `dst` answers within [`WAIT`].
    pub fn ping(&self, i: usize, dst: &str, size: usize) -> Step {
        let t = Instant::now();
        let size = size.to_string();
        loop {
            let out = self.lab.run(
                &self.hosts[i].ns,
                &["ping", "-c", "1", "-W", "1", "-s", &size, dst],
            );
            if out.status.success() {
                return Ok(());
            }
            if t.elapsed() > WAIT {
                return Err(format!(
                    "host {i}: ping -s {size} {dst} failed: {}",
                    text(&out)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// netns.sh's `tests`: pings both ways over both inner families, then TCP both ways.
    pub fn traffic(&self, size: usize, megabytes: usize) -> Step {
        for (i, j) in [(0, 1), (1, 0)] {
            self.ping(i, &inner4(j), size)?;
            self.ping(i, &inner6(j), size)?;
        }
        for (i, j, dst) in [(0, 1, inner4(1)), (1, 0, inner6(0))] {
            let t = self
                .lab
                .tcp_transfer(&self.hosts[i].ns, &self.hosts[j].ns, &dst, megabytes);
            check(
                t.received == t.sent && t.received_bytes == megabytes << 20,
                format!("TCP {i} → {j} ({dst}) arrived damaged: {}", t.log),
            )?;
        }
        Ok(())
    }

    /// `wg show IFACE transfer` of host `i` for its one peer: (rx, tx).
    pub fn transfer(&self, i: usize) -> (u64, u64) {
        let s = self.show(i, "transfer");
        let f: Vec<u64> = s
            .split_whitespace()
            .skip(1)
            .take(2)
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        (
            f.first().copied().unwrap_or(0),
            f.get(1).copied().unwrap_or(0),
        )
    }

    /// Sets the endpoint host `i` uses for the other.
    pub fn endpoint(&self, i: usize, endpoint: &str) -> Step {
        self.wg(
            i,
            &[
                "set",
                &self.ifaces[i],
                "peer",
                &self.public(1 - i),
                "endpoint",
                endpoint,
            ],
        )?;
        Ok(())
    }
}

pub fn uapi_path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{iface}.sock"))
}

/// Whether one UDP datagram from host `from` reaches a listener on host `to` (bound to `::`,
/// port 1111), sent to `dst`.
pub fn udp_arrives(p: &Pair, from: usize, to: usize, dst: &str) -> bool {
    let mut rx = Command::new("ip")
        .args(["netns", "exec", &p.hosts[to].ns, "python3", "-c"])
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
             s.bind(('::',1111)); print('ready',flush=True); s.settimeout(2)\n\
             try: print(s.recv(10).decode())\n\
             except socket.timeout: print('none')",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(rx.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let _ = p.lab.run(
        &p.hosts[from].ns,
        &[
            "python3",
            "-c",
            &format!(
                "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.sendto(b'X',('{dst}',1111))"
            ),
        ],
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = rx.wait();
    rest.trim() == "X"
}

/// Sends one raw UAPI request and returns the answer.
pub fn uapi(iface: &str, request: &str) -> String {
    let mut s = UnixStream::connect(uapi_path(iface)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the blank line that ends an answer.
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.ends_with(b"\n\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// `get=1` without what moves (handshake times, counters), is random (the port) or ends the
/// answer (errno, the blank line), with the
/// peers in key order and each peer's allowed IPs sorted (wireguard-go lists peers in map
/// order and allowed IPs in trie order).
pub fn normalized_get(iface: &str) -> String {
    let answer = uapi(iface, "get=1\n\n");
    let mut head = Vec::new();
    let mut peers: Vec<Vec<String>> = Vec::new();
    for l in answer.lines() {
        if [
            "last_handshake",
            "rx_bytes",
            "tx_bytes",
            "listen_port",
            "errno=",
        ]
        .iter()
        .any(|p| l.starts_with(p))
            || l.is_empty()
        {
            continue;
        }
        if l.starts_with("public_key=") {
            peers.push(Vec::new());
        }
        match peers.last_mut() {
            Some(p) => p.push(l.to_string()),
            None => head.push(l.to_string()),
        }
    }
    for p in &mut peers {
        p[1..].sort_by_key(|l| l.starts_with("allowed_ip"));
        let first = p
            .iter()
            .position(|l| l.starts_with("allowed_ip"))
            .unwrap_or(p.len());
        p[first..].sort();
    }
    peers.sort();
    let peers: Vec<String> = peers.into_iter().map(|p| p.join(" ")).collect();
    format!("{} | {}", head.join(" "), peers.join(" | "))
}
