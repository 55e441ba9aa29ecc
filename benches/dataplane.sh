#!/usr/bin/env bash
# Data-plane throughput, side by side in one run: iperf3 TCP between two network namespaces over
# a raw veth pair, over Canopy, over wireguard-go (Debian) and over boringtun-cli (crates.io).
# Prints Mbit/s (median of RUNS runs) and ratios. Needs root.
#   RUNS=3 SECONDS_PER_RUN=5 STREAMS=1 bash benches/dataplane.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "dataplane bench: needs root" >&2; exit 1; }
RUNS=${RUNS:-3}; SECS=${SECONDS_PER_RUN:-5}; STREAMS=${STREAMS:-1}
bash deploy/install-deps.sh
cargo build --quiet --release -p canopy-agent
tools=$PWD/target/bench-tools
[ -x "$tools/bin/boringtun-cli" ] || cargo install --quiet boringtun-cli --version 0.7.1 --locked --root "$tools"
agent=$PWD/target/release/canopy-agent
work=$(mktemp -d /tmp/canopy-bench.XXXXXX)
p=cbn$$; A=${p}a; B=${p}b
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
ip netns add $A; ip netns add $B
ip link add ${p}va type veth peer name ${p}vb
ip link set ${p}va netns $A; ip link set ${p}vb netns $B
ip -n $A addr add 192.0.2.1/24 dev ${p}va; ip -n $B addr add 192.0.2.2/24 dev ${p}vb
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set ${p}va up; ip -n $B link set ${p}vb up

KA=$($agent genkey); KB=$($agent genkey); PA=$(echo "$KA" | $agent pubkey); PB=$(echo "$KB" | $agent pubkey)
echo "$KA" > "$work/ka"; echo "$KB" > "$work/kb"; chmod 600 "$work/ka" "$work/kb"

# One iperf3 run: prints Mbit/s received.
iperf() {
  ip netns exec $B iperf3 -s -1 -D -p 5201 > /dev/null 2>&1; sleep 0.3
  ip netns exec $A iperf3 -c "$1" -p 5201 -t "$SECS" -P "$STREAMS" -J 2>/dev/null \
    | python3 -c "import json,sys; print(round(json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e6))"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
measure() {
  local r=()
  for _ in $(seq "$RUNS"); do r+=("$(iperf "$1")"); done
  median "${r[@]}"
}
wait_sock() { for _ in $(seq 100); do [ -S "/var/run/wireguard/$1.sock" ] && return 0; sleep 0.05; done; echo "no UAPI socket for $1" >&2; return 1; }
addr_up() { ip -n "$1" addr add "$2" dev "$3"; ip -n "$1" link set "$3" mtu 1420 up; }
wg_conf() {  # ns iface keyfile port peerkey endpoint allowed
  ip netns exec "$1" wg set "$2" private-key "$3" listen-port "$4" peer "$5" endpoint "$6" allowed-ips "$7"
}
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true; pids=()
  # Make sure the tunnel addresses are gone before the next implementation claims them.
  for _ in $(seq 50); do ip -n $A -o addr show | grep -q 10.9.0.1 || break; sleep 0.1; done
}

declare -A mbit
echo "measuring raw veth..."
mbit[raw]=$(measure 192.0.2.2)

echo "measuring canopy..."
cat > "$work/${p}ca.conf" <<C
[Interface]
PrivateKey = $KA
Address = 10.9.0.1/24
ListenPort = 51820
[Peer]
PublicKey = $PB
Endpoint = 192.0.2.2:51820
AllowedIPs = 10.9.0.2/32
C
cat > "$work/${p}cb.conf" <<C
[Interface]
PrivateKey = $KB
Address = 10.9.0.2/24
ListenPort = 51820
[Peer]
PublicKey = $PA
Endpoint = 192.0.2.1:51820
AllowedIPs = 10.9.0.1/32
C
ip netns exec $A env CANOPY_LOG=warn "$agent" up "$work/${p}ca.conf" > "$work/ca.log" 2>&1 & pids+=($!)
ip netns exec $B env CANOPY_LOG=warn "$agent" up "$work/${p}cb.conf" > "$work/cb.log" 2>&1 & pids+=($!)
wait_sock ${p}ca; wait_sock ${p}cb
ip netns exec $A ping -c 1 -W 2 10.9.0.2 > /dev/null
mbit[canopy]=$(measure 10.9.0.2)
stop_all

run_userspace() {  # tag port command... (each implementation gets its own names and port)
  local tag=$1 port=$2; shift 2
  local ia=${p}${tag}a ib=${p}${tag}b
  ip netns exec $A "$@" $ia > "$work/$tag-a.log" 2>&1 & pids+=($!)
  ip netns exec $B "$@" $ib > "$work/$tag-b.log" 2>&1 & pids+=($!)
  wait_sock $ia; wait_sock $ib
  wg_conf $A $ia "$work/ka" "$port" "$PB" "192.0.2.2:$port" 10.9.0.2/32
  wg_conf $B $ib "$work/kb" "$port" "$PA" "192.0.2.1:$port" 10.9.0.1/32
  addr_up $A 10.9.0.1/24 $ia; addr_up $B 10.9.0.2/24 $ib
  ip netns exec $A ping -c 1 -W 2 10.9.0.2 > /dev/null
  measure 10.9.0.2
}
echo "measuring wireguard-go..."
mbit[wggo]=$(run_userspace g 51821 wireguard-go -f)
stop_all
echo "measuring boringtun-cli..."
mbit[bt]=$(WG_SUDO=1 run_userspace t 51822 "$tools/bin/boringtun-cli" --foreground --disable-drop-privileges)
stop_all

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo
echo "iperf3 TCP, $STREAMS stream(s), ${SECS}s x $RUNS runs (median), $(nproc) cores, kernel $(uname -r)"
printf '%-16s %10s %12s %12s\n' "path" "Mbit/s" "vs wg-go" "vs raw veth"
for k in raw canopy wggo bt; do
  case $k in raw) n="raw veth";; canopy) n="canopy";; wggo) n="wireguard-go";; bt) n="boringtun-cli";; esac
  printf '%-16s %10s %12s %12s\n' "$n" "${mbit[$k]}" "$(ratio ${mbit[$k]} ${mbit[wggo]})" "$(ratio ${mbit[$k]} ${mbit[raw]})"
done
