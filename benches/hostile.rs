//! Hostile clients against a real `canopy serve` process (the release binary next to this one),
//! measured from outside: the controller's RSS and open descriptors, and what real agents get.
//!
//! 1. 100 Sync streams with one credential that never read (the map of a 1000-peer network).
//! 2. 100 peers, one such stream each.
//! 3. 2,000 Sync calls with garbage credentials while 100 real agents reconnect.
//! 4. 1,000 TCP connections that never start TLS, while a console call is made.
//!
//! `cargo build --release -p canopy-controller -p canopy-benches && target/release/hostile`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use canopy_agent::control::{self, Backoff, ControlClient, NoDataPlane};
use canopy_agent::keys::PrivateKey;
use canopy_agent::state::Enrollment;
use canopy_proto::join::JoinString;
use canopy_proto::transport::{self, Trust};
use canopy_proto::v1::agent_service_client::AgentServiceClient;
use canopy_proto::v1::*;
use tokio::sync::mpsc;

struct Server {
    child: std::process::Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn start(dir: &Path) -> anyhow::Result<Server> {
    use std::io::BufRead as _;
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("canopy");
    let mut child = std::process::Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("CANOPY_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} (build it with --release)", bin.display()))?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let url = loop {
        let line = lines.next().context("serve exited")??;
        if let Some(rest) = line.strip_prefix("canopy: controller at ") {
            break rest.split(';').next().unwrap_or_default().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Server {
        child,
        url,
        dir: dir.to_path_buf(),
    })
}

fn hello() -> SyncRequest {
    SyncRequest {
        msg: Some(sync_request::Msg::Hello(Hello {
            known_revision: 0,
            endpoints: vec![],
            ..Default::default()
        })),
    }
}

/// Opens a Sync stream that never reads; returns what keeps it open, or None if refused.
async fn stuck_stream(
    url: &str,
    pin: [u8; 32],
    credential: &str,
) -> Option<(mpsc::Sender<SyncRequest>, tonic::Streaming<SyncResponse>)> {
    let ch = transport::connect(url, &Trust::Pin(pin)).await.ok()?;
    let mut c = AgentServiceClient::new(ch);
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello()).await.ok()?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().ok()?,
    );
    let s = c.sync(req).await.ok()?.into_inner();
    Some((tx, s))
}

/// A console for `srv`, a network "bench" and an unlimited join token for it.
async fn network_and_token(
    srv: &Server,
) -> anyhow::Result<(canopy_controller::console::Client, JoinString)> {
    let token = std::fs::read_to_string(srv.dir.join("admin-token"))?;
    let ca = std::fs::read(srv.dir.join("ca.pem"))?;
    let mut con =
        canopy_controller::console::connect(&srv.url, &Trust::CaPem(ca), token.trim()).await?;
    let network = CreateNetworkRequest {
        name: "bench".into(),
        cidrs: vec!["100.64.0.0/16".into()],
    };
    con.create_network(network).await?;
    let token = CreateJoinTokenRequest {
        network: "bench".into(),
        max_uses: 0,
        ttl_seconds: 3600,
        tags: vec![],
    };
    let join = con.create_join_token(token).await?.into_inner().join_string;
    Ok((con, JoinString::parse(&join)?))
}

/// Enrolls `n` peers with `join`, 25 at a time.
async fn enroll_many(join: &JoinString, n: usize) -> anyhow::Result<Vec<(Enrollment, NetworkMap)>> {
    let mut peers = Vec::new();
    for chunk in 0..n / 25 {
        let batch: Vec<_> = (0..25)
            .map(|i| {
                let join = join.clone();
                let host = format!("h{chunk}-{i}");
                tokio::spawn(async move {
                    control::enroll(&join, PrivateKey::generate().public_key(), &host).await
                })
            })
            .collect();
        for b in batch {
            peers.push(b.await??);
        }
    }
    Ok(peers)
}

/// Opens a stuck stream for each credential (skipping refused ones); what keeps them open.
async fn stuck_streams<'a>(
    url: &str,
    pin: [u8; 32],
    credentials: impl Iterator<Item = &'a str>,
) -> Vec<(mpsc::Sender<SyncRequest>, tonic::Streaming<SyncResponse>)> {
    let mut held = Vec::new();
    for c in credentials {
        if let Some(s) = stuck_stream(url, pin, c).await {
            held.push(s);
        }
    }
    held
}

