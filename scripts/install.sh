#!/usr/bin/env bash
# Installs hearth on this machine for good: the binaries, a commented
# /etc/hearth/hearth.toml (an existing one is kept), a systemd unit for each daemon and
# one for the api (ordered after them, all restarting on failure), and the Debian
# packages they need. Then enables and starts them.
#
# Usage: scripts/install.sh [options]
#   --prefix DIR     binaries go to DIR/bin (default /usr/local)
#   --root DIR       install into DIR instead of / (packaging, tests); nothing is started
#   --bin-dir DIR    take the binaries from DIR instead of building them (cargo build --release)
#   --no-packages    do not apt-get install the runtime packages
#   --no-start       install and enable nothing in systemd, just write the files
#   --uninstall      stop and disable the units, remove the binaries and units, and
#                    hearth.toml if it is unchanged; VMs' data in /var/lib/hearth is kept
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD

PREFIX=/usr/local ROOT=/ BIN_DIR="" PACKAGES=1 START=1 UNINSTALL=0
while [ $# -gt 0 ]; do
	case $1 in
	--prefix) PREFIX=$2; shift 2 ;;
	--root) ROOT=$2; START=0; shift 2 ;;
	--bin-dir) BIN_DIR=$2; shift 2 ;;
	--no-packages) PACKAGES=0; shift ;;
	--no-start) START=0; shift ;;
	--uninstall) UNINSTALL=1; shift ;;
	-h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
done
ROOT=${ROOT%/}
BINS=(hearth-api hearth vmm-manager netd blockd imaged)
UNITS=(hearth-vmm-manager hearth-netd hearth-blockd hearth-imaged hearth-api)
BIN_TARGET="$ROOT$PREFIX/bin"
UNIT_DIR="$ROOT/etc/systemd/system"
CONFIG="$ROOT/etc/hearth/hearth.toml"

systemd_running() {
	[ -z "$ROOT" ] && [ "$START" = 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null
}

if [ "$UNINSTALL" = 1 ]; then
	if systemd_running; then
		echo "==> stopping and disabling the units (VMs keep running until their host stops)"
		systemctl disable --now "${UNITS[@]/%/.service}" 2>/dev/null || true
	fi
	for u in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$u.service"; done
	systemd_running && systemctl daemon-reload
	for b in "${BINS[@]}"; do rm -f "$BIN_TARGET/$b"; done
	if [ -f "$CONFIG" ]; then
		if cmp -s "$CONFIG" scripts/hearth.toml; then
			rm -f "$CONFIG"
			rmdir "$(dirname "$CONFIG")" 2>/dev/null || true
		else
			echo "==> kept $CONFIG: you changed it"
		fi
	fi
	echo "==> hearth is uninstalled; its data (/var/lib/hearth: store, volumes, images) is kept"
	exit 0
fi

source scripts/deps.sh
if [ "$PACKAGES" = 1 ]; then
	ensure_packages "${HEARTH_BUILD_PACKAGES[@]}" "${HEARTH_RUNTIME_PACKAGES[@]}"
fi
if [ -z "$BIN_DIR" ]; then
	echo "==> building the release binaries"
	cargo build --release --locked -p api -p hearth-cli -p vmm-manager -p netd -p blockd -p imaged
	BIN_DIR="$CARGO_TARGET_DIR/release"
fi
for b in "${BINS[@]}"; do
	[ -x "$BIN_DIR/$b" ] || { echo "install.sh: $BIN_DIR/$b is missing" >&2; exit 1; }
done

echo "==> installing ${BINS[*]} into $BIN_TARGET"
install -d -m 0755 "$BIN_TARGET" "$UNIT_DIR" "$(dirname "$CONFIG")"
for b in "${BINS[@]}"; do install -m 0755 "$BIN_DIR/$b" "$BIN_TARGET/$b"; done

if [ -e "$CONFIG" ]; then
	echo "==> keeping the existing $CONFIG"
else
	install -m 0644 scripts/hearth.toml "$CONFIG"
fi

echo "==> writing the systemd units into $UNIT_DIR"
for u in "${UNITS[@]}"; do
	sed "s|@BINDIR@|$PREFIX/bin|g" "scripts/systemd/$u.service" >"$UNIT_DIR/$u.service.tmp"
	chmod 0644 "$UNIT_DIR/$u.service.tmp"
	mv "$UNIT_DIR/$u.service.tmp" "$UNIT_DIR/$u.service"
done

if systemd_running; then
	systemctl daemon-reload
	systemctl enable --now "${UNITS[@]/%/.service}"
	echo "==> hearth is running: hearth doctor checks the host; the admin key is /var/lib/hearth/admin.key"
elif [ "$START" = 1 ]; then
	echo "==> systemd is not running here; on a systemd host: systemctl enable --now hearth-api.service"
else
	echo "==> installed (nothing started)"
fi
cd "$HERE"
