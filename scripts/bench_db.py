#!/usr/bin/env python3
"""Benchmark: a managed database, from POST /v1/databases to the first successful query
over TLS (verify-full, hearth's CA) with its password, against the reference: a Debian
guest with cloud-init and Debian's PostgreSQL 15 (guest-images/debian-postgres-ref),
configured by its user-data (TLS files, pg_hba, the password as a SCRAM verifier, a
restart), booted through the same hearth (so with the same QEMU command line: q35, TCG,
-cpu max, 2 vCPUs, 1 GiB, virtio disks and NIC) and queried the same way.

Runs inside a private network namespace (scripts/bench_db.sh arranges it); the clients
are the namespace's own psql. ROUNDS (default 5) rounds, the two sides interleaved.
Also records where a database's seconds go: the api until the VMM runs, the guest's
boot until the agent has configured it, PostgreSQL's start until the agent is ready,
and the last step to the first query from the host. Prints a JSON summary on stdout.
"""
import base64, hashlib, hmac, http.client, json, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vm_boot  # noqa: E402
from bench_vm_boot import start_api  # noqa: E402
from procs import kill_processes_under, remove_cgroups, stop  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "5"))
API = ("127.0.0.1", 18092)


def call(method, path, key, body=None):
    return bench_vm_boot.call(method, path, key, body, api=API)


def wait_op(op_id, key):
    return bench_vm_boot.wait_op(op_id, key, api=API)
SUBNET = "10.92.0"


def scram(password):
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b = lambda x: base64.b64encode(x).decode()
    return f"SCRAM-SHA-256$4096:{b(salt)}${b(hashlib.sha256(client_key).digest())}:{b(server_key)}"


def psql_ok(uri, password):
    r = subprocess.run(["psql", "-X", "-Atc", "SELECT 1", uri], env={**os.environ, "PGPASSWORD": password},
                       capture_output=True, timeout=30)
    return r.returncode == 0 and r.stdout.strip() == b"1"


def until(check, deadline, step=0.1):
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(step)
    raise TimeoutError("not within the deadline")


def console_has(data, vm_id, text):
    try:
        with open(os.path.join(data, "run", "vms", vm_id, "console.log"), "rb") as f:
            return text in f.read()
    except FileNotFoundError:
        return False


def vm_running(key, name):
    status, vm = call("GET", f"/v1/vms/{name}", key)
    return status == 200 and vm.get("state") == "running", (vm or {}).get("id")


def hearth_round(r, key, data, ca_path):
    name = f"b{r}"
    t0 = time.monotonic()
    status, acc = call("POST", "/v1/databases", key, {"name": name, "network": "lan", "storage": "1G",
                                                       "vcpus": 2, "memory_mib": 1024})
    assert status == 202, acc
    t_accept = time.monotonic()
    password = acc["database"]["password"]
    c = http.client.HTTPConnection(*API, timeout=30)
    c.request("GET", f"/v1/databases/{name}/ca.pem", headers={"Authorization": f"Bearer {key}"})
    resp = c.getresponse()
    ca = resp.read()
    assert resp.status == 200, ca
    open(ca_path, "wb").write(ca)
    deadline = t0 + 300
    vm_id = None
    while vm_id is None or not vm_running(key, f"db-{name}")[0]:
        _, vm_id = vm_running(key, f"db-{name}")
        assert time.monotonic() < deadline, "VM never ran"
        time.sleep(0.02)
    t_vmm = time.monotonic()
    t_boot = until(lambda: console_has(data, vm_id, b"HEARTH-AGENT-BOOT ok"), deadline, 0.02)
    t_ready = until(lambda: console_has(data, vm_id, b"HEARTH-AGENT-READY"), deadline, 0.02)
    uri = None
    while not uri:
        _, db = call("GET", f"/v1/databases/{name}", key)
        uri = db.get("uri")
        if not uri:
            time.sleep(0.02)
    uri = f"{uri}&sslrootcert={ca_path}&connect_timeout=5"
    t_query = until(lambda: psql_ok(uri, password), deadline, 0.05)
    op = wait_op(acc["operation"]["id"], key)
    assert op["status"] == "succeeded", op
    status, acc = call("DELETE", f"/v1/databases/{name}", key)
    assert status == 202, acc
    wait_op(acc["operation"]["id"], key)
    ms = lambda t: (t - t0) * 1000
    return {"accepted": ms(t_accept), "vmm": ms(t_vmm), "agent_boot": ms(t_boot), "agent_ready": ms(t_ready),
            "query": ms(t_query)}


