#!/usr/bin/env python3
"""Instructions veil spends per request, per DMA setup, counted by callgrind.

Wall-clock time on the development machines is noisy (nested KVM, ~100 µs
per exit), instruction counts are not. This runs veil under
`valgrind --tool=callgrind --separate-threads=yes` with the test guest's
benchmark mode restricted to one case (`probe.bench_case`), twice per
setup: once with N requests and once with 2N. The difference between the
two runs, divided by the difference in requests, is the cost of one request
with boot, device set-up and teardown cancelled out. Only veil's own
(host user-space) instructions are counted: guest code runs in KVM, and the
kernel's share of each syscall and exit is not seen by valgrind.

Each thread's profile is attributed by the functions it ran: the device
worker of the case's device (blk0 or net0), the vIOMMU's worker, the vCPU
thread (the exit handling: trapped MMIO/PIO, notifications without an
ioeventfd) and veil's main loop.

    resources/bench/callgrind.py [--veil target/release/veil] [--transport mmio,pci]
        [--case blk-seqwrite-64k,blk-seqread-64k,net-1500] [--setup bypass,...] [--json FILE]

Prints a Markdown table on stdout.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

# name: (veil flags, guest DMA policy), as `veil bench dma` defines them.
SETUPS = {
    "bypass": (["--dma", "bypass"], "probe.dma=identity"),
    "platform-identity": (["--dma", "platform"], "probe.dma=bounce"),
    "iommu-lazy": (["--dma", "platform", "--iommu"], "probe.dma=lazy"),
    "iommu-strict": (["--dma", "platform", "--iommu"], "probe.dma=strict"),
    "secure-bounce": (["--dma", "platform"], "probe.dma=bounce probe.secure=1"),
}

# Which functions mark a thread as which role; the first match wins.
ROLES = [
    ("vcpu", re.compile(r"veil::vmm::vcpu|KvmRunWrapper")),
    ("iommu", re.compile(r"virtio::iommu::handler")),
    ("blk", re.compile(r"virtio::block::handler|block::request::Request")),
    ("net", re.compile(r"virtio::net::NetWorker|virtio::net::chain")),
]

RESULT = re.compile(r"^PROBE bench case=(\S+) .*\brequests=(\d+) .*\bresult=(\w+)")


class Failure(Exception):
    pass


def thread_role(path):
    with open(path, errors="replace") as f:
        text = f.read()
    for role, pattern in ROLES:
        if pattern.search(text):
            return role
    return "main"


def thread_total(path):
    with open(path) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    return 0


def run_once(veil, setup, transport, case, size, workdir):
    """One veil run under callgrind; returns (requests, {role: instructions})."""
    flags, policy = SETUPS[setup]
    kind = "net" if case.startswith("net") else "blk"
    out_dir = tempfile.mkdtemp(prefix=f"{setup}-{transport}-{case}-{size}-", dir=workdir)
    cmdline = (
        f"probe.mode=bench probe.bench={kind} probe.bench_case={case} "
        f"probe.bench_mib={size} probe.net_frames={size} {policy}"
    )
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out_dir}/cg.%p",
        veil,
        "run",
        "--memory",
        "512M",
        "--timeout",
        "600",
        "--cmdline",
        cmdline,
        # valgrind cannot run a program that installs seccomp filters; the
        # filters' cost is in the kernel, which callgrind does not see anyway.
        "--seccomp",
        "off",
        *flags,
    ]
    if kind == "blk":
        image = os.path.join(out_dir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(max(2 * size, 8) << 20)
        cmd += ["--disk", f"path={image},transport={transport}"]
    else:
        cmd += ["--net", f"loopback,transport={transport}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise Failure(f"{setup}/{transport}/{case}: veil under callgrind did not finish in 900 s")
    requests = None
    for line in proc.stdout.splitlines():
        m = RESULT.match(line)
        if m and m.group(1) == case:
            if m.group(3) != "ok":
                raise Failure(f"{setup}/{transport}/{case}: the guest reported: {line}")
            requests = int(m.group(2))
    if proc.returncode != 0 or requests is None:
        tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise Failure(f"{setup}/{transport}/{case}: veil exited {proc.returncode}, last line: {tail}")
    per_role = {}
    for name in os.listdir(out_dir):
        if name.startswith("cg."):
            path = os.path.join(out_dir, name)
            role = thread_role(path)
            per_role[role] = per_role.get(role, 0) + thread_total(path)
    shutil.rmtree(out_dir)
    return requests, per_role


def measure(veil, setup, transport, case, size, workdir):
    r1, i1 = run_once(veil, setup, transport, case, size, workdir)
    r2, i2 = run_once(veil, setup, transport, case, 2 * size, workdir)
    if r2 <= r1:
        raise Failure(f"{setup}/{transport}/{case}: the larger run made no more requests ({r1} then {r2})")
    roles = set(i1) | set(i2)
    per_request = {role: (i2.get(role, 0) - i1.get(role, 0)) / (r2 - r1) for role in roles}
    return {"setup": setup, "transport": transport, "case": case, "requests": [r1, r2], "per_request": per_request}


def count(x):
    """An instruction count for the table; differences of two runs can come
    out a hair below zero where a thread does no work per request."""
    return f"{max(x, 0.0):,.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--veil", default="target/release/veil")
    p.add_argument("--transport", default="mmio,pci")
    p.add_argument("--case", default="blk-seqwrite-64k,blk-seqread-64k,net-1500")
    p.add_argument("--setup", default=",".join(SETUPS))
    p.add_argument("--mib", type=int, default=4, help="MiB per block case in the smaller run")
    p.add_argument("--frames", type=int, default=2000, help="frames per net case in the smaller run")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("callgrind.py: error: valgrind is not installed (apt-get install valgrind)")
    if not os.access(a.veil, os.X_OK):
        sys.exit(f"callgrind.py: error: {a.veil} is not an executable (cargo build --release first)")
    for s in a.setup.split(","):
        if s not in SETUPS:
            sys.exit(f"callgrind.py: error: unknown setup {s!r} (known: {', '.join(SETUPS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="veil-callgrind-") as workdir:
        try:
            for transport in a.transport.split(","):
                for case in a.case.split(","):
                    size = a.frames if case.startswith("net") else a.mib
                    for setup in a.setup.split(","):
                        print(f"callgrind.py: {setup} {transport} {case}", file=sys.stderr)
                        rows.append(measure(a.veil, setup, transport, case, size, workdir))
        except Failure as e:
            sys.exit(f"callgrind.py: error: {e}")
    print("| transport | case | setup | device thread | vIOMMU thread | vCPU thread | main | all veil threads | vs bypass |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        pr = r["per_request"]
        device = pr.get("net" if r["case"].startswith("net") else "blk", 0)
        total = sum(pr.values())
        base = next(
            (b for b in rows if b["setup"] == "bypass" and b["case"] == r["case"] and b["transport"] == r["transport"]),
            None,
        )
        ratio = f"{total / sum(base['per_request'].values()):.2f}" if base else "-"
        print(
            f"| {r['transport']} | {r['case']} | {r['setup']} | {count(device)} | {count(pr.get('iommu', 0))} "
            f"| {count(pr.get('vcpu', 0))} | {count(pr.get('main', 0))} | {count(total)} | {ratio} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
