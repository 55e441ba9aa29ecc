#!/usr/bin/env bash
# Runs every fuzz target (fuzz/src/lib.rs) for INPUTS mutated inputs each (default 10 million),
# in a release build. Not part of CI (CI runs fuzz/tests/smoke.rs: a short burst of each, and
# the committed regression inputs). Crashing inputs land in fuzz/crashes/.
#   bash benches/fuzz.sh [TARGET|all] [INPUTS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p canopy-fuzz --bin fuzz
exec ./target/release/fuzz "${1:-all}" "${2:-10000000}" "${3:-1}"
