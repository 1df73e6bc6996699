#!/usr/bin/env bash
# Runs every fuzz target (or the TARGETs named) for SECONDS_PER_TARGET
# (default 300), one after the other in a single process each, and prints
# per target the executions and any crash. Not part of CI: a run takes
# minutes per target and needs the nightly toolchain.
#
# New inputs go to target/corpus/<target> (not committed); the committed,
# minimised seeds in corpus/<target> are read, never written. Crashes land in
# artifacts/<target>/.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${1:-300}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: $0 [SECONDS_PER_TARGET [TARGET...]]" >&2
  exit 2
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked || exit 1
fi
cargo +nightly fuzz build || exit 1
shift $(($# > 0 ? 1 : 0))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

mkdir -p target/logs
summary=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t" "corpus/$t"
  log="target/logs/$t.log"
  echo "== $t: ${seconds}s (log: fuzz/$log)"
  # -timeout: an input that takes 10 s is a hang worth keeping, not a slow
  # run to wait 20 minutes for (libFuzzer's default).
  cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1
  rc=$?
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1)
  execs=$(sed -nE 's/^#([0-9]+)[[:space:]]+DONE.*/\1/p' <<<"$done_line")
  rate=$(sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$done_line")
  crash=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
  if [ $rc -eq 0 ] && [ -n "$done_line" ]; then
    result="ok"
  else
    failed=1
    result="CRASH ${crash:-(no input written, see the log)}"
    grep -m 3 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|ERROR: LeakSanitizer" "$log" | sed 's/^/    /'
  fi
  summary+=("$(printf '%-14s %12s execs %8s exec/s  %s' "$t" "${execs:--}" "${rate:--}" "$result")")
done

echo
echo "== ${seconds}s per target"
printf '%s\n' "${summary[@]}"
exit $failed
