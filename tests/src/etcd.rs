//! A real etcd (`/usr/bin/etcd`, Debian's etcd-server) on free loopback ports with a temporary
//! data dir, killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Child,
    dir: tempfile::TempDir,
    ports: (u16, u16),
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Etcd {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = (free_port(), free_port());
        let child = spawn(dir.path(), ports);
        let etcd = Self {
            child,
            dir,
            ports,
            endpoint: format!("127.0.0.1:{}", ports.0),
        };
        etcd.wait_ready();
        etcd
    }

    fn wait_ready(&self) {
        let t = Instant::now();
        while std::net::TcpStream::connect(&self.endpoint).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops etcd, to test how the controller behaves while it is away.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.dir.path(), self.ports);
        self.wait_ready();
    }
}

fn spawn(dir: &std::path::Path, (client, peer): (u16, u16)) -> Child {
    let curl = format!("http://127.0.0.1:{client}");
    let purl = format!("http://127.0.0.1:{peer}");
    Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            &curl,
            "--advertise-client-urls",
            &curl,
        ])
        .args([
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
        ])
        .args([
            "--initial-cluster",
            &format!("t={purl}"),
            "--log-level",
            "error",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian package etcd-server) must be installed: deploy/install-deps.sh")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
