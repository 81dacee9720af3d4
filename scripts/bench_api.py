#!/usr/bin/env python3
"""Benchmark: the REST API under load with 1,000 VMs in the store, for both stores.

For the embedded store, then for etcd (a private etcd on loopback), in one run:
  - start `hearth-api --all-in-one`, create VMS (1,000) VMs through `POST /v1/vms`
    (tiny image, not started, no NICs) from 8 client threads, check that
    `GET /v1/vms` lists them all;
  - load `GET /v1/vms` (plain, then with `Accept-Encoding: gzip` as browsers, curl
    --compressed, Python requests and Go send it) and, for contrast,
    `GET /v1/vms/b-0001` with wrk on loopback (wrk and the api share the machine's cores);
  - for scale (first store only): the web console's largest static file and
    `/health/live` under the same load;
  - restart: SIGTERM the api, start it again on the same data directory (and etcd),
    time until `/health/ready` is 200 and until `GET /v1/vms` lists all the VMs, and
    the reconcile pass the api ran before serving (`hearth_reconcile_seconds`, and how
    many records and daemon objects it examined, from `/metrics`);
  - a simulated host reboot: the api stopped, vmm-manager's state directories (which
    live under /run on a real host) removed, the api started: the reconciler defines
    all the VMs again; the same figures.
Each wrk run also records where the machine's CPU went (the api, wrk, etcd, interrupts,
and other processes by name), so a run disturbed by other work on the machine shows it.
Prints a JSON summary on stdout; `--markdown JSON` renders it as the section of
docs/benchmarks.md (scripts/bench.sh appends it), `--markdown JSON --doc FILE` replaces
that section in FILE (or appends it) for a run of this benchmark on its own.

Usage: scripts/bench_api.py HEARTH_API_BINARY IMAGES_DIR
It runs in a private network and mount namespace: it re-executes itself under
`unshare` unless HEARTH_BENCH_NETNS=1 says it already is in one. Needs wrk and, for the
etcd store, etcd (Debian's etcd-server). Environment: VMS (1000), DURATION (wrk seconds,
10), CONNECTIONS (16), THREADS (wrk threads, 2), RESTARTS (3), STORES (embedded,etcd),
KEEP (keep the data directories).
"""
import datetime, http.client, json, os, re, resource, shutil, statistics, subprocess, sys, tempfile, threading, time

from procs import kill_processes_under, stop

HOST = "127.0.0.1"
API_PORT = 18091
ETCD_CLIENT, ETCD_PEER = 12379, 12380
VMS = int(os.environ.get("VMS", "1000"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "16"))
THREADS = int(os.environ.get("THREADS", "2"))
RESTARTS = int(os.environ.get("RESTARTS", "3"))
STORES = os.environ.get("STORES", "embedded,etcd").split(",")
CREATE_CLIENTS = 8
SECTION = "## REST API: GET /v1/vms with"  # followed by the number of VMs


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Client:
    """One keep-alive HTTP connection to the api, reopened after errors."""

    def __init__(self, key):
        self.key, self.c = key, None

    def call(self, method, path, body=None, timeout=60, parse=True):
        for attempt in range(3):
            try:
                if self.c is None:
                    self.c = http.client.HTTPConnection(HOST, API_PORT, timeout=timeout)
                self.c.request(method, path, body=json.dumps(body) if body is not None else None,
                               headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
                r = self.c.getresponse()
                data = r.read()
                return r.status, (json.loads(data) if data and parse else None), len(data)
            except (OSError, http.client.HTTPException):
                if self.c is not None:
                    self.c.close()
                self.c = None
                if attempt == 2:
                    raise
                time.sleep(0.1)

    def close(self):
        if self.c is not None:
            self.c.close()


def ready():
    try:
        c = http.client.HTTPConnection(HOST, API_PORT, timeout=2)
        c.request("GET", "/health/ready")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


class Api:
    def __init__(self, binary, images, data, store):
        self.binary, self.images, self.data, self.store = binary, images, data, store
        self.proc, self.log = None, open(os.path.join(data, "api.log"), "ab")

    def start(self):
        args = [self.binary, "--all-in-one", "--data-dir", self.data, "--listen", f"{HOST}:{API_PORT}",
                "--images-dir", self.images, "--qemu-accel", "tcg"]
        if self.store != "embedded":
            args += ["--store", self.store]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def wait_ready(self, deadline_s=60, poll=0.01):
        deadline = time.monotonic() + deadline_s
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"hearth-api exited with {self.proc.returncode}; see {self.data}/api.log")
            if time.monotonic() > deadline:
                raise TimeoutError("hearth-api not ready")
            time.sleep(poll)

    def stop(self):
        if self.proc is not None:
            stop(self.proc, 60)


