#!/bin/bash
# Fetch the .debs that turn the debian guest image into an LVM thin host: lvm2,
# thin-provisioning-tools and the libraries of theirs the image lacks, in the
# versions the host's apt lists give (the ones the image was built from).
# blockd's test `lvm_thin_pool_in_a_debian_guest` installs them in a throw-away
# guest to run the thin-pool suite on a real device-mapper.
#
# Usage: guest-images/debian/lvm-debs.sh [OUT_DIR]
#   OUT_DIR defaults to ${HEARTH_DEB_CACHE:-/var/cache/hearth/debs}/lvm-guest.
# Cached: files already there with the right name and SHA-256 are kept; others removed.
set -euo pipefail
OUT_DIR=${1:-${HEARTH_DEB_CACHE:-/var/cache/hearth/debs}/lvm-guest}
# What `apt-get install lvm2 thin-provisioning-tools` adds to the image (bookworm).
PACKAGES="lvm2 dmeventd libaio1 libdevmapper-event1.02.1 liblvm2cmd2.03 thin-provisioning-tools lsb-base"

mkdir -p "$OUT_DIR"
# shellcheck disable=SC2086
uris=$(apt-get download --print-uris $PACKAGES)
wanted=()
while read -r uri file _size sum; do
	[ -n "$uri" ] || continue
	uri=${uri//\'/}
	sum=${sum#SHA256:}
	wanted+=("$file")
	if [ -f "$OUT_DIR/$file" ] && echo "$sum  $OUT_DIR/$file" | sha256sum --quiet -c 2>/dev/null; then
		continue
	fi
	tmp=$(mktemp "$OUT_DIR/.download.XXXXXX")
	curl -fsSL --retry 3 -o "$tmp" "$uri"
	echo "$sum  $tmp" | sha256sum --quiet -c || { rm -f "$tmp"; echo "checksum mismatch: $uri" >&2; exit 1; }
	chmod 644 "$tmp"
	mv "$tmp" "$OUT_DIR/$file"
	echo "fetched $file"
done <<<"$uris"
[ ${#wanted[@]} -eq "$(wc -w <<<"$PACKAGES")" ] || { echo "apt gave ${#wanted[@]} files for: $PACKAGES" >&2; exit 1; }
for f in "$OUT_DIR"/*.deb; do
	[ -e "$f" ] || continue
	keep=0
	for w in "${wanted[@]}"; do [ "$(basename "$f")" = "$w" ] && keep=1; done
	[ $keep = 1 ] || rm -f "$f"
done
echo "lvm guest packages in $OUT_DIR: ${wanted[*]}"
