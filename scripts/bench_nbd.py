#!/usr/bin/env python3
"""NBD server benchmark: blockd's nbd_serve vs qemu-nbd vs nbdkit (file plugin).

All three serve the same 1 GiB file in /dev/shm. Each round runs every test against
every server back to back (server order rotated per round), so the machine's noise
hits them alike; the figure per server is the median over rounds.

Tests, each over TCP (127.0.0.1) and a Unix socket:
  nbdcopy sequential read (export -> null:) and write (tmpfs file -> export), MiB/s
  (a sample is NBDCOPY_REPEAT copies of the 1 GiB, 4 by default)
  fio (nbd engine) 4k random read and random write at QD32 and QD1, IOPS
and over TCP with TLS required (certificates made by openssl for the run, every
server given the same directory): the nbdcopy rows and fio 4k random read at QD1.

Prints a JSON document on stdout and a table on stderr. Called by bench_nbd.sh,
which builds the example server first. Environment: ROUNDS (3), FIO_RUNTIME (5 s),
NBDCOPY_REPEAT (4),
OURS (path of nbd_serve), OURS_ARGS (extra arguments for it), SERVERS (comma list),
PIN (0: wherever the scheduler puts them, the default; 1: servers on the upper half of
the CPUs, clients on the lower half, as when client and server are different hosts;
every server gets the same CPUs either way).
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
ROUNDS = int(os.environ.get("ROUNDS", "3"))
FIO_RUNTIME = int(os.environ.get("FIO_RUNTIME", "5"))
NBDCOPY_REPEAT = int(os.environ.get("NBDCOPY_REPEAT", "4"))
OURS = os.environ.get("OURS", "")
OURS_ARGS = os.environ.get("OURS_ARGS", "").split()
SERVERS = os.environ.get("SERVERS", "blockd,qemu-nbd,nbdkit").split(",")
# A subset of tcp,unix,tls (for a quick look at some rows).
ONLY = set(os.environ.get("TRANSPORTS", "tcp,unix,tls").split(","))
CPUS = sorted(os.sched_getaffinity(0))
PIN = os.environ.get("PIN", "0") == "1" and len(CPUS) >= 2
CLIENT_CPUS, SERVER_CPUS = (CPUS[:len(CPUS) // 2], CPUS[len(CPUS) // 2:]) if PIN else (CPUS, CPUS)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(tcp_port=None, unix_path=None, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if tcp_port is not None:
                with socket.create_connection(("127.0.0.1", tcp_port), timeout=1) as s:
                    if len(s.recv(8)) == 8:
                        return
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(unix_path)
                    if len(s.recv(8)) == 8:
                        return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not come up (port %s, socket %s)" % (tcp_port, unix_path))


class Server:
    """One NBD server, listening on TCP and a Unix socket (one or two processes)."""

    def __init__(self, name, image, workdir, pki):
        self.name, self.image, self.pki = name, image, pki
        self.port = free_port()
        self.tls_port = free_port()
        self.sock = os.path.join(workdir, name + ".sock")
        self.procs = []

    def spawn(self, argv):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=lambda: os.sched_setaffinity(0, SERVER_CPUS))
        self.procs.append(p)

    def start(self):
        tls_tcp = "127.0.0.1:%d" % self.tls_port
        if self.name == "blockd":
            self.spawn([OURS, "--file", self.image, "--tcp", "127.0.0.1:%d" % self.port, "--unix", self.sock] + OURS_ARGS)
            self.spawn([OURS, "--file", self.image, "--tcp", tls_tcp, "--nbd-tls", "require", "--nbd-tls-certificates", self.pki] + OURS_ARGS)
        elif self.name == "qemu-nbd":
            common = ["qemu-nbd", "-f", "raw", "-t", "--shared=16", "--cache=writeback", "--aio=threads"]
            self.spawn(common + ["-b", "127.0.0.1", "-p", str(self.port), self.image])
            self.spawn(common + ["-k", self.sock, self.image])
            self.spawn(common + ["--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=server,verify-peer=off" % self.pki,
                                 "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(self.tls_port), self.image])
        elif self.name == "nbdkit":
            self.spawn(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "file", self.image])
            self.spawn(["nbdkit", "-f", "-U", self.sock, "file", self.image])
            self.spawn(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.tls_port), "--tls=require",
                        "--tls-certificates=" + self.pki, "file", self.image])
        else:
            raise ValueError(self.name)
        wait_ready(tcp_port=self.port)
        wait_ready(unix_path=self.sock)
        wait_ready(tcp_port=self.tls_port)

    def uri(self, transport):
        if transport == "tcp":
            return "nbd://127.0.0.1:%d/" % self.port
        if transport == "tls":
            # The CA comes from $HOME/.pki/libnbd (see CLIENT_ENV): fio's nbd engine
            # refuses a tls-certificates path in the URI.
            return "nbds://127.0.0.1:%d/" % self.tls_port
        return "nbd+unix:///?socket=%s" % self.sock

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


# The clients' environment: HOME holds .pki/libnbd, the run's CA (set in main).
CLIENT_ENV = dict(os.environ)


def nbdcopy(src, dst):
    # One copy of 1 GiB takes about half a second here, and on this shared machine such
    # short runs came out bimodal (~1,000 or ~2,000 MiB/s, for every server alike,
    # depending on when they ran): a sample is NBDCOPY_REPEAT copies back to back.
    t = time.monotonic()
    for _ in range(NBDCOPY_REPEAT):
        subprocess.run(["nbdcopy", src, dst], check=True, stdout=subprocess.DEVNULL, env=CLIENT_ENV)
    return NBDCOPY_REPEAT * (GIB / (1 << 20)) / (time.monotonic() - t)


def fio(uri, rw, depth, workdir):
    out = os.path.join(workdir, "fio.json")
    subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=4k",
         "--iodepth=%d" % depth, "--size=1G", "--runtime=%d" % FIO_RUNTIME, "--ramp_time=1",
         "--time_based", "--norandommap", "--randrepeat=0", "--output-format=json", "--output=" + out],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLIENT_ENV)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    os.unlink(out)
    if job["error"]:
        raise RuntimeError("fio %s on %s: error %s" % (rw, uri, job["error"]))
    return job["read" if rw == "randread" else "write"]["iops"]


PLAIN, WITH_TLS = ("tcp", "unix"), ("tcp", "unix", "tls")
TESTS = [
    ("nbdcopy seq read", "MiB/s", WITH_TLS, lambda s, t, w: nbdcopy(s.uri(t), "null:")),
    ("nbdcopy seq write", "MiB/s", WITH_TLS, lambda s, t, w: nbdcopy(w["src"], s.uri(t))),
    ("fio 4k randread QD32", "IOPS", PLAIN, lambda s, t, w: fio(s.uri(t), "randread", 32, w["dir"])),
    ("fio 4k randwrite QD32", "IOPS", PLAIN, lambda s, t, w: fio(s.uri(t), "randwrite", 32, w["dir"])),
    ("fio 4k randread QD1", "IOPS", WITH_TLS, lambda s, t, w: fio(s.uri(t), "randread", 1, w["dir"])),
    ("fio 4k randwrite QD1", "IOPS", PLAIN, lambda s, t, w: fio(s.uri(t), "randwrite", 1, w["dir"])),
]

OPENSSL_CONFIG = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = hearth bench CA
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
"""


