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

/// Two distinct free ports: both listeners are held until both are known (two calls that each
/// bound and dropped one could return the same port twice).
fn two_free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("free port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    (port(&a), port(&b))
}

impl Etcd {
    /// Starts etcd on two free ports; if another process took one of them before etcd bound
    /// it (etcd then exits), tries again on new ports, three times at most.
    pub fn start() -> Self {
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let ports = two_free_ports();
            let child = spawn(dir.path(), ports);
            let mut etcd = Self {
                child,
                dir,
                ports,
                endpoint: format!("127.0.0.1:{}", ports.0),
            };
            if etcd.ready() {
                return etcd;
            }
            etcd.kill();
        }
        panic!("etcd did not start on free ports three times");
    }

    /// Waits until etcd answers on its client port; false if it exited or took over 20 s.
    fn ready(&mut self) -> bool {
        let t = Instant::now();
        while std::net::TcpStream::connect(&self.endpoint).is_err() {
            if t.elapsed() > Duration::from_secs(20) || !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    fn wait_ready(&mut self) {
        assert!(self.ready(), "etcd did not start");
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
