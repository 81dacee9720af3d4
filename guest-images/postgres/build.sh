#!/bin/bash
# Build the hearth "postgres" guest image: the debian recipe's lean bookworm (no
# cloud-init, no sshd) with PostgreSQL 15, PostGIS and the other extensions hearth
# offers, pgbouncer, a template cluster made by initdb at build time, and hearth's
# guest agent (built from this workspace as a static binary), which configures the
# server from the NoCloud seed at boot and answers the host's control channel.
#
# Usage: guest-images/postgres/build.sh [OUT_DIR]
#   OUT_DIR defaults to ${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}/postgres.
# Everything else (caching, reproducibility, environment) is as for
# guest-images/debian/build.sh, which this recipe sources; see README.md.
set -euo pipefail
PG_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$PG_HERE/../.." && pwd)
RECIPE=postgres
# shellcheck source=SCRIPTDIR/../lib.sh
. "$PG_HERE/../lib.sh"
PG_MAJOR=15

FLAVOUR_NAME=postgres
FLAVOUR_PACKAGES="systemd-sysv udev linux-image-cloud-amd64 initramfs-tools iproute2 netbase
ca-certificates lz4 e2fsprogs postgresql-$PG_MAJOR postgresql-$PG_MAJOR-postgis-3
postgresql-$PG_MAJOR-postgis-3-scripts postgresql-$PG_MAJOR-cron postgresql-$PG_MAJOR-partman
postgresql-$PG_MAJOR-repack postgresql-$PG_MAJOR-hypopg postgresql-$PG_MAJOR-pgaudit
postgresql-$PG_MAJOR-ip4r postgresql-$PG_MAJOR-rum pgbouncer"
# Debian's own cluster units: the agent's hearth-postgresql.service runs the server.
FLAVOUR_MASK_UNITS="postgresql.service pgbouncer.service"
FLAVOUR_ENABLE_UNITS="systemd-networkd.service hearth-resolv-conf.path hearth-resolv-conf.service
hearth-agent-boot.service hearth-postgresql.service hearth-agent.service"
FLAVOUR_EXECUTABLES="usr/local/sbin/hearth-guest-agent"
FLAVOUR_NOTABLE_PACKAGES="postgresql-$PG_MAJOR postgresql-$PG_MAJOR-postgis-3 pgbouncer"

# The agent's inputs: its sources and the exact crates it is built from.
agent_inputs() {
	hearth_hash_files "$REPO" guest-agent/src guest-agent/Cargo.toml
	(cd "$REPO" && cargo tree --locked -q -p hearth-guest-agent -e normal --prefix none 2>/dev/null ||
		sha256sum Cargo.lock)
}
FLAVOUR_HASH=$({
	hearth_hash_files "$PG_HERE" build.sh rootfs
	agent_inputs
} | sha256sum | cut -d' ' -f1)

# Builds the agent, statically linked (the guest's libc is never its concern), into
# the flavour's root tree.
flavour_prepare() {
	local target_dir=${CARGO_TARGET_DIR:-/var/cache/hearth/target}
	log "building hearth-guest-agent (static)"
	(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
		cargo build --locked --release -q -p hearth-guest-agent --target x86_64-unknown-linux-gnu) ||
		die "cannot build hearth-guest-agent"
	FLAVOUR_ROOTFS=$WORK/flavour
	mkdir -p "$FLAVOUR_ROOTFS"
	cp -a "$PG_HERE/rootfs/." "$FLAVOUR_ROOTFS/"
	install -D -m 0755 "$target_dir/x86_64-unknown-linux-gnu/release/hearth-guest-agent" \
		"$FLAVOUR_ROOTFS/usr/local/sbin/hearth-guest-agent"
}

# The template cluster, made natively at build time (initdb under TCG takes far
# longer); each database's copy gets its own system identifier at first boot.
FLAVOUR_CUSTOMIZE="
chroot \"\$1\" install -d -o postgres -g postgres -m 0700 /usr/lib/hearth/pgdata-$PG_MAJOR
chroot \"\$1\" runuser -u postgres -- /usr/lib/postgresql/$PG_MAJOR/bin/initdb -D /usr/lib/hearth/pgdata-$PG_MAJOR \\
	-U postgres --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 --data-checksums >/dev/null
rm -f \"\$1\"/usr/lib/hearth/pgdata-$PG_MAJOR/postgresql.conf \"\$1\"/usr/lib/hearth/pgdata-$PG_MAJOR/pg_hba.conf \"\$1\"/usr/lib/hearth/pgdata-$PG_MAJOR/pg_ident.conf
"

# shellcheck source=SCRIPTDIR/../debian/build.sh
. "$PG_HERE/../debian/build.sh"
