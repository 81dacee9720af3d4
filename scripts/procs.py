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
