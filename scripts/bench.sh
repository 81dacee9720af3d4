#!/usr/bin/env bash
# Benchmarks (not timed tests), each side by side with its reference in one run, so the
# machine's noise hits both alike. Writes docs/benchmarks.md.
#   VM boot: POST /v1/vms until the VMM runs and until HEARTH-GUEST-READY, against the
#   identical QEMU command line launched by hand (QEMU/TCG, tiny guest).
#   Storage: blockd's NBD server vs qemu-nbd and nbdkit; its vhost-user-blk backend vs
#   qemu-storage-daemon (scripts/bench_nbd.sh, scripts/bench_vhost_user.sh).
#   Images: a root disk from a 10 GiB image by clone (ext4: qcow2 overlay; XFS loop
#   mount: reflink) vs a full copy; qcow2 import vs qemu-img convert (image_bench).
#   VM create path (BASELINE=<commit> only): this tree's api against that commit's,
#   POST /v1/vms until its operation succeeded, interleaved (bench_create_ab.py); then
#   GET /v1/vms with 1,000 VMs for both, runs alternated (bench_api.py, embedded store).
#   REST API: GET /v1/vms with 1,000 VMs under wrk, embedded store and etcd, and the
#   restart to serving them again (scripts/bench_api.py, which also runs on its own).
#   Managed PostgreSQL: create until the first TLS query with the password, against a
#   Debian guest with cloud-init and PostgreSQL (scripts/bench_db.sh, also on its own).
#   Several hosts: the scheduler placing 1,000 VMs over 50 simulated hosts, and the time
#   until a host whose api died is marked lost (scripts/bench_hosts.py, also on its own).
# Usage: scripts/bench.sh   (ROUNDS=N to change the number of interleaved rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages "${HEARTH_BUILD_PACKAGES[@]}" "${HEARTH_RUNTIME_PACKAGES[@]}" python3 iproute2
guest-images/tiny/build.sh "$HEARTH_IMAGE_CACHE/tiny"
cargo build --release --locked -p api -p netd -p imaged -p hearth-placement --bins --examples
api_bin="$CARGO_TARGET_DIR/release/hearth-api"
netd_bin="$CARGO_TARGET_DIR/release/netd"

out=$(mktemp) net_out=$(mktemp) ipam_out=$(mktemp) nbd_out=$(mktemp) vu_out=$(mktemp) img_out=$(mktemp) api_out=$(mktemp) db_out=$(mktemp) hosts_out=$(mktemp)
img_work=$(mktemp -d /var/tmp/hearth-image-bench.XXXXXX)
xfs_mnt=""
cleanup() {
	[ -z "$xfs_mnt" ] || { umount "$xfs_mnt" 2>/dev/null; rmdir "$xfs_mnt"; }
	rm -rf "$img_work"
	rm -f "$out" "$net_out" "$ipam_out" "$nbd_out" "$vu_out" "$img_out" "$api_out" "$db_out" "$hosts_out"
}
trap cleanup EXIT
ensure_packages "${HEARTH_TEST_PACKAGES[@]}"
echo "==> NBD: blockd vs qemu-nbd vs nbdkit (1 GiB in /dev/shm, loopback and Unix socket)"
ROUNDS="${NBD_ROUNDS:-3}" scripts/bench_nbd.sh >"$nbd_out"
echo "==> vhost-user-blk: blockd vs qemu-storage-daemon (fio in a tiny guest)"
ROUNDS="${VHOST_ROUNDS:-5}" scripts/bench_vhost_user.sh >"$vu_out"
echo "==> images: root disk by clone vs full copy; qcow2 import vs qemu-img convert"
xfs_mnt=$(mktemp -d /var/tmp/hearth-xfs.XXXXXX)
truncate -s 14G "$img_work/xfs.img"
mkfs.xfs -q -m reflink=1 "$img_work/xfs.img"
mount -o loop "$img_work/xfs.img" "$xfs_mnt"
"$CARGO_TARGET_DIR/release/examples/image_bench" "$img_work/ext4" "$xfs_mnt" "${IMAGE_ROUNDS:-5}" "$HEARTH_IMAGE_CACHE/debian/disk.raw" >"$img_out"
cat "$img_out"
umount "$xfs_mnt" && rmdir "$xfs_mnt" && xfs_mnt=""
echo "==> netd: ${TAPS:-200} TAPs with IP allocation vs ip commands (private namespaces)"
unshare --net --mount --propagation private bash -c 'mount -t sysfs sysfs /sys && ip link set lo up && exec python3 scripts/bench_netd.py "$0"' \
	"$netd_bin" >"$net_out"
