#!/usr/bin/env bash
# Data-plane performance, side by side in one run, between two network namespaces over a veth
# pair: raw veth, Canopy, wireguard-go (Debian) and boringtun-cli (crates.io).
#   - iperf3 TCP, 1 and 4 streams, both directions (A→B and B→A with -R), RUNS runs each, median;
#   - UDP packets per second at 1400-byte datagrams with under 0.1 % loss (rate search);
#   - ping round trip at idle and under a TCP load, and what the tunnel adds to raw veth's.
# Prints a table and the ratios. Needs root.
# Three more paths put Canopy behind its controller (`canopy serve` in A, both agents joined):
# `managed` without a policy, `policy` with a 100-rule access policy whose rules all name the
# sending peer, 99 of them for other ports (the worst case for the per-packet check), and
# `gateway`: A to a host in a site namespace behind B (10.20.0.0/24, routed through B, which
# forwards and masquerades); `relayed`: the managed pair with direct UDP between A and B
# blocked (nftables in B; only the controller's port passes), so it goes through the relay on
# the controller's UDP port (in A);
#   ONLY="managed policy gateway relayed" bash benches/dataplane.sh
# RELAY_RATE=N raises the relay's per-source cap (default 10,000 datagrams/s) to measure the
# relay itself rather than its limit.
#   RUNS=5 SECONDS_PER_RUN=5 ONLY="raw canopy" bash benches/dataplane.sh
# CANOPY_AGENT=path runs that canopy-agent binary instead of this tree's (an older build, to
# compare before and after a change, each against wireguard-go in its own run).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "dataplane bench: needs root" >&2; exit 1; }
RUNS=${RUNS:-5}; SECS=${SECONDS_PER_RUN:-5}; ONLY=${ONLY:-raw canopy wggo bt}
UDP_PROBES=${UDP_PROBES:-8}; UDP_SECS=${UDP_SECONDS:-3}
bash deploy/install-deps.sh
[ -n "${CANOPY_AGENT:-}" ] || cargo build --quiet --release -p canopy-agent
[[ " $ONLY " != *" managed "* && " $ONLY " != *" policy "* && " $ONLY " != *" gateway "* && " $ONLY " != *" relayed "* ]] || cargo build --quiet --release -p canopy-controller
canopy=$PWD/target/release/canopy
tools=$PWD/target/bench-tools
[ -x "$tools/bin/boringtun-cli" ] || cargo install --quiet boringtun-cli --version 0.7.1 --locked --root "$tools"
agent=${CANOPY_AGENT:-$PWD/target/release/canopy-agent}
work=$(mktemp -d /tmp/canopy-bench.XXXXXX)
p=cbn$$; A=${p}a; B=${p}b; S=${p}s
SRV_NS=$B
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true
  ip netns del $S 2>/dev/null || true
  # wireguard-go and boringtun-cli leave their UAPI sockets behind when killed.
  rm -f /var/run/wireguard/${p}*.sock
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

