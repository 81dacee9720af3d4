#!/usr/bin/env bash
# Benchmarks blockd's vhost-user-blk backend against qemu-storage-daemon's vhost-user-blk
# export, serving the same raw file in /dev/shm to a tiny guest under QEMU/TCG.
#
# Inside the guest, fio (the host's /usr/bin/fio and its shared libraries, appended to
# the tiny initramfs as a second cpio archive) runs on /dev/vda with O_DIRECT and libaio:
#   seq_read / seq_write    1 MiB blocks, queue depth 8   -> MiB/s
#   rand_read / rand_write  4 KiB blocks, queue depth 32  -> IOPS
# then the guest powers off. Backends alternate within each round (the order flips every
# round) and the medians of all rounds are compared: the machines are noisy, and under
# TCG the guest's CPU is the bottleneck, so only the side-by-side comparison means
# anything, not the absolute figures.
#
# Output: JSON on stdout (for docs/benchmarks.md), a table on stderr.
#
# Environment: ROUNDS (3), RUNTIME seconds per fio job (8), DISK_MIB (512), QUEUES (1),
# SMP guest vCPUs (1), HEARTH_ARGS (extra flags for the hearth backend, e.g.
# "--poll-us 0"), QSD_AIO (io_uring; threads if QEMU lacks it),
# HEARTH_TEST_IMAGES (/var/cache/hearth/images), CARGO_TARGET_DIR
# (/var/cache/hearth/target).
#
# Needs: qemu-system-x86_64, qemu-storage-daemon, fio, cpio, python3, cargo, and the tiny
# image (guest-images/tiny/build.sh).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
DISK_MIB=${DISK_MIB:-512}
QUEUES=${QUEUES:-1}
SMP=${SMP:-1}
QSD_AIO=${QSD_AIO:-io_uring}
HEARTH_ARGS=${HEARTH_ARGS:-}
IMAGES=${HEARTH_TEST_IMAGES:-/var/cache/hearth/images}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/hearth/target}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TINY=$IMAGES/tiny

log() { printf '%s\n' "$*" >&2; }
die() { log "bench_vhost_user: $*"; exit 1; }

for tool in qemu-system-x86_64 qemu-storage-daemon fio cpio python3 cargo ldd; do
	command -v "$tool" >/dev/null || die "$tool is missing"
done
[ -f "$TINY/vmlinuz" ] && [ -f "$TINY/initrd.img" ] || die "no tiny image in $TINY: run guest-images/tiny/build.sh"

WORK=$(mktemp -d /dev/shm/hearth-bench-vhost-user.XXXXXX)
PIDS=()
cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$WORK"
}
trap cleanup EXIT

log "building blockd's vhost_user_blk example (release)"
(cd "$REPO" && cargo build --quiet --release -p blockd --example vhost_user_blk)
HEARTH_BACKEND=$CARGO_TARGET_DIR/release/examples/vhost_user_blk

