#!/usr/bin/env python3
"""Benchmark: several hosts. Two figures, each against its goal:

  - the scheduler alone: 1,000 VMs of mixed sizes placed one by one over 50 simulated
    hosts (the `place_many` example of crate hearth-placement, release build): the
    median and slowest decision (goal: at most 1 ms each);
  - failure detection: three hosts on this machine, each a network namespace of its own
    on one bridge, each running `hearth-api --all-in-one --host-address`, all on one
    etcd; host B's api is killed (-9) ROUNDS times (5), and each time the time until
    host A's api reports B `lost` is measured, then B is started again and waits to be
    `ready` (goal: at most 5 s; the issue's references: Proxmox HA ~2 min, Harvester
    300 s, Incus off by default).

Restarting a lost host's VMs elsewhere and live migration are not built yet: no figures
for them.

Prints a JSON summary on stdout; `--markdown JSON` renders it as the section of
docs/benchmarks.md (scripts/bench.sh appends it); `--markdown JSON --doc FILE` replaces
that section in FILE (or appends it), for a run of this benchmark on its own.

Usage: scripts/bench_hosts.py HEARTH_API_BINARY PLACE_MANY_BINARY IMAGES_DIR
It re-executes itself in a private network and mount namespace (`unshare`) unless
HEARTH_BENCH_NETNS=1 says it already runs in one. Needs etcd (Debian's etcd-server) and
iproute2.
"""
import http.client, json, os, re, shutil, statistics, subprocess, sys, tempfile, time

ROUNDS = int(os.environ.get("ROUNDS", "5"))
UNDERLAY = "10.98.0"
NAMES = ["h-a", "h-b", "h-c"]
SECTION = "## Several hosts: the scheduler and failure detection"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def call(address, key, path):
    c = http.client.HTTPConnection(address, 8080, timeout=5)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        r = c.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if body else None)
    finally:
        c.close()


class Host:
    def __init__(self, i, name, work, api, images):
        self.name, self.api, self.images = name, api, images
        self.ns = f"hb{os.getpid()}{name[2:]}"
        self.address = f"{UNDERLAY}.{i + 1}"
        self.data = os.path.join(work, name)
        os.makedirs(self.data)
        self.proc, self.key = None, ""
        sh("ip", "netns", "add", self.ns)
        outer, inner = f"hb{i}", f"hb{i}p"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", self.ns)
        sh("ip", "link", "set", outer, "master", "hbench0", "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.address}/24", "dev", inner)
        sh("ip", "-n", self.ns, "link", "set", inner, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    def start(self, store):
        # Its namespace, a fresh sysfs (netd reads it), the cgroup file systems kept.
        aside = os.path.join(self.data, "cgroup-aside")
        os.makedirs(aside, exist_ok=True)
        script = (f"mount --rbind /sys/fs/cgroup {aside} 2>/dev/null; mount -t sysfs sysfs /sys; "
                  f"mountpoint -q {aside} && mount --move {aside} /sys/fs/cgroup; exec \"$@\"")
        args = ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", self.api, "--all-in-one", "--data-dir", self.data,
                "--listen", f"{self.address}:8080", "--host-name", self.name, "--host-address", self.address,
                "--store", store, "--images-dir", self.images, "--qemu-accel", "tcg"]
        logf = open(os.path.join(self.data, "api.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(self.address, "", "/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}'s api did not start; see {self.data}/api.log")
            time.sleep(0.05)
        self.key = open(os.path.join(self.data, "admin.key")).read().strip()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def remove(self):
        self.kill()
        subprocess.run(["ip", "netns", "del", self.ns], stderr=subprocess.DEVNULL)


def start_etcd(work):
    d = os.path.join(work, "etcd")
    logf = open(os.path.join(work, "etcd.log"), "wb")
    client, peer = f"http://{UNDERLAY}.254:2379", f"http://{UNDERLAY}.254:2380"
    p = subprocess.Popen(["etcd", "--name", "b", "--data-dir", d, "--listen-client-urls", client,
                          "--advertise-client-urls", client, "--listen-peer-urls", peer,
                          "--initial-advertise-peer-urls", peer, "--initial-cluster", f"b={peer}"],
                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = http.client.HTTPConnection(f"{UNDERLAY}.254", 2379, timeout=2)
            c.request("GET", "/health")
            if b'"true"' in c.getresponse().read():
                return p
        except (OSError, http.client.HTTPException):
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"etcd did not come up; see {work}/etcd.log")
        time.sleep(0.05)


def state_of(via, name):
    try:
        status, h = call(via.address, via.key, f"/v1/hosts/{name}")
        return h.get("state") if status == 200 else None
    except OSError:
        return None


def detection(api, images):
    work = tempfile.mkdtemp(prefix="hearth-bench-hosts-")
    hosts, etcd = [], None
    try:
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "hbench0", "type", "bridge")
        sh("ip", "addr", "add", f"{UNDERLAY}.254/24", "dev", "hbench0")
        sh("ip", "link", "set", "hbench0", "up")
        etcd = start_etcd(work)
        hosts = [Host(i, n, work, api, images) for i, n in enumerate(NAMES)]
        for h in hosts:
            h.start(f"etcd://{UNDERLAY}.254:2379")
        a, b = hosts[0], hosts[1]
        lost = []
        for r in range(ROUNDS):
            b.kill()
            t0 = time.monotonic()
            while state_of(a, b.name) != "lost":
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("B was not marked lost within 30 s")
                time.sleep(0.02)
            lost.append(time.monotonic() - t0)
            log(f"  round {r + 1}: lost after {lost[-1]:.2f} s")
            b.start(f"etcd://{UNDERLAY}.254:2379")
            t1 = time.monotonic()
            while state_of(a, b.name) != "ready":
                if time.monotonic() - t1 > 30:
                    raise RuntimeError("B did not come back")
                time.sleep(0.05)
        return lost
    finally:
        for h in hosts:
            h.remove()
        if etcd is not None:
            etcd.kill()
            etcd.wait()
        subprocess.run(["ip", "link", "del", "hbench0"], stderr=subprocess.DEVNULL)
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def scheduler(place_many):
    out = subprocess.run([place_many], check=True, capture_output=True, text=True).stdout.strip()
    m = re.search(r"placed (\d+)/(\d+) VMs over (\d+) hosts: median ([\d.]+) µs, slowest ([\d.]+) µs per decision; "
                  r"(\d+)\.\.(\d+) VMs", out)
    if not m:
        raise RuntimeError(f"unexpected place_many output: {out}")
    return {"line": out, "placed": int(m[1]), "vms": int(m[2]), "hosts": int(m[3]), "median_us": float(m[4]),
            "max_us": float(m[5]), "fewest": int(m[6]), "most": int(m[7])}


