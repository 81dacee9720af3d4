#!/usr/bin/env bash
# Self-test of the fake cloud-hypervisor: drives it with curl over its API socket and
# with a small Python client on its serial socket.  Exits non-zero on the first failure.
# Kills only the processes it started and removes its temporary directory on exit.
#
#   selftest.sh                            the fake
#   selftest.sh --against BINARY KERNEL    the same checks against a real cloud-hypervisor
#                                          booting KERNEL (a PVH guest that prints
#                                          HEARTH-GUEST-READY: guest-images/pvh-count),
#                                          so the fake cannot drift from the real thing
#                                          unnoticed. What only the fake's guest can show
#                                          (its shell, poweroff typed in the guest, the
#                                          injected vCPU error, the sector-0 refusal) is
#                                          left out and counted as skipped.
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FAKE="$HERE/fake-cloud-hypervisor"
REAL=""
KERNEL=""
if [ "${1:-}" = "--against" ]; then
    FAKE=${2:?usage: selftest.sh --against BINARY KERNEL}
    KERNEL=${3:?usage: selftest.sh --against BINARY KERNEL}
    REAL=1
    [ -x "$FAKE" ] || { echo "selftest: $FAKE is not executable" >&2; exit 2; }
    [ -f "$KERNEL" ] || { echo "selftest: no kernel $KERNEL" >&2; exit 2; }
fi
SKIPPED=0
# fake_only WHAT: true against the fake; against the real binary, counts WHAT as skipped.
fake_only() {
    [ -z "$REAL" ] && return 0
    SKIPPED=$((SKIPPED + 1)); echo "skip $* (the fake's guest only)"
    return 1
}
command -v curl >/dev/null || { echo "selftest: curl is required" >&2; exit 2; }
command -v python3 >/dev/null || { echo "selftest: python3 is required" >&2; exit 2; }

TMP=$(mktemp -d /tmp/fake-ch-selftest.XXXXXX)
PIDS=()
PASSED=0
FAILED=0

cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

ok() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
fail() {
    FAILED=$((FAILED + 1)); echo "FAIL $*"
    for f in "$TMP"/*/log "$TMP"/*/serial.out; do
        [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }
    done
    echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
    exit 1
}

