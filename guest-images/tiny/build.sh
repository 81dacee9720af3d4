#!/bin/bash
# Build the hearth "tiny" guest image from Debian packages only:
#   vmlinuz     Debian cloud kernel (bzImage), for QEMU
#   vmlinux     the same kernel, uncompressed ELF with PVH note (Cloud Hypervisor)
#   initrd.img  busybox-static + virtio/ACPI-button modules + init scripts (rootfs/)
#   cmdline     default kernel command line
#   image.json  what it was built from
#
# Usage: guest-images/tiny/build.sh [OUT_DIR]
#   OUT_DIR defaults to ${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}/tiny.
#   HEARTH_DEB_CACHE (default /var/cache/hearth/debs) keeps downloaded .debs.
#
# Cached: if OUT_DIR holds a complete build from the same inputs (kernel
# package + version, busybox-static version, hash of build.sh and rootfs/),
# prints "tiny image up to date" and exits 0. The image is assembled in a temp
# dir next to OUT_DIR and renamed into place at the end.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE_CACHE=${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}
OUT_DIR=${1:-$IMAGE_CACHE/tiny}
DEB_CACHE=${HEARTH_DEB_CACHE:-/var/cache/hearth/debs}
META_PKG=linux-image-cloud-amd64
# cryptomgr.notests: skip the crypto self-tests (~0.3 s of a 2.6 s TCG boot).
CMDLINE="console=ttyS0 quiet panic=-1 cryptomgr.notests"
# insmod order (dependencies first). Built-in or absent ones are skipped.
# button + evdev: ACPI power button -> input event -> acpid -> poweroff.
MODULES="virtio_ring virtio failover net_failover virtio_pci_legacy_dev
virtio_pci_modern_dev virtio_pci virtio_mmio virtio_net virtio_blk button evdev"
OUT_FILES="vmlinuz vmlinux initrd.img cmdline image.json"

export LC_ALL=C
RECIPE=tiny
# shellcheck source=SCRIPTDIR/../lib.sh
. "$HERE/../lib.sh"

[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
case $OUT_DIR in /*) ;; *) OUT_DIR=$PWD/$OUT_DIR ;; esac
OUT_DIR=${OUT_DIR%/}

need_tools "Debian: apt-get install -y busybox-static cpio lz4 gzip dpkg apt coreutils" \
	apt-cache apt-get dpkg-deb dpkg-query sha256sum od dd cpio lz4 gzip find sort
hearth_traps

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
recipe_hash() {
	# build.sh, everything under rootfs/ and the shared ../lib.sh (not README.md).
	# Modes are set explicitly below, so only names, link targets and contents count.
	hearth_hash_files "$HERE/.." tiny/build.sh tiny/rootfs lib.sh
}

kernel_package() {
	apt-cache depends "$META_PKG" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

KPKG=$(kernel_package)
if [ -z "$KPKG" ]; then
	log "apt-cache knows no $META_PKG: running apt-get update"
	apt-get update -qq >&2 || die "apt-get update failed"
	KPKG=$(kernel_package)
	[ -n "$KPKG" ] || die "apt-cache depends $META_PKG names no linux-image-* package (is this amd64 Debian?)"
fi
KPKG_SHOW=$(apt-cache show --no-all-versions "$KPKG")
KPKG_VERSION=$(awk '/^Version:/ { print $2; exit }' <<<"$KPKG_SHOW")
KPKG_SHA256=$(awk '/^SHA256:/ { print $2; exit }' <<<"$KPKG_SHOW")
KPKG_FILE=$(awk '/^Filename:/ { print $2; exit }' <<<"$KPKG_SHOW")
[ -n "$KPKG_VERSION" ] && [ -n "$KPKG_FILE" ] || die "apt-cache show $KPKG gave no Version/Filename"
KPKG_FILE=${KPKG_FILE##*/}

