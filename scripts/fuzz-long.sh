#!/usr/bin/env bash
# The long fuzz runs of docs/security.md: RUNS executions (default 10
# million) of each TARGET (default: all), one after another, niced, from
# the committed seeds plus fuzz/work/<target>. Built without a sanitizer but
# with debug assertions and overflow checks (-O -a -s none): veil's fuzzed
# code is safe Rust, so AddressSanitizer would mostly slow it down. A hang
# longer than 10 s counts as a crash. Inputs are at most 4096 bytes, 256 for
# ultracall (each input is a sequence of calls and every call re-checks all
# pages, so long inputs would spend the runs on few sequences).
# Logs: fuzz/work/<target>.long.log.
#   scripts/fuzz-long.sh [RUNS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs="${1:-10000000}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets="${*:-$(cargo +nightly fuzz list)}"
nice -n 10 cargo +nightly fuzz build -O -a -s none
bin=target/x86_64-unknown-linux-gnu/release
for t in $targets; do
    mkdir -p "work/$t"
    log="work/$t.long.log"
    max_len=4096
    [ "$t" = ultracall ] && max_len=256
    start=$(date +%s)
    if ! nice -n 10 "$bin/$t" "work/$t" "corpus/$t" -runs="$runs" -max_len="$max_len" -timeout=10 \
        -artifact_prefix="work/$t-" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz-long: $t FAILED (see $log)" >&2
        exit 1
    fi
    echo "fuzz-long: $t: $runs runs in $(($(date +%s) - start)) s"
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec)|^Done' "$log" || true
    grep -E '^#[0-9]+ +DONE' "$log" || true
done
