# shellcheck shell=bash
# Shell shared by the guest image recipes (guest-images/*/build.sh). Sourced, not run.
#
# The sourcing script sets RECIPE (the image name, used as the message prefix) first,
# and runs under `set -euo pipefail`. This file is one of each recipe's inputs: the
# recipes put it into their recipe hash, so changing it rebuilds every image once.
#
# Provides:
#   die MSG / log MSG          "$RECIPE: error: MSG" (exit 1) / "$RECIPE: MSG" on stderr
#   need_tools HINT TOOL...    die listing the TOOLs not on PATH, with an install HINT
#   hearth_traps               temp dirs in TMP_DIRS removed on any exit; ERR/INT/TERM
#   hearth_tmpdir VAR TEMPLATE mktemp -d TEMPLATE, registered in TMP_DIRS, path in VAR
#   hearth_hash_files DIR PATH...
#                              SHA-256 over names, link targets and contents of the
#                              files under PATH... (relative to DIR), in sorted order
#   hearth_extract_vmlinux BZIMAGE OUT SCRATCH_DIR
#                              the uncompressed ELF kernel (PVH note) from a bzImage
#   hearth_into_place STAGE OUT_DIR
#                              rename the finished STAGE dir to OUT_DIR, never partial

die() {
	echo "$RECIPE: error: $*" >&2
	exit 1
}
log() { echo "$RECIPE: $*" >&2; }

need_tools() {
	local hint=$1 t missing=()
	shift
	for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
	[ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} ($hint)"
}

# Temp dirs, removed on any exit.
TMP_DIRS=()
hearth_cleanup() {
	local d
	for d in "${TMP_DIRS[@]}"; do
		[ -n "$d" ] && [ -e "$d" ] || continue
		# A recipe may leave something mounted below a temp dir if it is killed at the
		# wrong moment (mmdebstrap's own mounts are undone by mmdebstrap): never let
		# rm -rf walk into a mount.
		if command -v findmnt >/dev/null 2>&1; then
			findmnt -rn -o TARGET | awk -v d="$d/" 'index($0 "/", d) == 1' | sort -r |
				while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done
		fi
		rm -rf --one-file-system -- "$d"
	done
}
hearth_traps() {
	trap hearth_cleanup EXIT
	trap 'echo "$RECIPE: error: build failed at line $LINENO: $BASH_COMMAND" >&2' ERR
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

hearth_tmpdir() {
	local __d
	__d=$(mktemp -d "$2")
	TMP_DIRS+=("$__d")
	printf -v "$1" '%s' "$__d"
}

hearth_hash_files() {
	local dir=$1
	shift
	(
		cd "$dir" || exit 1
		find "$@" \( -type f -o -type l \) -print | sort |
			while IFS= read -r f; do
				if [ -L "$f" ]; then
					printf 'L %s %s\n' "$f" "$(readlink "$f")"
				else
					printf 'F %s %s\n' "$f" "$(sha256sum <"$f" | cut -d' ' -f1)"
				fi
			done
	) | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------------------
# vmlinux: LZ4 payload of the bzImage (boot protocol >= 2.08)
#   setup sectors: byte 0x1f1; payload_offset: u32 LE 0x248; payload_length:
#   u32 LE 0x24c; both relative to the protected-mode code at (setup+1)*512.
# Needs od, dd, lz4, stat; readelf (binutils) is optional: when present the PVH
# note is checked too.
# ---------------------------------------------------------------------------
hearth_u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
hearth_u32le() { od -An -tu4 --endian=little -j "$2" -N4 "$1" | tr -d ' '; }

hearth_extract_vmlinux() {
	local vmlinuz=$1 out=$2 scratch=$3
	local setup_sects payload_off payload_len pm_start payload_start vmlinux_size magic notes
	[ "$(dd if="$vmlinuz" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ] ||
		die "$vmlinuz is not a bzImage (no HdrS setup header)"
	setup_sects=$(hearth_u8 "$vmlinuz" $((0x1f1)))
	[ "$setup_sects" -eq 0 ] && setup_sects=4
	payload_off=$(hearth_u32le "$vmlinuz" $((0x248)))
	payload_len=$(hearth_u32le "$vmlinuz" $((0x24c)))
	pm_start=$(((setup_sects + 1) * 512))
	[ "$payload_len" -gt 0 ] && [ $((pm_start + payload_off + payload_len)) -le "$(stat -c %s "$vmlinuz")" ] ||
		die "bzImage payload offset/length out of range"
	# The kernel build appends the decompressed size (u32 LE) to the compressed
	# data; lz4 rejects that as trailing garbage, so cut it off and check it.
	payload_start=$((pm_start + payload_off))
	vmlinux_size=$(hearth_u32le "$vmlinuz" $((payload_start + payload_len - 4)))
	dd if="$vmlinuz" of="$scratch/payload" iflag=skip_bytes,count_bytes bs=1M \
		skip="$payload_start" count=$((payload_len - 4)) status=none
	# lz4 frame (04 22 4d 18) or legacy (02 21 4c 18) magic
	magic=$(od -An -tx1 -N4 "$scratch/payload" | tr -d ' ')
	case $magic in
	04224d18 | 02214c18) ;;
	*) die "bzImage payload is not LZ4 (magic $magic); this kernel is compressed differently" ;;
	esac
	lz4 -d -q -f --sparse "$scratch/payload" "$out" ||
		die "lz4 could not decompress the bzImage payload"
	rm -f "$scratch/payload"
	[ "$(stat -c %s "$out")" = "$vmlinux_size" ] ||
		die "vmlinux is $(stat -c %s "$out") bytes, the bzImage says $vmlinux_size"
	[ "$(od -An -tx1 -N4 "$out" | tr -d ' ')" = 7f454c46 ] ||
		die "decompressed payload is not an ELF file (no 7f 45 4c 46 magic)"
	if command -v readelf >/dev/null 2>&1; then
		# XEN_ELFNOTE_PHYS32_ENTRY (18) = PVH entry point
		notes=$(readelf -n "$out")
		grep -E '^[[:space:]]+Xen[[:space:]]' <<<"$notes" | grep -E '\(0x00000012\)|PHYS32_ENTRY' >/dev/null ||
			die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); Cloud Hypervisor cannot boot it"
	fi
}

# ---------------------------------------------------------------------------
# Into place. OUT_DIR is either the old complete image, absent, or the new
# complete image; never partial. The old one is moved into a registered temp
# dir and removed on exit.
# ---------------------------------------------------------------------------
hearth_into_place() {
	local stage=$1 out=$2 old
	if [ -e "$out" ]; then
		hearth_tmpdir old "$(dirname "$out")/.$(basename "$out").old.XXXXXX"
		mv -T "$out" "$old/old"
	fi
	mv -T "$stage" "$out"
	sync -f "$out" 2>/dev/null || true
}