py() { python3 -c "$@"; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
server() { ip netns exec $SRV_NS iperf3 -s -1 -D -p 5201 > /dev/null 2>&1; sleep 0.3; }

# One TCP run: Mbit/s received. Args: target, extra iperf3 flags.
tcp_once() {
  local to=$1; shift; server
  ip netns exec $A iperf3 -c "$to" -p 5201 -t "$SECS" "$@" -J 2>/dev/null \
    | py "import json,sys; print(round(json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e6))"
}
tcp() { local r=(); for _ in $(seq "$RUNS"); do r+=("$(tcp_once "$@")"); done; median "${r[@]}"; }

# One UDP run at $2 Mbit/s of 1400-byte datagrams: prints "loss_percent packets_per_second".
udp_once() {
  server
  ip netns exec $A iperf3 -c "$1" -p 5201 -u -l 1400 -b "${2}M" -t "$UDP_SECS" -J 2>/dev/null \
    | py "import json,sys; s=json.load(sys.stdin)['end']['sum']; print(s['lost_percent'], round((s['packets']-s['lost_packets'])/s['seconds']))"
}
# The highest rate (bisection over Mbit/s) with under 0.1 % loss: prints packets per second.
udp_pps() {
  local lo=0 hi=${UDP_MAX_MBIT:-4000} best=0 mid out
  for _ in $(seq "$UDP_PROBES"); do
    mid=$(( (lo + hi) / 2 )); out=$(udp_once "$1" "$mid")
    if py "import sys; sys.exit(0 if float('${out% *}') < 0.1 else 1)"; then lo=$mid; best=${out#* }; else hi=$mid; fi
  done
  echo "$best"
}
# Median ping round trip in ms (50 pings, 20 ms apart).
ping_ms() {
  ip netns exec $A ping -c 50 -i 0.02 -W 1 "$1" \
    | py "import sys,re,statistics; t=[float(m) for m in re.findall(r'time=([0-9.]+)', sys.stdin.read())]; print(f'{statistics.median(t):.3f}' if t else 'nan')"
}
# The same while one TCP stream runs A→B.
ping_loaded_ms() {
  server; ip netns exec $A iperf3 -c "$1" -p 5201 -t 4 > /dev/null 2>&1 & local ip=$!
  sleep 1; ping_ms "$1"; wait $ip || true
}

declare -A res
# Runs every measurement against $2 (an address in B) and stores it under $1.
measure() {
  local k=$1 to=$2
  echo "  $k: TCP" >&2
  res[$k.t1]=$(tcp "$to" -P 1); res[$k.t1r]=$(tcp "$to" -P 1 -R)
  res[$k.t4]=$(tcp "$to" -P 4); res[$k.t4r]=$(tcp "$to" -P 4 -R)
  echo "  $k: UDP rate search" >&2
  res[$k.pps]=$(udp_pps "$to")
  echo "  $k: ping" >&2
  res[$k.ping]=$(ping_ms "$to"); res[$k.pingl]=$(ping_loaded_ms "$to")
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
canopy_conf() {  # key address peerkey endpoint allowed
  printf '[Interface]\nPrivateKey = %s\nAddress = %s\nListenPort = 51820\n[Peer]\nPublicKey = %s\nEndpoint = %s\nAllowedIPs = %s\n' "$@"
}
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
}

# A network of two joined agents (web in A, db in B) on a controller in A; with $1 = policy,
# a 100-rule policy first. Sets $to to db's overlay address (no subshell: its processes go in
# $pids).
run_managed() {
  local data=$work/ctl-$1
  ip netns exec $A "$canopy" serve --listen 192.0.2.1:7443 --data-dir "$data" ${RELAY_RATE:+--relay-rate "$RELAY_RATE"} > "$work/serve-$1.log" 2>&1 & pids+=($!)
  for _ in $(seq 100); do [ -s "$data/admin-token" ] && break; sleep 0.1; done
  con=("$canopy" --server https://192.0.2.1:7443 --token "$(cat "$data/admin-token")" --ca "$data/ca.pem")
  for _ in $(seq 50); do ip netns exec $A "${con[@]}" network list > /dev/null 2>&1 && break; sleep 0.1; done
  ip netns exec $A "${con[@]}" network create bench --cidr 100.64.0.0/24 > /dev/null
  if [ "$1" = policy ]; then
    { echo 'tags = ["web", "db"]'
      for i in $(seq 1 99); do printf '[[rule]]\nfrom = ["tag:web"]\nto = ["tag:db"]\nproto = "tcp"\nports = ["%d"]\n' $((10000 + i)); done
      printf '[[rule]]\nname = "the benchmark traffic"\nfrom = ["tag:web"]\nto = ["tag:db"]\n'; } > "$work/policy.toml"
    ip netns exec $A "${con[@]}" policy set bench "$work/policy.toml" > /dev/null
  fi
  [ "$1" = relayed ] && block_direct
  local jw jd
  jw=$(ip netns exec $A "${con[@]}" token create --network bench --tag web)
  jd=$(ip netns exec $A "${con[@]}" token create --network bench --tag db)
  ip netns exec $A env CANOPY_LOG=warn "$agent" join "$jw" --state-dir "$work/$1-a" --interface ${p}${1:0:1}a > "$work/$1-a.log" 2>&1 & pids+=($!)
  ip netns exec $B env CANOPY_LOG=warn "$agent" join "$jd" --state-dir "$work/$1-b" --interface ${p}${1:0:1}b > "$work/$1-b.log" 2>&1 & pids+=($!)
  to=""
  for _ in $(seq 100); do
    to=$(ip netns exec $B "$agent" status --json --state-dir "$work/$1-b" 2>/dev/null | py "import json,sys; print(json.load(sys.stdin)['addresses'][0].split('/')[0])" 2>/dev/null) && [ -n "$to" ] && break
    sleep 0.1
  done
  for _ in $(seq 50); do ip netns exec $A ping -c 1 -W 1 "$to" > /dev/null 2>&1 && break; done
}

# B may exchange UDP with A only on the controller's port: WireGuard between them must go
# through the relay.
block_direct() {
  ip netns exec $B nft -f - <<'NFT'
table inet relayonly {
  chain out { type filter hook output priority 0; ip daddr 192.0.2.1 udp dport != 7443 drop; }
  chain in { type filter hook input priority 0; ip saddr 192.0.2.1 udp sport != 7443 drop; }
}
NFT
}

# The site behind B for the gateway path: namespace S at 10.20.0.5, B at 10.20.0.1, and the
# route through B's agent. Sets $to to the site host.
run_gateway() {
  run_managed gateway
  ip netns add $S; ip -n $S link set lo up
  ip -n $B link add ${p}gs type veth peer name ${p}sg netns $S
  ip -n $B addr add 10.20.0.1/24 dev ${p}gs; ip -n $B link set ${p}gs up
  ip -n $S addr add 10.20.0.5/24 dev ${p}sg; ip -n $S link set ${p}sg up
  local gw
  gw=$(ip netns exec $B "$agent" status --json --state-dir "$work/gateway-b" | py "import json,sys; print(json.load(sys.stdin)['peer_id'])")
  ip netns exec $A "${con[@]}" route advertise --peer "$gw" 10.20.0.0/24 > /dev/null
  to=10.20.0.5; SRV_NS=$S
  for _ in $(seq 50); do ip netns exec $A ping -c 1 -W 1 "$to" > /dev/null 2>&1 && break; done
}

for k in $ONLY; do
  echo "measuring $k..." >&2
  case $k in
    raw) measure raw 192.0.2.2 ;;
    canopy)
      canopy_conf "$KA" 10.9.0.1/24 "$PB" 192.0.2.2:51820 10.9.0.2/32 > "$work/${p}ca.conf"
      canopy_conf "$KB" 10.9.0.2/24 "$PA" 192.0.2.1:51820 10.9.0.1/32 > "$work/${p}cb.conf"
      ip netns exec $A env CANOPY_LOG=warn "$agent" up "$work/${p}ca.conf" > "$work/ca.log" 2>&1 & pids+=($!)
      ip netns exec $B env CANOPY_LOG=warn "$agent" up "$work/${p}cb.conf" > "$work/cb.log" 2>&1 & pids+=($!)
      wait_sock ${p}ca; wait_sock ${p}cb
      ip netns exec $A ping -c 1 -W 2 10.9.0.2 > /dev/null
      measure canopy 10.9.0.2; stop_all ;;
    wggo) run_userspace g 51821 wireguard-go -f; measure wggo 10.9.0.2; stop_all ;;
    managed|policy) run_managed $k; measure $k "$to"; stop_all ;;
    gateway) run_gateway; measure gateway "$to"; stop_all; SRV_NS=$B; ip netns del $S ;;
    relayed)
      run_managed relayed
      path=$(ip netns exec $B "$agent" status --json --state-dir "$work/relayed-b" | py "import json,sys; print((json.load(sys.stdin)['peers'][0]['path'] or {}).get('path'))")
      echo "  relayed: B's path to A: $path" >&2
      measure relayed "$to"; stop_all; ip netns exec $B nft delete table inet relayonly ;;
    bt) WG_SUDO=1 run_userspace t 51822 "$tools/bin/boringtun-cli" --foreground --disable-drop-privileges
        measure bt 10.9.0.2; stop_all ;;
  esac
