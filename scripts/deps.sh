# Sourced by the scripts: installs Debian packages that are missing, with apt-get.
# Usage: ensure_packages pkg...   (runs apt-get update once, only when something is missing)

ensure_packages() {
	local missing=() sudo=() updated=0 pass p
	[ "$(id -u)" -eq 0 ] || sudo=(sudo)
	# Two passes: installing one package can remove another that was asked for (a
	# machine with qemu-utils from backports loses it when Debian's qemu-system-x86
	# comes in, as their versions must match); the second pass puts it back.
	for pass in 1 2; do
		missing=()
		for p in "$@"; do
			dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
		done
		[ ${#missing[@]} -eq 0 ] && return 0
		echo "==> installing ${missing[*]}"
		[ "$updated" -eq 1 ] || "${sudo[@]}" apt-get update -qq
		updated=1
		DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
	done
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
			{ echo "==> $p could not be installed alongside the others" >&2; return 1; }
	done
}

# What building and running hearth's VMs needs. qemu-utils: qemu-img makes the qcow2
# overlays of clones on file systems without reflink.
# e2fsprogs, mmdebstrap, systemd: the debian guest image recipe (guest-images/debian).
HEARTH_RUNTIME_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio lz4 ca-certificates curl nftables dnsmasq-base iproute2 e2fsprogs mmdebstrap)
# What building hearth needs besides cargo: protoc and the well-known protobuf types,
# for etcd-client's gRPC code.
HEARTH_BUILD_PACKAGES=(protobuf-compiler libprotobuf-dev)

# What the tests need on top: procps (sysctl) to set the host state a test pass needs; curl for the fake Cloud Hypervisor's self-test, python3
# to run the fake; binutils (as, ld) for the pvh-count guest the real Cloud Hypervisor boots.
# chromium: the web console's browser test (Playwright drives Debian's Chromium).
# lvm2, xfsprogs: the LVM backend against real lvm2, the file pool on XFS with reflink.
# nbdkit, libnbd-bin (nbdinfo, nbdcopy), python3-libnbd (nbdsh), fio: the NBD server
# against real clients and the reference servers.
# openssh-client: the debian guest test logs in with the key cloud-init installed.
# etcd-server, etcd-client: the etcd state store's tests start their own etcd.
# wrk: the REST API load benchmark (scripts/bench_api.py).
# openssl: the NBD TLS tests make their CA and certificates with it.
# postgresql-client: psql, the client of the managed databases' tests.
HEARTH_TEST_PACKAGES=(procps binutils curl python3 fdisk e2fsprogs chromium lvm2 xfsprogs nbdkit libnbd-bin python3-libnbd fio openssh-client etcd-server etcd-client wrk openssl postgresql-client)

# Shared cargo target directory, outside the clone, so CI and local runs reuse builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/hearth/target}"
export HEARTH_IMAGE_CACHE="${HEARTH_IMAGE_CACHE:-/var/cache/hearth/images}"

# A shared target directory keeps every incremental build: drop that state (rebuilt as
# needed) when its disk has less than 15 GiB left, so runs do not fill the disk.
if [ -d "$CARGO_TARGET_DIR/debug/incremental" ] &&
	[ "$(df --output=avail -k "$CARGO_TARGET_DIR" | tail -1)" -lt $((15 * 1024 * 1024)) ]; then
	echo "==> low on disk: removing $CARGO_TARGET_DIR/debug/incremental"
	# Not fatal: a build running meanwhile may be writing into it.
	rm -rf "$CARGO_TARGET_DIR/debug/incremental" 2>/dev/null ||
		echo "==> could not remove all of it (a build is using it); going on"
fi
