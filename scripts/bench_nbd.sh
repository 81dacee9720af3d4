#!/usr/bin/env bash
# Benchmarks blockd's NBD server against qemu-nbd and nbdkit on a 1 GiB file in
# /dev/shm (see scripts/bench_nbd.py). JSON on stdout, a table on stderr.
# Needs the Debian packages qemu-utils nbdkit libnbd-bin fio.
# Environment: ROUNDS, FIO_RUNTIME, NBDCOPY_REPEAT, OURS_ARGS, SERVERS, TRANSPORTS, PIN (passed to the
# helper; TRANSPORTS=tls runs only the TLS rows).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/hearth/target}"
cargo build --release -p blockd --example nbd_serve >&2
export OURS="$CARGO_TARGET_DIR/release/examples/nbd_serve"
exec python3 scripts/bench_nbd.py