# --- bench initramfs: the tiny initrd + fio, its libraries and a bench init --------
build_initrd() {
	local root=$WORK/initrd-root lib
	mkdir -p "$root/usr/bin" "$root/etc"
	cp /usr/bin/fio "$root/usr/bin/fio"
	for lib in $(ldd /usr/bin/fio | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done
	# busybox init runs the benchmark once on the serial console instead of a shell.
	cat >"$root/etc/inittab" <<-'EOF'
		::sysinit:/etc/init.d/rcS
		ttyS0::once:/bench.sh
	EOF
	cat >"$root/bench.sh" <<-'EOF'
		#!/bin/sh
		export PATH=/sbin:/usr/sbin:/bin:/usr/bin
		rt=8
		for a in $(cat /proc/cmdline); do
			case "$a" in bench.runtime=*) rt=${a#*=} ;; esac
		done
		echo BENCH-JSON-BEGIN
		fio --output-format=json --filename=/dev/vda --direct=1 --ioengine=libaio \
			--time_based --runtime="$rt" --ramp_time=1 --norandommap --randrepeat=0 \
			--name=seq_read --rw=read --bs=1M --iodepth=8 --stonewall \
			--name=seq_write --rw=write --bs=1M --iodepth=8 --stonewall \
			--name=rand_read --rw=randread --bs=4k --iodepth=32 --stonewall \
			--name=rand_write --rw=randwrite --bs=4k --iodepth=32 --stonewall
		echo BENCH-JSON-END
		sync
		poweroff -f
	EOF
	chmod +x "$root/bench.sh"
	# Appended newc archives are unpacked over the first: these files win.
	(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc) >"$WORK/fio.cpio"
	cat "$TINY/initrd.img" "$WORK/fio.cpio" >"$WORK/bench-initrd.img"
}
log "building the bench initramfs (tiny + fio)"
build_initrd

DISK=$WORK/disk.raw
log "filling a ${DISK_MIB} MiB disk in /dev/shm"
dd if=/dev/urandom of="$DISK" bs=1M count="$DISK_MIB" status=none

# A QEMU build without io_uring refuses aio=io_uring at once: fall back to its thread pool.
if [ "$QSD_AIO" = io_uring ]; then
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=probe,filename=$DISK,aio=io_uring,read-only=on" \
		--export "type=vhost-user-blk,id=probe,node-name=probe,addr.type=unix,addr.path=$WORK/probe.sock" \
		</dev/null >/dev/null 2>&1 &
	probe=$!
	sleep 1
	if kill -0 "$probe" 2>/dev/null; then
		kill -TERM "$probe"
		wait "$probe" 2>/dev/null || true
	else
		wait "$probe" 2>/dev/null || true
		log "qemu-storage-daemon has no io_uring here: using aio=threads"
		QSD_AIO=threads
	fi
fi
rm -f "$WORK/probe.sock"

wait_for_socket() {
	local sock=$1 pid=$2 i
	for i in $(seq 1 200); do
		[ -S "$sock" ] && return 0
		kill -0 "$pid" 2>/dev/null || die "backend $pid exited before listening on $sock"
		sleep 0.05
	done
	die "no socket at $sock"
}

start_backend() { # name sock; sets BPID
	local name=$1 sock=$2
	case "$name" in
	hearth)
		"$HEARTH_BACKEND" --socket "$sock" --image "$DISK" --queues "$QUEUES" $HEARTH_ARGS \
			>"$WORK/$name.log" 2>&1 &
		;;
	qemu-storage-daemon)
		qemu-storage-daemon \
			--object iothread,id=io0 \
			--blockdev "driver=file,node-name=disk0,filename=$DISK,cache.direct=off,aio=$QSD_AIO" \
			--export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES,iothread=io0" \
			>"$WORK/$name.log" 2>&1 &
		;;
	esac
	BPID=$!
}

run_guest() { # name round
	local name=$1 round=$2 sock=$WORK/$1.sock console=$WORK/$1-$2.console bpid qpid deadline
	rm -f "$sock"
	start_backend "$name" "$sock"
	bpid=$BPID
	PIDS+=("$bpid")
	wait_for_socket "$sock" "$bpid"
	qemu-system-x86_64 -name bench -machine q35 -accel tcg -cpu max -smp "$SMP" -m 1G \
		-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
		-nodefaults -no-user-config -display none \
		-kernel "$TINY/vmlinuz" -initrd "$WORK/bench-initrd.img" \
		-append "console=ttyS0 quiet panic=-1 cryptomgr.notests bench.runtime=$RUNTIME" \
		-chardev "file,id=s0,path=$console" -serial chardev:s0 \
		-chardev "socket,id=blk0,path=$sock" \
		-device "vhost-user-blk-pci,chardev=blk0,num-queues=$QUEUES" \
		</dev/null >"$WORK/$name-$round.qemu.log" 2>&1 &
	qpid=$!
	PIDS+=("$qpid")
	deadline=$((SECONDS + 120 + 6 * (RUNTIME + 1)))
	while kill -0 "$qpid" 2>/dev/null; do
		if [ "$SECONDS" -gt "$deadline" ]; then
			log "$name round $round: guest did not finish in time; console:"
			tail -n 30 "$console" >&2 || true
			kill -KILL "$qpid"
			break
		fi
		sleep 0.5
	done
	wait "$qpid" 2>/dev/null || true
	kill -TERM "$bpid" 2>/dev/null || true
	wait "$bpid" 2>/dev/null || true
	grep -q BENCH-JSON-END "$console" || {
		log "$name round $round: no fio results; console:"
		tail -n 30 "$console" >&2
		log "backend log:"
		tail -n 30 "$WORK/$name.log" >&2
		exit 1
	}
	printf '%s\t%s\t%s\n' "$name" "$round" "$console" >>"$WORK/results.tsv"
}

: >"$WORK/results.tsv"
for round in $(seq 1 "$ROUNDS"); do
	if [ $((round % 2)) -eq 1 ]; then order="hearth qemu-storage-daemon"; else order="qemu-storage-daemon hearth"; fi
	for name in $order; do
		log "round $round/$ROUNDS: $name"
		run_guest "$name" "$round"
	done
done

python3 "$REPO/scripts/bench_vhost_user.py" "$WORK/results.tsv" \
	--rounds "$ROUNDS" --runtime "$RUNTIME" --disk-mib "$DISK_MIB" --queues "$QUEUES" \
	--smp "$SMP" --qsd-aio "$QSD_AIO" \
	--kernel "$(cat "$TINY/image.json" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("kernel_version",""))' 2>/dev/null || true)"