SOCK=""
# req METHOD ENDPOINT [JSON] -> $STATUS, $BODY
req() {
    local args=(-s -o "$TMP/body" -w '%{http_code}' --max-time 5 --unix-socket "$SOCK" -X "$1")
    [ $# -ge 3 ] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
    STATUS=$(curl "${args[@]}" "http://localhost/api/v1/$2") || STATUS="curl-failed($?)"
    BODY=$(cat "$TMP/body" 2>/dev/null)
}
expect() { # expect STATUS DESCRIPTION [substring of body]
    if [ "$STATUS" != "$1" ]; then fail "$2: status $STATUS, expected $1; body: $BODY"; fi
    if [ $# -ge 3 ] && [[ "$BODY" != *"$3"* ]]; then
        fail "$2: body $BODY lacks $3"
    fi
    ok "$2 ($STATUS${BODY:+ $BODY})"
}
wait_for() { # wait_for SECONDS COMMAND...
    local end=$((SECONDS + $1)); shift
    until "$@"; do
        [ $SECONDS -ge $end ] && return 1
        sleep 0.05
    done
}

exited() { # exited PID: gone or a zombie waiting to be reaped
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
    [ -z "$st" ] || [ "$st" = Z ]
}

start_fake() { # start_fake DIR [extra args...] -> $FPID; uses env as given
    local dir=$1; shift
    mkdir -p "$dir"
    "$FAKE" --api-socket "path=$dir/api.sock" --event-monitor "path=$dir/events.json" \
        --log-file "$dir/log" -v "$@" &
    FPID=$!
    PIDS+=("$FPID")
    SOCK="$dir/api.sock"
    wait_for 5 curl -s -o /dev/null --unix-socket "$SOCK" http://localhost/api/v1/vmm.ping \
        || fail "the fake did not answer vmm.ping"
}

# Background serial client: everything received goes to OUT, bytes written to the
# FIFO IN are sent to the guest.
SERIAL_PY='
import os, socket, sys, select
sock_path, out_path, in_path = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
open(out_path + ".connected", "w").close()
fin = os.open(in_path, os.O_RDWR)
with open(out_path, "ab", buffering=0) as out:
    while True:
        r, _, _ = select.select([s, fin], [], [])
        if s in r:
            data = s.recv(4096)
            if not data:
                break
            out.write(data)
        if fin in r:
            s.sendall(os.read(fin, 4096))
'
start_serial() { # start_serial DIR [again]: "again" reconnects, keeping serial.out
    [ -p "$1/serial.in" ] || mkfifo "$1/serial.in"
    [ -n "${2:-}" ] || : >"$1/serial.out"
    rm -f "$1/serial.out.connected"
    python3 -c "$SERIAL_PY" "$1/serial.sock" "$1/serial.out" "$1/serial.in" &
    SPID=$!
    PIDS+=("$SPID")
    wait_for 5 test -e "$1/serial.out.connected" || fail "serial: cannot connect to $1/serial.sock"
}
serial_has() { grep -a -q -- "$2" "$1/serial.out"; }

guest_procs_left() { # any process still running in a fake guest's directory?
    ls -l /proc/[0-9]*/cwd 2>/dev/null | grep -q 'fake-ch-guest-'
}

make_assets() { # make_assets DIR
    if [ -n "$REAL" ]; then cp "$KERNEL" "$1/vmlinux"; else : >"$1/vmlinux"; fi
    truncate -s 8M "$1/root.raw"
    truncate -s 8M "$1/data.raw"
}
vm_config() { # vm_config DIR [disk image_type json fragment]
    cat <<EOF
{"payload":{"kernel":"$1/vmlinux","cmdline":"console=ttyS0 root=/dev/vda rw"},
 "cpus":{"boot_vcpus":1,"max_vcpus":2},
 "memory":{"size":268435456},
 "disks":[{"id":"root","path":"$1/root.raw","image_type":"Raw"},
          {"id":"data","path":"$1/data.raw"${2:-,\"image_type\":\"Raw\"}}],
 "serial":{"mode":"Socket","socket":"$1/serial.sock"},
 "console":{"mode":"Off"},
 "some_unknown_field":{"is":"ignored"}}
EOF
}

echo "== run 1: lifecycle, serial guest, power button"
D="$TMP/run1"
mkdir -p "$D"
make_assets "$D"
start_fake "$D"
P1=$FPID

curl -s -i --unix-socket "$SOCK" http://localhost/api/v1/vmm.ping >"$TMP/head"
if head -n1 "$TMP/head" | grep -q $'^HTTP/1.1 200 \r$'; then
    ok "status line has an empty reason phrase"
else
    fail "status line: $(head -n1 "$TMP/head" | od -c | head -n2)"
fi
n=$(curl -sv --unix-socket "$SOCK" http://localhost/api/v1/vmm.ping \
        http://localhost/api/v1/vmm.ping http://localhost/api/v1/vmm.ping 2>&1 >/dev/null |
    grep -ciE 're-?using existing connection')
[ "$n" -ge 2 ] && ok "keep-alive: $n requests reused one connection" \
    || fail "keep-alive: connection not reused ($n)"

req GET vmm.ping
expect 200 "vmm.ping" '"version":"54.0.0"'
[[ "$BODY" == *"\"pid\":$P1"* ]] && ok "vmm.ping pid is the fake's pid" || fail "ping pid: $BODY"
req GET vm.info
expect 404 "vm.info before vm.create" '"The VM info is not available","VM is not created"'
req GET vm.nosuchthing
expect 404 "unknown path" '["Not Found"]'
req PUT vm.info
expect 400 "wrong method" '["Bad Request"]'
req PUT vm.boot
expect 404 "vm.boot before vm.create" "VM config is missing"
req PUT vm.create
if [ "$STATUS" = 400 ] && [ -z "$BODY" ]; then ok "vm.create without a body (400, empty body)"
else fail "vm.create without a body: $STATUS $BODY"; fi
req PUT vm.create '{"cpus":{"boot_vcpus":"one","max_vcpus":1}}'
expect 400 "vm.create with a wrong field type" "Failed to deserialize JSON"
req PUT vm.create '{"payload":'
expect 400 "vm.create with malformed JSON" "Failed to deserialize JSON"
req PUT vm.create '{"console":{"mode":"Socket","socket":"'"$D"'/console.sock"}}'
expect 500 "vm.create with console mode Socket" "No socket option support for console device"
req GET vm.info
expect 200 "the failed vm.create kept its config" '"mode":"Socket"'
req PUT vm.boot
expect 500 "vm.boot fails as the create did" "No socket option support for console device"
req PUT vm.delete
expect 204 "vm.delete clears it"

req PUT vm.create "$(vm_config "$D")"
expect 204 "vm.create"
[ -S "$D/serial.sock" ] && ok "serial socket bound at vm.create" || fail "no serial socket after vm.create"
req PUT vm.create "$(vm_config "$D")"
expect 500 "vm.create again" "VM is already created"
req GET vm.info
expect 200 "vm.info after vm.create" '"state":"Created"'
[[ "$BODY" != *some_unknown_field* ]] && ok "unknown fields are dropped from vm.info" \
    || fail "unknown field echoed"

start_serial "$D"   # connect before boot, like vmm-manager does
req PUT vm.boot '{}'
expect 400 "vm.boot with a body" '["Bad Request"]'
req PUT vm.boot
expect 204 "vm.boot"
req PUT vm.boot
expect 500 "vm.boot again" "VM is already created"
req GET vm.info
expect 200 "vm.info while running" '"state":"Running"'
[[ "$BODY" == *'"id":"root"'* ]] && ok "vm.info echoes the config" || fail "config not echoed"
req PUT vm.pause
expect 204 "vm.pause"
req PUT vm.pause
expect 500 "vm.pause again" "InvalidStateTransition"
req GET vm.info
expect 200 "vm.info while paused" '"state":"Paused"'
req PUT vm.resume
expect 204 "vm.resume"
req PUT vm.resume
expect 500 "vm.resume while running" "InvalidStateTransition"
req PUT vm.add-disk '{"id":"root","path":"'"$D"'/data.raw","image_type":"Raw"}'
expect 409 "vm.add-disk with a duplicate id" "Identifier root is not unique"
req PUT vm.resize '{"desired_vcpus":2}'
expect 204 "vm.resize to max_vcpus"
req PUT vm.resize '{"desired_vcpus":8}'
expect 500 "vm.resize above max_vcpus" '"Error from CPU manager","Requested vCPUs exceed maximum"'
req PUT vm.resize '{"desired_ram":536870912}'
expect 500 "vm.resize of memory without hotplug_size" '"Memory manager error","Not enough space in the hotplug RAM region"'
req GET vm.info
expect 200 "vm.info after resize" '"boot_vcpus":2'

wait_for 10 serial_has "$D" "HEARTH-GUEST-READY" && ok "serial: guest printed HEARTH-GUEST-READY" \
    || fail "serial: no READY line"
if fake_only "serial: the guest's shell"; then
wait_for 10 serial_has "$D" '~ # ' && ok "serial: shell prompt" || fail "serial: no prompt"
printf 'echo $((6*7))\n' >"$D/serial.in"
if wait_for 10 grep -a -q $'^42\r$' "$D/serial.out"; then ok "serial: echo \$((6*7)) gave 42"
else fail "serial: no 42 in output"; fi
fi

t0=$(date +%s%N)
req PUT vm.power-button
expect 204 "vm.power-button"
if [ -n "$REAL" ]; then
    # The PVH guest has no ACPI: it ignores the button, so the VM is shut down instead.
    sleep 0.3
    exited $P1 && fail "power button: a guest without ACPI powered off"
    req PUT vm.shutdown
    expect 204 "vm.shutdown"
    req PUT vmm.shutdown
    expect 200 "vmm.shutdown"
fi
if wait_for 2 exited $P1; then
    wait "$P1"; rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    [ $rc -eq 0 ] && ok "power button: the fake exited with status 0 after ${ms} ms" \
        || fail "power button: exit status $rc"
else
    fail "power button: the fake still runs after 2 s"
fi
[ -e "$D/api.sock.lock" ] && ok "api.sock.lock left behind" || fail "no api.sock.lock"
[ ! -e "$D/serial.sock" ] && ok "serial socket removed on exit" || fail "serial socket left"
guest_procs_left && fail "guest processes left behind" || ok "no guest process left"
python3 - "$D/events.json" <<'EOF' || fail "event monitor stream"
import json, sys
text = open(sys.argv[1]).read()
dec, i, evs = json.JSONDecoder(), 0, []
while text[i:].strip():
    while text[i].isspace():
        i += 1
    ev, i = dec.raw_decode(text, i)
    evs.append((ev["source"], ev["event"]))
want = [("vmm", "starting"), ("vm", "booting"), ("vm", "booted"), ("vm", "pausing"),
        ("vm", "paused"), ("vm", "resuming"), ("vm", "resumed"), ("vm", "shutdown")]
pos = 0
for ev in evs:
    if pos < len(want) and ev == want[pos]:
        pos += 1
assert pos == len(want), (evs, want[pos:])
print("ok   event monitor: %d events, in order: %s" % (len(evs), " ".join(e for _, e in evs)))
EOF
PASSED=$((PASSED + 1))

echo "== run 2: disk without image_type"
D="$TMP/run2"
mkdir -p "$D"
make_assets "$D"
FAKE_CH_DROP_FINAL_EVENTS=0 start_fake "$D"
P2=$FPID
req PUT vm.create "$(vm_config "$D" ' ')"
expect 204 "vm.create (data disk without image_type)"
start_serial "$D"
req PUT vm.boot
expect 204 "vm.boot"
grep -q 'deprecated' "$D/log" && ok "log warns that image type detection is deprecated" \
    || fail "no deprecation warning in the log"
if fake_only "guest: EXT4 sector 0 error without image_type"; then
wait_for 5 serial_has "$D" "write to sector 0 refused" && ok "guest: EXT4 sector 0 error" \
    || fail "no EXT4 error"
sleep 0.5
serial_has "$D" "HEARTH-GUEST-READY" && fail "READY printed despite image_type missing" \
    || ok "no READY line without image_type"
fi
req PUT vm.shutdown
expect 204 "vm.shutdown"
req GET vm.info
expect 200 "vm.info after vm.shutdown" '"state":"Created"'
req PUT vm.shutdown
expect 500 "vm.shutdown when not running" "VM is not running"
req PUT vmm.shutdown
expect 200 "vmm.shutdown"
wait_for 3 exited $P2 || fail "vmm.shutdown: still running"
wait "$P2"; rc=$?
[ $rc -eq 0 ] && ok "vmm.shutdown: exit status 0" || fail "vmm.shutdown: exit status $rc"
grep -q '"event": "deleted"' "$D/events.json" && grep -A1 '"source": "vmm"' "$D/events.json" |
    grep -q '"event": "shutdown"' && ok "final events written (FAKE_CH_DROP_FINAL_EVENTS=0)" \
    || fail "final events missing with FAKE_CH_DROP_FINAL_EVENTS=0"

if fake_only "run 3: vCPU error injection"; then
echo "== run 3: vCPU error injection (with --no-shutdown)"
D="$TMP/run3"
mkdir -p "$D"
make_assets "$D"
FAKE_CH_VCPU_ERROR_AFTER_MS=300 start_fake "$D" --no-shutdown
P3=$FPID
req PUT vm.create "$(vm_config "$D")"
expect 204 "vm.create"
req PUT vm.boot
expect 204 "vm.boot"
if wait_for 3 exited $P3; then
    wait "$P3"; rc=$?
    [ $rc -eq 0 ] && ok "vCPU error: exit status 0" || fail "vCPU error: exit status $rc"
else
    fail "vCPU error: the fake still runs"
fi
grep -q 'VCPU generated error' "$D/log" && ok "log says 'VCPU generated error'" \
    || fail "no 'VCPU generated error' in the log"
guest_procs_left && fail "guest processes left behind" || ok "no guest process left"
fi

echo "== run 4: SIGTERM, socket in use"
D="$TMP/run4"
mkdir -p "$D"
make_assets "$D"
start_fake "$D"
P4=$FPID
"$FAKE" --api-socket "path=$D/api.sock" --log-file "$D/log2" 2>"$D/err2"
rc=$?
[ $rc -eq 1 ] && grep -q "is already in use by another running instance" "$D/err2" && ok "second VMM on the socket: already in use, exit 1" \
    || fail "second VMM: rc $rc, $(cat "$D/err2")"
req PUT vm.create "$(vm_config "$D")"
expect 204 "vm.create"
req PUT vm.boot
expect 204 "vm.boot"
sleep 0.5
kill -TERM "$P4"
wait_for 3 exited $P4 || fail "SIGTERM: still running"
wait "$P4"; rc=$?
[ $rc -eq 0 ] && ok "SIGTERM: exit status 0" || fail "SIGTERM: exit status $rc"
guest_procs_left && fail "guest processes left behind" || ok "no guest process left"

echo "== run 5: failed boot, reboot, guest 'poweroff' with --no-shutdown, vm.delete"
D="$TMP/run5"
mkdir -p "$D"
make_assets "$D"
start_fake "$D" --no-shutdown
P5=$FPID
req PUT vm.create '{"payload":{"kernel":"'"$D"'/no-such-vmlinux"}}'
expect 204 "vm.create with a missing kernel"
req PUT vm.boot
expect 500 "vm.boot with a missing kernel" "Cannot open kernel file"
req GET vm.info
expect 200 "vm.info after the failed boot" '"state":"Created"'
req PUT vm.boot
expect 500 "vm.boot after a failed boot" "VM is already created"
req PUT vm.delete
expect 204 "vm.delete"
req PUT vm.delete
expect 204 "vm.delete without a VM"
req PUT vm.create "$(vm_config "$D")"
expect 204 "vm.create"
start_serial "$D"
req PUT vm.boot
expect 204 "vm.boot"
wait_for 10 serial_has "$D" "HEARTH-GUEST-READY" && ok "serial: READY" || fail "serial: no READY"
S1=$SPID
req PUT vm.reboot
expect 204 "vm.reboot"
wait_for 3 exited "$S1" && ok "serial: vm.reboot closed the client's connection" \
    || fail "serial: the client stayed connected across vm.reboot"
start_serial "$D" again
if wait_for 10 bash -c "[ \$(grep -a -c HEARTH-GUEST-READY '$D/serial.out') -ge 2 ]"; then
    ok "serial: READY again after vm.reboot, on a new connection (output kept meanwhile)"
else
    fail "serial: no second READY after vm.reboot"
fi
if fake_only "guest poweroff with --no-shutdown"; then
wait_for 10 bash -c "[ \$(grep -a -o '~ # ' '$D/serial.out' | wc -l) -ge 2 ]" || fail "no prompt after reboot"
printf 'poweroff\n' >"$D/serial.in"
state_is_created() { req GET vm.info; [[ "$BODY" == *'"state":"Created"'* ]]; }
wait_for 3 state_is_created && ok "guest poweroff with --no-shutdown: VM back to Created" \
    || fail "guest poweroff with --no-shutdown: $BODY"
fi
exited "$P5" && fail "--no-shutdown: the fake exited" || ok "--no-shutdown: the fake still runs"
req PUT vm.delete
expect 204 "vm.delete"
[ ! -e "$D/serial.sock" ] && ok "vm.delete removed the serial socket" || fail "serial socket left"
guest_procs_left && fail "guest processes left behind" || ok "no guest process left"
grep -q '"event": "rebooted"' "$D/events.json" && ok "event monitor: rebooted" || fail "no rebooted event"
kill -TERM "$P5"
wait_for 3 exited "$P5" || fail "SIGTERM: still running"
wait "$P5"; rc=$?
[ $rc -eq 0 ] && ok "SIGTERM: exit status 0" || fail "SIGTERM: exit status $rc"

if fake_only "run 6: guest poweroff exits the VMM"; then
echo "== run 6: guest 'poweroff' exits the VMM; final events dropped on demand"
D="$TMP/run6"
mkdir -p "$D"
make_assets "$D"
FAKE_CH_DROP_FINAL_EVENTS=1 start_fake "$D"
P6=$FPID
req PUT vm.create "$(vm_config "$D")"
expect 204 "vm.create"
start_serial "$D"
req PUT vm.boot
expect 204 "vm.boot"
wait_for 10 serial_has "$D" '~ # ' || fail "serial: no prompt"
printf 'poweroff\n' >"$D/serial.in"
if wait_for 3 exited "$P6"; then
    wait "$P6"; rc=$?
    [ $rc -eq 0 ] && ok "guest poweroff: exit status 0" || fail "guest poweroff: exit status $rc"
else
    fail "guest poweroff: the fake still runs"
fi
serial_has "$D" "reboot: Power down" && ok "serial: 'reboot: Power down'" || fail "no power-down line"
grep -q '"event": "deleted"' "$D/events.json" && fail "final events were written" \
    || ok "final events (deleted, vmm shutdown) not written (FAKE_CH_DROP_FINAL_EVENTS=1)"
guest_procs_left && fail "guest processes left behind" || ok "no guest process left"
fi

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped${REAL:+ (against $FAKE)}"