done

name() { case $1 in raw) echo "raw veth";; canopy) echo "canopy";; wggo) echo "wireguard-go";; bt) echo "boringtun-cli";; managed) echo "canopy managed";; policy) echo "canopy policy";; gateway) echo "via a gateway";; relayed) echo "via the relay";; esac; }
ratio() { py "a,b='${res[$1]:-}','${res[$2]:-}'; print(f'{float(a)/float(b):.2f}' if a and b and float(b) else '-')"; }
added() { py "a,b='${res[$1]:-}','${res[$2]:-}'; print(f'{float(a)-float(b):+.3f}' if a and b else '-')"; }
echo
echo "$(nproc) cores, kernel $(uname -r); TCP: iperf3 ${SECS}s x $RUNS runs, median (Mbit/s); UDP: 1400-byte datagrams, highest rate with < 0.1% loss"
printf '%-14s %8s %8s %8s %8s %10s %9s %9s\n' "path" "tcp1" "tcp1 -R" "tcp4" "tcp4 -R" "udp pps" "ping ms" "loaded ms"
for k in $ONLY; do
  printf '%-14s %8s %8s %8s %8s %10s %9s %9s\n' "$(name $k)" "${res[$k.t1]}" "${res[$k.t1r]}" "${res[$k.t4]}" "${res[$k.t4r]}" "${res[$k.pps]}" "${res[$k.ping]}" "${res[$k.pingl]}"