/// 4 × 500 Sync calls with garbage credentials: how many were refused.
async fn garbage_flood(url: String, pin: [u8; 32]) -> u32 {
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let url = url.clone();
            tokio::spawn(async move {
                let Ok(ch) = transport::connect(&url, &Trust::Pin(pin)).await else {
                    return 0;
                };
                let mut c = AgentServiceClient::new(ch);
                let mut refused = 0u32;
                for i in 0..500 {
                    let mut req = tonic::Request::new(futures::stream::iter([hello()]));
                    if let Ok(v) = format!("Bearer cpc_junk{w}x{i}").parse() {
                        req.metadata_mut().insert("authorization", v);
                    }
                    if c.sync(req).await.is_err() {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        refused += t.await.unwrap_or(0);
    }
    refused
}

/// Starts real agents for `peers` (for 20 s); how many connected within 10 s, and how many of
/// those were never paced.
async fn real_agents_connect(peers: &[(Enrollment, NetworkMap)]) -> (usize, usize) {
    let mut real = Vec::new();
    for (e, m) in peers {
        let mut c = ControlClient::new(e.clone(), Some(m.clone()), None);
        c.backoff = Backoff::equal(Duration::from_millis(50), Duration::from_secs(1));
        let c = Arc::new(c);
        let c2 = c.clone();
        tokio::spawn(async move {
            let until = tokio::time::sleep(Duration::from_secs(20));
            let _ = c2.run(&mut NoDataPlane, until).await;
        });
        real.push(c);
    }
    let (mut connected, mut first_try) = (0, 0);
    for c in &real {
        let mut rx = c.connected();
        let wait = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c));
        if wait.await.is_ok() {
            connected += 1;
            if c.stats.paced.load(Relaxed) == 0 {
                first_try += 1;
            }
        }
    }
    (connected, first_try)
}

/// 4. 1000 TCP connections that never start TLS, and a console call meanwhile.
async fn silent_connections(
    srv: &Server,
    con: &mut canopy_controller::console::Client,
) -> anyhow::Result<()> {
    let pid = srv.child.id();
    let fds0 = fds(pid);
    let addr: std::net::SocketAddr = srv
        .url
        .trim_start_matches("https://")
        .parse()
        .context("controller address")?;
    let mut silent = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            silent.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_during = fds(pid);
    let t0 = Instant::now();
    let ok = con.list_networks(ListNetworksRequest {}).await.is_ok();
    let call = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let fds_after = fds(pid);
    println!(
        "4. 1000 silent TCP connections: controller fds {fds0} → {fds_during} (handshakes capped) → {fds_after} after the 10 s deadline; a console call meanwhile: {} in {:.1} ms",
        if ok { "ok" } else { "FAILED" },
        call.as_secs_f64() * 1000.0
    );
    drop(silent);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let srv = start(tmp.path())?;
    let pid = srv.child.id();
    let (mut con, join) = network_and_token(&srv).await?;
    let pin = join.ca_sha256;
    let peers = enroll_many(&join, 1000).await?;
    let map_bytes = peers
        .last()
        .map_or(0, |p| prost::Message::encoded_len(&p.1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = status_kb(pid, "VmRSS");
    println!(
        "controller with a 1000-peer network: RSS {} MB, {} fds",
        rss0 / 1024,
        fds(pid)
    );

    // 1. One credential, 100 streams that never read.
    let one = std::iter::repeat_n(peers[0].0.credential.as_str(), 100);
    let held = stuck_streams(&srv.url, pin, one).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = status_kb(pid, "VmRSS");
    println!(
        "1. one credential, 100 stuck streams ({} admitted, the rest paced; map {map_bytes} B): RSS {} MB (+{} MB)",
        held.len(),
        rss1 / 1024,
        (rss1.saturating_sub(rss0)) / 1024
    );
    drop(held);

    // 2. 100 peers, one stuck stream each.
    let each = peers
        .iter()
        .skip(1)
        .take(100)
        .map(|(e, _)| e.credential.as_str());
    let held = stuck_streams(&srv.url, pin, each).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss2 = status_kb(pid, "VmRSS");
    println!(
        "2. 100 peers, one stuck stream each ({} open): RSS {} MB (+{} MB, {} kB per stuck session)",
        held.len(),
        rss2 / 1024,
        rss2.saturating_sub(rss0) / 1024,
        rss2.saturating_sub(rss0) / held.len().max(1) as u64
    );
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. Garbage credentials while real agents reconnect.
    let flood = tokio::spawn(garbage_flood(srv.url.clone(), pin));
    let t0 = Instant::now();
    let (connected, first_try) = real_agents_connect(&peers[200..300]).await;
    let took = t0.elapsed();
    let refused = flood.await?;
    println!(
        "3. 2000 garbage Sync calls ({refused} refused) while 100 real agents reconnect: {connected}/100 connected in {:.2} s, {first_try} of them never paced",
        took.as_secs_f64()
    );

    silent_connections(&srv, &mut con).await?;
    println!("controller peak RSS {} MB", status_kb(pid, "VmHWM") / 1024);
    Ok(())
}
