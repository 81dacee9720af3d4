"""Process helpers the Python test and benchmark scripts share."""

import os
import signal
import subprocess


def kill_processes_under(path):
    """SIGKILLs every process (other than this one) whose command line mentions `path`:
    VMMs a run started from its scratch data directory. Returns their PIDs."""
    killed = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if path.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
        except OSError:
            pass
    return killed


def stop(proc, timeout):
    """SIGTERM `proc` (a subprocess.Popen), SIGKILL it if it has not exited after
    `timeout` seconds, and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def remove_cgroups(name):
    """Removes the cgroup directories named `name` (and their empty children) under this
    process's own cgroup in every hierarchy: what a hearth-api started with
    `--cgroup-name name` leaves once its VMs are gone."""
    own = {}
    for line in open("/proc/self/cgroup"):
        hid, ctrls, path = line.rstrip("\n").split(":", 2)
        own[ctrls] = path
    for line in open("/proc/self/mountinfo"):
        left, right = line.split(" - ", 1)
        point = left.split(" ")[4]
        fstype, _, opts = right.split(" ")[:3]
        if fstype == "cgroup2":
            path = own.get("")
        elif fstype == "cgroup":
            path = next((p for c, p in own.items() if c and set(c.split(",")) & set(opts.strip().split(","))), None)
        else:
            continue
        if path is None:
            continue
        d = os.path.join(point, path.lstrip("/"), name)
        if not os.path.isdir(d):
            continue
        for sub in os.listdir(d):
            if os.path.isdir(os.path.join(d, sub)):
                try:
                    os.rmdir(os.path.join(d, sub))
                except OSError:
                    pass
        try:
            os.rmdir(d)
        except OSError:
            pass
