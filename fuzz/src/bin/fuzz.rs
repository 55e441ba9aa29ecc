//! Runs the fuzz targets: `cargo run --release -p canopy-fuzz --bin fuzz -- [TARGET|all]
//! [INPUTS] [SEED]` (default: all, 10,000,000 inputs each). Prints inputs run, rate and
//! crashes per target; each crashing input is written to `fuzz/crashes/<target>-<sha256>`,
//! to be committed under `fuzz/regressions/<target>/` with the fix.
#![allow(clippy::print_stdout)]

use std::time::Instant;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("all", String::as_str);
    let n: u64 = args
        .get(1)
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(10_000_000);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let targets: Vec<_> = canopy_fuzz::TARGETS
        .iter()
        .filter(|t| which == "all" || t.name == which)
        .collect();
    if targets.is_empty() {
        let names: Vec<_> = canopy_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!(
            "fuzz: unknown target {which:?}; targets: all, {}",
            names.join(", ")
        );
        return std::process::ExitCode::FAILURE;
    }
    // Panics are what we look for: keep them off the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes");
    let mut total = 0;
    for t in targets {
        let start = Instant::now();
        let crashes = canopy_fuzz::run(t, n, seed, &[], 100);
        let secs = start.elapsed().as_secs_f64();
        for c in &crashes {
            use sha2::Digest as _;
            let _ = std::fs::create_dir_all(&out);
            let name = format!("{}-{}", t.name, hex::encode(&sha2::Sha256::digest(c)[..8]));
            let _ = std::fs::write(out.join(name), c);
        }
        println!(
            "{:<16} {:>12} inputs  {:>8.0}/s  {:>6.1} s  crashes: {}",
            t.name,
            n,
            n as f64 / secs,
            secs,
            crashes.len()
        );
        total += crashes.len();
    }
    if total > 0 {
        println!("crashing inputs written to {}", out.display());
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
