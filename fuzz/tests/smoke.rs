//! A short burst of every fuzz target (CI), and every committed regression input replayed:
//! none may panic. The long runs are `cargo run --release -p canopy-fuzz --bin fuzz`.
#![allow(clippy::unwrap_used)]

/// Inputs per target in CI: a few seconds in a debug build.
const SMOKE: u64 = 3_000;

#[test]
fn every_target_survives_a_burst_of_mutated_inputs() {
    for t in canopy_fuzz::TARGETS {
        let crashes = canopy_fuzz::run(t, SMOKE, 7, &[], 5);
        assert!(
            crashes.is_empty(),
            "{}: {} crashing inputs, first {:02x?}",
            t.name,
            crashes.len(),
            &crashes[0][..crashes[0].len().min(64)]
        );
    }
}

#[test]
fn committed_regression_inputs_do_not_crash() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for t in canopy_fuzz::TARGETS {
        let Ok(entries) = std::fs::read_dir(dir.join(t.name)) else {
            continue;
        };
        for e in entries {
            let input = std::fs::read(e.unwrap().path()).unwrap();
            (t.run)(&input);
            replayed += 1;
        }
    }
    println!("replayed {replayed} regression inputs");
}

#[test]
fn the_tunnel_target_really_crosses_the_tunnel() {
    // Otherwise the fuzzer would only ever exercise the "no session" path.
    let seeds = canopy_fuzz::target("engine_tunnel")
        .map(|t| (t.seeds)())
        .unwrap();
    let (at_b, _) = canopy_fuzz::tunnel_roundtrip(&seeds[0]);
    assert_eq!(at_b, 1, "a packet from A's address reaches B's TUN");
    let (at_b, _) = canopy_fuzz::tunnel_roundtrip(&seeds[1]);
    assert_eq!(
        at_b, 0,
        "a packet with a source outside A's allowed IPs is dropped at B"
    );
}
