#!/usr/bin/env bash
# The managed-database benchmark on its own (scripts/bench.sh runs it too): builds the
# postgres image and the reference (guest-images/debian-postgres-ref), then runs
# scripts/bench_db.py in a private network namespace with the release hearth-api.
# Prints bench_db.py's JSON. Usage: scripts/bench_db.sh   (ROUNDS=N, default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_packages "${HEARTH_BUILD_PACKAGES[@]}" "${HEARTH_RUNTIME_PACKAGES[@]}" python3 iproute2 openssl postgresql-client >&2
guest-images/postgres/build.sh "$HEARTH_IMAGE_CACHE/postgres" >&2
guest-images/debian-postgres-ref/build.sh "$HEARTH_IMAGE_CACHE/debian-postgres-ref" >&2
cargo build --release --locked -p api --bins >&2
cg_aside=$(mktemp -d /var/tmp/hearth-cg.XXXXXX)
unshare --net --mount --propagation private bash -c 'mount --rbind /sys/fs/cgroup "$2" && mount -t sysfs sysfs /sys &&
	mount --move "$2" /sys/fs/cgroup && ip link set lo up && exec python3 scripts/bench_db.py "$0" "$1"' \
	"$CARGO_TARGET_DIR/release/hearth-api" "$HEARTH_IMAGE_CACHE" "$cg_aside"
rmdir "$cg_aside"