def make_cert(work, ip):
    ca_key, ca_crt = os.path.join(work, "ca.key"), os.path.join(work, "ca.crt")
    if not os.path.exists(ca_crt):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", "/CN=bench CA"],
                       check=True, capture_output=True)
    key, csr, crt, ext = (os.path.join(work, f"{ip}.{x}") for x in ("key", "csr", "crt", "ext"))
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", f"/CN={ip}"], check=True, capture_output=True)
    open(ext, "w").write(f"subjectAltName=IP:{ip}\n")
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", crt, "-days", "2", "-extfile", ext], check=True, capture_output=True)
    return ca_crt, open(crt).read(), open(key).read()


def reference_round(r, key, data, work):
    ip = f"{SUBNET}.{100 + r}"
    password = base64.b32encode(os.urandom(15)).decode()
    ca_crt, crt, pkey = make_cert(work, ip)
    user_data = "#cloud-config\n" + json.dumps({
        "write_files": [
            {"path": "/etc/postgresql/15/main/conf.d/bench.conf", "permissions": "0644",
             "content": "listen_addresses = '*'\nssl = on\nssl_cert_file = '/etc/postgresql/tls/server.crt'\n"
                        "ssl_key_file = '/etc/postgresql/tls/server.key'\npassword_encryption = 'scram-sha-256'\n"},
            {"path": "/etc/postgresql/tls/server.crt", "permissions": "0644", "content": crt},
            {"path": "/etc/postgresql/tls/server.key", "permissions": "0600", "owner": "postgres:postgres",
             "content": pkey},
            {"path": "/etc/postgresql/15/main/pg_hba.conf", "permissions": "0640", "owner": "postgres:postgres",
             "content": f"local all postgres peer\nhostssl all all {SUBNET}.0/24 scram-sha-256\n"},
        ],
        "runcmd": [
            ["runuser", "-u", "postgres", "--", "psql", "-Xqc", f"ALTER ROLE postgres PASSWORD '{scram(password)}'"],
            ["systemctl", "restart", "postgresql@15-main.service"],
        ],
    })
    name = f"ref{r}"
    t0 = time.monotonic()
    status, acc = call("POST", "/v1/vms", key, {"name": name, "image": "debian-postgres-ref", "hypervisor": "qemu",
                                                "vcpus": 2, "memory_mib": 1024,
                                                "nics": [{"network": "lan", "ip": ip}], "user_data": user_data})
    assert status == 202, acc
    t_accept = time.monotonic()
    deadline = t0 + 400
    vm_id = acc["vm"]["id"]
    t_vmm = until(lambda: vm_running(key, name)[0], deadline, 0.02)
    uri = f"postgres://postgres@{ip}:5432/postgres?sslmode=verify-full&sslrootcert={ca_crt}&connect_timeout=5"
    t_query = until(lambda: psql_ok(uri, password), deadline, 0.05)
    t_guest = until(lambda: console_has(data, vm_id, b"HEARTH-GUEST-READY"), deadline, 0.02)
    ci_ok = console_has(data, vm_id, b"HEARTH-GUEST-CLOUD-INIT ok")
    status, acc = call("DELETE", f"/v1/vms/{name}", key)
    assert status == 202, acc
    wait_op(acc["operation"]["id"], key)
    ms = lambda t: (t - t0) * 1000
    return {"accepted": ms(t_accept), "vmm": ms(t_vmm), "query": ms(t_query), "guest_ready": ms(t_guest),
            "cloud_init_ok": ci_ok}


