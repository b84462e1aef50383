#!/usr/bin/env python3
"""Writes the hand-made seed inputs of fuzz/corpus/<target>/.

The queue targets read: setup bytes, then 16 descriptors of 6 bytes
(shape = flags & 7, addr in 16-byte units from DATA_START, len, next),
the number of chains, 16 avail entries, and the rest as the data that
fills guest RAM from DATA_START (repeated)."""
import os
import struct
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus")
NEXT, WRITE, INDIRECT = 1, 2, 4


def ring(descs, heads):
    out = b""
    for i in range(16):
        addr, length, flags, nxt = descs[i] if i < len(descs) else (0, 0, 0, 0)
        out += bytes([flags & 7]) + struct.pack("<HHB", addr // 16, length, nxt)
    out += bytes([len(heads)]) + bytes(heads + [0] * (16 - len(heads)))
    return out


def write(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def iommu_req(kind, *fields):
    return bytes([kind, 0, 0, 0]) + b"".join(fields)


u32 = lambda v: struct.pack("<I", v)
u64 = lambda v: struct.pack("<Q", v)
# Requests 64 bytes apart in a 512-byte pattern; answers at 0x1000 + 64 * i.
reqs = [
    iommu_req(1, u32(1), u32(0x10), u32(0), u32(0)),  # ATTACH domain 1, endpoint 0x10
    iommu_req(3, u32(1), u64(0x18000), u64(0x18fff), u64(0x18000), u32(3)),  # MAP rw
    iommu_req(5, u32(0x10), bytes(64)),  # PROBE
    iommu_req(4, u32(1), u64(0x18000), u64(0x18fff), u32(0)),  # UNMAP
    iommu_req(2, u32(1), u32(0x10), bytes(8)),  # DETACH
    iommu_req(3, u32(1), u64(0xfee00000), u64(0xfee00fff), u64(0), u32(1)),  # MAP over MSI: RANGE
]
pattern = b"".join(r.ljust(64, b"\0") for r in reqs).ljust(512, b"\0")
descs, heads = [], []
for i, r in enumerate(reqs):
    w = 4 + (512 if r[0] == 5 else 0)
    descs += [(64 * i, len(r), NEXT, 2 * i + 1), (0x1000 + 0x400 * i, w, WRITE, 0)]
    heads.append(2 * i)
write("virtio_iommu", "attach-map-probe-unmap-detach", bytes([0, 0x7F]) + ring(descs, heads) + pattern)
write("virtio_iommu", "attach-bypass", bytes([1, 0x7F]) + ring(descs[:2], [0]) + iommu_req(1, u32(2), u32(0x10), u32(1), u32(0)))

# Block: header (type, reserved, sector), data, status.
def blk(setup, kind, sector, data_len, write_data):
    hdr = struct.pack("<IIQ", kind, 0, sector)
    flags = WRITE if write_data else 0
    descs = [(0, 16, NEXT, 1), (0x1000, data_len, flags | NEXT, 2), (0x3000, 1, WRITE, 0)]
    return bytes([setup]) + ring(descs, [0]) + hdr.ljust(256, b"\xab")


for view, setup in (("bypass", 0), ("iommu", 1), ("secure", 2)):
    write("virtio_blk", f"read-{view}", blk(setup, 0, 2, 1024, True) if setup != 1 else bytes([1, 4]) + blk(1, 0, 2, 1024, True)[1:])
    write("virtio_blk", f"write-{view}", blk(setup, 1, 4, 512, False))
write("virtio_blk", "get-id", blk(0, 8, 0, 20, True))
write("virtio_blk", "flush-readonly", blk(16, 4, 0, 0, False))
# Indirect: head points at a 3-entry table at DATA_START + 0x800.
table = b"".join(struct.pack("<QIHH", 0x10000 + a, l, f, n) for a, l, f, n in [(0, 16, NEXT, 1), (0x1000, 512, WRITE | NEXT, 2), (0x3000, 1, WRITE, 0)])
write("virtio_blk", "indirect-read", bytes([4]) + ring([(0x800, 48, INDIRECT, 0)], [0]) + (struct.pack("<IIQ", 0, 0, 1).ljust(0x800, b"\0") + table))

# Net: one TX frame (12-byte header, 60-byte frame), one RX buffer.
frame = bytes(12) + bytes([0xFF] * 6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + bytes(46)
tx = ring([(0, len(frame), 0, 0)], [0])
rx = ring([(0x2000, 2048, WRITE, 0)], [0])
write("virtio_net", "one-frame", tx + rx + frame)
write("virtio_net", "split-rx", tx + ring([(0x2000, 12, WRITE | NEXT, 1), (0x3000, 100, WRITE, 0)], [0]) + frame)
write("virtio_net", "tiny-rx", tx + ring([(0x2000, 10, WRITE, 0)], [0]) + frame)

# Ultracall: op, gpa byte (page number), npages byte, then two u64 args.
def call(op, page, n):
    return bytes([op, page, n]) + bytes(16)


write("ultracall", "esm-share-unshare", call(2, 0, 4) + call(3, 8, 2) + call(4, 9, 1) + call(1, 0, 0))
write("ultracall", "out-of-range", call(2, 0, 1) + call(3, 40, 4) + call(3, 0, 0) + call(5, 0, 0))
write("ultracall", "map-gpa-range", call(2, 1, 1) + bytes([8, 4, 2]) + bytes(8) + bytes([8 | 32, 4, 1]) + bytes(8))

# Boot tables: cpus, devices, flags (1 PCI, 2 VIOT, 4 VIOT on MMIO, 8 COM1), ...
write("boot_tables", "one-cpu", bytes([1, 0, 8]) + u64(0))
write("boot_tables", "many-devices-viot", bytes([8, 6, 1 | 2 | 8, 0, 2]) + u64(1 << 32))
write("boot_tables", "mmio-viot", bytes([255, 3, 2 | 4]) + u64(5 << 30))
write("boot_tables", "zero-cpus", bytes([0, 0, 0]))
# virtio-mmio: mode byte, then (register index, width byte, u64 value) writes
# or (index | 0x20, width byte) reads. Indexes into the target's REGS.
STATUS, QSEL, QNUM, QREADY, NOTIFY, DFSEL, DF, DESC, AVAIL, USED, CONFIG = 15, 8, 10, 11, 12, 7, 6, 16, 18, 20, 23


def w(reg, v):
    return bytes([reg, 0]) + u64(v)


def r(reg):
    return bytes([reg | 0x20, 0])


init = w(STATUS, 1) + w(STATUS, 3) + w(DFSEL, 1) + w(DF, 1) + w(DFSEL, 0) + w(DF, 1) + w(STATUS, 11) + r(STATUS)
for q in (0, 1):
    init += w(QSEL, q) + w(QNUM, 8) + w(DESC, 0x1000 * q) + w(AVAIL, 0x400 + 0x1000 * q) + w(USED, 0x800 + 0x1000 * q) + w(QREADY, 1)
write("virtio_mmio", "init-driver-ok-notify-reset", bytes([0]) + init + w(STATUS, 15) + w(NOTIFY, 0) + r(CONFIG) + w(STATUS, 0) + r(STATUS))
write("virtio_mmio", "no-version-1", bytes([0]) + w(STATUS, 3) + w(STATUS, 11) + r(STATUS) + w(STATUS, 15))
write("virtio_mmio", "ready-after-driver-ok", bytes([1]) + init + w(STATUS, 15) + w(QSEL, 0) + w(QREADY, 0) + w(QNUM, 3))
# virtio-pci: mode byte, then ops: op (bits 6-7 width 1/2/4/8, 0x20 write,
# 0x10 config space, 0x08 raw BAR offset, 0-7 region: common, ISR, device,
# notify, MSI-X table, PBA), a u16 offset, a u64 value for writes.
def bar_w(op, at, v):
    return bytes([op | 0x20]) + struct.pack("<H", at) + u64(v)


def bar_r(op, at):
    return bytes([op]) + struct.pack("<H", at)


B1, B2, B4, B8 = 0x00, 0x40, 0x80, 0xC0
pci = bar_w(B1, 0x14, 1) + bar_w(B1, 0x14, 3) + bar_w(B4, 0x08, 1) + bar_w(B4, 0x0C, 1) + bar_w(B1, 0x14, 11)
for q in (0, 1):
    pci += bar_w(B2, 0x16, q) + bar_w(B2, 0x18, 8) + bar_w(B8, 0x20, 0x1000 * q) + bar_w(B8, 0x28, 0x400 + 0x1000 * q)
    pci += bar_w(B8, 0x30, 0x800 + 0x1000 * q) + bar_w(B2, 0x1A, q) + bar_w(B2, 0x1C, 1)
pci += bar_w(B1, 0x14, 15) + bar_w(B2 | 3, 0, 0) + bar_r(B1 | 1, 0) + bar_r(B4 | 2, 0)
msix = bar_w(B4 | 4, 0, 0xFEE00000) + bar_w(B4 | 4, 8, 0x4041) + bar_w(B4 | 4, 12, 0) + bar_r(B8 | 5, 0)
cfg = bytes([0x10 | 0x20 | B2]) + struct.pack("<H", 4) + u64(6) + bytes([0x10 | B4]) + struct.pack("<H", 0x10)
write("virtio_pci", "init-driver-ok-notify", bytes([0]) + pci + bar_w(B1, 0x14, 0))
write("virtio_pci", "msix-table", bytes([1]) + msix + pci)
write("virtio_pci", "config-space", bytes([0]) + cfg)
sys.exit(0)