def make_pki(d):
    """A CA and a server certificate for 127.0.0.1, laid out as nbdkit's --tls-certificates."""
    os.makedirs(d)
    with open(os.path.join(d, "openssl.cnf"), "w") as f:
        f.write(OPENSSL_CONFIG)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda args: subprocess.run(["openssl"] + args, cwd=d, check=True, capture_output=True)
    run(["req", "-x509", "-config", "openssl.cnf", "-extensions", "ca", "-days", "2"] + ec +
        ["-keyout", "ca-key.pem", "-out", "ca-cert.pem"])
    run(["req", "-new", "-config", "openssl.cnf", "-subj", "/CN=localhost"] + ec +
        ["-keyout", "server-key.pem", "-out", "server.csr"])
    run(["x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-set_serial", "2",
         "-days", "2", "-extfile", "openssl.cnf", "-extensions", "server", "-out", "server-cert.pem"])


def fill_random(path, size):
    with open("/dev/urandom", "rb") as r, open(path, "wb") as w:
        left = size
        while left:
            n = min(left, 8 << 20)
            w.write(r.read(n))
            left -= n


def main():
    for tool in ["nbdcopy", "fio", "openssl"] + [{"qemu-nbd": "qemu-nbd", "nbdkit": "nbdkit"}.get(s) for s in SERVERS if s != "blockd"]:
        if tool and not shutil.which(tool):
            sys.exit("%s is missing (Debian packages: qemu-utils nbdkit libnbd-bin fio)" % tool)
    if "blockd" in SERVERS and not os.access(OURS, os.X_OK):
        sys.exit("OURS must name the nbd_serve binary")
    # The clients (nbdcopy, fio) inherit this process's CPUs.
    os.sched_setaffinity(0, CLIENT_CPUS)
    workdir = tempfile.mkdtemp(prefix="bench-nbd-", dir="/dev/shm")
    servers = []
    try:
        image = os.path.join(workdir, "image.raw")
        src = os.path.join(workdir, "src.raw")
        log("preparing two 1 GiB files in %s" % workdir)
        fill_random(image, GIB)
        fill_random(src, GIB)
        pki = os.path.join(workdir, "pki")
        make_pki(pki)
        os.makedirs(os.path.join(workdir, "home", ".pki"))
        os.symlink(pki, os.path.join(workdir, "home", ".pki", "libnbd"))
        CLIENT_ENV["HOME"] = os.path.join(workdir, "home")
        servers = [Server(n, image, workdir, pki) for n in SERVERS]
        for s in servers:
            s.start()
        env = {"src": src, "dir": workdir}
        samples = {}  # (test, transport) -> server -> [values]
        for r in range(ROUNDS):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for name, unit, transports, fn in TESTS:
                for transport in [t for t in transports if t in ONLY]:
                    for s in order:
                        v = fn(s, transport, env)
                        samples.setdefault((name, transport), {}).setdefault(s.name, []).append(v)
                    row = samples[(name, transport)]
                    log("round %d  %-22s %-4s  %s" % (r + 1, name, transport,
                        "  ".join("%s=%.0f" % (k, v[-1]) for k, v in row.items())))
        rows = []
        for name, unit, transports, _ in TESTS:
            for transport in [t for t in transports if t in ONLY]:
                per = samples[(name, transport)]
                row = {"test": name, "transport": transport, "unit": unit,
                       "median": {k: round(statistics.median(v), 1) for k, v in per.items()},
                       "samples": {k: [round(x, 1) for x in v] for k, v in per.items()}}
                m = row["median"]
                if "blockd" in m:
                    for other in ("nbdkit", "qemu-nbd"):
                        if other in m and m[other]:
                            row["blockd_vs_" + other.replace("-", "_")] = round(m["blockd"] / m[other], 2)
                rows.append(row)
        doc = {
            "benchmark": "nbd-servers",
            "file": "1 GiB raw file in /dev/shm",
            "rounds": ROUNDS,
            "fio_runtime_s": FIO_RUNTIME,
            "nbdcopy_repeat": NBDCOPY_REPEAT,
            "servers": SERVERS,
            "ours_args": OURS_ARGS,
            "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "pinned": {"clients": CLIENT_CPUS, "servers": SERVER_CPUS} if PIN else None,
            "rows": rows,
        }
        print(json.dumps(doc, indent=2))
        header = "%-22s %-5s %-6s" % ("test", "via", "unit") + "".join("%11s" % s for s in SERVERS)
        if "blockd" in SERVERS:
            header += "  vs nbdkit  vs qemu-nbd"
        log("\n" + header)
        for row in rows:
            line = "%-22s %-5s %-6s" % (row["test"], row["transport"], row["unit"])
            line += "".join("%11.0f" % row["median"].get(s, 0) for s in SERVERS)
            if "blockd" in SERVERS:
                line += "  %9s  %11s" % (row.get("blockd_vs_nbdkit", "-"), row.get("blockd_vs_qemu_nbd", "-"))
            log(line)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
