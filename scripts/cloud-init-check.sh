#!/bin/bash
# Validate a NoCloud user-data and network-config with the real cloud-init that the
# Debian guests run (bookworm: 22.4.2), without installing cloud-init on the host.
#
# Usage: scripts/cloud-init-check.sh [-v] USER_DATA_FILE NETWORK_CONFIG_FILE
#   Either file may be "-" to skip it. -v also prints the systemd-networkd files
#   cloud-init would write in the guest.
#   Exit status: 0 both valid, 1 invalid (cloud-init's messages on stderr),
#   2 usage or tooling error.
#
# cloud-init comes from `apt-get download cloud-init` (the host's candidate version,
# or HEARTH_CLOUD_INIT_VERSION), unpacked with dpkg-deb -x into
# ${HEARTH_CLOUD_INIT_CACHE:-/var/cache/hearth/cloud-init}/<version>/ and run from
# there with Debian's /usr/bin/python3. Nothing of it is installed: no units, no
# generator, no /etc/cloud. The Python modules it needs (the python3-* packages in
# its Depends) are installed with apt-get if missing.
#
# user-data: `cloud-init schema --config-file FILE`. It must start with
#   "#cloud-config" and be a YAML mapping that passes cloud-init's JSON schema
#   (strict; deprecations are printed but are no error). On errors the file is
#   printed again annotated (`--annotate`). cloud-init 22.4 does not reject
#   unknown top-level keys: the guest ignores them too.
# network-config: cloud-init 22.4's `schema` command knows no network-config, so
#   the check runs what the guest runs: the YAML is loaded, a top-level "network:"
#   is unwrapped (as cloud-init's stages.py does), and cloudinit.net.network_state
#   parses it with skip_broken=False (the guest skips a broken entry with a
#   warning; here it is an error, as is any warning cloud-init logs while parsing
#   or rendering). Then `cloud-init devel net-convert --kind yaml --output-kind
#   networkd --distro debian` renders it as the guest does. A summary of what
#   cloud-init understood (interfaces, addresses, routes, DNS) is printed.
#   Limit: cloud-init 22.4 ignores keys it does not know in a v2 device (a typo
#   like "adresses" passes); read the summary.
set -euo pipefail

die() {
	echo "cloud-init-check: $*" >&2
	exit 2
}

VERBOSE=0
if [ "${1:-}" = -v ]; then
	VERBOSE=1
	shift
fi
[ $# -eq 2 ] || {
	sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}
USER_DATA=$1
NETWORK_CONFIG=$2
for f in "$USER_DATA" "$NETWORK_CONFIG"; do
	[ "$f" = - ] || [ -f "$f" ] || die "no such file: $f"
done

CACHE=${HEARTH_CLOUD_INIT_CACHE:-/var/cache/hearth/cloud-init}
PY=/usr/bin/python3 # Debian's: the python3-* modules are installed for it
export LC_ALL=C.UTF-8

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
apt_updated=0
CLEAN=() # temp files and dirs, removed on exit
trap 'rm -rf -- "${CLEAN[@]}"' EXIT
APT_LOG=$(mktemp "${TMPDIR:-/tmp}/cloud-init-check.apt.XXXXXX")
CLEAN+=("$APT_LOG")
apt_install() {
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$APT_LOG" 2>&1 ||
		{ apt_update_once && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$APT_LOG" 2>&1; } ||
		{ cat "$APT_LOG" >&2; die "could not install $*"; }
}
apt_update_once() {
	[ $apt_updated = 1 ] && return 0
	"${SUDO[@]}" apt-get update -qq >&2 || die "apt-get update failed"
	apt_updated=1
}

# --- cloud-init, unpacked ----------------------------------------------------
VERSION=${HEARTH_CLOUD_INIT_VERSION:-}
candidate() { apt-cache policy cloud-init 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'; }
if [ -z "$VERSION" ]; then
	VERSION=$(candidate)
	if [ -z "$VERSION" ]; then
		apt_update_once
		VERSION=$(candidate)
	fi
	[ -n "$VERSION" ] || die "apt knows no cloud-init package"
fi
ROOT=$CACHE/$VERSION
if [ ! -x "$ROOT/usr/bin/cloud-init" ]; then
	mkdir -p "$CACHE"
	exec 9>"$CACHE/.lock"
	flock 9
	if [ ! -x "$ROOT/usr/bin/cloud-init" ]; then
		tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
		CLEAN+=("$tmp")
		echo "cloud-init-check: fetching cloud-init $VERSION" >&2
		(cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "cloud-init=$VERSION" >"$APT_LOG" 2>&1) ||
			{ apt_update_once && (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "cloud-init=$VERSION" >"$APT_LOG" 2>&1); } ||
			{ cat "$APT_LOG" >&2; die "apt-get download cloud-init=$VERSION failed"; }
		debs=("$tmp"/cloud-init_*.deb)
		[ -f "${debs[0]}" ] || die "apt-get download produced no cloud-init .deb"
		mkdir "$tmp/root"
		dpkg-deb -x "${debs[0]}" "$tmp/root"
		dpkg-deb -f "${debs[0]}" Depends >"$tmp/root/.depends"
		rm -rf "$ROOT"
		mv -T "$tmp/root" "$ROOT"
		rm -rf "$tmp"
	fi
	exec 9>&-
fi
SITE=$ROOT/usr/lib/python3/dist-packages
[ -f "$SITE/cloudinit/__init__.py" ] || die "no cloudinit module in $ROOT"

# --- its Python dependencies ----------------------------------------------------
[ -x "$PY" ] || apt_install python3
PY_DEPS=$(tr ',' '\n' <"$ROOT/.depends" | sed 's/|.*//; s/(.*)//; s/:any//; s/[[:space:]]//g' | grep '^python3-' | sort -u)
missing=()
for p in $PY_DEPS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "cloud-init-check: installing ${missing[*]}" >&2
	apt_install "${missing[@]}"
fi

cloud_init() { PYTHONPATH=$SITE "$PY" "$ROOT/usr/bin/cloud-init" "$@"; }

status=0

# --- user-data ------------------------------------------------------------------
if [ "$USER_DATA" != - ]; then
	if out=$(cloud_init schema --config-file "$USER_DATA" 2>&1); then
		[ -z "$out" ] || echo "$out" | grep -v '^Valid cloud-config:' >&2 || true
		echo "user-data: valid (cloud-init $VERSION schema): $USER_DATA"
	else
		status=1
		echo "user-data: INVALID: $USER_DATA" >&2
		echo "$out" >&2
		# 22.4 prints the annotated file with --annotate (and then exits 0). It
		# crashes (KeyError) on some files with deprecated keys: then say so.
		annotated=$(cloud_init schema --config-file "$USER_DATA" --annotate 2>&1) || true
		echo "--- annotated ---" >&2
		if grep -q '^Traceback' <<<"$annotated"; then
			echo "(cloud-init $VERSION's --annotate failed on this file; the errors above are complete)" >&2
		else
			echo "$annotated" >&2
		fi
	fi
fi

# --- network-config ---------------------------------------------------------------
if [ "$NETWORK_CONFIG" != - ]; then
	work=$(mktemp -d "${TMPDIR:-/tmp}/cloud-init-check.XXXXXX")
	CLEAN+=("$work")
	if ! PYTHONPATH=$SITE "$PY" - "$NETWORK_CONFIG" "$work/v" <<'EOF'; then
import logging, os, sys

path, out = sys.argv[1], sys.argv[2]
warnings = []


class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())


logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.WARNING)

