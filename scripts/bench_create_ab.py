#!/usr/bin/env python3
"""Benchmark: the VM create path of two hearth-api binaries, interleaved.

Usage: bench_create_ab.py BASELINE_API NEW_API IMAGES_DIR   (inside a private network
namespace; scripts/bench.sh arranges it when BASELINE names a commit). Each round starts
each binary with --all-in-one on a fresh data directory and times N creates of the tiny
image, from POST /v1/vms until its operation succeeded (START=1 also launches the VMM).
Rounds alternate which binary goes first. Prints the medians and p10-p90 per binary.
"""
import http.client, json, os, signal, statistics, subprocess, sys, tempfile, time
API=("127.0.0.1", 18091)
def call(method, path, key, body=None):
    c=http.client.HTTPConnection(*API, timeout=120)
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r=c.getresponse(); d=r.read(); c.close()
    return r.status, (json.loads(d) if d else None)
def run(binary, images, n, start):
    d=tempfile.mkdtemp(prefix="hearth-ab-")
    p=subprocess.Popen([binary,"--all-in-one","--data-dir",d,"--listen",f"{API[0]}:{API[1]}","--images-dir",images,"--qemu-accel","tcg"],stdout=subprocess.DEVNULL,stderr=open(d+"/log","w"))
    for _ in range(300):
        try:
            c=http.client.HTTPConnection(*API,timeout=1); c.request("GET","/health/ready"); r=c.getresponse(); r.read(); c.close()
            if r.status==200: break
        except Exception: pass
        time.sleep(0.05)
    key=open(d+"/admin.key").read().strip()
    # warm the image (first use imports the recipe)
    s,b=call("POST","/v1/vms",key,{"name":"warm","image":"tiny","start":False}); call("GET",f"/v1/operations/{b['operation']['id']}?wait=60",key)
    times=[]
    for i in range(n):
        t=time.monotonic()
        s,b=call("POST","/v1/vms",key,{"name":f"v{i}","image":"tiny","start":start})
        assert s==202,(s,b)
        s,op=call("GET",f"/v1/operations/{b['operation']['id']}?wait=60",key)
        assert op["status"]=="succeeded",op
        times.append((time.monotonic()-t)*1000)
    for i in range(n):
        s,b=call("DELETE",f"/v1/vms/v{i}",key); call("GET",f"/v1/operations/{b['operation']['id']}?wait=60",key)
    p.send_signal(signal.SIGTERM); p.wait()
    subprocess.run(["rm","-rf",d])
    return times
old, new, images = sys.argv[1], sys.argv[2], sys.argv[3]
rounds=int(os.environ.get("ROUNDS","4")); n=int(os.environ.get("N","10")); start=os.environ.get("START","0")=="1"
res = {"baseline": [], "this": []}
for r in range(rounds):
    order = [("baseline", old), ("this", new)] if r % 2 == 0 else [("this", new), ("baseline", old)]
    for name,b in order:
        res[name]+=run(b,images,n,start)
for k,v in res.items():
    v=sorted(v); print(k, "median %.1f ms  p10 %.1f  p90 %.1f  n=%d"%(statistics.median(v), v[len(v)//10], v[len(v)*9//10], len(v)))
