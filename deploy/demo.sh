#!/usr/bin/env bash
# Canopy demo: builds Canopy, starts a controller on the embedded store, joins three agents with
# one token, shows `canopy peer list` and each agent's view, then cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo build --quiet --bins
bin=$PWD/target/debug
work=$(mktemp -d /tmp/canopy-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
export HOME=$work/home CANOPY_LOG=warn

port=$(( 20000 + RANDOM % 20000 ))
"$bin/canopy" serve --listen 127.0.0.1:$port --data-dir "$work/data" > "$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "canopy login" "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
cat "$work/serve.log"
"$bin/canopy" login --server https://127.0.0.1:$port --ca "$work/data/ca.pem" --token-file "$work/data/admin-token"

echo "== canopy network create demo --cidr 100.64.0.0/24 --cidr fd7a:115c:a1e0::/64"
"$bin/canopy" network create demo --cidr 100.64.0.0/24 --cidr fd7a:115c:a1e0::/64
join=$("$bin/canopy" token create --network demo --uses 3 --ttl 10m --tag demo)
echo "== join string: $join"
for n in alpha beta gamma; do
  "$bin/canopy-agent" join "$join" --hostname "$n" --state-dir "$work/$n" > "$work/$n.log" 2>&1 &
  pids+=($!)
done
for n in alpha beta gamma; do
  for _ in $(seq 100); do
    [ "$("$bin/canopy-agent" status --json --state-dir "$work/$n" 2>/dev/null | grep -c '"peer_id"')" = 3 ] && break
    sleep 0.1
  done
done
echo "== canopy peer list --network demo"
"$bin/canopy" peer list --network demo
echo "== canopy-agent status (alpha)"
"$bin/canopy-agent" status --state-dir "$work/alpha"
echo "== removing gamma: the others drop it at once"
gamma=$("$bin/canopy-agent" status --json --state-dir "$work/gamma" | sed -n 's/.*"peer_id": "\(peer_[0-9a-f]*\)".*/\1/p' | head -1)
"$bin/canopy" peer remove "$gamma"
sleep 0.5
"$bin/canopy-agent" status --state-dir "$work/alpha" | sed -n '/^peers:/,$p'
echo "== demo done; cleaning up"
