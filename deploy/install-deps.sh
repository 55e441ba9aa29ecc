#!/usr/bin/env bash
# Installs what building and testing Canopy needs on a fresh Debian machine (idempotent), then
# checks that each tool works, not only that its package is installed.
#   protobuf-compiler  protoc, for the gRPC code generation
#   libprotobuf-dev    google/protobuf/*.proto (well-known types) that etcd-client's build imports;
#                      only a Recommends of protobuf-compiler, so --no-install-recommends drops it
#   etcd-server        /usr/bin/etcd, for the etcd store tests
#   wireguard-tools    wg, to inspect and configure interfaces (UAPI)
#   wireguard-go       the reference userspace WireGuard, for interop tests and benchmarks
#   iproute2, iputils-ping, iperf3: network namespaces, pings and throughput across the overlay
#   nftables           nft, which wg-quick uses for a full tunnel's (AllowedIPs = 0.0.0.0/0)
#                      firewall marks; without it (or iptables) such a `wg-quick up` fails
#   python3            TCP transfers in the data-plane tests, result parsing in the benchmarks
#   python3-grpcio     a third-party gRPC client (Python's grpcio) in the tests, under Debian's
#                      /usr/bin/python3
#   python3-prometheus-client  a real OpenMetrics parser for the /metrics tests
#   coturn             turnutils_stunclient, a third-party STUN client, against the controller's
#                      STUN port (coturn's own server stays disabled, as Debian ships it)
#   bind9-dnsutils     dig, to ask the agents' resolvers for peer names as users do
#   chromium, chromium-driver, python3-selenium: a real browser, headless, driven through the
#                      web console's journeys (nothing is downloaded at test time)
set -euo pipefail
pkgs=(protobuf-compiler libprotobuf-dev etcd-server wireguard-tools wireguard-go iproute2 iputils-ping
      iperf3 nftables python3 python3-grpcio python3-prometheus-client coturn
      bind9-dnsutils chromium chromium-driver python3-selenium)
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

# Each tool does its job: a package can be installed and still not be enough (libprotobuf-dev).
fail() { echo "install-deps: $*" >&2; exit 1; }
command -v cargo >/dev/null || fail "cargo (Rust) is required"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/check.proto" <<'PROTO'
syntax = "proto3";
import "google/protobuf/descriptor.proto";
import "google/protobuf/timestamp.proto";
message Check { google.protobuf.Timestamp at = 1; }
extend google.protobuf.FieldOptions { string check = 50000; }
PROTO
protoc -I"$tmp" --descriptor_set_out="$tmp/check.pb" "$tmp/check.proto" \
  || fail "protoc cannot compile a file importing google/protobuf/*.proto (libprotobuf-dev)"
etcd --version >/dev/null || fail "etcd does not run"
wg --version >/dev/null || fail "wg does not run"
command -v wireguard-go >/dev/null || fail "wireguard-go is missing"
iperf3 --version >/dev/null || fail "iperf3 does not run"
ip -V >/dev/null || fail "ip (iproute2) does not run"
command -v ping >/dev/null || fail "ping is missing"
nft --version >/dev/null || fail "nft (nftables) does not run"
python3 -c 'import hashlib, socket' || fail "python3 does not run"
/usr/bin/python3 -c 'import grpc' || fail "Debian's python3 cannot import grpc (python3-grpcio)"
/usr/bin/python3 -c 'import prometheus_client.openmetrics.parser' || fail "Debian's python3 cannot import prometheus_client (python3-prometheus-client)"
command -v turnutils_stunclient >/dev/null || fail "turnutils_stunclient (coturn) is missing"
dig -v >/dev/null 2>&1 || fail "dig (bind9-dnsutils) does not run"
chromedriver --version >/dev/null || fail "chromedriver (chromium-driver) does not run"
/usr/bin/python3 -c 'import selenium.webdriver' || fail "Debian's python3 cannot import selenium (python3-selenium)"
echo "install-deps: protoc, etcd, wg, wireguard-go, iperf3, ip, ping, nft, python3, grpcio, prometheus_client, stunclient, dig, chromedriver, selenium work"
