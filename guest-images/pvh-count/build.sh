#!/bin/bash
# Build the "pvh-count" guest: a few hundred bytes of assembly (count.S) that the real
# Cloud Hypervisor boots on machines whose KVM cannot run a Linux guest (see
# README.md). A test fixture, never shipped.
#   vmlinux     the guest, an ELF64 with a PVH entry note
#   cmdline     empty (the guest reads none)
#   image.json  what it was built from
#
# Usage: guest-images/pvh-count/build.sh [OUT_DIR]
#   OUT_DIR defaults to ${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}/pvh-count.
# Cached: an OUT_DIR built from the same inputs (this folder, lib.sh, the binutils
# version) is left alone ("pvh-count image up to date").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE_CACHE=${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}
OUT_DIR=${1:-$IMAGE_CACHE/pvh-count}
export LC_ALL=C
RECIPE=pvh-count
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
case $OUT_DIR in /*) ;; *) OUT_DIR=$PWD/$OUT_DIR ;; esac
OUT_DIR=${OUT_DIR%/}
need_tools "apt-get install binutils" as ld

binutils=$(as --version | head -n1)
hash=$( (hearth_hash_files "$HERE" build.sh count.S link.ld; hearth_hash_files "$HERE/.." lib.sh; echo "$binutils") | sha256sum | cut -d' ' -f1)
if [ -f "$OUT_DIR/image.json" ] && grep -q "\"recipe_hash\": \"$hash\"" "$OUT_DIR/image.json"; then
	log "image up to date"
	exit 0
fi

hearth_traps
hearth_tmpdir STAGE "$(dirname "$OUT_DIR")/.pvh-count.XXXXXX"
hearth_tmpdir WORK /tmp/pvh-count.XXXXXX
as --64 "$HERE/count.S" -o "$WORK/count.o"
ld -m elf_x86_64 --no-warn-rwx-segments -T "$HERE/link.ld" "$WORK/count.o" -o "$STAGE/vmlinux"
: >"$STAGE/cmdline"
cat >"$STAGE/image.json" <<JSON
{
  "name": "pvh-count",
  "binutils": "$binutils",
  "recipe_hash": "$hash",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
chmod 755 "$STAGE"
hearth_into_place "$STAGE" "$OUT_DIR"
log "built $OUT_DIR"
