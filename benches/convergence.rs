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

#[path = "convergence_lock.rs"]
mod lock;

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
    /// Run under an access policy of this many rules (every agent tagged web and db; all but
    /// the last rule name ports, the last lets everyone reach everyone), and time policy
    /// changes too.
    #[arg(long, default_value_t = 0)]
    policy_rules: usize,
    /// Lock the network first (tenant-signed membership): every agent joins with a presigned
    /// join string, every peer in every map is verified.
    #[arg(long)]
    lock: bool,
}

/// A policy of `rules` rules: web → db on one port each (shifted by `shift`), then `*` → `*`.
fn bench_policy(rules: usize, shift: usize) -> String {
    let mut text = String::from("tags = [\"web\", \"db\"]\n");
    for i in 1..rules {
        let port = 10_000 + i + shift;
        text += &format!(
            "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n"
        );
    }
    text + "[[rule]]\nname = \"everyone\"\nfrom = [\"*\"]\nto = [\"*\"]\n"
}

/// `count` policy changes (the ports shift by one each time): how long until every agent has
/// applied each, sorted.
async fn policy_changes(
    ctl: &canopy_controller::service::Controller,
    caller: &canopy_controller::service::Caller,
    agents: &[Agent],
    (rules, count): (usize, usize),
    limit: Duration,
    cache_at: impl Fn() -> i64 + Clone,
) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::new();
    for k in 0..count {
        let t0 = Instant::now();
        let text = bench_policy(rules, k + 1);
        let (p, _) = ctl
            .set_policy(caller, "bench", Some(&text), None, None)
            .await?;
        let what = format!("policy revision {}", p.revision);
        let pred = move |m: &canopy_proto::v1::NetworkMap| m.revision >= p.revision;
        lat.extend(all_apply(agents, t0, limit, &what, cache_at.clone(), pred).await?);
    }
    lat.sort();
    Ok(lat)
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

/// The sum of one counter over all agents.
fn total(agents: &[Agent], counter: impl Fn(&control::SyncStats) -> u64) -> u64 {
    agents.iter().map(|a| counter(&a.client.stats)).sum()
}

/// Enrolls and starts `n` agents with `join`, 32 enrollments at a time; they run until `stop`.
async fn enroll_agents(
    join: &JoinString,
    n: usize,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| {
                let (join, host) = (join.clone(), format!("n{i}"));
                tokio::spawn(async move {
                    control::enroll(&join, PrivateKey::generate().public_key(), &host).await
                })
            })
            .collect();
        for b in batch {
            let (enrollment, map) = b.await??;
            let mut c = ControlClient::new(enrollment, Some(map), None);
            // Sessions are needed anyway; under the lock, Hello carries the presigned
            // membership (see `lock::follow`).
            c.backoff = Backoff::equal(Duration::from_millis(100), Duration::from_secs(2));
            let client = Arc::new(c);
            let (c2, mut stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let until = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                let _ = c2.run(&mut NoDataPlane, until).await;
            });
            agents.push(Agent { client });
        }
    }
    Ok(agents)
}

/// What the timed changes measured.
struct Changes {
    add: Vec<Duration>,
    del: Vec<Duration>,
    /// Share of one core the process used meanwhile.
    cpu: f64,
}

/// `count` times: a new peer enrolls (every agent must see it; under the lock its own session
/// presents its presigned membership first), then it is removed (every agent must see that).
/// Latencies sorted.
async fn timed_changes(
    ctl: &canopy_controller::service::Controller,
    caller: &canopy_controller::service::Caller,
    (join, lock): (&JoinString, Option<&tokio::sync::watch::Receiver<bool>>),
    agents: &[Agent],
    count: usize,
    limit: Duration,
    cache_at: impl Fn() -> i64 + Clone,
) -> anyhow::Result<Changes> {
    let (cpu0, t) = (cpu_seconds(), Instant::now());
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for k in 0..count {
        let t0 = Instant::now();
        let peer_id = lock::enroll_one(join, &format!("x{k}"), lock).await?;
        let id = peer_id.clone();
        let what = format!("peer {id} to be added");
        let pred = move |m: &canopy_proto::v1::NetworkMap| m.peers.iter().any(|p| p.peer_id == id);
        add.extend(all_apply(agents, t0, limit, &what, cache_at.clone(), pred).await?);
        let t0 = Instant::now();
        ctl.remove_peer(caller, &peer_id).await?;
        let id = peer_id;
        let what = format!("peer {id} to be removed");
        let pred = move |m: &canopy_proto::v1::NetworkMap| m.peers.iter().all(|p| p.peer_id != id);
        del.extend(all_apply(agents, t0, limit, &what, cache_at.clone(), pred).await?);
    }
    add.sort();
    del.sort();
    let cpu = (cpu_seconds() - cpu0) / t.elapsed().as_secs_f64();
    Ok(Changes { add, del, cpu })
}

