#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60), one at a
# time, niced; fails on the first crash. Seeds come from fuzz/corpus/<target>
# (committed); what the run finds goes to fuzz/work/<target> (not committed).
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=$(cargo +nightly fuzz list)
nice -n 10 cargo +nightly fuzz build -O
for t in $targets; do
    mkdir -p "work/$t" "corpus/$t"
    echo "fuzz: $t for ${seconds}s"
    if ! nice -n 10 cargo +nightly fuzz run -O "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 >"work/$t.log" 2>&1; then
        tail -n 40 "work/$t.log"
        echo "fuzz: $t FAILED (artifacts in fuzz/artifacts/$t)" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|Done)' "work/$t.log" || true
done
echo "fuzz: all targets ran ${seconds}s without a crash"
