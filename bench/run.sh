#!/usr/bin/env bash
# Runs a benchmark by name, installing first (idempotently) what it needs.
#
#   bench/run.sh handoff [-- --switch handoff|restart|both --nodes 10]
#   bench/run.sh dashboard [-- --nodes 1000 --dashboards 10]
#   bench/run.sh verify [-- --mb 100]
#   bench/run.sh planner
#   bench/run.sh scale [-- --agents 10000 | --sizes 100,1000,10000 --store sqlite,etcd]
#   bench/run.sh fleet [-- --agents 200]
#   bench/run.sh recovery [-- --rounds 20 --nodes 4]
#   bench/run.sh leader [-- --rounds 20 --nodes 6]
#   bench/run.sh all
#
# Each prints its figures beside the ideal it is compared to; README.md
# ("Benchmarks") says what each measures.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '4,12p' "$0" | sed 's/^#   /usage: /' >&2
  exit 2
}

[ $# -ge 1 ] || usage
name=$1
shift
[ "${1:-}" != "--" ] || shift

need_wrk() {
  command -v wrk >/dev/null 2>&1 && return
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq wrk
}

need_etcd() {
  command -v etcd >/dev/null 2>&1 && command -v protoc >/dev/null 2>&1 && return
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq etcd-server protobuf-compiler
}

run() {
  case "$1" in
    handoff) need_wrk; cargo bench -p rollwave --bench handoff -- "${@:2}" ;;
    dashboard) cargo bench -p rollwave --bench dashboard -- "${@:2}" ;;
    verify) cargo bench -p rollwave-agent --bench verify -- "${@:2}" ;;
    planner) cargo bench -p rollwave-core --bench planner -- "${@:2}" ;;
    scale) need_etcd; cargo bench -p rollwave --features etcd --bench scale -- "${@:2}" ;;
    fleet) cargo bench -p rollwave --bench fleet -- "${@:2}" ;;
    recovery) cargo bench -p rollwave --bench recovery -- "${@:2}" ;;
    leader) need_etcd; cargo bench -p rollwave --features etcd --bench leader -- "${@:2}" ;;
    *) echo "bench/run.sh: unknown benchmark \"$1\" (handoff, dashboard, verify, planner, scale, fleet, recovery, leader, all)" >&2; exit 2 ;;
  esac
}

# fleet, recovery and leader start real agents and run for minutes: by name
# only.
if [ "$name" = all ]; then
  for b in planner verify handoff dashboard scale; do
    echo "== $b"
    run "$b"
  done
else
  run "$name" "$@"
fi