cat "$net_out"
echo "==> IPAM allocations in a /16"
"$CARGO_TARGET_DIR/release/examples/ipam_bench" 2000 >"$ipam_out"
cat "$ipam_out"
echo "==> VM boot: REST path vs QEMU by hand, jailed vs not (${ROUNDS:-5} interleaved rounds, private network namespace)"
# The cgroup file systems stay visible under the namespace's fresh sysfs (the jail
# puts each VMM in a cgroup, and that is part of what is measured).
cg_aside=$(mktemp -d /var/tmp/hearth-cg.XXXXXX)
unshare --net --mount --propagation private bash -c 'mount --rbind /sys/fs/cgroup "$2" && mount -t sysfs sysfs /sys &&
	mount --move "$2" /sys/fs/cgroup && ip link set lo up && exec python3 scripts/bench_vm_boot.py "$0" "$1"' \
	"$api_bin" "$HEARTH_IMAGE_CACHE" "$cg_aside" >"$out"
rmdir "$cg_aside"
cat "$out"
if [ -n "${BASELINE:-}" ]; then
	# The VM create path against another commit (e.g. BASELINE=HEAD~1), built in a
	# worktree with a target directory of its own: path dependencies of two checkouts
	# would otherwise overwrite each other's artifacts in a shared one.
	echo "==> VM create path: this tree against $BASELINE (interleaved, private network namespace)"
	base_wt=$(mktemp -d /var/tmp/hearth-baseline.XXXXXX)
	git worktree add -q --detach "$base_wt" "$BASELINE"
	CARGO_TARGET_DIR="${CARGO_TARGET_DIR}-baseline" cargo build --release --locked -p api --bin hearth-api \
		--manifest-path "$base_wt/Cargo.toml"
	cp "${CARGO_TARGET_DIR}-baseline/release/hearth-api" "$base_wt/hearth-api-baseline"
	for start in 0 1; do
		unshare --net bash -c 'ip link set lo up && START="$3" exec python3 scripts/bench_create_ab.py "$0" "$1" "$2"' \
			"$base_wt/hearth-api-baseline" "$api_bin" "$HEARTH_IMAGE_CACHE" "$start"
	done
	echo "==> GET /v1/vms with ${VMS:-1000} VMs: this tree against $BASELINE, alternated (${AB_RUNS:-3} runs each, embedded store)"
	for run in $(seq "${AB_RUNS:-3}"); do
		for which in baseline this; do
			bin=$api_bin
			[ "$which" = baseline ] && bin="$base_wt/hearth-api-baseline"
			STORES=embedded RESTARTS=1 DURATION="${AB_DURATION:-5}" unshare --net --mount --propagation private \
				bash -c 'mount -t sysfs sysfs /sys && ip link set lo up && HEARTH_BENCH_NETNS=1 exec python3 scripts/bench_api.py "$0" "$1"' \
				"$bin" "$HEARTH_IMAGE_CACHE" 2>/dev/null |
				python3 -c 'import json,sys; d=json.load(sys.stdin)["stores"]["embedded"]; print(sys.argv[1], "run", sys.argv[2], "create 1000: %.2f s" % d["create_s"], "GET /v1/vms: %.0f req/s" % d["list"]["rps"], "gzip: %.0f req/s" % d["list_gzip"]["rps"], "GET /v1/vms/{id}: %.0f req/s" % d["show"]["rps"])' "$which" "$run"
		done
	done
	git worktree remove --force "$base_wt"
fi
echo "==> managed PostgreSQL: create to the first TLS query, against Debian + cloud-init + PostgreSQL"
scripts/bench_db.sh >"$db_out"
echo "==> several hosts: the scheduler, and failure detection (${HOSTS_ROUNDS:-5} rounds)"
ROUNDS="${HOSTS_ROUNDS:-5}" python3 scripts/bench_hosts.py "$api_bin" "$CARGO_TARGET_DIR/release/examples/place_many" \
	"$HEARTH_IMAGE_CACHE" >"$hosts_out"
