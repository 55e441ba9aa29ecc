#!/usr/bin/env bash
# Installs what building and testing Canopy needs on a fresh Debian machine (idempotent).
#   protobuf-compiler  protoc, for the gRPC code generation
#   etcd-server        /usr/bin/etcd, for the etcd store tests
#   wireguard-tools    wg, to inspect and configure interfaces (UAPI)
#   wireguard-go       the reference userspace WireGuard, for interop tests and benchmarks
#   iproute2, iputils-ping, iperf3: network namespaces, pings and throughput across the overlay
#   python3            TCP transfers in the data-plane tests, result parsing in the benchmarks
set -euo pipefail
pkgs=(protobuf-compiler etcd-server wireguard-tools wireguard-go iproute2 iputils-ping iperf3 python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # No recommends: wireguard-go would otherwise pull in a whole kernel image.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust) is required" >&2; exit 1; }
