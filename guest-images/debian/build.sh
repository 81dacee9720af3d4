#!/bin/bash
# Build the hearth "debian" guest image: Debian bookworm with systemd, cloud-init
# (NoCloud only, systemd-networkd) and sshd, made with mmdebstrap.
#   disk.raw      sparse raw disk, ext4 on the whole disk (no partition table), 2 GiB
#   vmlinuz       the image's own Debian cloud kernel (bzImage), for QEMU
#   vmlinux       the same kernel, uncompressed ELF with PVH note (Cloud Hypervisor)
#   initrd.img    the image's own initramfs-tools initramfs
#   cmdline       default kernel command line (root=/dev/vda)
#   image.json    what it was built from
#   packages.txt  every installed package and version
#
# Usage: guest-images/debian/build.sh [OUT_DIR]
#   OUT_DIR defaults to ${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}/debian.
#   HEARTH_DEB_CACHE (default /var/cache/hearth/debs) keeps downloaded .debs
#   (in mmdebstrap-bookworm/) between builds.
#   HEARTH_DEBIAN_MIRROR, HEARTH_DEBIAN_SECURITY_MIRROR: apt mirrors (default
#   http://deb.debian.org/debian and http://deb.debian.org/debian-security).
#   HEARTH_IMAGE_REBUILD=1 builds even if OUT_DIR is up to date.
#   SOURCE_DATE_EPOCH: timestamp for generated files (default: a fixed date).
#
# Needs root (mmdebstrap --mode=root, chroot). Installs mmdebstrap with apt-get
# if it is missing.
#
# Cached: if OUT_DIR holds a complete build from the same inputs (this script,
# rootfs/, mke2fs.conf, ../lib.sh, the mirrors, and the candidate versions that
# the host's apt lists give for the image's packages and everything they depend
# on), prints "debian image up to date" and exits 0. The image is assembled in
# temp dirs next to OUT_DIR and renamed into place at the end.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE_CACHE=${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}
# A recipe that builds on this one (guest-images/postgres) sets FLAVOUR_* and sources
# this script: FLAVOUR_NAME, FLAVOUR_PACKAGES (instead of PACKAGES), FLAVOUR_MASK_UNITS
# and FLAVOUR_ENABLE_UNITS (added), FLAVOUR_ROOTFS (a directory laid over rootfs/),
# FLAVOUR_EXECUTABLES (its executable files), FLAVOUR_HASH (more recipe input),
# FLAVOUR_CUSTOMIZE (a mmdebstrap customize hook body; the root tree is $1) and
# FLAVOUR_NOTABLE_PACKAGES.
IMAGE_NAME=${FLAVOUR_NAME:-debian}
OUT_DIR=${1:-$IMAGE_CACHE/$IMAGE_NAME}
DEB_CACHE=${HEARTH_DEB_CACHE:-/var/cache/hearth/debs}
SUITE=bookworm
MIRROR=${HEARTH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${HEARTH_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# lz4: the initramfs compressor (fastest to unpack under emulation). No
# systemd-resolved: it and the D-Bus it needs cost ~10 s of a TCG boot;
# hearth-resolv-conf (rootfs/) writes /etc/resolv.conf from networkd's state.
PACKAGES=${FLAVOUR_PACKAGES:-"systemd-sysv udev cloud-init openssh-server linux-image-cloud-amd64
initramfs-tools iproute2 netbase ca-certificates lz4"}
# Installed versions recorded in image.json (the full list is packages.txt).
NOTABLE_PACKAGES="base-files cloud-init systemd openssh-server python3 libc6 initramfs-tools e2fsprogs ${FLAVOUR_NOTABLE_PACKAGES:-}"
# Units a hearth guest never needs; each costs boot time under TCG (e2scrub_reap
# alone ~30 s, networkd-wait-online ~14 s when a NIC has no carrier).
# cloud-config.service: its modules run in cloud-final (rootfs/etc/cloud/cloud.cfg.d).
MASK_UNITS="apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
dpkg-db-backup.timer dpkg-db-backup.service e2scrub_all.timer e2scrub_all.service
e2scrub_reap.service fstrim.timer fstrim.service systemd-networkd-wait-online.service
cloud-config.service ${FLAVOUR_MASK_UNITS:-}"
ENABLE_UNITS=${FLAVOUR_ENABLE_UNITS:-"systemd-networkd.service hearth-guest-ready.service hearth-resolv-conf.path
hearth-resolv-conf.service"}
DISK_SIZE=$((2 * 1024 * 1024 * 1024))
# Fixed, so the same inputs give the same file system identity.
FS_UUID=5f2d5a0c-8e1f-4b4a-9a57-68e6a1d0b5e1
FS_HASH_SEED=0b6a1e3c-3c1d-4f8e-bd55-2a6f7f1d9c42
FS_LABEL=hearth-root
# root=/dev/vda: the disk is the file system. net.ifnames=0: the first NIC is eth0
# under QEMU and Cloud Hypervisor alike. cryptomgr.notests: skip the crypto
# self-tests. panic=-1: reboot (QEMU -no-reboot: exit) on a panic.
CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=-1 cryptomgr.notests net.ifnames=0"
# 2024-01-01T00:00:00Z unless the caller sets it.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}
OUT_FILES="disk.raw vmlinuz vmlinux initrd.img cmdline image.json packages.txt"

export LC_ALL=C
umask 022
RECIPE=$IMAGE_NAME
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
case $OUT_DIR in /*) ;; *) OUT_DIR=$PWD/$OUT_DIR ;; esac
OUT_DIR=${OUT_DIR%/}

need_tools "Debian: apt-get install -y apt dpkg coreutils util-linux e2fsprogs lz4 findutils" \
	apt-cache apt-get dpkg-query sha256sum od dd lz4 find sort flock mkfs.ext4 e2fsck debugfs dumpe2fs \
	chroot systemctl
hearth_traps

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
recipe_hash() {
	# build.sh, rootfs/, mke2fs.conf and the shared ../lib.sh (not README.md).
	# Modes are set explicitly below, so only names, link targets and contents count.
	# A flavour's own inputs (its recipe, its files) are hashed in too.
	{
		hearth_hash_files "$HERE/.." debian/build.sh debian/rootfs debian/mke2fs.conf lib.sh
		echo "${FLAVOUR_HASH:-}"
	} | sha256sum | cut -d' ' -f1
}

# The packages and everything they depend on (all alternatives), as the host's apt
# lists know them, with candidate versions: a new version of any of them (a point
# release, a security update) makes a new image. Only meaningful on a bookworm host.
packages_key() {
	local names
	names=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
		--no-breaks --no-replaces --no-enhances $PACKAGES apt 2>/dev/null |
		grep -v -e '^ ' -e '^<' | sort -u)
	[ -n "$names" ] || return 1
	# shellcheck disable=SC2086
	apt-cache policy $names 2>/dev/null |
		awk '/^[^ ]/ { p = $1 } $1 == "Candidate:" { print p, $2 }' | sort | sha256sum | cut -d' ' -f1
}

HOST_CODENAME=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || HOST_CODENAME=
if [ "$HOST_CODENAME" = "$SUITE" ]; then
	PKG_KEY=$(packages_key) || PKG_KEY=
	if [ -z "$PKG_KEY" ]; then
		log "apt-cache knows no cloud-init: running apt-get update"
		apt-get update -qq >&2 || die "apt-get update failed"
		PKG_KEY=$(packages_key) || die "apt-cache depends lists nothing for the image's packages"
	fi
else
	log "warning: the host is not Debian $SUITE: package updates do not rebuild the image (HEARTH_IMAGE_REBUILD=1 does)"
	PKG_KEY="host-not-$SUITE"
fi
RECIPE_HASH=$(recipe_hash)

# The image.json lines that must match for OUT_DIR to be up to date.
input_lines() {
	printf '  "suite": "%s",\n' "$SUITE"
	printf '  "mirrors": "%s %s",\n' "$MIRROR" "$SECURITY_MIRROR"
	printf '  "packages_key": "%s",\n' "$PKG_KEY"
	printf '  "recipe_hash": "%s",\n' "$RECIPE_HASH"
	printf '  "source_date_epoch": %s,\n' "$SOURCE_DATE_EPOCH"
}

up_to_date() {
	local f line
	[ "${HEARTH_IMAGE_REBUILD:-0}" = 1 ] && return 1
	for f in $OUT_FILES; do [ -s "$OUT_DIR/$f" ] || return 1; done
	while IFS= read -r line; do
		grep -Fxq -- "$line" "$OUT_DIR/image.json" || return 1
	done < <(input_lines)
}

if up_to_date; then
	echo "$IMAGE_NAME image up to date"
	exit 0
fi

[ "$(id -u)" = 0 ] || die "building needs root (mmdebstrap --mode=root, chroot)"

# One build at a time per OUT_DIR.
mkdir -p "$(dirname "$OUT_DIR")"
exec 9>"$OUT_DIR.lock"
flock 9
if up_to_date; then
	echo "$IMAGE_NAME image up to date"
	exit 0
fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
	log "installing mmdebstrap"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >&2 ||
		{ apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >&2; } ||
		die "could not install mmdebstrap"
fi

log "building $OUT_DIR ($SUITE from $MIRROR)"
START=$(date +%s)

# Everything next to OUT_DIR: the root tree is ~600 MB, and on the same file
# system as the deb cache, .debs are hard-linked instead of copied.
hearth_tmpdir WORK "$(dirname "$OUT_DIR")/.$(basename "$OUT_DIR").work.XXXXXX"
hearth_tmpdir STAGE "$(dirname "$OUT_DIR")/.$(basename "$OUT_DIR").build.XXXXXX"
ROOT=$WORK/root
# A flavour prepares its files now (e.g. builds a binary into FLAVOUR_ROOTFS).
if declare -F flavour_prepare >/dev/null; then flavour_prepare; fi

# ---------------------------------------------------------------------------
# Root tree with mmdebstrap
# ---------------------------------------------------------------------------
# .deb cache: seeded into the chroot's apt archive before the download, and every
# .deb of this build is linked out again before mmdebstrap's cleanup removes them.
ARCHIVE_CACHE=$DEB_CACHE/mmdebstrap-$SUITE
mkdir -p "$ARCHIVE_CACHE" "$WORK/debs"
# Hard links if possible, copies otherwise.
link_debs() {
	local from=$1 to=$2 f
	for f in "$from"/*.deb; do
		[ -f "$f" ] || continue
		ln -f "$f" "$to/" 2>/dev/null || cp -f "$f" "$to/"
	done
}

# mmdebstrap runs hooks with the chroot path as $1. They are small bash scripts
# (mmdebstrap's own hook shell is sh, which cannot see bash functions).
write_hook() {
	local name=$1 body=$2
	{
		echo '#!/bin/bash'
		echo 'set -euo pipefail'
		echo 'umask 022'
		declare -f link_debs
		printf 'ARCHIVE_CACHE=%q\nWORK=%q\nHERE=%q\n' "$ARCHIVE_CACHE" "$WORK" "$HERE"
		printf 'EXECUTABLES=%q\n' "$EXECUTABLES"
		echo "$body"
	} >"$WORK/hook-$name"
	chmod 0755 "$WORK/hook-$name"
}
# The recipe's files (rootfs/): root-owned, 0644, 0755 for these.
EXECUTABLES="etc/initramfs-tools/hooks/hearth usr/local/sbin/hearth-guest-ready
usr/local/sbin/hearth-resolv-conf ${FLAVOUR_EXECUTABLES:-}"
write_hook setup '
mkdir -p "$1/var/cache/apt/archives"
link_debs "$ARCHIVE_CACHE" "$1/var/cache/apt/archives"'
write_hook essential "
for tree in $(printf %q "$HERE/rootfs") ${FLAVOUR_ROOTFS:+$(printf %q "$FLAVOUR_ROOTFS")}; do"'
cd "$tree"
find . -type f -print | sed "s|^\./||" | sort | while IFS= read -r f; do
	mode=0644
	case " $(echo $EXECUTABLES) " in *" $f "*) mode=0755 ;; esac
	install -D -o root -g root -m "$mode" "$f" "$1/$f"
done
done'
write_hook customize '
link_debs "$1/var/cache/apt/archives" "$WORK/debs"'"
${FLAVOUR_CUSTOMIZE:-}"

MMDEBSTRAP_ARGS=(
	--mode=root --format=directory --variant=minbase
	--include="$(echo $PACKAGES | tr ' ' ',')"
	--aptopt='Acquire::Languages "none"'
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-include=/usr/share/locale/locale.alias'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/lintian/*'
	# keep the downloaded essential packages for the cache
	--skip=essential/unlink
	# seed the apt archive from the cache
	--setup-hook="$WORK/hook-setup"
	# rootfs/ before the kernel, cloud-init and openssh are installed, so that
	# the first initramfs is built with the recipe's settings
	--essential-hook="$WORK/hook-essential"
	# link this build's .debs out before the cleanup removes them
	--customize-hook="$WORK/hook-customize"
	"$SUITE" "$ROOT"
	"deb $MIRROR $SUITE main"
	"deb $MIRROR $SUITE-updates main"
	"deb $SECURITY_MIRROR $SUITE-security main"
)
MM_LOG=$WORK/mmdebstrap.log
if [ "${HEARTH_VERBOSE:-0}" = 1 ]; then
	mmdebstrap "${MMDEBSTRAP_ARGS[@]}" </dev/null 2>&1 | tee "$MM_LOG" >&2
else
	mmdebstrap --quiet "${MMDEBSTRAP_ARGS[@]}" </dev/null >"$MM_LOG" 2>&1 ||
		{ tail -n 40 "$MM_LOG" >&2; die "mmdebstrap failed (last lines above)"; }
fi
log "root tree done after $(($(date +%s) - START)) s"

# Update the .deb cache: add this build's packages, drop versions they replace.
(
	flock 8
	link_debs "$WORK/debs" "$ARCHIVE_CACHE"
	for f in "$WORK"/debs/*.deb; do
		[ -f "$f" ] || continue
		name=${f##*/}
		pkg=${name%%_*}
		arch=${name##*_}
		for old in "$ARCHIVE_CACHE/${pkg}_"*"_$arch"; do
			if [ -f "$old" ] && [ "${old##*/}" != "$name" ]; then rm -f "$old"; fi
		done
	done
) 8>"$ARCHIVE_CACHE.lock"

# ---------------------------------------------------------------------------
# Finish the root tree
# ---------------------------------------------------------------------------
kernels=("$ROOT"/boot/vmlinuz-*)
[ ${#kernels[@]} -eq 1 ] && [ -s "${kernels[0]}" ] || die "no single /boot/vmlinuz-* in the root tree"
vmlinuz=${kernels[0]}
KVER=${vmlinuz##*/vmlinuz-}
initrd=$ROOT/boot/initrd.img-$KVER
[ -s "$initrd" ] || die "no /boot/initrd.img-$KVER in the root tree"
KPKG=linux-image-$KVER

# Identity: host name, hosts, fstab; no resolv.conf from the build host (it is
# written at boot by hearth-resolv-conf, which manages it while its header is there).
echo "$IMAGE_NAME" >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' "$IMAGE_NAME" >"$ROOT/etc/hosts"
rm -f "$ROOT/etc/resolv.conf"
echo "# hearth-resolv-conf: from systemd-networkd's link state" >"$ROOT/etc/resolv.conf"
printf '# hearth: the whole disk is the root file system (see guest-images/debian)\n/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$ROOT/etc/fstab"
# (mmdebstrap copied hostname and resolv.conf from the host, with the host's modes)
chown 0:0 "$ROOT"/etc/{hostname,hosts,resolv.conf,fstab}
chmod 0644 "$ROOT"/etc/{hostname,hosts,resolv.conf,fstab}

# Units
# shellcheck disable=SC2086
systemctl --root="$ROOT" --quiet enable $ENABLE_UNITS
# shellcheck disable=SC2086
systemctl --root="$ROOT" --quiet mask $MASK_UNITS

# Per-machine state must not be in the image: host keys (cloud-init makes new
# ones), machine-id (systemd makes one at first boot), logs, caches.
rm -f "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT/var/lib/systemd/random-seed"
rm -rf "$ROOT"/var/lib/cloud/* "$ROOT"/var/log/cloud-init*
find "$ROOT/var/log" -type f \( -name '*.log' -o -name 'lastlog' -o -name 'wtmp' -o -name 'btmp' \) -delete
rm -f "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old
rm -rf "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* "$ROOT"/var/tmp/*

# Installed packages
chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}\n' | sort >"$STAGE/packages.txt"
pkg_version() { awk -v p="$1" '$1 == p { print $2 }' "$STAGE/packages.txt"; }
KPKG_VERSION=$(pkg_version "$KPKG")
[ -n "$KPKG_VERSION" ] || die "$KPKG is not installed in the root tree"
cloud_init_version=$(pkg_version cloud-init)
case " $(echo $PACKAGES) " in
*" cloud-init "*) [ -n "$cloud_init_version" ] || die "cloud-init is not installed in the root tree" ;;
*) cloud_init_version=none ;;
esac

# Reproducible timestamps: what the build made (maintainer scripts, the
# initramfs, .pyc files, this script) gets SOURCE_DATE_EPOCH. Files that dpkg
# unpacked keep their package mtimes: Python checks its .pyc files against the
# .py mtimes, and stale ones would be recompiled under TCG at every boot.
find "$ROOT" -xdev -newermt "@$((START - 1))" -print0 |
	xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

# ---------------------------------------------------------------------------
# Kernel, initramfs, disk
# ---------------------------------------------------------------------------
cp "$vmlinuz" "$STAGE/vmlinuz"
cp "$initrd" "$STAGE/initrd.img"
hearth_extract_vmlinux "$STAGE/vmlinuz" "$STAGE/vmlinux" "$WORK"

# mkfs.ext4 -d copies each file's atime and ctime from the build tree; ctime cannot
# be set there and atime changes whenever the build reads a file. Set both to
# SOURCE_DATE_EPOCH in every used inode (debugfs, ~0.1 s), so that the same tree
# gives a bit-identical disk.raw. Used inodes: the complement of dumpe2fs's
# per-group "Free inodes" ranges.
ext4_clamp_times() {
	local img=$1
	dumpe2fs "$img" 2>/dev/null | awk -v t="$SOURCE_DATE_EPOCH" '
		/^Inodes per group:/ { ipg = $4 }
		/^Group [0-9]+:/ { g = $2; sub(/:$/, "", g); g += 0 }
		/^  Free inodes:/ {
			s = $0; sub(/^  Free inodes: */, "", s)
			delete free
			n = split(s, parts, /, */)
			for (i = 1; i <= n; i++) {
				if (parts[i] == "") continue
				if (split(parts[i], r, "-") == 2) { for (j = r[1] + 0; j <= r[2] + 0; j++) free[j] = 1 }
				else free[parts[i] + 0] = 1
			}
			for (j = g * ipg + 1; j <= (g + 1) * ipg; j++) if (!(j in free))
				printf "sif <%d> ctime @%s\nsif <%d> atime @%s\nsif <%d> ctime_extra 0\nsif <%d> atime_extra 0\n", j, t, j, t, j, j
		}' >"$WORK/times.debugfs"
	[ -s "$WORK/times.debugfs" ] || die "dumpe2fs listed no used inodes in $img"
	E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$WORK/times.debugfs" "$img" >/dev/null 2>"$WORK/times.err" ||
		{ cat "$WORK/times.err" >&2; die "debugfs could not set the inode times"; }
	if grep -v '^debugfs [0-9]' "$WORK/times.err" | grep -q .; then
		cat "$WORK/times.err" >&2
		die "debugfs could not set the inode times"
	fi
}

# ext4 straight from the tree (no loop mount). Fixed UUID, hash seed and time;
# the settings come from the recipe's mke2fs.conf, not the host's.
truncate -s "$DISK_SIZE" "$STAGE/disk.raw"
MKE2FS_CONFIG=$HERE/mke2fs.conf E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH \
	mkfs.ext4 -q -F -t ext4 -L "$FS_LABEL" -U "$FS_UUID" -m 1 \
	-E "hash_seed=$FS_HASH_SEED,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0" \
	-d "$ROOT" "$STAGE/disk.raw" ||
	die "mkfs.ext4 -d failed"
ext4_clamp_times "$STAGE/disk.raw"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH e2fsck -fn "$STAGE/disk.raw" >"$WORK/fsck.log" 2>&1 ||
	{ cat "$WORK/fsck.log" >&2; die "e2fsck found problems in disk.raw"; }

echo "$CMDLINE" >"$STAGE/cmdline"

{
	echo "{"
	printf '  "name": "%s",\n' "$IMAGE_NAME"
	printf '  "kernel_version": "%s",\n' "$KVER"
	printf '  "kernel_package": "%s",\n' "$KPKG"
	printf '  "kernel_package_version": "%s",\n' "$KPKG_VERSION"
	printf '  "debian_version": "%s",\n' "$(cat "$ROOT/etc/debian_version")"
	input_lines
	echo '  "packages": {'
	sep=
	for p in $NOTABLE_PACKAGES; do
		v=$(pkg_version "$p")
		[ -n "$v" ] || continue
		printf '%s    "%s": "%s"' "$sep" "$p" "$v"
		sep=$',\n'
	done
	printf '\n  },\n'
	printf '  "package_count": %s,\n' "$(wc -l <"$STAGE/packages.txt")"
	echo '  "disk": "disk.raw",'
	echo '  "format": "raw",'
	printf '  "virtual_size": %s,\n' "$DISK_SIZE"
	echo '  "root_fs": "ext4",'
	printf '  "root_fs_uuid": "%s",\n' "$FS_UUID"
	printf '  "cmdline": "%s",\n' "$CMDLINE"
	printf '  "built_at": "%s"\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "}"
} >"$STAGE/image.json"
chmod 0644 "$STAGE"/*
chmod 0755 "$STAGE"

# Into place: OUT_DIR is the old complete image, absent, or the new one; never partial.
hearth_into_place "$STAGE" "$OUT_DIR"
log "done in $(($(date +%s) - START)) s: $KVER, cloud-init $cloud_init_version;" \
	"disk.raw $(du -h "$OUT_DIR/disk.raw" | cut -f1) used of $((DISK_SIZE >> 30)) GiB"
