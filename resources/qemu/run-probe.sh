#!/usr/bin/env bash
# Run veil's test guest (the probe ELF) under QEMU, through its PVH note, with
# the same devices veil's benchmarks use: a virtio-blk disk and a virtio-net
# NIC whose peer echoes every frame (a UDP socket that sends to itself).
#
#   resources/qemu/run-probe.sh [mmio|pci|pci-iommu] [probe command line words...]
#
# mmio:      -M microvm, virtio-mmio devices (modern), ACPI on
# pci:       -M q35 (SeaBIOS assigns the BARs), virtio-pci modern-only devices
# pci-iommu: as pci, plus a virtio-iommu-pci (QEMU writes a VIOT) and
#            iommu_platform=on on both devices, for probe.dma=lazy|strict|bounce
#
# Environment: PROBE_ELF (default: written by `veil probe-elf`), DISK (a raw
# image, default a fresh 32 MiB one), NET_PORT (UDP port, default 47000+$$%1000),
# QEMU (default qemu-system-x86_64), MEMORY (default 256M), DRY_RUN=1 prints the
# command instead of running it. QEMU exits with (status << 1) | 1 after the
# probe writes its status to the debug-exit port 0xF4, and 1 on its own
# errors too; so this script exits with the status of the probe's last
# `PROBE done status=N` line, or 125 when there is none.
set -euo pipefail

transport=${1:-mmio}
shift || true
probe_args=${*:-probe.mode=basic}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

qemu=${QEMU:-qemu-system-x86_64}
memory=${MEMORY:-256M}
port=${NET_PORT:-$((47000 + $$ % 1000))}
elf=${PROBE_ELF:-}
if [ -z "$elf" ]; then
  elf=$work/probe.elf
  veil=${VEIL:-$here/../../target/release/veil}
  "$veil" probe-elf "$elf"
fi
disk=${DISK:-}
if [ -z "$disk" ]; then
  disk=$work/disk.img
  truncate -s 32M "$disk"
fi

# -cpu host without arch-capabilities: the development machines' KVM refuses
# QEMU's write of MSR 0x10a (IA32_ARCH_CAPABILITIES) otherwise.
common=(-cpu host,-arch-capabilities -m "$memory" -smp 1 -nodefaults -no-user-config
  -nographic -serial stdio -kernel "$elf"
  -device isa-debug-exit,iobase=0xf4,iosize=4
  -drive "id=d0,file=$disk,format=raw,if=none"
  -netdev "socket,id=n0,udp=127.0.0.1:$port,localaddr=127.0.0.1:$port")

case $transport in
  mmio)
    # With ACPI on, microvm has 24 virtio-mmio transports of 512 bytes from
    # 0xfeb00000 and fills them from the top, one per -device in order; it
    # describes them in the DSDT only (auto-kernel-cmdline adds
    # virtio_mmio.device= words only with acpi=off), so name them here. The
    # probe polls: the IRQ field is not used.
    args=(-M microvm,accel=kvm,acpi=on,pic=off,pit=on,rtc=off,isa-serial=on
      -global virtio-mmio.force-legacy=false
      -device virtio-blk-device,drive=d0 -device virtio-net-device,netdev=n0)
    probe_args="$probe_args virtio_mmio.device=512@0xfeb02e00:0 virtio_mmio.device=512@0xfeb02c00:0"
    ;;
  pci)
    args=(-M q35,accel=kvm
      -device virtio-blk-pci,drive=d0,disable-legacy=on
      -device virtio-net-pci,netdev=n0,disable-legacy=on,romfile=)
    ;;
  pci-iommu)
    args=(-M q35,accel=kvm -device virtio-iommu-pci
      -device virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on
      -device virtio-net-pci,netdev=n0,disable-legacy=on,iommu_platform=on,romfile=)
    ;;
  *)
    echo "usage: $0 [mmio|pci|pci-iommu] [probe command line words...]" >&2
    exit 64
    ;;
esac

cmd=("$qemu" "${args[@]}" "${common[@]}" -append "$probe_args")
if [ "${DRY_RUN:-}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
set +e
"${cmd[@]}" | tee "$work/out"
set -e
status=$(sed -n 's/^PROBE done status=\([0-9]*\).*/\1/p' "$work/out" | tail -1)
exit "${status:-125}"
