#!/usr/bin/env bash
# Builds the fuzz targets and runs each for $1 seconds (default 600), one
# at a time on one core; logs to fuzz/logs/<target>.log.
set -u
cd "$(dirname "$0")"
secs="${1:-600}"
mkdir -p logs
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# unlocks them (this machine has no nightly).
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O || exit 1
for t in ws_frame http_body token query media; do
  mkdir -p "corpus/$t"
  cargo fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -jobs=1 -workers=1 -max_len=70000 -print_final_stats=1 \
    > "logs/$t.log" 2>&1
  rc=$?
  # libFuzzer's worker writes its own log (fuzz-0.log) when -jobs is set.
  [ -f fuzz-0.log ] && mv fuzz-0.log "logs/$t.worker.log"
  echo "$t exit $rc" >> logs/summary.txt
done
