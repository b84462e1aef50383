#!/usr/bin/env bash
# Installs the Debian packages veil's tests and benchmarks use when they are
# missing: a C toolchain for the guest build, iproute2 and util-linux for the
# TAP and namespace tests, python3, QEMU (the benchmark peer and the QEMU
# tests) and valgrind (resources/bench/callgrind.py). Needs root or sudo.
set -euo pipefail
need=()
for tool in gcc:gcc make:make ip:iproute2 unshare:util-linux setpriv:util-linux python3:python3 \
  qemu-system-x86_64:qemu-system-x86 valgrind:valgrind; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
sudo=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "setup.sh: not root and no sudo: install ${need[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "setup.sh: installing ${need[*]}" >&2
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