cat "$db_out"
echo "==> REST API: GET /v1/vms with ${VMS:-1000} VMs under wrk, embedded store and etcd; restart time"
unshare --net --mount --propagation private bash -c 'mount -t sysfs sysfs /sys && ip link set lo up && HEARTH_BENCH_NETNS=1 exec python3 scripts/bench_api.py "$0" "$1"' \
	"$api_bin" "$HEARTH_IMAGE_CACHE" >"$api_out"
cat "$api_out"

python3 - "$out" "$net_out" "$ipam_out" <<'PY'
import json, sys, datetime, platform, os
r = json.load(open(sys.argv[1]))
net = json.load(open(sys.argv[2]))
ipam = json.load(open(sys.argv[3]))
rest, hand = r["rest"], r["hand"]
def row(label, key):
    a, b = rest[key], hand[key]
    over = a["median"] - b["median"]
    pct = 100.0 * over / b["median"]
    return f"| {label} | {a['median']:.1f} ({a['min']:.1f}-{a['max']:.1f}) | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | {over:+.1f} ms ({pct:+.1f}%) |"
unj = r["unjailed"]
def jrow(label, key):
    a, b = rest[key], unj[key]
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

## VM boot: jailed VMM vs jailing turned off

The same REST path, the same rounds, on two hearth-api instances: one jailing its VMMs
(the default: the jailer, its own user, mount namespace, seccomp, cgroup), one started
with `--insecure-no-jail`. Rounds alternate which goes first.

| Milestone | jailed | not jailed | jailing costs |
|---|---|---|---|
{jrow("VMM running (QMP socket answers)", "vmm")}
{jrow("HEARTH-GUEST-READY", "ready")}

Goal: jailing costs at most 20 ms before the VMM runs and nothing measurable until the
guest is ready (within 5%: a tie on these machines). The storage rows below run their
QEMU by hand, not through vmm-manager, so they do not see the jail.

## netd: {net['taps']} TAPs on a bridge, each with an IP allocation

Through netd (IPAM allocation persisted with fdatasync, TAP by ioctl, one netlink
request to set its MAC, bridge and state, anti-spoofing set elements added through
libnftables) against the equivalent `ip` commands (`ip tuntap add`, `ip link set master`,
`ip link set up`; no address bookkeeping, no firewall). netd is measured twice: one
`PUT /ports/{{id}}` per port (a new HTTP connection each, as the api attaches one NIC), and
all ports in one `PUT /ports` (one IPAM sync and one firewall transaction for the lot).

| path | total | per TAP | speed vs `ip` |
|---|---|---|---|
| netd, one request per port | {net['netd_seconds']*1000:.0f} ms | {net['netd_seconds']*1000/net['taps']:.2f} ms | {net['ip_seconds']/net['netd_seconds']:.1f}x |
| netd, one request for all | {net['netd_batch_seconds']*1000:.0f} ms | {net['netd_batch_seconds']*1000/net['taps']:.2f} ms | {net['ip_seconds']/net['netd_batch_seconds']:.1f}x |
| ip commands | {net['ip_seconds']*1000:.0f} ms | {net['ip_seconds']*1000/net['taps']:.2f} ms | 1x |

Goal: at least 10x the speed of the `ip` sequence.

## IPAM allocations in a /16

{ipam['allocations']} allocations, each persisted before returning: {ipam['seconds']*1000:.0f} ms, {ipam['per_second']:.0f} per second.
"""
open("docs/benchmarks.md", "w").write(doc)
print(doc)
PY
python3 scripts/bench_storage_md.py "$nbd_out" "$vu_out" | tee -a docs/benchmarks.md
cat "$img_out" >>docs/benchmarks.md
python3 scripts/bench_api.py --markdown "$api_out" | tee -a docs/benchmarks.md
python3 scripts/bench_db.py --markdown "$db_out" | tee -a docs/benchmarks.md
python3 scripts/bench_hosts.py --markdown "$hosts_out" | tee -a docs/benchmarks.md
