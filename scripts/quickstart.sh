#!/usr/bin/env bash
# One machine, one command: installs what hearth needs (apt), builds it, builds the tiny
# guest image, starts the all-in-one stack with the embedded store, creates a VM, shows
# its console output, and prints what to try next. Run as root on Debian.
#   HEARTH_DATA_DIR (default /var/lib/hearth)   HEARTH_LISTEN (default 127.0.0.1:8080)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

data=${HEARTH_DATA_DIR:-/var/lib/hearth}
listen=${HEARTH_LISTEN:-127.0.0.1:8080}
[ "$(id -u)" -eq 0 ] || { echo "quickstart: run as root (VMs need /dev/kvm or QEMU, sockets in $data)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "quickstart: cargo is missing: install a Rust toolchain (https://rustup.rs) first" >&2; exit 1; }

echo "==> installing packages"
ensure_packages "${HEARTH_BUILD_PACKAGES[@]}" "${HEARTH_RUNTIME_PACKAGES[@]}"
echo "==> building the web console"
scripts/build-web.sh

echo "==> building hearth (release)"
cargo build --release --locked -p api -p hearth-cli -p vmm-manager -p netd -p blockd -p imaged
bin="$CARGO_TARGET_DIR/release"
echo "==> building the tiny guest image"
guest-images/tiny/build.sh "$HEARTH_IMAGE_CACHE/tiny"

mkdir -p "$data"
pidfile="$data/hearth-api.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
	echo "==> hearth-api already running (pid $(cat "$pidfile"))"
else
	echo "==> starting hearth-api --all-in-one on $listen (log: $data/hearth-api.log)"
	setsid "$bin/hearth-api" --all-in-one --data-dir "$data" --listen "$listen" \
		--images-dir "$HEARTH_IMAGE_CACHE" >>"$data/hearth-api.log" 2>&1 </dev/null &
	echo $! >"$pidfile"
fi
for _ in $(seq 100); do
	curl -fsS "http://$listen/health/ready" >/dev/null 2>&1 && break
	sleep 0.1
done
curl -fsS "http://$listen/health/ready" >/dev/null || { echo "hearth-api did not start; see $data/hearth-api.log" >&2; exit 1; }

export HEARTH_URL="http://$listen" HEARTH_API_KEY_FILE="$data/admin.key"
hearth="$bin/hearth"
vm=hello
if ! "$hearth" vm show "$vm" >/dev/null 2>&1; then
	echo "==> creating VM '$vm' (image tiny)"
	"$hearth" vm create "$vm" --image tiny --memory 256
fi
echo "==> waiting for the guest to boot"
for _ in $(seq 600); do
	"$hearth" vm log "$vm" 2>/dev/null | grep -q HEARTH-GUEST-READY && break
	sleep 0.1
done
echo "----- console of $vm (last lines) -----"
"$hearth" vm log "$vm" --bytes 2000 | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | tr -d '\r' | tail -n 12
echo "---------------------------------------"
cat <<MSG

hearth is running. Try:
  export HEARTH_URL=$HEARTH_URL HEARTH_API_KEY=\$(cat $data/admin.key)
  $hearth vm list
  $hearth console $vm                 # type 'uname -a'; Ctrl-] detaches
  $hearth vm create web --image tiny --vcpus 2 --memory 512
  $hearth vm stop $vm && $hearth vm start $vm
  $hearth vm delete $vm
Stop the stack (VMs keep running and are re-adopted on the next start):
  kill \$(cat $pidfile)
MSG
