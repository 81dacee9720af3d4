#!/usr/bin/env bash
# Runs schemathesis (from PyPI) against the OpenAPI document a fresh all-in-one api
# serves, authenticated with its admin key, inside a private network namespace. Fails
# on any 5xx answer and on any answer that does not match the document.
# Usage: scripts/schemathesis.sh [hearth-api binary]   (MAX_TIME=seconds, default 150)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
VERSION=4.32.5
VENV=/var/cache/hearth/venv-schemathesis
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$VERSION"; then
	echo "==> installing schemathesis $VERSION into $VENV"
	rm -rf "$VENV"
	if ! python3 -m venv "$VENV" 2>/dev/null; then
		ensure_packages python3-venv
		/usr/bin/python3 -m venv "$VENV"
	fi
	"$VENV/bin/pip" install -q "schemathesis==$VERSION"
fi
bin=${1:-$CARGO_TARGET_DIR/debug/hearth-api}
exec unshare --net --mount --propagation private bash -c \
	'mount -t sysfs sysfs /sys && ip link set lo up && exec python3 scripts/schemathesis_run.py "$@"' \
	_ "$bin" "$VENV/bin/schemathesis" "$HEARTH_IMAGE_CACHE" "${MAX_TIME:-150}"
