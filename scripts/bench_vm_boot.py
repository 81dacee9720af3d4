#!/usr/bin/env python3
"""Benchmark: the REST path against launching the identical QEMU command line by hand,
and the REST path with the VMM jailed (the default) against jailing turned off.

Runs inside a private network namespace (scripts/bench.sh arranges it). For each round,
interleaved so machine noise hits both sides alike:
  - REST: POST /v1/vms to hearth-api --all-in-one; time until the VMM's QMP socket
    accepts a connection ("VMM running") and until HEARTH-GUEST-READY is in the
    console log.
  - by hand: the exact argv vmm-manager used (read from /proc/<pid>/cmdline), started
    with subprocess; the same two milestones.
  - REST unjailed: the same through a second hearth-api started with
    --insecure-no-jail (VMMs as root, no namespace, no cgroup).
Prints a JSON summary on stdout.
"""
import http.client, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

from procs import kill_processes_under, remove_cgroups

API = ("127.0.0.1", 18090)
API_UNJAILED = ("127.0.0.1", 18091)
ROUNDS = int(os.environ.get("ROUNDS", "5"))


def call(method, path, key, body=None, api=API):
    c = http.client.HTTPConnection(*api, timeout=120)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, (json.loads(data) if data else None)


def wait_socket(path, deadline):
    while time.monotonic() < deadline:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return time.monotonic()
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.0005)
    raise TimeoutError(path)


def wait_text(path, text, deadline):
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if text in f.read():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    try:
        tail = open(path, "rb").read()[-2000:].decode(errors="replace")
    except OSError as e:
        tail = str(e)
    raise TimeoutError(f"{text!r} not in {path}; it ends with:\n{tail}")


def wait_op(op_id, key, api=API):
    while True:
        _, op = call("GET", f"/v1/operations/{op_id}?wait=30", key, api=api)
        if op["status"] != "running":
            return op


def start_api(api_bin, images, addr, extra):
    data = tempfile.mkdtemp(prefix="hearth-bench-")
    log = open(os.path.join(data, "api.log"), "wb")
    proc = subprocess.Popen([api_bin, "--all-in-one", "--data-dir", data, "--listen", f"{addr[0]}:{addr[1]}",
                             "--images-dir", images, "--qemu-accel", "tcg", "--stop-timeout", "10",
                             "--cgroup-name", os.path.basename(data)] + extra,
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = http.client.HTTPConnection(*addr, timeout=1)
            c.request("GET", "/health/ready")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("hearth-api not ready")
        time.sleep(0.05)
    key = open(os.path.join(data, "admin.key")).read().strip()
    return proc, data, key


def rest_round(name, key, data, api, into):
    """One VM through the REST path: records its milestones in `into`, returns the
    VMM's argv and its VM directory."""
    t0 = time.monotonic()
    status, acc = call("POST", "/v1/vms", key, {"name": name, "image": "tiny", "hypervisor": "qemu",
                                                "vcpus": 1, "memory_mib": 256, "nics": []}, api=api)
    assert status == 202, acc
    vm_id = acc["vm"]["id"]
    vm_dir = os.path.join(data, "run", "vms", vm_id)
    t_vmm = wait_socket(os.path.join(vm_dir, "qmp.sock"), t0 + 30)
    t_ready = wait_text(os.path.join(vm_dir, "console.log"), b"HEARTH-GUEST-READY", t0 + 90)
    into["vmm"].append((t_vmm - t0) * 1000)
    into["ready"].append((t_ready - t0) * 1000)
    wait_op(acc["operation"]["id"], key, api=api)
    _, vm = call("GET", f"/v1/vms/{vm_id}", key, api=api)
    argv = open(f"/proc/{vm['pid']}/cmdline", "rb").read().split(b"\0")[:-1]
    _, acc = call("DELETE", f"/v1/vms/{vm_id}", key, api=api)
    wait_op(acc["operation"]["id"], key, api=api)
    return argv, vm_dir


def main():
    api_bin, images = sys.argv[1], sys.argv[2]
    api, data, key = start_api(api_bin, images, API, [])
    api2, data2, key2 = start_api(api_bin, images, API_UNJAILED, ["--insecure-no-jail"])
    rest, hand, unjailed = {"vmm": [], "ready": []}, {"vmm": [], "ready": []}, {"vmm": [], "ready": []}
    try:
        for i in range(ROUNDS):
            # The REST path, jailed (the default) and not, in alternating order.
            order = [(rest, key, data, API), (unjailed, key2, data2, API_UNJAILED)]
            if i % 2:
                order.reverse()
            for into, k, d, a in order:
                got = rest_round(f"bench{i}", k, d, a, into)
                if into is rest:
                    argv, vm_dir = got

            # The identical command line by hand, with its paths moved to a fresh directory.
            hand_dir = tempfile.mkdtemp(prefix="hearth-bench-hand-")
            argv = [a.replace(vm_dir.encode(), hand_dir.encode()) for a in argv]
            t0 = time.monotonic()
            p = subprocess.Popen(argv, cwd=hand_dir, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                t_vmm = wait_socket(os.path.join(hand_dir, "qmp.sock"), t0 + 30)
                # Like vmm-manager, keep a client on the serial socket (QEMU's chardev
                # behaves differently without one).
                s = socket.socket(socket.AF_UNIX)
                s.connect(os.path.join(hand_dir, "serial.sock"))
                s.setblocking(False)
                t_ready = None
                while t_ready is None and time.monotonic() < t0 + 90:
                    try:
                        while s.recv(65536):
                            pass
                    except BlockingIOError:
                        pass
                    with open(os.path.join(hand_dir, "console.log"), "rb") as f:
                        if b"HEARTH-GUEST-READY" in f.read():
                            t_ready = time.monotonic()
                    time.sleep(0.002)
                s.close()
                assert t_ready is not None, "hand-launched QEMU never got ready"
                hand["vmm"].append((t_vmm - t0) * 1000)
                hand["ready"].append((t_ready - t0) * 1000)
            finally:
                p.kill()
                p.wait()
                shutil.rmtree(hand_dir, ignore_errors=True)
    finally:
        for proc, d in [(api, data), (api2, data2)]:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            # Any VMM still using the data directory (a failed round) is ours: stop it by PID.
            kill_processes_under(d)
            remove_cgroups(os.path.basename(d))
            if os.environ.get("KEEP") is None:
                shutil.rmtree(d, ignore_errors=True)
            else:
                print("kept", d, file=sys.stderr)

    def summary(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
    print(json.dumps({"rest": {k: summary(v) for k, v in rest.items()},
                      "hand": {k: summary(v) for k, v in hand.items()},
                      "unjailed": {k: summary(v) for k, v in unjailed.items()}}))


if __name__ == "__main__":
    main()