BUSYBOX_VERSION=$(dpkg-query -W -f='${db:Status-Status} ${Version}' busybox-static 2>/dev/null || true)
case $BUSYBOX_VERSION in
"installed "*) BUSYBOX_VERSION=${BUSYBOX_VERSION#installed } ;;
*) die "busybox-static is not installed (apt-get install -y busybox-static)" ;;
esac
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing although busybox-static is installed"

RECIPE_HASH=$(recipe_hash)

# The image.json lines that must match for OUT_DIR to be up to date.
input_lines() {
	printf '  "kernel_package": "%s",\n' "$KPKG"
	printf '  "kernel_package_version": "%s",\n' "$KPKG_VERSION"
	printf '  "busybox_version": "%s",\n' "$BUSYBOX_VERSION"
	printf '  "recipe_hash": "%s",\n' "$RECIPE_HASH"
}

up_to_date() {
	local f line
	for f in $OUT_FILES; do [ -s "$OUT_DIR/$f" ] || return 1; done
	while IFS= read -r line; do
		grep -Fxq -- "$line" "$OUT_DIR/image.json" || return 1
	done < <(input_lines)
}

if up_to_date; then
	echo "tiny image up to date"
	exit 0
fi

# One build at a time per OUT_DIR.
mkdir -p "$(dirname "$OUT_DIR")"
if command -v flock >/dev/null 2>&1; then
	exec 9>"$OUT_DIR.lock"
	flock 9
	if up_to_date; then
		echo "tiny image up to date"
		exit 0
	fi
fi

log "building $OUT_DIR (kernel $KPKG $KPKG_VERSION, busybox $BUSYBOX_VERSION)"

hearth_tmpdir WORK "${TMPDIR:-/tmp}/hearth-tiny.XXXXXX"
hearth_tmpdir STAGE "$(dirname "$OUT_DIR")/.$(basename "$OUT_DIR").build.XXXXXX"

# ---------------------------------------------------------------------------
# Kernel package: download (cached), verify, extract
# ---------------------------------------------------------------------------
mkdir -p "$DEB_CACHE"
DEB=$DEB_CACHE/$KPKG_FILE
deb_ok() {
	[ -s "$1" ] || return 1
	[ -z "$KPKG_SHA256" ] || [ "$(sha256sum <"$1" | cut -d' ' -f1)" = "$KPKG_SHA256" ]
}
if ! deb_ok "$DEB"; then
	log "downloading $KPKG=$KPKG_VERSION"
	hearth_tmpdir dl "$DEB_CACHE/.download.XXXXXX"
	# shellcheck disable=SC2154 # dl is set by hearth_tmpdir
	(cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$KPKG=$KPKG_VERSION" >&2) ||
		die "apt-get download $KPKG=$KPKG_VERSION failed"
	got=("$dl"/*.deb)
	[ ${#got[@]} -eq 1 ] && [ -s "${got[0]}" ] || die "apt-get download produced no .deb"
	deb_ok "${got[0]}" || die "downloaded ${got[0]##*/} does not match the SHA256 apt-cache lists"
	mv -f "${got[0]}" "$DEB"
	rm -rf "$dl"
fi

KROOT=$WORK/kernel
mkdir -p "$KROOT"
dpkg-deb -x "$DEB" "$KROOT"
vmlinuz=("$KROOT"/boot/vmlinuz-*)
[ ${#vmlinuz[@]} -eq 1 ] && [ -s "${vmlinuz[0]}" ] || die "no single boot/vmlinuz-* in $KPKG"
vmlinuz=${vmlinuz[0]}
KVER=${vmlinuz##*/vmlinuz-}
MODDIR=$KROOT/lib/modules/$KVER
[ -d "$MODDIR/kernel" ] || die "no lib/modules/$KVER/kernel in $KPKG"

cp "$vmlinuz" "$STAGE/vmlinuz"

# vmlinux: the LZ4 payload of the bzImage, decompressed (guest-images/lib.sh)
hearth_extract_vmlinux "$vmlinuz" "$STAGE/vmlinux" "$WORK"

# ---------------------------------------------------------------------------
# initramfs
# ---------------------------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc,proc,sys,dev,run,tmp,mnt,root,var/log}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while IFS= read -r applet; do
	case $applet in
	"" | bin/busybox | linuxrc) continue ;;
	/*) applet=${applet#/} ;;
	esac
	mkdir -p "$ROOT/$(dirname "$applet")"
	[ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
[ -L "$ROOT/sbin/init" ] || die "busybox has no init applet"

# Modules: flat in /lib/modules/<name>.ko, uncompressed (no decompression
# under TCG at boot; busybox insmod need not support compressed modules).
: >"$ROOT/etc/modules-load"
for mod in $MODULES; do
	if grep -Eq "/${mod//_/[-_]}\.ko(\.[a-z]+)?\$" "$MODDIR/modules.builtin" 2>/dev/null; then
		continue # built in
	fi
	src=$(find "$MODDIR/kernel" -regextype posix-extended \
		-regex ".*/${mod//_/[-_]}\.ko(\.(xz|zst|gz))?" -print -quit)
	[ -n "$src" ] || continue # absent
	case $src in
	*.ko) cp "$src" "$ROOT/lib/modules/$mod.ko" ;;
	*.ko.xz) need_tools "apt-get install -y xz-utils" xz; xz -dc "$src" >"$ROOT/lib/modules/$mod.ko" ;;
	*.ko.zst) need_tools "apt-get install -y zstd" zstd; zstd -qdc "$src" >"$ROOT/lib/modules/$mod.ko" ;;
	*.ko.gz) gzip -dc "$src" >"$ROOT/lib/modules/$mod.ko" ;;
	esac
	echo "$mod" >>"$ROOT/etc/modules-load"