/// Waits until every agent has connected again since `connects_before` was taken.
async fn all_reconnected(
    agents: &[Agent],
    connects_before: &[u64],
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let back = agents
            .iter()
            .zip(connects_before)
            .filter(|(a, c)| {
                a.client.stats.connects.load(Relaxed) > **c && *a.client.connected().borrow()
            })
            .count();
        if back == agents.len() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {back} of {} agents reconnected",
            agents.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Peak resident set of this process, as /proc says it (kB).
fn peak_rss_kb() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default()
}

/// The figures of one run.
struct Report {
    initial: Duration,
    changes: Changes,
    bytes_per_change: f64,
    full_map_bytes: usize,
    reconnect: Duration,
    full_maps_resent: u64,
    /// Policy change → all applied, when run under a policy.
    policy: Vec<Duration>,
    /// Under the lock: what an agent spends verifying one full map, and its peers.
    verify: Option<(Duration, usize)>,
}

fn print_report(args: &Args, r: &Report) {
    let (n, c) = (args.agents, &r.changes);
    let line = |what: &str, l: &[Duration]| {
        let max = *l.last().unwrap_or(&Duration::ZERO);
        println!(
            "  {what} → all applied   p50 {}  p99 {}  max {}",
            ms(pct(l, 0.5)),
            ms(pct(l, 0.99)),
            ms(max)
        );
    };
    println!(
        "convergence: {n} agents, {} changes, {} store{}",
        args.changes * 2,
        args.store,
        if args.lock { ", network locked" } else { "" }
    );
    println!("  initial enroll + converge     {}", ms(r.initial));
    line("peer added   ", &c.add);
    line("peer removed ", &c.del);
    if args.policy_rules > 0 {
        println!("  under a {}-rule policy", args.policy_rules);
        line("policy change", &r.policy);
    }
    println!(
        "  bytes per agent per change    {:.0} B (full map at this size: {} B)",
        r.bytes_per_change, r.full_map_bytes
    );
    println!(
        "  restart → all {n} reconnected  {} ({} full maps resent)",
        ms(r.reconnect),
        r.full_maps_resent
    );
    println!(
        "  process peak RSS              {} kB (controller + all agents)",
        peak_rss_kb()
    );
    println!(
        "  CPU during the changes        {:.0} % of one core (controller + all agents)",
        c.cpu * 100.0
    );
    if let Some((cost, peers)) = r.verify {
        println!(
            "  lock: one full map verified   {} ({peers} peers, {:.0} µs each)",
            ms(cost),
            cost.as_secs_f64() * 1e6 / peers.max(1) as f64
        );
    }
}

/// The controller's configuration for store `store` in `dir`; for etcd, the etcd process too
/// (stopped on drop).
fn serve_config(
    store: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(ServeConfig, Option<canopy_tests::etcd::Etcd>)> {
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse()?, dir.to_path_buf());
    match store {
        "embedded" => Ok((cfg, None)),
        "etcd" => {
            let etcd = canopy_tests::etcd::Etcd::start();
            cfg.store = Some(server::StoreSpec::Etcd(vec![etcd.endpoint.clone()]));
            Ok((cfg, Some(etcd)))
        }
        _ => anyhow::bail!("--store is embedded or etcd"),
    }
}

