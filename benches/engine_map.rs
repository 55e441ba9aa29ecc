//! How long the agent's engine takes to apply a full network map of N peers (each with an IPv4
//! /32 and an IPv6 /128): first as new peers, then again as an update of all of them (what a
//! full map after a reconnect does). Pure CPU, no I/O.
//!   cargo run --release -p canopy-benches --bin engine_map -- 1000 10000

use std::time::Instant;

use canopy_agent::engine::{Engine, PeerConfig};

fn config(i: u32) -> PeerConfig {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&i.to_be_bytes());
    key[31] = 1;
    PeerConfig {
        public_key: key,
        preshared_key: None,
        endpoint: Some(
            format!("192.0.2.1:{}", 1024 + i % 60000)
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        ),
        allowed_ips: vec![
            format!("100.{}.{}.{}/32", 64 + (i >> 16), (i >> 8) & 255, i & 255)
                .parse()
                .unwrap_or_else(|_| unreachable!()),
            format!("fd00::{:x}/128", i)
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        ],
        persistent_keepalive: Some(25),
    }
}

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    println!("peers    add all (ms)  update all (ms)  per peer (µs)");
    for n in sizes {
        let mut e = Engine::new([7; 32]);
        let t = Instant::now();
        for i in 0..n {
            e.set_peer(config(i));
        }
        let add = t.elapsed();
        let t = Instant::now();
        for i in 0..n {
            e.set_peer(config(i));
        }
        let update = t.elapsed();
        println!(
            "{n:<8} {:>12.1}  {:>15.1}  {:>13.2}",
            add.as_secs_f64() * 1e3,
            update.as_secs_f64() * 1e3,
            update.as_secs_f64() * 1e6 / f64::from(n)
        );
    }
}
