"""Renders the storage benchmarks (scripts/bench_nbd.sh and scripts/bench_vhost_user.sh
JSON) as the storage sections of docs/benchmarks.md. Usage: bench_storage_md.py NBD [VHOST]
(without VHOST only the NBD section, for a run of scripts/bench_nbd.sh on its own)."""
import datetime
import json
import sys

nbd = json.load(open(sys.argv[1]))
vu = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else None
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
pin = nbd.get("pinned")
pinned = (f"\nClients pinned to CPUs {pin['clients']}, servers to CPUs {pin['servers']} (PIN=1)."
          if pin else "")
repeat = (f" (a sample is {nbd['nbdcopy_repeat']} copies of the file back to back)"
          if nbd.get("nbdcopy_repeat", 1) > 1 else "")
out = [f"""
## NBD servers: blockd against qemu-nbd and nbdkit

{nbd['file']}, the same file for every server; {nbd['rounds']} rounds, servers interleaved
(order rotated every round), fio {nbd['fio_runtime_s']} s per job; medians. nbdcopy for
sequential transfers{repeat}, fio's `nbd` engine for 4k random I/O. Run {now} UTC.{pinned}
Goal: at least nbdkit and at least 1.3x qemu-nbd on every row; tls rows are TCP with
TLS required, the same certificates for all three servers.

| test | via | unit | blockd | qemu-nbd | nbdkit | vs nbdkit | vs qemu-nbd |
|---|---|---|---|---|---|---|---|"""]
for r in nbd["rows"]:
    m = r["median"]
    vk, vq = r.get("blockd_vs_nbdkit"), r.get("blockd_vs_qemu_nbd")
    flag = lambda v, want: f"**{v:.2f}**" if v is not None and v < want else (f"{v:.2f}" if v is not None else "-")
    out.append(f"| {r['test']} | {r['transport']} | {r['unit']} | {m.get('blockd', 0):.0f} | {m.get('qemu-nbd', 0):.0f} | "
               f"{m.get('nbdkit', 0):.0f} | {flag(vk, 1.0)} | {flag(vq, 1.3)} |")
out.append("""
Bold: below the goal. blockd serves each connection from threads of its own (up to 8,
nbdkit's "parallel" model): one thread reads a request, runs it and sends the reply, and
the thread waiting for the next request polls the socket for up to 50 µs before it
sleeps (after requests of at most 64 KiB), so at queue depth 1 a request costs no
thread wake-up. A second thread is started only when waiting costs more than handing
requests over (a flush or FUA, a read that would wait for the disk, requests averaging
over 20 µs), so 4k requests to the page cache, even 32 in flight, are served by one
thread and no futex wakes or socket-lock contention between threads. Writes of 128 KiB or more are spliced from the socket into the file
(one copy of the data, not two). nbdcopy's sequential rows are bound by the client (one nbdcopy process
on the same 2 cores) and swing from run to run. Over TLS the connection threads run the
rustls session themselves (records decrypted by the thread that reads, sealed by the
one that replies), as nbdkit runs GnuTLS in its threads.""")
if vu is None:
    print("\n".join(out))
    sys.exit(0)
med, ratio = vu["median"], vu["hearth_over_qsd"]
s = vu["setup"]
out.append(f"""
## vhost-user-blk: blockd's backend against qemu-storage-daemon

{s['disk']}; tiny guest under QEMU/TCG ({s['guest_vcpus']} vCPU, {s['queues']} queue), fio inside
the guest ({s['fio']}), {s['rounds']} rounds {s['order']}; medians. qemu-storage-daemon:
`{s['qemu-storage-daemon']}`. Goal: at least equal.

| metric | blockd | qemu-storage-daemon | blockd / qsd |
|---|---|---|---|""")
names = {"seq_read_mib_s": "sequential read, MiB/s", "seq_write_mib_s": "sequential write, MiB/s",
         "rand_read_4k_iops": "4k random read, IOPS", "rand_write_4k_iops": "4k random write, IOPS"}
for k, label in names.items():
    out.append(f"| {label} | {med['hearth'][k]:.0f} | {med['qemu-storage-daemon'][k]:.0f} | {ratio[k]:.2f} |")
out.append("""
Under TCG the guest's own CPU cost dominates and single rounds swing 2-3x on these
2-core machines; the backend polls a busy queue for up to 100 µs before it interrupts
the guest, which is where it gains.
""")
print("\n".join(out))