done
if [[ " $ONLY " == *" managed "* && " $ONLY " == *" policy "* ]]; then
  echo
  echo "policy vs managed (100 rules / none)"
  printf '%-16s %8s %8s %8s %8s %10s\n' "" "tcp1" "tcp1 -R" "tcp4" "tcp4 -R" "udp pps"
  printf '%-16s %8s %8s %8s %8s %10s\n' "ratio" "$(ratio policy.t1 managed.t1)" "$(ratio policy.t1r managed.t1r)" "$(ratio policy.t4 managed.t4)" "$(ratio policy.t4r managed.t4r)" "$(ratio policy.pps managed.pps)"
fi
if [[ " $ONLY " == *" managed "* && " $ONLY " == *" relayed "* ]]; then
  echo
  echo "through the relay vs direct (managed)"
  printf '%-16s %8s %8s %8s %8s %10s\n' "" "tcp1" "tcp1 -R" "tcp4" "tcp4 -R" "udp pps"
  printf '%-16s %8s %8s %8s %8s %10s\n' "ratio" "$(ratio relayed.t1 managed.t1)" "$(ratio relayed.t1r managed.t1r)" "$(ratio relayed.t4 managed.t4)" "$(ratio relayed.t4r managed.t4r)" "$(ratio relayed.pps managed.pps)"
fi
if [[ " $ONLY " == *" managed "* && " $ONLY " == *" gateway "* ]]; then
  echo
  echo "through a gateway vs direct (managed)"
  printf '%-16s %8s %8s %8s %8s %10s\n' "" "tcp1" "tcp1 -R" "tcp4" "tcp4 -R" "udp pps"
  printf '%-16s %8s %8s %8s %8s %10s\n' "ratio" "$(ratio gateway.t1 managed.t1)" "$(ratio gateway.t1r managed.t1r)" "$(ratio gateway.t4 managed.t4)" "$(ratio gateway.t4r managed.t4r)" "$(ratio gateway.pps managed.pps)"
fi
if [[ " $ONLY " == *" canopy "* ]]; then
  echo
  echo "canopy ratios"
  printf '%-16s %8s %8s %8s %8s %10s\n' "vs" "tcp1" "tcp1 -R" "tcp4" "tcp4 -R" "udp pps"
  for k in $ONLY; do
    [ "$k" = canopy ] && continue
    printf '%-16s %8s %8s %8s %8s %10s\n' "$(name $k)" "$(ratio canopy.t1 $k.t1)" "$(ratio canopy.t1r $k.t1r)" "$(ratio canopy.t4 $k.t4)" "$(ratio canopy.t4r $k.t4r)" "$(ratio canopy.pps $k.pps)"
  done
  if [[ " $ONLY " == *" raw "* ]]; then
    echo
    echo "ping added to raw veth (ms, idle / under load):"
    for k in $ONLY; do
      [ "$k" = raw ] && continue
      printf '  %-14s %8s %8s\n' "$(name $k)" "$(added $k.ping raw.ping)" "$(added $k.pingl raw.pingl)"
    done
  fi
fi