def markdown(r):
    s, lost = r["scheduler"], r["lost_seconds"]
    med = statistics.median(lost)
    tie = "meets it" if med <= 5.0 else ("a tie (within 5%)" if med <= 5.25 else "misses it")
    return f"""{SECTION}

### The scheduler alone

{s['vms']:,} VMs of mixed sizes (1–4 vCPUs, 512–4096 MiB, 10–30 GiB, one in ten in an
anti-affinity group) placed one by one over {s['hosts']} simulated hosts of three sizes (one in
17 cordoned), each decision seeing the ones before, by the `place_many` example of crate
`hearth-placement` (release build).

| decisions | median | slowest | VMs per schedulable host |
|---|---|---|---|
| {s['placed']:,} of {s['vms']:,} placed | {s['median_us']:.1f} µs | {s['max_us']:.1f} µs | {s['fewest']}–{s['most']} |

Goal: at most 1 ms per decision. Every decision also explains itself (a verdict per host).

### Failure detection

Three hosts on this machine (a network namespace each, one bridge as the underlay, one
etcd), each running `hearth-api --all-in-one --host-address`. Host B's api is killed
(-9) {len(lost)} times; each time, the time until host A's api answers `GET /v1/hosts/h-b`
with `lost` (B's 3 s lease lapsed, the leader marked it and took it out of every overlay).

| rounds | median | fastest | slowest |
|---|---|---|---|
| {len(lost)} | {med:.2f} s | {min(lost):.2f} s | {max(lost):.2f} s |

Goal: at most 5 s ({tie}). For comparison, as documented by their projects: Proxmox VE HA
takes about 2 minutes to act on a dead node, Harvester waits 300 s, Incus leaves healing
off by default. Not measured yet: restarting a lost host's VMs elsewhere and live
migration, which hearth does not do yet.
"""


def replace_section(doc_path, section_md):
    text = open(doc_path).read() if os.path.exists(doc_path) else ""
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section_md
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section_md + (text[nxt + 1:] if nxt >= 0 else "")
    open(doc_path, "w").write(text)


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--markdown":
        r = json.load(open(sys.argv[2]))
        md = markdown(r)
        if len(sys.argv) == 5 and sys.argv[3] == "--doc":
            replace_section(sys.argv[4], md)
        print(md)
        return
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    api, place_many, images = sys.argv[1:]
    if os.environ.get("HEARTH_BENCH_NETNS") != "1":
        os.environ["HEARTH_BENCH_NETNS"] = "1"
        os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private",
                              sys.executable, *sys.argv])
    log("==> scheduler: 1,000 VMs over 50 simulated hosts")
    s = scheduler(place_many)
    log("  " + s["line"])
    log(f"==> failure detection: host B's api killed {ROUNDS} times")
    lost = detection(api, images)
    print(json.dumps({"scheduler": s, "lost_seconds": lost}))


if __name__ == "__main__":
    main()
