//! A real etcd (`/usr/bin/etcd`, Debian's etcd-server) on free loopback ports with a temporary
//! data dir, killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
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
        let (client, peer) = (free_port(), free_port());
        let curl = format!("http://127.0.0.1:{client}");
        let purl = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
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
            .expect("etcd (Debian package etcd-server) must be installed: deploy/install-deps.sh");
        let endpoint = format!("127.0.0.1:{client}");
        let t = Instant::now();
        while std::net::TcpStream::connect(&endpoint).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            _dir: dir,
            endpoint,
        }
    }

    /// Stops etcd, to test how the controller behaves while it is away.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
