#!/bin/bash
# The managed-database benchmark's reference (scripts/bench_db.sh), never shipped: the
# debian recipe's guest (cloud-init, trimmed as guest-images/debian/README.md says)
# with Debian's PostgreSQL 15 installed the stock way (its own `main` cluster,
# pg_ctlcluster units). cloud-init's user-data configures TLS, pg_hba and the password,
# as a user would without hearth's agent.
#
# Usage: guest-images/debian-postgres-ref/build.sh [OUT_DIR]
#   OUT_DIR defaults to ${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}/debian-postgres-ref.
set -euo pipefail
REF_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=debian-postgres-ref
# shellcheck source=SCRIPTDIR/../lib.sh
. "$REF_HERE/../lib.sh"
FLAVOUR_NAME=debian-postgres-ref
FLAVOUR_PACKAGES="systemd-sysv udev cloud-init openssh-server linux-image-cloud-amd64
initramfs-tools iproute2 netbase ca-certificates lz4 postgresql-15"
FLAVOUR_NOTABLE_PACKAGES="postgresql-15"
FLAVOUR_HASH=$(hearth_hash_files "$REF_HERE" build.sh)
# shellcheck source=SCRIPTDIR/../debian/build.sh
. "$REF_HERE/../debian/build.sh"