def main():
    api_bin, images = sys.argv[1], sys.argv[2]
    proc, data, key = start_api(api_bin, images, API, [])
    work = tempfile.mkdtemp(prefix="hearth-bench-db-")
    hearth, reference = [], []
    try:
        status, net = call("POST", "/v1/networks", key, {"name": "lan", "subnet": f"{SUBNET}.0/24", "dhcp": False})
        assert status == 201, net
        for r in range(ROUNDS):
            first = [("hearth", hearth_round), ("reference", reference_round)]
            if r % 2:
                first.reverse()
            for which, fn in first:
                if which == "hearth":
                    hearth.append(fn(r, key, data, os.path.join(work, "hearth-ca.pem")))
                else:
                    reference.append(fn(r, key, data, work))
                print(which, r, json.dumps(hearth[-1] if which == "hearth" else reference[-1]), file=sys.stderr)
    finally:
        stop(proc, 20)
        kill_processes_under(data)
        remove_cgroups(os.path.basename(data))
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    def summary(xs, k):
        v = [x[k] for x in xs]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}
    out = {
        "rounds": ROUNDS,
        "hearth": {k: summary(hearth, k) for k in ("accepted", "vmm", "agent_boot", "agent_ready", "query")},
        "reference": {k: summary(reference, k) for k in ("accepted", "vmm", "guest_ready", "query")},
        "reference_cloud_init_ok": all(x["cloud_init_ok"] for x in reference),
    }
    print(json.dumps(out, indent=1))


def markdown(path):
    r = json.load(open(path))
    h, ref = r["hearth"], r["reference"]
    s = lambda x: f"{x['median'] / 1000:.1f} ({x['min'] / 1000:.1f}-{x['max'] / 1000:.1f})"
    goal = 20.0
    got = h["query"]["median"] / 1000
    verdict = ("met" if got <= goal else "a tie (within 5%)" if got <= goal * 1.05 else "missed")
    step = lambda a, b: (h[b]["median"] - (h[a]["median"] if a else 0)) / 1000
    return f"""
## Managed PostgreSQL: create to the first TLS query

`POST /v1/databases` until `psql` (`sslmode=verify-full`, hearth's CA, the password
from the answer) first runs `SELECT 1`, against the reference: a Debian guest with
cloud-init and Debian's PostgreSQL 15 configured by its user-data (TLS files, pg_hba,
the password's SCRAM verifier, a restart; `guest-images/debian-postgres-ref`), created
through the same api with the same shape, so with the same QEMU command line (q35,
TCG, `-cpu max`, 2 vCPUs, 1 GiB). {r['rounds']} rounds, interleaved
(`scripts/bench_db.sh`); seconds from the request, medians (min-max); each side's first
round also imports its image into the cache (the maxima of the first two rows). The
reference's cloud-init {"reported no error" if r["reference_cloud_init_ok"] else "REPORTED ERRORS"}.

| milestone | hearth database | reference |
|---|---|---|
| request answered | {s(h['accepted'])} | {s(ref['accepted'])} |
| VMM running | {s(h['vmm'])} | {s(ref['vmm'])} |
| first TLS query with the password | **{s(h['query'])}** | **{s(ref['query'])}** |

Goal: at most {goal:.0f} s under TCG on these machines: {verdict} ({got:.1f} s; the
reference {ref['query']['median'] / 1000:.1f} s).

Where a database's seconds go (medians): the api until the VMM runs {step(None, 'vmm'):.1f} s
(name, data volume, the VM's own create saga, the seed with the server's certificate);
the guest's boot until the agent has configured it {step('vmm', 'agent_boot'):.1f} s
(firmware, kernel and initramfs, systemd, the seed read in place, `mkfs` of the data
volume, the template cluster copied and given its own identity, PostgreSQL's files);
PostgreSQL's start until the agent is ready {step('agent_boot', 'agent_ready'):.1f} s (the
server, the password); the host's first query after that
{step('agent_ready', 'query'):.1f} s. The reference spends most of its time in cloud-init's
Python stages and Debian's `pg_ctlcluster` wrapper.
"""


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(sys.argv[2]))
    else:
        main()