def start_etcd(work):
    d = os.path.join(work, "etcd")
    logf = open(os.path.join(work, "etcd.log"), "wb")
    peer = f"http://{HOST}:{ETCD_PEER}"
    client = f"http://{HOST}:{ETCD_CLIENT}"
    p = subprocess.Popen(["etcd", "--name", "b", "--data-dir", d, "--listen-client-urls", client,
                          "--advertise-client-urls", client, "--listen-peer-urls", peer,
                          "--initial-advertise-peer-urls", peer, "--initial-cluster", f"b={peer}"],
                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = http.client.HTTPConnection(HOST, ETCD_CLIENT, timeout=2)
            c.request("GET", "/health")
            if b'"true"' in c.getresponse().read():
                c.close()
                return p
        except (OSError, http.client.HTTPException):
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            p.wait()
            raise RuntimeError(f"etcd did not come up; see {work}/etcd.log")
        time.sleep(0.05)


def create_vms(key, n):
    """POST /v1/vms n times from CREATE_CLIENTS threads; waits for every operation."""
    names = [f"b-{i:04d}" for i in range(1, n + 1)]
    lock, errors = threading.Lock(), []

    def worker():
        c = Client(key)
        try:
            while True:
                with lock:
                    if not names or errors:
                        return
                    name = names.pop(0)
                status, body, _ = c.call("POST", "/v1/vms", {"name": name, "image": "tiny", "hypervisor": "qemu",
                                                            "start": False, "memory_mib": 64, "vcpus": 1,
                                                            "nics": []})
                if status != 202:
                    raise RuntimeError(f"POST /v1/vms {name}: {status} {body}")
                op = body["operation"]
                while op["status"] == "running":
                    _, op, _ = c.call("GET", f"/v1/operations/{op['id']}?wait=10")
                if op["status"] != "succeeded":
                    raise RuntimeError(f"creating {name}: {op}")
        except Exception as e:  # noqa: BLE001 - reported by the caller
            with lock:
                errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(CREATE_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def to_ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        raise ValueError(f"wrk latency {s!r}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def machine_cpu_s():
    """CPU seconds of the whole machine (all cores, /proc/stat): in processes (user,
    nice, system), in interrupts (irq, softirq: loopback TCP is processed there and
    is charged to no process), and stolen by the hypervisor."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return {"procs": (f[0] + f[1] + f[2]) / hz, "irq": (f[5] + f[6]) / hz, "steal": f[7] / hz}


def all_processes_cpu_s():
    """{pid: (comm, CPU seconds)} of every process this one can see."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                comm, rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)
                f = rest.split()
                out[int(pid)] = (comm.split("(", 1)[1], (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
            except (OSError, IndexError):
                pass
    return out


def process_cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def serial(key, path, n=50):
    """Median latency of n requests one after another on one keep-alive connection."""
    c, ts = Client(key), []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            status, _, _ = c.call("GET", path, parse=False)
            ts.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
    finally:
        c.close()
    return statistics.median(ts)


def wrk(key, path, api_pid, etcd_pid=None, auth=True, extra=()):
    """wrk on one route; also where the machine's CPU went meanwhile: the api, wrk, etcd,
    and anything else (another build on the same cores lowers the figures). `extra`:
    more request headers."""
    headers = ["-H", f"Authorization: Bearer {key}"] if auth else []
    for h in extra:
        headers += ["-H", h]
    t0, m0, api0, all0 = time.monotonic(), machine_cpu_s(), process_cpu_s(api_pid), all_processes_cpu_s()
    etcd0 = process_cpu_s(etcd_pid) if etcd_pid else 0.0
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{DURATION}s", "--latency", *headers,
                         f"http://{HOST}:{API_PORT}{path}"],
                         check=True, capture_output=True, text=True).stdout
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m1, api_cpu, all1 = machine_cpu_s(), process_cpu_s(api_pid) - api0, all_processes_cpu_s()
    dt, m = time.monotonic() - t0, {k: m1[k] - m0[k] for k in m0}
    etcd_cpu = process_cpu_s(etcd_pid) - etcd0 if etcd_pid else 0.0
    wrk_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    log(out)
    r = {"path": path, "cores_api": api_cpu / dt, "cores_wrk": wrk_cpu / dt, "cores_etcd": etcd_cpu / dt,
         "cores_irq": m["irq"] / dt, "cores_steal": m["steal"] / dt,
         "cores_other": max(0.0, m["procs"] - api_cpu - wrk_cpu - etcd_cpu) / dt}
    mine = {api_pid, etcd_pid, os.getpid()}
    others = {}
    for pid, (comm, cpu) in all1.items():
        if pid not in mine and comm != "wrk":
            used = cpu - all0.get(pid, (comm, 0.0))[1]
            if used > 0.05 * dt:
                others[comm] = others.get(comm, 0.0) + used / dt
    r["other_processes"] = {k: round(v, 2) for k, v in sorted(others.items(), key=lambda kv: -kv[1])}
    r["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    r["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    for pct in ("50", "75", "90", "99"):
        r[f"p{pct}_ms"] = to_ms(re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M).group(1))
    r["avg_ms"] = to_ms(re.search(r"^\s+Latency\s+(\S+)", out, re.M).group(1))
    r["max_ms"] = to_ms(re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    r["non_2xx"] = int(bad.group(1)) if bad else 0
    r["socket_errors"] = sock.group(1).strip() if sock else ""
    if r["non_2xx"]:
        raise RuntimeError(f"wrk {path}: {r['non_2xx']} responses were not 2xx")
    r["api_cpu_ms_per_request"] = api_cpu * 1000 / r["requests"]
    r["alone_ms"] = serial(key, path)
    return r


def bench_store(api_bin, images, store):
    work = tempfile.mkdtemp(prefix=f"hearth-bench-api-{store}-")
    data = os.path.join(work, "data")
    os.mkdir(data)
    etcd, api = None, None
    result = {"store": store}
    try:
        location = "embedded"
        if store == "etcd":
            etcd = start_etcd(work)
            location = f"etcd://{HOST}:{ETCD_CLIENT}"
        api = Api(api_bin, images, data, location)
        api.start()
        api.wait_ready()
        key = open(os.path.join(data, "admin.key")).read().strip()
        log(f"==> {store}: creating {VMS} VMs")
        t0 = time.monotonic()
        create_vms(key, VMS)
        result["create_s"] = time.monotonic() - t0
        c = Client(key)
        status, vms, size = c.call("GET", "/v1/vms")
        c.close()
        if status != 200 or len(vms) != VMS:
            raise RuntimeError(f"GET /v1/vms: {status}, {len(vms or [])} VMs, expected {VMS}")
        result["list_bytes"] = size
        log(f"==> {store}: {VMS} VMs in {result['create_s']:.1f} s; GET /v1/vms is {size} bytes")
        etcd_pid = etcd.pid if etcd else None
        result["list"] = wrk(key, "/v1/vms", api.proc.pid, etcd_pid)
        result["list_gzip"] = wrk(key, "/v1/vms", api.proc.pid, etcd_pid, extra=["Accept-Encoding: gzip"])
        c = http.client.HTTPConnection(HOST, API_PORT, timeout=30)
        c.request("GET", "/v1/vms", headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "gzip"})
        resp = c.getresponse()
        if resp.getheader("Content-Encoding") != "gzip":
            raise RuntimeError("GET /v1/vms with Accept-Encoding: gzip was not compressed")
        result["list_gzip_bytes"] = len(resp.read())
        c.close()
        result["show"] = wrk(key, "/v1/vms/b-0001", api.proc.pid, etcd_pid)
        if store == STORES[0]:
            # References on the same server: the largest static file of the web console
            # (if it was built in), to show what sending a body of that size costs, and
            # the cheapest route there is.
            c = http.client.HTTPConnection(HOST, API_PORT, timeout=10)
            c.request("GET", "/")
            page = c.getresponse().read().decode(errors="replace")
            sizes = {}
            for a in sorted(set(re.findall(r'"(/assets/[^"?#]+)"', page))):
                c.request("GET", a)
                resp = c.getresponse()
                body = resp.read()
                if resp.status == 200:
                    sizes[a] = len(body)
            c.close()
            if sizes:
                biggest = max(sizes, key=sizes.get)
                result["static"] = wrk(key, biggest, api.proc.pid, etcd_pid, auth=False)
                result["static"]["bytes"] = sizes[biggest]
            result["health"] = wrk(key, "/health/live", api.proc.pid, etcd_pid, auth=False)

        ready_ms, serving_ms, stop_ms, reconcile = [], [], [], []
        for i in range(RESTARTS + 1):
            reboot = i == RESTARTS
            t0 = time.monotonic()
            api.stop()
            if reboot:
                # What a host reboot does to vmm-manager: its state under /run is gone.
                shutil.rmtree(os.path.join(data, "run", "vms"))
            else:
                stop_ms.append((time.monotonic() - t0) * 1000)
            t0 = time.monotonic()
            api.start()
            api.wait_ready(poll=0.005)
            ready = (time.monotonic() - t0) * 1000
            c = Client(key)
            while True:
                status, vms, _ = c.call("GET", "/v1/vms")
                if status == 200 and len(vms) == VMS:
                    break
                if time.monotonic() - t0 > 120:
                    raise TimeoutError(f"after restart GET /v1/vms gave {status} with {len(vms or [])} VMs")
                time.sleep(0.005)
            serving = (time.monotonic() - t0) * 1000
            if reboot and any(v["state"] != "stopped" for v in vms):
                raise RuntimeError("after the simulated reboot some VMs are not 'stopped': "
                                   + ", ".join(sorted({v["state"] for v in vms})))
            c.close()
            m = http.client.HTTPConnection(HOST, API_PORT, timeout=10)
            m.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
            text = m.getresponse().read().decode()
            m.close()
            figures = {k: float(re.search(rf"^hearth_reconcile_{k} (\S+)", text, re.M).group(1))
                       for k in ("seconds", "examined", "repairs")}
            if reboot:
                if figures["repairs"] < VMS:
                    raise RuntimeError(f"after the simulated reboot the reconciler repaired {figures['repairs']:.0f}, "
                                       f"expected {VMS}")
                result["reboot"] = {"ready_ms": ready, "serving_ms": serving, **figures}
            else:
                ready_ms.append(ready)
                serving_ms.append(serving)
                reconcile.append(figures)
            log(f"==> {store}: {'simulated reboot' if reboot else 'restart'}: ready after {ready:.0f} ms, "
                f"serving all {VMS} VMs after {serving:.0f} ms, reconcile {figures}")
        result["restart"] = {"stop_ms": stop_ms, "ready_ms": ready_ms, "serving_ms": serving_ms,
                             "reconcile_ms": [f["seconds"] * 1000 for f in reconcile],
                             "reconcile_examined": reconcile[-1]["examined"] if reconcile else 0}
        return result
    finally:
        if api is not None:
            api.stop()
        if etcd is not None:
            stop(etcd, 30)
        # A VMM left running from this data directory (none is started here) is ours:
        # stop it by PID.
        kill_processes_under(data)
        if os.environ.get("KEEP") is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log("kept", work)


def run(api_bin, images):
    if os.environ.get("HEARTH_BENCH_NETNS") != "1":
        # Loopback traffic and the all-in-one's bridges and firewall stay in a namespace
        # of their own.
        os.execvpe("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c",
                               'mount -t sysfs sysfs /sys && ip link set lo up && exec python3 "$0" "$@"',
                               os.path.abspath(__file__), api_bin, images],
                   dict(os.environ, HEARTH_BENCH_NETNS="1"))
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    out = {"vms": VMS, "wrk": {"threads": THREADS, "connections": CONNECTIONS, "duration_s": DURATION},
           "restarts": RESTARTS, "cores": os.cpu_count(), "cpu": cpu,
           "run": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "stores": {}}
    for store in STORES:
        out["stores"][store] = bench_store(api_bin, images, store)
    print(json.dumps(out, indent=1))


GOAL_RPS, GOAL_P99_MS = 10000, 10.0


def markdown(r):
    def med(xs):
        return f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})"

    w = r["wrk"]
    lines = [f"""
{SECTION} {r['vms']:,} VMs

`hearth-api --all-in-one`, {r['vms']:,} VMs created through `POST /v1/vms` (tiny image, not
started, no NICs), then wrk on loopback: {w['threads']} threads, {w['connections']} connections,
{w['duration_s']} s per route, one run each; latencies as wrk reports them, in ms. wrk and the
api share the machine's {r['cores']} cores, so these are figures for the pair, not for the api
alone. "One at a time": median of 50 requests in a row on one connection, no load.
Restart: SIGTERM, start again on the same data directory (and the same etcd), time until
`/health/ready` is 200 and until `GET /v1/vms` lists all {r['vms']:,} VMs, and the reconcile
pass the api runs before it serves (`hearth_reconcile_seconds` in `/metrics`: it compares
every VM record with vmm-manager's VMs, netd's ports and blockd's volumes); median
(min-max) of {r['restarts']} restart{'s' if r['restarts'] != 1 else ''}, ms. Run {r['run']} UTC.

| store | route | req/s | p50 | p99 | one at a time | restart to ready | restart to serving {r['vms']:,} VMs | reconcile pass |
|---|---|---|---|---|---|---|---|---|"""]
    for name, s in r["stores"].items():
        label = {"embedded": "embedded (redb)", "etcd": "etcd 3.4 (local)"}.get(name, name)
        rs = s["restart"]
        rows = [("list", f"`GET /v1/vms` ({s['list_bytes'] // 1024} KiB)")]
        if "list_gzip" in s:
            rows.append(("list_gzip", f"`GET /v1/vms`, gzip ({s['list_gzip_bytes'] // 1024} KiB)"))
        rows.append(("show", "`GET /v1/vms/b-0001`"))
        for i, (k, route) in enumerate(rows):
            x = s[k]
            restart = "| | "
            if i == 0:
                restart = f"{med(rs['ready_ms'])} | {med(rs['serving_ms'])} | "
                restart += f"{med(rs['reconcile_ms'])} ({rs['reconcile_examined']:,.0f} examined)" if rs.get("reconcile_ms") else ""
            lines.append(f"| {label if i == 0 else ''} | {route} | {x['rps']:,.0f} | {x['p50_ms']:.2f} | "
                         f"{x['p99_ms']:.2f} | {x['alone_ms']:.2f} | {restart} |")
    reboots = [(n, s["reboot"]) for n, s in r["stores"].items() if "reboot" in s]
    if reboots:
        lines.append("\nSimulated host reboot (vmm-manager's state directories removed while the api was down, so "
                     "the reconciler must define every VM again from its record before serving): " + "; ".join(
                         f"{n}: {b['repairs']:,.0f} VMs defined again in a {b['seconds'] * 1000:,.0f} ms reconcile pass, "
                         f"ready after {b['ready_ms']:,.0f} ms, all listed after {b['serving_ms']:,.0f} ms"
                         for n, b in reboots) + ".")
    refs = []
    for s in r["stores"].values():
        if "static" in s:
            x = s["static"]
            refs.append(f"`GET {x['path']}` (the web console's script, {x['bytes'] // 1024} KiB, a static body: "
                        f"no store, no JSON) {x['rps']:,.0f} req/s, p99 {x['p99_ms']:.2f} ms")
        if "health" in s:
            x = s["health"]
            refs.append(f"`GET /health/live` {x['rps']:,.0f} req/s, p99 {x['p99_ms']:.2f} ms")
    if refs:
        lines.append("\nFor scale, the same server in the same run, same wrk settings: " + "; ".join(refs) + ".")
    e = r["stores"].get("embedded")
    if e:
        rps, p99 = e["list"]["rps"], e["list"]["p99_ms"]
        met = rps >= GOAL_RPS and p99 < GOAL_P99_MS
        misses = []
        if rps < GOAL_RPS:
            misses.append(f"{rps:,.0f} req/s is {rps / GOAL_RPS:.1%} of the goal")
        if p99 >= GOAL_P99_MS:
            misses.append(f"p99 {p99:.1f} ms is {p99 / GOAL_P99_MS:.1f}x the limit")
        verdict = "**Met.**" if met else "**Not met**: " + "; ".join(misses) + "."
        budget = r["cores"] * 1000 / GOAL_RPS
        lines.append(f"""
Goal: `GET /v1/vms` with {r['vms']:,} VMs at >= {GOAL_RPS:,} requests/s with p99 < {GOAL_P99_MS:.0f} ms on the
embedded store. {verdict}
Under that load the api used {e['list']['cores_api']:.1f} cores, {e['list']['api_cpu_ms_per_request']:.1f} ms of CPU per request (wrk
{e['list']['cores_wrk']:.2f} cores); the goal leaves {budget:.1f} ms per request for the api and wrk together on
{r['cores']} cores.""")
        lines.append("""
How: the listing is not rebuilt per request. The api follows vmm-manager's event stream
(each change carries a sequence number, so a late event never undoes a newer state) and
keeps each project's rendered JSON, and its gzip form, with the store's version of
`vms/` and the live view's generation; a request compares both (an in-memory lookup on
the embedded store) and sends the cached bytes. Before this cache (2026-11-22) the same
request decoded every record and vmm-manager's full-spec reply each time: 236 req/s,
p99 111 ms.""")
    t = r["stores"].get("etcd")
    if t:
        lines.append(f"""
On etcd every request waits on sequential etcd reads: two to check the key (the key and
its user; a member's project role is a third); the listing adds one keys-only range
request (the version of `vms/`, so a write by any api is seen at once), finding one VM by
name three more.
Under `GET /v1/vms` load the api used {t['list']['cores_api']:.1f} cores and etcd
{t['list']['cores_etcd']:.1f}; under `GET /v1/vms/b-0001`, {t['show']['cores_api']:.1f} and {t['show']['cores_etcd']:.1f}.""")
    other, names = 0.0, {}
    for s in r["stores"].values():
        for k in ("list", "list_gzip", "show", "static", "health"):
            if k in s and s[k]["cores_other"] >= 0.15:
                other = max(other, s[k]["cores_other"])
                for n, c in s[k].get("other_processes", {}).items():
                    names[n] = max(names.get(n, 0.0), c)
    if other:
        who = ", ".join(f"{n} {c:.1f}" for n, c in sorted(names.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"\nOther processes on the machine used up to {other:.1f} of its {r['cores']} cores during some of "
                     f"these measurements ({who}): those figures are lower than on an idle machine.")
    for name, s in r["stores"].items():
        errs = [f"{s[k]['path']}: {s[k]['socket_errors']}" for k in ("list", "list_gzip", "show")
                if k in s and s[k]["socket_errors"]]
        if errs:
            lines.append(f"\nwrk socket errors ({name}): " + "; ".join(errs) + ".")
    return "\n".join(lines) + "\n"


def replace_section(doc_path, section):
    doc = open(doc_path).read() if os.path.exists(doc_path) else ""
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip("\n") + "\n" + section
    else:
        start = doc.rfind("\n", 0, start) + 1
        nxt = doc.find("\n## ", start + len(SECTION))
        rest = doc[nxt + 1:] if nxt >= 0 else ""
        doc = doc[:start].rstrip("\n") + "\n" + section + ("\n" + rest if rest else "")
    open(doc_path, "w").write(doc)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--markdown":
        md = markdown(json.load(open(sys.argv[2])))
        if len(sys.argv) == 5 and sys.argv[3] == "--doc":
            replace_section(sys.argv[4], md)
        print(md, end="")
    elif len(sys.argv) == 3:
        run(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
