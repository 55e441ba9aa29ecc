#!/usr/bin/env bash
# Canopy demo: a real overlay on this one machine.
# Builds Canopy, starts a controller on the embedded store in a "hub" network namespace, joins
# three agents (each in its own namespace, on a real TUN device) with one token, prints
# `canopy peer list`, `wg show` and the pings across the overlay, removes one peer live, and
# cleans up after itself. Needs root (namespaces, TUN).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (network namespaces and TUN devices)" >&2; exit 1; }
bash deploy/install-deps.sh
cargo build --quiet --release --bins
bin=$PWD/target/release
work=$(mktemp -d /tmp/canopy-demo.XXXXXX)
p=cdemo$$
hub=${p}hub
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in $hub ${p}h1 ${p}h2 ${p}h3; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
export CANOPY_LOG=warn HOME=$work/home

# Underlay: a bridge in the hub namespace, one veth per host, 192.0.2.0/24.
ip netns add $hub
ip -n $hub link set lo up
ip -n $hub link add br0 type bridge
ip -n $hub addr add 192.0.2.254/24 dev br0
ip -n $hub link set br0 up
for i in 1 2 3; do
  ip netns add ${p}h$i
  ip link add ${p}a$i type veth peer name ${p}b$i
  ip link set ${p}a$i netns ${p}h$i
  ip link set ${p}b$i netns $hub
  ip -n $hub link set ${p}b$i master br0 up
  ip -n ${p}h$i addr add 192.0.2.$i/24 dev ${p}a$i
  ip -n ${p}h$i link set ${p}a$i up
  ip -n ${p}h$i link set lo up
done

ip netns exec $hub "$bin/canopy" serve --listen 192.0.2.254:7443 --data-dir "$work/data" > "$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "canopy login" "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
cat "$work/serve.log"
canopy() { ip netns exec $hub "$bin/canopy" "$@"; }
canopy login --server https://192.0.2.254:7443 --ca "$work/data/ca.pem" --token-file "$work/data/admin-token"

echo; echo "== canopy network create demo --cidr 100.64.0.0/24 --cidr fd7a:115c:a1e0::/64"
canopy network create demo --cidr 100.64.0.0/24 --cidr fd7a:115c:a1e0::/64
join=$(canopy token create --network demo --uses 3 --ttl 10m --tag demo)
echo "== join string: $join"
names=(alpha beta gamma)
for i in 1 2 3; do
  ip netns exec ${p}h$i "$bin/canopy-agent" join "$join" --hostname "${names[$((i-1))]}" \
    --state-dir "$work/s$i" --interface canopy$i > "$work/agent$i.log" 2>&1 &
  pids+=($!)
done
status() { ip netns exec ${p}h$1 "$bin/canopy-agent" status --json --state-dir "$work/s$1" 2>/dev/null; }
for i in 1 2 3; do
  for _ in $(seq 150); do [ "$(status $i | grep -c '"peer_id"')" = 3 ] && break; sleep 0.1; done
done
addr() { status "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['addresses'][$2].split('/')[0])"; }

echo; echo "== canopy peer list --network demo"
canopy peer list --network demo
echo; echo "== pings across the overlay"
fail=0
for i in 1 2 3; do for j in 1 2 3; do
  [ $i = $j ] && continue
  for fam in 0 1; do
    dst=$(addr $j $fam)
    if ip netns exec ${p}h$i ping -c 2 -i 0.2 -W 2 "$dst" > "$work/ping" 2>&1; then
      echo "${names[$((i-1))]} -> ${names[$((j-1))]} $dst: $(grep -o 'time=[0-9.]* ms' "$work/ping" | tail -1)"
    else
      echo "${names[$((i-1))]} -> ${names[$((j-1))]} $dst: FAILED"; fail=1
    fi
  done
done; done

echo; echo "== wg show canopy1 (in alpha's namespace)"
ip netns exec ${p}h1 wg show canopy1

echo; echo "== removing gamma from the network, live"
gamma=$(status 3 | python3 -c "import json,sys; print(json.load(sys.stdin)['peer_id'])")
gaddr=$(addr 3 0)
canopy peer remove "$gamma"
sleep 1
if ip netns exec ${p}h1 ping -c 1 -W 1 "$gaddr" > /dev/null 2>&1; then echo "alpha -> gamma: still reachable (unexpected)"; fail=1; else echo "alpha -> gamma $gaddr: unreachable, as it should be"; fi
ip netns exec ${p}h1 ping -c 1 -W 2 "$(addr 2 0)" > /dev/null && echo "alpha -> beta: still fine"
echo; echo "== demo done; cleaning up"
exit $fail