done
grep -qx virtio_pci "$ROOT/etc/modules-load" ||
	grep -Eq '/virtio_pci\.ko' "$MODDIR/modules.builtin" ||
	die "virtio_pci is neither a module nor built into $KPKG"

# Init scripts and config from rootfs/
cp -R "$HERE/rootfs/." "$ROOT/"
for f in init etc/init.d/rcS etc/init.d/rcK etc/acpi/PWRF/00000080 etc/udhcpc/default.script sbin/hotplug; do
	[ -f "$ROOT/$f" ] || die "rootfs/$f missing"
	chmod 0755 "$ROOT/$f"
done
echo "$KVER" >"$ROOT/etc/hearth-kernel"
# /dev/console lets the kernel give /init stdio; /init copes without it.
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$ROOT/dev/console" c 5 1
fi

# Uncompressed newc: QEMU copies it into guest memory at host speed and the
# kernel unpacks it without a decompressor (faster under TCG than gzip).
(cd "$ROOT" && find . -mindepth 1 -print | sort |
	cpio -o -H newc -R 0:0 --reproducible --quiet) >"$STAGE/initrd.img"

echo "$CMDLINE" >"$STAGE/cmdline"

{
	echo "{"
	echo '  "name": "tiny",'
	printf '  "kernel_version": "%s",\n' "$KVER"
	input_lines
	printf '  "modules": "%s",\n' "$(tr '\n' ' ' <"$ROOT/etc/modules-load" | sed 's/ $//')"
	printf '  "cmdline": "%s",\n' "$CMDLINE"
	printf '  "built_at": "%s"\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "}"
} >"$STAGE/image.json"
chmod 0644 "$STAGE"/*
chmod 0755 "$STAGE"

# Into place: OUT_DIR is the old complete image, absent, or the new one; never partial.
hearth_into_place "$STAGE" "$OUT_DIR"
log "done: $(du -sh --apparent-size "$OUT_DIR" | cut -f1) apparent in $OUT_DIR ($KVER)"
