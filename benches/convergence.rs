//! Control-plane convergence: N agents (the real control client, all in this process) follow one
//! network on an in-process controller (embedded store, TLS, real gRPC on loopback).
//!
//! Measures, for each change made through the API (a peer enrolls, a peer is removed): the time
//! until each agent has applied it (p50 / p99 / max over agents and changes), the bytes each
//! agent received for it, and the time for all N agents to reconnect after a controller restart.
//!
//! `cargo run --release -p canopy-benches --bin convergence -- --agents 100 --changes 10`

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use canopy_agent::control::{self, Backoff, ControlClient, NoDataPlane};
use canopy_agent::keys::PrivateKey;
use canopy_controller::server::{self, ServeConfig};
use canopy_proto::join::JoinString;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Agents following the network.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Changes to time (each is one enrollment and one removal).
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Give up on any one wait after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// embedded, or etcd (starts /usr/bin/etcd on a free loopback port for the run).
    #[arg(long, default_value = "embedded")]
    store: String,
}

/// CPU seconds this process has used (user + system), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

struct Agent {
    client: Arc<ControlClient>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Waits until every agent's map satisfies `pred`; returns each agent's latency from `t0`.
/// When some do not within `limit`, says what it was waiting for, how many agents are late,
/// which revisions they hold, and where the controller's cache is.
async fn all_apply(
    agents: &[Agent],
    t0: Instant,
    limit: Duration,
    what: &str,
    cache_at: impl Fn() -> i64,
    pred: impl Fn(&canopy_proto::v1::NetworkMap) -> bool + Clone + Send + Sync + 'static,
) -> anyhow::Result<Vec<Duration>> {
    let tasks: Vec<_> = agents
        .iter()
        .map(|a| {
            let mut rx = a.client.maps();
            let pred = pred.clone();
            tokio::spawn(async move {
                tokio::time::timeout(limit, rx.wait_for(|m| m.as_ref().is_some_and(&pred)))
                    .await
                    .ok()?
                    .ok()?;
                Some(t0.elapsed())
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    let mut late = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await? {
            Some(d) => out.push(d),
            None => late.push(i),
        }
    }
    if late.is_empty() {
        return Ok(out);
    }
    let held: Vec<i64> = late
        .iter()
        .map(|&i| {
            agents[i]
                .client
                .maps()
                .borrow()
                .as_ref()
                .map_or(-1, |m| m.revision)
        })
        .collect();
    let no_map = held.iter().filter(|r| **r < 0).count();
    let revs: Vec<i64> = held.iter().copied().filter(|r| *r >= 0).collect();
    let connected = late
        .iter()
        .filter(|&&i| *agents[i].client.connected().borrow())
        .count();
    let paced: u64 = late
        .iter()
        .map(|&i| agents[i].client.stats.paced.load(Relaxed))
        .sum();
    anyhow::bail!(
        "{} of {} agents did not converge within {limit:?} waiting for {what}: {no_map} hold no map, \
         the others revisions {}..{}; {connected} connected, paced {paced} times; controller cache at revision {}",
        late.len(),
        agents.len(),
        revs.iter().min().unwrap_or(&0),
        revs.iter().max().unwrap_or(&0),
        cache_at()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Warnings (agents that lose or cannot reach the controller) go to stderr; CANOPY_LOG
    // sets more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CANOPY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let limit = Duration::from_secs(args.timeout);
    let dir = tempfile::tempdir()?;
    let etcd = (args.store == "etcd").then(canopy_tests::etcd::Etcd::start);
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse()?, dir.path().to_path_buf());
    if let Some(e) = &etcd {
        cfg.store = Some(canopy_controller::server::StoreSpec::Etcd(vec![
            e.endpoint.clone(),
        ]));
    } else {
        anyhow::ensure!(args.store == "embedded", "--store is embedded or etcd");
    }
    let srv = server::spawn(&cfg).await?;
    let port = srv.local_addr.port();
    let ctl = srv.controller.clone();
    let caller = ctl.authenticate_console(&srv.admin_token).await?;
    ctl.create_network(&caller, "bench", &["100.64.0.0/10".into()])
        .await?;
    let (_, join) = ctl
        .create_join_token(&caller, "bench", 0, 3600, &[])
        .await?;
    let join = JoinString::parse(&join)?;

    // Enroll and start N agents, 32 enrollments at a time.
    let t_enroll = Instant::now();
    let mut agents = Vec::with_capacity(args.agents);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for chunk in (0..args.agents).collect::<Vec<_>>().chunks(32) {
        let mut batch = Vec::new();
        for i in chunk {
            let join = join.clone();
            let host = format!("n{i}");
            batch.push(tokio::spawn(async move {
                control::enroll(&join, PrivateKey::generate().public_key(), &host).await
            }));
        }
        for b in batch {
            let (enrollment, map) = b.await??;
            let mut c = ControlClient::new(enrollment, Some(map), None);
            c.backoff = Backoff::equal(Duration::from_millis(100), Duration::from_secs(2));
            let client = Arc::new(c);
            let (c2, mut stop) = (client.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let _ = c2
                    .run(&mut NoDataPlane, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            });
            agents.push(Agent { client });
        }
    }
    let n = args.agents;
    let cache = ctl.cache.clone();
    let cache_at = move || cache.applied();
    all_apply(
        &agents,
        t_enroll,
        limit,
        &format!("all {n} agents to see {} peers", n - 1),
        cache_at.clone(),
        move |m| m.peers.len() == n - 1,
    )
    .await?;
    let initial = t_enroll.elapsed();
    let bytes_before: u64 = agents
        .iter()
        .map(|a| a.client.stats.bytes.load(Relaxed))
        .sum();

    // Timed changes: a new peer enrolls (every agent must see it), then it is removed.
    let cpu0 = cpu_seconds();
    let t_changes = Instant::now();
    let mut add_lat = Vec::new();
    let mut del_lat = Vec::new();
    for k in 0..args.changes {
        let t0 = Instant::now();
        let (e, _) =
            control::enroll(&join, PrivateKey::generate().public_key(), &format!("x{k}")).await?;
        let id = e.peer_id.clone();
        add_lat.extend(
            all_apply(
                &agents,
                t0,
                limit,
                &format!("peer {} to be added", e.peer_id),
                cache_at.clone(),
                move |m| m.peers.iter().any(|p| p.peer_id == id),
            )
            .await?,
        );
        let t0 = Instant::now();
        ctl.remove_peer(&caller, &e.peer_id).await?;
        let id = e.peer_id.clone();
        del_lat.extend(
            all_apply(
                &agents,
                t0,
                limit,
                &format!("peer {} to be removed", e.peer_id),
                cache_at.clone(),
                move |m| m.peers.iter().all(|p| p.peer_id != id),
            )
            .await?,
        );
    }
    let change_cpu = (cpu_seconds() - cpu0) / t_changes.elapsed().as_secs_f64();
    let bytes_after: u64 = agents
        .iter()
        .map(|a| a.client.stats.bytes.load(Relaxed))
        .sum();
    let full_before: u64 = agents
        .iter()
        .map(|a| a.client.stats.full_maps.load(Relaxed))
        .sum();

    // Restart the controller on the same data dir and port: time until all N are back.
    let connects_before: Vec<u64> = agents
        .iter()
        .map(|a| a.client.stats.connects.load(Relaxed))
        .collect();
    drop(ctl); // our handle on the controller would keep its store open
    srv.stop().await?;
    let t_restart = Instant::now();
    let srv = server::spawn(&ServeConfig {
        listen: format!("127.0.0.1:{port}").parse()?,
        ..cfg
    })
    .await?;
    let deadline = Instant::now() + limit;
    loop {
        let back = agents
            .iter()
            .zip(&connects_before)
            .filter(|(a, c)| {
                a.client.stats.connects.load(Relaxed) > **c && *a.client.connected().borrow()
            })
            .count();
        if back == n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {back} of {n} agents reconnected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reconnect = t_restart.elapsed();
    let full_after: u64 = agents
        .iter()
        .map(|a| a.client.stats.full_maps.load(Relaxed))
        .sum();

    add_lat.sort();
    del_lat.sort();
    let changes = (2 * args.changes) as u64;
    let rss = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        .unwrap_or_default();
    println!(
        "convergence: {n} agents, {} changes, {} store",
        args.changes * 2,
        args.store
    );
    println!("  initial enroll + converge     {}", ms(initial));
    println!(
        "  peer added    → all applied   p50 {}  p99 {}  max {}",
        ms(pct(&add_lat, 0.5)),
        ms(pct(&add_lat, 0.99)),
        ms(*add_lat.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  peer removed  → all applied   p50 {}  p99 {}  max {}",
        ms(pct(&del_lat, 0.5)),
        ms(pct(&del_lat, 0.99)),
        ms(*del_lat.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  bytes per agent per change    {:.0} B (full map at this size: {} B)",
        (bytes_after - bytes_before) as f64 / (changes * n as u64) as f64,
        agents[0]
            .client
            .maps()
            .borrow()
            .as_ref()
            .map_or(0, prost::Message::encoded_len)
    );
    println!(
        "  restart → all {n} reconnected  {} ({} full maps resent)",
        ms(reconnect),
        full_after - full_before
    );
    println!(
        "  process peak RSS              {} kB (controller + all agents)",
        rss
    );
    println!(
        "  CPU during the changes        {:.0} % of one core (controller + all agents)",
        change_cpu * 100.0
    );
    let _ = stop_tx.send(true);
    srv.stop().await?;
    Ok(())
}