/// Logs warnings (agents that lose or cannot reach the controller) to stderr; CANOPY_LOG sets
/// more.
fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CANOPY_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The admin's handle on `srv`, a network "bench" (under a policy of `rules` rules, if any)
/// and a join string for it that tags its peers web and db.
async fn prepare(
    srv: &server::Running,
    rules: usize,
    locked: bool,
) -> anyhow::Result<(
    canopy_controller::service::Controller,
    canopy_controller::service::Caller,
    JoinString,
)> {
    let ctl = srv.controller.clone();
    let caller = ctl.authenticate_console(&srv.admin_token).await?;
    ctl.create_network(&caller, "bench", &["100.64.0.0/10".into()])
        .await?;
    if rules > 0 {
        let text = bench_policy(rules, 0);
        ctl.set_policy(&caller, "bench", Some(&text), None, None)
            .await?;
    }
    let tags = ["web".to_string(), "db".to_string()];
    if locked {
        let join = lock::presigned_join(&ctl, &caller, &tags).await?;
        return Ok((ctl, caller, join));
    }
    let (_, join) = ctl
        .create_join_token(&caller, "bench", 0, 3600, &tags)
        .await?;
    Ok((ctl, caller, JoinString::parse(&join)?))
}

/// Stops the controller and starts it again on the same data dir and port: the new one, and
/// the time until every agent is back.
async fn restart(
    srv: server::Running,
    cfg: ServeConfig,
    agents: &[Agent],
    limit: Duration,
) -> anyhow::Result<(server::Running, Duration)> {
    let port = srv.local_addr.port();
    let connects_before: Vec<u64> = agents
        .iter()
        .map(|a| a.client.stats.connects.load(Relaxed))
        .collect();
    srv.stop().await?;
    let t = Instant::now();
    let listen = format!("127.0.0.1:{port}").parse()?;
    let srv = server::spawn(&ServeConfig { listen, ..cfg }).await?;
    all_reconnected(agents, &connects_before, limit).await?;
    Ok((srv, t.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging();
    let limit = Duration::from_secs(args.timeout);
    let dir = tempfile::tempdir()?;
    let (cfg, _etcd) = serve_config(&args.store, dir.path())?;
    let srv = server::spawn(&cfg).await?;
    let (ctl, caller, join) = prepare(&srv, args.policy_rules, args.lock).await?;

    let t_enroll = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agents = enroll_agents(&join, args.agents, &stop_rx).await?;
    let n = args.agents;
    let cache = ctl.cache.clone();
    let cache_at = move || cache.applied();
    let what = format!("all {n} agents to see {} peers", n - 1);
    all_apply(
        &agents,
        t_enroll,
        limit,
        &what,
        cache_at.clone(),
        move |m| m.peers.len() == n - 1,
    )
    .await?;
    let initial = t_enroll.elapsed();

    let bytes_before = total(&agents, |s| s.bytes.load(Relaxed));
    let changes = timed_changes(
        &ctl,
        &caller,
        (&join, args.lock.then_some(&stop_rx)),
        &agents,
        args.changes,
        limit,
        cache_at.clone(),
    )
    .await?;
    let bytes = total(&agents, |s| s.bytes.load(Relaxed)) - bytes_before;
    let policy = match args.policy_rules {
        0 => Vec::new(),
        rules => {
            policy_changes(
                &ctl,
                &caller,
                &agents,
                (rules, args.changes),
                limit,
                cache_at,
            )
            .await?
        }
    };
    let full_before = total(&agents, |s| s.full_maps.load(Relaxed));
    drop(ctl); // our handle on the controller would keep its store open
    let (srv, reconnect) = restart(srv, cfg, &agents, limit).await?;

    let held = agents[0].client.maps().borrow().clone().unwrap_or_default();
    let full_map_bytes = prost::Message::encoded_len(&held);
    let verify = args
        .lock
        .then(|| (lock::verify_cost(&held), held.peers.len()));
    print_report(
        &args,
        &Report {
            initial,
            bytes_per_change: bytes as f64 / (2 * args.changes * n) as f64,
            full_map_bytes,
            reconnect,
            full_maps_resent: total(&agents, |s| s.full_maps.load(Relaxed)) - full_before,
            changes,
            policy,
            verify,
        },
    );
    let _ = stop_tx.send(true);
    srv.stop().await?;
    Ok(())
}
