#!/bin/bash
# Fetch the .debs that turn a throw-away debian guest into something the image is not:
# an LVM thin host for blockd's thin-pool suite, or a whole hearth host (QEMU, nftables,
# dnsmasq, lvm2) for the api's test on an LVM pool. The packages are what
# `apt-get install --no-install-recommends PACKAGE...` would add to the image: apt
# works that out from the image's own dpkg status (read from disk.raw with debugfs)
# and the host's apt lists, the ones the image was built from. The tests install them
# in the guest with `dpkg -i`, as a user installs packages.
#
# Usage: guest-images/debian/guest-debs.sh IMAGE_DIR OUT_DIR PACKAGE...
#   IMAGE_DIR holds disk.raw (guest-images/debian/build.sh's output).
# Cached: files already there with the right name and SHA-256 are kept; others removed.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 IMAGE_DIR OUT_DIR PACKAGE..." >&2; exit 2; }
IMAGE_DIR=$1
OUT_DIR=$2
shift 2

mkdir -p "$OUT_DIR"
status=$(mktemp)
trap 'rm -f "$status"' EXIT
debugfs -R "cat /var/lib/dpkg/status" "$IMAGE_DIR/disk.raw" >"$status" 2>/dev/null
grep -q '^Package: dpkg$' "$status" || { echo "no dpkg status in $IMAGE_DIR/disk.raw" >&2; exit 1; }
# A simulated install against the image's status names the packages and versions
# (no lock on the host's own dpkg is needed); `apt-get download` gives their SHA-256.
# shellcheck disable=SC2046
uris=$(apt-get download --print-uris $(apt-get -s -qq --no-install-recommends \
	-o Debug::NoLocking=1 -o Dir::State::status="$status" install "$@" |
	awk '$1 == "Inst" { gsub(/[()]/, "", $3); print $2 "=" $3 }'))
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
[ ${#wanted[@]} -gt 0 ] || { echo "apt found nothing to add for: $*" >&2; exit 1; }
for f in "$OUT_DIR"/*.deb; do
	[ -e "$f" ] || continue
	keep=0
	for w in "${wanted[@]}"; do [ "$(basename "$f")" = "$w" ] && keep=1; done
	[ $keep = 1 ] || rm -f "$f"
done
echo "guest packages for '$*' in $OUT_DIR: ${#wanted[@]} files"
