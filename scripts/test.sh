#!/usr/bin/env bash
# Installs what the tests need, builds the guest images, and runs the whole test
# suite: lints, unit tests, the fake Cloud Hypervisor's self-test, and the end-to-end
# tests that boot real VMs under QEMU/TCG inside private network namespaces.
# Needs root (network namespaces, /dev/kvm probing). Usage: scripts/test.sh [--quick]
#
# --quick: formatting, clippy and the tests that need neither root nor a VM (unit tests,
# the layout and OpenAPI checks, the embedded store's suite); a couple of minutes on a
# warm target directory. CI runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

start=$(date +%s)
if [ "${1:-}" = "--quick" ]; then
	ensure_packages "${HEARTH_BUILD_PACKAGES[@]}"
	mkdir -p "$CARGO_TARGET_DIR"
	echo "==> lints"
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	echo "==> tests that need neither root nor a VM"
	# netd's namespace, link and TAP tests need root; everything else here does not.
	quick='(kind(lib) | kind(bin)) - (package(netd) & (test(/^firewall::tests::in_netns::/) | test(/^link::tests::/) | test(/^tap::tests::/)))'
	quick+=' | (package(api) & binary(layout))'
	quick+=' | (package(api) & binary(openapi) & test(checked_in_document_is_current))'
	quick+=' | (package(hearth-store) & test(embedded))'
	quick+=' | (package(socket-http) & binary(tls))'
	if cargo nextest --version >/dev/null 2>&1; then
		cargo nextest run --workspace --locked -E "$quick"
	else
		cargo test --workspace --locked --lib --bins
		cargo test --locked -p api --test layout
		cargo test --locked -p socket-http --test tls
	fi
	echo "==> quick tests passed in $(( $(date +%s) - start )) s"
	exit 0
fi
ensure_packages "${HEARTH_BUILD_PACKAGES[@]}" "${HEARTH_RUNTIME_PACKAGES[@]}" "${HEARTH_TEST_PACKAGES[@]}"
mkdir -p "$CARGO_TARGET_DIR"

echo "==> building the guest images (tiny, debian, postgres; cached)"
guest-images/tiny/build.sh "$HEARTH_IMAGE_CACHE/tiny"
guest-images/debian/build.sh "$HEARTH_IMAGE_CACHE/debian"
guest-images/postgres/build.sh "$HEARTH_IMAGE_CACHE/postgres"
guest-images/pvh-count/build.sh "$HEARTH_IMAGE_CACHE/pvh-count"
# The .debs that debian guests install to run on a real device-mapper (these hosts
# have none): lvm2 and thin-provisioning-tools for blockd's thin-pool suite, and a
# whole hearth host (QEMU, nftables, dnsmasq, lvm2) for the api on an LVM pool.
export HEARTH_TEST_LVM_DEBS="${HEARTH_DEB_CACHE:-/var/cache/hearth/debs}/lvm-guest"
guest-images/debian/guest-debs.sh "$HEARTH_IMAGE_CACHE/debian" "$HEARTH_TEST_LVM_DEBS" \
	lvm2 thin-provisioning-tools
export HEARTH_TEST_HOST_DEBS="${HEARTH_DEB_CACHE:-/var/cache/hearth/debs}/hearth-host-guest"
guest-images/debian/guest-debs.sh "$HEARTH_IMAGE_CACHE/debian" "$HEARTH_TEST_HOST_DEBS" \
	qemu-system-x86 qemu-utils nftables dnsmasq-base lvm2 thin-provisioning-tools

echo "==> building the web console"
scripts/build-web.sh

echo "==> lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> fake Cloud Hypervisor self-test"
vmm-manager/tests/fake-cloud-hypervisor/selftest.sh
# The same checks against the real binary, so the fake cannot drift from it unnoticed.
# HEARTH_TEST_CH_BINARY names one; else the v54 kept beside the checkout is used.
real_ch=${HEARTH_TEST_CH_BINARY:-$(cd .. && pwd)/shared/cloud-hypervisor/bin/cloud-hypervisor}
if [ -x "$real_ch" ]; then
	echo "==> the fake's self-test against the real Cloud Hypervisor ($real_ch)"
	vmm-manager/tests/fake-cloud-hypervisor/selftest.sh --against "$real_ch" "$HEARTH_IMAGE_CACHE/pvh-count/vmlinux"
else
	echo "==> NOT RUN: the fake's self-test against a real Cloud Hypervisor (none at $real_ch)"
fi

echo "==> tests"
export HEARTH_TEST_IMAGES="$HEARTH_IMAGE_CACHE"
# The api's tests start the daemons' binaries, which a test run builds only for the
# packages whose own tests need them: build them all first (on a fresh target
# directory the daemons were otherwise missing when the first tests ran).
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
	cargo nextest run --workspace --locked --no-fail-fast
else
	cargo test --workspace --locked --no-fail-fast
fi
# The host's own settings must not decide a test: a new network namespace inherits the
# host's IPv4 settings (net.core.devconf_inherit_init_net = 0), so a host that forwards
# (a router, a Docker host, the quickstart's stack still running) starts every test
# namespace forwarding. The tests that read namespace settings run again with the host
# in the opposite state: forwarding flipped, strict reverse-path filtering.
echo "==> netd and the namespace tests again, on a host with forwarding flipped and strict rp_filter"
host_sysctls=(net.ipv4.ip_forward net.ipv4.conf.all.rp_filter net.ipv4.conf.default.rp_filter)
saved_sysctls=()
for k in "${host_sysctls[@]}"; do saved_sysctls+=("$k=$(sysctl -n "$k")"); done
restore_sysctls() { sysctl -qw "${saved_sysctls[@]}" >/dev/null || true; }
trap restore_sysctls EXIT
sysctl -qw "net.ipv4.ip_forward=$((1 - $(sysctl -n net.ipv4.ip_forward)))" \
	net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1
flipped_api_tests=(--test networking --test doctor --test netd_ports --test overlay_nat)
if cargo nextest --version >/dev/null 2>&1; then
	cargo nextest run --locked --no-fail-fast -p netd
	cargo nextest run --locked --no-fail-fast -p api "${flipped_api_tests[@]}"
else
	cargo test --locked --no-fail-fast -p netd
	cargo test --locked --no-fail-fast -p api "${flipped_api_tests[@]}"
fi
restore_sysctls
trap - EXIT

echo "==> schemathesis against the served OpenAPI document"
MAX_TIME="${SCHEMATHESIS_MAX_TIME:-90}" scripts/schemathesis.sh "$CARGO_TARGET_DIR/debug/hearth-api"
echo "==> all tests passed in $(( $(date +%s) - start )) s"
