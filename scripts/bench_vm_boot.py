#!/usr/bin/env python3
"""Benchmark: the REST path against launching the identical QEMU command line by hand.

Runs inside a private network namespace (scripts/bench.sh arranges it). For each round,
interleaved so machine noise hits both sides alike:
  - REST: POST /v1/vms to hearth-api --all-in-one; time until the VMM's QMP socket
    accepts a connection ("VMM running") and until HEARTH-GUEST-READY is in the
    console log.
  - by hand: the exact argv vmm-manager used (read from /proc/<pid>/cmdline), started
    with subprocess; the same two milestones.
Prints a JSON summary on stdout.
"""
import http.client, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

from procs import kill_processes_under

API = ("127.0.0.1", 18090)
ROUNDS = int(os.environ.get("ROUNDS", "5"))


def call(method, path, key, body=None):
    c = http.client.HTTPConnection(*API, timeout=120)
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


def wait_op(op_id, key):
    while True:
        _, op = call("GET", f"/v1/operations/{op_id}?wait=30", key)
        if op["status"] != "running":
            return op


def main():
    api_bin, images = sys.argv[1], sys.argv[2]
    data = tempfile.mkdtemp(prefix="hearth-bench-")
    log = open(os.path.join(data, "api.log"), "wb")
    api = subprocess.Popen([api_bin, "--all-in-one", "--data-dir", data, "--listen", f"{API[0]}:{API[1]}",
                            "--images-dir", images, "--qemu-accel", "tcg", "--stop-timeout", "10"],
                           stdout=log, stderr=log)
    rest, hand = {"vmm": [], "ready": []}, {"vmm": [], "ready": []}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection(*API, timeout=1)
                c.request("GET", "/health/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("hearth-api not ready")
            time.sleep(0.05)
        key = open(os.path.join(data, "admin.key")).read().strip()
        for i in range(ROUNDS):
            # REST path.
            name = f"bench{i}"
            t0 = time.monotonic()
            status, acc = call("POST", "/v1/vms", key, {"name": name, "image": "tiny", "hypervisor": "qemu",
                                                        "vcpus": 1, "memory_mib": 256, "nics": []})
            assert status == 202, acc
            vm_id = acc["vm"]["id"]
            vm_dir = os.path.join(data, "run", "vms", vm_id)
            t_vmm = wait_socket(os.path.join(vm_dir, "qmp.sock"), t0 + 30)
            t_ready = wait_text(os.path.join(vm_dir, "console.log"), b"HEARTH-GUEST-READY", t0 + 90)
            rest["vmm"].append((t_vmm - t0) * 1000)
            rest["ready"].append((t_ready - t0) * 1000)
            wait_op(acc["operation"]["id"], key)
            _, vm = call("GET", f"/v1/vms/{vm_id}", key)
            argv = open(f"/proc/{vm['pid']}/cmdline", "rb").read().split(b"\0")[:-1]
            _, acc = call("DELETE", f"/v1/vms/{vm_id}", key)
            wait_op(acc["operation"]["id"], key)

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
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
        # Any VMM still using the data directory (a failed round) is ours: stop it by PID.
        kill_processes_under(data)
        if os.environ.get("KEEP") is None:
            shutil.rmtree(data, ignore_errors=True)
        else:
            print("kept", data, file=sys.stderr)

    def summary(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
    print(json.dumps({"rest": {k: summary(v) for k, v in rest.items()},
                      "hand": {k: summary(v) for k, v in hand.items()}}))


if __name__ == "__main__":
    main()