import yaml
from cloudinit import safeyaml
from cloudinit.net import network_state, networkd
from cloudinit.distros import debian


def fail(msg):
    print("network-config: INVALID: %s\n%s" % (path, msg), file=sys.stderr)
    sys.exit(1)


text = open(path, "rb").read()
try:
    cfg = safeyaml.load(text)  # what the guest's util.load_yaml uses
except yaml.YAMLError as e:
    fail("not valid YAML: %s" % e)
if not isinstance(cfg, dict):
    fail("not a YAML mapping (got %s); the guest would ignore it and use DHCP" % type(cfg).__name__)
if "network" in cfg:  # stages.py: _remove_top_level_network_key
    cfg = cfg["network"]
    if not isinstance(cfg, dict):
        fail("'network' is not a mapping")
if cfg.get("config") == "disabled":
    print("network-config: valid (network configuration disabled): %s" % path)
    sys.exit(0)
renderer = networkd.Renderer(config=debian.Distro.renderer_configs.get("networkd"))
try:
    ns = network_state.parse_net_config_data(cfg, skip_broken=False, renderer=renderer)
    renderer.render_network_state(network_state=ns, target=out)
except Exception as e:  # cloud-init's own exception, whatever its class
    fail("cloud-init could not parse it: %s: %s" % (type(e).__name__, e))
if warnings:
    fail("cloud-init warned:\n  " + "\n  ".join(warnings))
print("network-config: valid (cloud-init network_state, version %s): %s" % (cfg["version"], path))
listed = set()
for iface in ns.iter_interfaces():
    subnets = iface.get("subnets") or []
    desc = []
    for s in subnets:
        t = s.get("type")
        if t in ("static", "static6"):
            a = s.get("address")
            if s.get("prefix") is not None and "/" not in str(a):
                a = "%s/%s" % (a, s["prefix"])
            desc.append(str(a))
            if s.get("gateway"):
                desc.append("gateway " + s["gateway"])
            for r in s.get("routes") or []:
                desc.append("route %s/%s via %s" % (r.get("network"), r.get("prefix"), r.get("gateway")))
            if s.get("dns_nameservers"):
                desc.append("dns " + ",".join(s["dns_nameservers"]))
                listed.update(s["dns_nameservers"])
        else:
            desc.append(t)
    match = iface.get("mac_address")
    print("  %s%s: %s" % (iface.get("name"), " (mac %s)" % match if match else "",
                          "; ".join(desc) or "NO ADDRESS and no DHCP"))
dns = ns.dns_nameservers() if callable(ns.dns_nameservers) else ns.dns_nameservers
if dns and not set(dns) <= listed:
    print("  dns: %s" % ",".join(dns))
EOF
		status=1
	else
		# The same through cloud-init's own command line, as a cross-check.
		if ! conv=$(cloud_init devel net-convert --network-data "$NETWORK_CONFIG" --kind yaml \
			--output-kind networkd --distro debian --directory "$work/cli" 2>&1); then
			status=1
			echo "network-config: INVALID: cloud-init devel net-convert failed:" >&2
			echo "$conv" >&2
		elif grep -Eq 'WARNING|ERROR|Traceback' <<<"$conv"; then
			status=1
			echo "network-config: INVALID: cloud-init devel net-convert warned:" >&2
			echo "$conv" >&2
		elif [ "$VERBOSE" = 1 ]; then
			find "$work/cli" -type f | sort | while IFS= read -r f; do
				echo "--- ${f#"$work/cli"}"
				cat "$f"
			done
		fi
	fi
fi

exit $status
