#!/usr/bin/env python3
"""Benchmark: 200 TAPs created and attached to a bridge with an IP allocation each,
through netd (PUT /ports/{id} one by one, then all in one PUT /ports; both install the
ports' anti-spoofing rules and persist the allocations with fdatasync),
against the equivalent `ip` commands (tuntap add, link set master, link set up).
Runs inside private network and mount namespaces (scripts/bench.sh arranges it).
Prints JSON."""
import http.client, json, os, socket, subprocess, sys, tempfile, time, shutil, signal

N = int(os.environ.get("TAPS", "200"))


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)


def call(sock, method, path, body=None):
    c = UnixHTTP(sock)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data!r}")
    return json.loads(data) if data else None


def main():
    netd_bin = sys.argv[1]
    d = tempfile.mkdtemp(prefix="hearth-bench-netd-")
    sock = os.path.join(d, "netd.sock")
    log = open(os.path.join(d, "netd.log"), "wb")
    p = subprocess.Popen([netd_bin, "--socket", sock, "--state-dir", os.path.join(d, "state")], stdout=log, stderr=log)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        call(sock, "PUT", "/networks/bench", {"name": "bench", "subnet": "10.40.0.0/16", "dhcp": False})
        # One request per port, as the api makes them for one NIC.
        t0 = time.monotonic()
        for i in range(N):
            call(sock, "PUT", f"/ports/p{i}", {"network": "bench"})
        netd_s = time.monotonic() - t0
        for i in range(N):
            call(sock, "DELETE", f"/ports/p{i}")
        # All ports in one request (PUT /ports): one IPAM sync and one firewall
        # transaction for the lot.
        t0 = time.monotonic()
        made = call(sock, "PUT", "/ports", {f"q{i}": {"network": "bench"} for i in range(N)})
        batch_s = time.monotonic() - t0
        assert len(made) == N and len({p["ip"] for p in made.values()}) == N, "distinct addresses"
        for i in range(N):
            call(sock, "DELETE", f"/ports/q{i}")
        call(sock, "DELETE", "/networks/bench")
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)

    subprocess.run(["ip", "link", "add", "bbench", "type", "bridge"], check=True)
    t0 = time.monotonic()
    for i in range(N):
        name = f"btap{i}"
        subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
        subprocess.run(["ip", "link", "set", name, "master", "bbench"], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
    ip_s = time.monotonic() - t0
    for i in range(N):
        subprocess.run(["ip", "link", "del", f"btap{i}"], check=True)
    subprocess.run(["ip", "link", "del", "bbench"], check=True)
    shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"taps": N, "netd_seconds": netd_s, "netd_batch_seconds": batch_s, "ip_seconds": ip_s}))


if __name__ == "__main__":
    main()
