#!/usr/bin/env bash
# Runs the whole test suite. Installs, idempotently, the system packages the
# tests need first (haproxy: the agent's drain tests run a real one; gunicorn:
# a third-party server taking the agent's sockets by socket activation; wrk:
# the handoff benchmark; chromium and chromium-driver: the dashboard's browser
# test; etcd-server: the etcd store engine's tests run real etcd members, and
# quorum upgrades roll real etcd clusters; etcd-client: their etcdctl;
# protobuf-compiler: the etcd client's gRPC code is generated at build time,
# which is why that engine is behind the `etcd` feature; prometheus: rollout
# analyses query a real one).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(haproxy gunicorn wrk chromium chromium-driver etcd-server etcd-client protobuf-compiler prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

cargo fmt --all -- --check
# The default build (no etcd engine, Rust toolchain only) and the full one.
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --all-features -- -D warnings
cargo test --workspace --locked --all-features
