"""Inside a private network namespace: starts `hearth-api --all-in-one` on a scratch data
directory, runs schemathesis against its /openapi.json with the admin key, then deletes
what the run created and stops every process it started (by PID), whatever happened.

Usage: schemathesis_run.py HEARTH_API SCHEMATHESIS IMAGES_DIR MAX_TIME"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from procs import kill_processes_under, stop

api_bin, st_bin, images, max_time = sys.argv[1:5]
LISTEN = "127.0.0.1:18080"
BASE = f"http://{LISTEN}"


def call(method, path, key, body=None):
    req = urllib.request.Request(BASE + path, method=method, data=body)
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def main():
    data = tempfile.mkdtemp(prefix="hearth-schemathesis-")
    log = open(os.path.join(data, "api.log"), "w")
    api = subprocess.Popen(
        [api_bin, "--all-in-one", "--listen", LISTEN, "--data-dir", data, "--images-dir", images,
         "--qemu-accel", "tcg", "--stop-timeout", "5",
         # schemathesis sends requests without a key on purpose; the limit would then
         # lock its own key out (api/tests/isolation.rs tests the limit).
         "--auth-failures-per-minute", "0"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    status = 1
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(BASE + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if api.poll() is not None or time.time() > deadline:
                raise SystemExit("hearth-api did not become ready:\n" + open(log.name).read())
            time.sleep(0.1)
        key = open(os.path.join(data, "admin.key")).read().strip()
        config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemathesis.toml")
        cmd = [st_bin, "--config-file", config, "run", BASE + "/openapi.json",
               "--header", f"Authorization: Bearer {key}",
               "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
               # WebSockets and the endless event stream are not request/response routes.
               "--exclude-path-regex", r"/(console|vnc)$|^/v1/events$",
               "--max-time", max_time, "--workers", "2", "--request-timeout", "60",
               "--suppress-health-check", "all", "--seed", "7"]
        print("==> " + " ".join(c if "Bearer" not in c else "Authorization: Bearer <admin key>" for c in cmd), flush=True)
        # Run from the scratch directory: schemathesis keeps a cache where it runs.
        status = subprocess.call(cmd, cwd=data, env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})
    finally:
        # Whatever the run made: VMs (their VMM processes outlive the api), then the api.
        try:
            key = open(os.path.join(data, "admin.key")).read().strip()
            _, vms = call("GET", "/v1/vms", key)
            for vm in vms or []:
                call("DELETE", f"/v1/vms/{vm['id']}", key)
            for _ in range(100):
                _, vms = call("GET", "/v1/vms", key)
                if not vms:
                    break
                time.sleep(0.3)
        except Exception as e:  # the api may be the thing that broke
            print(f"cleanup through the api failed: {e}", file=sys.stderr)
        stop(api, 30)
        kill_processes_under(data)
        if status != 0:
            print("---- hearth-api log (last 60 lines) ----")
            print("".join(open(log.name).readlines()[-60:]))
        subprocess.call(["rm", "-rf", data])
    sys.exit(status)


main()
