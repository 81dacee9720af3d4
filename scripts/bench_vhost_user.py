#!/usr/bin/env python3
"""Summarises scripts/bench_vhost_user.sh: reads the fio JSON each guest printed on its
serial console, takes per-backend medians over the rounds, prints JSON on stdout and a
table on stderr."""

import argparse
import json
import statistics
import sys

METRICS = [
    # (key, fio job, direction, field, unit, scale)
    ("seq_read_mib_s", "seq_read", "read", "bw", "MiB/s", 1 / 1024),
    ("seq_write_mib_s", "seq_write", "write", "bw", "MiB/s", 1 / 1024),
    ("rand_read_4k_iops", "rand_read", "read", "iops", "IOPS", 1),
    ("rand_write_4k_iops", "rand_write", "write", "iops", "IOPS", 1),
]
BACKENDS = ["hearth", "qemu-storage-daemon"]


def fio_results(console_path):
    text = open(console_path, encoding="utf-8", errors="replace").read().replace("\r", "")
    start = text.index("BENCH-JSON-BEGIN") + len("BENCH-JSON-BEGIN")
    end = text.index("BENCH-JSON-END", start)
    body = text[start:end]
    # fio may print notes before its JSON document.
    doc = json.loads(body[body.index("{"):])
    jobs = {j["jobname"]: j for j in doc["jobs"]}
    out = {}
    for key, job, direction, field, _unit, scale in METRICS:
        j = jobs[job]
        if j.get("error"):
            raise SystemExit(f"{console_path}: fio job {job} failed with error {j['error']}")
        out[key] = j[direction][field] * scale
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    for opt in ["rounds", "runtime", "disk-mib", "queues", "smp"]:
        ap.add_argument("--" + opt, type=int, required=True)
    ap.add_argument("--qsd-aio", required=True)
    ap.add_argument("--kernel", default="")
    args = ap.parse_args()

    raw = {b: {m[0]: [] for m in METRICS} for b in BACKENDS}
    with open(args.results, encoding="utf-8") as f:
        for line in f:
            name, _round, console = line.rstrip("\n").split("\t")
            for key, value in fio_results(console).items():
                raw[name][key].append(round(value, 1))

    medians = {b: {k: round(statistics.median(v), 1) for k, v in raw[b].items() if v} for b in BACKENDS}
    ratio = {
        k: round(medians["hearth"][k] / medians["qemu-storage-daemon"][k], 3)
        for k in medians["hearth"]
        if medians["qemu-storage-daemon"].get(k)
    }
    report = {
        "benchmark": "vhost-user-blk backends, tiny guest under QEMU/TCG, fio in the guest",
        "setup": {
            "accelerator": "tcg",
            "guest_vcpus": args.smp,
            "queues": args.queues,
            "guest_kernel": args.kernel,
            "disk": f"{args.disk_mib} MiB raw file in /dev/shm",
            "fio": "libaio, direct=1; seq: bs=1M iodepth=8; rand: bs=4k iodepth=32",
            "runtime_s_per_job": args.runtime,
            "rounds": args.rounds,
            "order": "interleaved, flipped every round",
            "hearth": "blockd::vhost_user::VhostUserBlkExport on FileDevice (examples/vhost_user_blk, release)",
            "qemu-storage-daemon": f"--blockdev file,cache.direct=off,aio={args.qsd_aio} --export vhost-user-blk,iothread",
        },
        "median": medians,
        "hearth_over_qsd": ratio,
        "runs": raw,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")

    w = sys.stderr.write
    w(f"\nvhost-user-blk under TCG, medians of {args.rounds} interleaved rounds\n")
    w(f"{'metric':<22}{'hearth':>12}{'qsd':>12}{'hearth/qsd':>12}\n")
    for key, _job, _direction, _field, unit, _scale in METRICS:
        h = medians["hearth"].get(key, float("nan"))
        q = medians["qemu-storage-daemon"].get(key, float("nan"))
        w(f"{key + ' (' + unit + ')':<22}{h:>12.1f}{q:>12.1f}{ratio.get(key, float('nan')):>12.3f}\n")


if __name__ == "__main__":
    main()
