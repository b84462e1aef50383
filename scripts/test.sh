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
# The Linux boots (every test with "linux" in its name) last, one at a time
# (each emulated CPL0 guest needs a core of its own here) and uncaptured,
# so the log shows each boot's time.
cargo test --release --test linux -- --test-threads=1 --nocapture
