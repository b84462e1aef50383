#!/usr/bin/env bash
# veil's whole test suite: formatting, lints, unit and integration tests,
# and Linux guest boots. The Linux guest is built once and cached outside the
# repository (resources/linux/build.sh), keyed by its inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x resources/linux/build.sh ]; then
  VEIL_LINUX_DIR="$(resources/linux/build.sh | tail -n 1)"
  export VEIL_LINUX_DIR
  echo "Linux guest: $VEIL_LINUX_DIR"
fi

cargo fmt --all --check
cargo clippy --all-targets -- -D warnings
cargo test --release --workspace -- --test-threads=2 --skip linux
# The EIO case needs veil built with its failing disk backend.
cargo test --release --features fault-injection --test faults -- eio
# The fuzz smoke run (docs/security.md, "Fuzzing"): every target for
# VEIL_FUZZ_SECONDS seconds (60) on the nightly toolchain. CI must have it;
# elsewhere a machine without nightly skips it and says so.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  scripts/fuzz.sh "${VEIL_FUZZ_SECONDS:-60}"
elif [ -n "${CI:-}" ]; then
  echo "fuzz: CI needs the nightly toolchain for the fuzz smoke run" >&2
  exit 1
else
  echo "fuzz: SKIPPED: no nightly toolchain on this machine"
fi
# The Linux boots (every test with "linux" in its name) last, one at a time
# (each emulated CPL0 guest needs a core of its own here) and uncaptured,
# so the log shows each boot's time.
cargo test --release --test linux -- --test-threads=1 --nocapture
