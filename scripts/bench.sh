#!/usr/bin/env bash
# Benchmarks (not timed tests), each side by side with its reference in one run, so the
# machine's noise hits both alike. Writes docs/benchmarks.md.
#   VM boot: POST /v1/vms until the VMM runs and until HEARTH-GUEST-READY, against the
#   identical QEMU command line launched by hand (QEMU/TCG, tiny guest).
# Usage: scripts/bench.sh   (ROUNDS=N to change the number of interleaved rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages "${HEARTH_RUNTIME_PACKAGES[@]}" python3 iproute2
guest-images/tiny/build.sh "$HEARTH_IMAGE_CACHE/tiny"
cargo build --release --locked -p api
api_bin="$CARGO_TARGET_DIR/release/hearth-api"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "==> VM boot: REST path vs QEMU by hand (${ROUNDS:-5} interleaved rounds, private network namespace)"
unshare --net bash -c 'ip link set lo up && exec python3 scripts/bench_vm_boot.py "$0" "$1"' \
	"$api_bin" "$HEARTH_IMAGE_CACHE" >"$out"
cat "$out"

python3 - "$out" <<'PY'
import json, sys, datetime, platform, os
r = json.load(open(sys.argv[1]))
rest, hand = r["rest"], r["hand"]
def row(label, key):
    a, b = rest[key], hand[key]
    over = a["median"] - b["median"]
    pct = 100.0 * over / b["median"]
    return f"| {label} | {a['median']:.1f} ({a['min']:.1f}-{a['max']:.1f}) | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | {over:+.1f} ms ({pct:+.1f}%) |"
cpu = next((l.split(':',1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
doc = f"""# Benchmarks

Written by `scripts/bench.sh`; every comparison runs side by side in one run, rounds
interleaved. Medians with (min-max), in milliseconds.

Machine: {os.cpu_count()} cores, {cpu}, kernel {platform.release()}; run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC.

## VM boot: REST path vs the identical QEMU command line by hand

QEMU under TCG (no usable KVM here), `tiny` guest, 1 vCPU, 256 MiB; {rest['vmm']['n']} rounds.
"VMM running" is the moment QEMU's QMP socket accepts a connection; "ready" is
`HEARTH-GUEST-READY` in the serial log. The REST column starts at `POST /v1/vms`.

| milestone | REST (hearth-api --all-in-one) | by hand | REST overhead |
|---|---|---|---|
{row("VMM running", "vmm")}
{row("HEARTH-GUEST-READY", "ready")}

Goal: at most 20 ms added before the VMM starts, at most 5% added until ready.
"""
open("docs/benchmarks.md", "w").write(doc)
print(doc)
PY
