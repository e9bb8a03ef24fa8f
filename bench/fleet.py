#!/usr/bin/env python3
"""Fleet behaviour: three replicas behind an nginx load balancer, under load,
one stopped (SIGTERM) and one reloaded (SIGHUP) mid-run.

Reports the errors clients saw (goal: zero) and token requests per replica.
Everything on 127.0.0.1. Run through bench/run-fleet (installs nginx and wrk,
builds the binary).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from bench import Server, TOKEN, feature_json, free_port, wait_port  # noqa: E402


def metric(admin_port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="aap-fleet-")
    os.chmod(work, 0o755)
    up_port, lb_port = free_port(), free_port()
    tok = json.dumps({"access_token": TOKEN, "expires_in": 7200})
    with open(f"{work}/up.conf", "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/up.pid; error_log {work}/up.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{up_port} backlog=4096;
    location = /sharing/rest/oauth2/token {{ default_type application/json; return 200 '{tok}'; }}
    location /arcgis/rest/services/ {{ default_type application/json; return 200 '{feature_json()}'; }}
  }}
}}
""")
    replicas = []
    for i in range(3):
        port, admin = free_port(), free_port()
        conf = f"{work}/replica{i}.toml"
        with open(conf, "w") as f:
            f.write(f"""
[server]
plain_listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
trusted_proxies = ["127.0.0.1/32"]
shutdown_grace_secs = 10
[referers]
allowed = ["https://app.example.com"]
[credentials.online]
token_url = "http://127.0.0.1:{up_port}/sharing/rest/oauth2/token"
client_id = "fleet"
client_secret_env = "FLEET_SECRET"
[[routes]]
upstream = "http://127.0.0.1:{up_port}/arcgis/rest/services"
credential = "online"
mount = "/features"
""")
        replicas.append({"port": port, "admin": admin, "conf": conf})
    servers = "\n".join(f"    server 127.0.0.1:{r['port']} max_fails=1 fail_timeout=2s;" for r in replicas)
    with open(f"{work}/lb.conf", "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/lb.pid; error_log {work}/lb.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream proxies {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{lb_port} backlog=4096;
    location / {{
      proxy_pass http://proxies;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
      # A replica that stops mid-request or refuses connections: try the next.
      proxy_next_upstream error timeout http_502 http_503;
    }}
  }}
}}
""")
    env = dict(os.environ, FLEET_SECRET="s", RUST_LOG="warn")
    upstream = Server("upstream", ["nginx", "-c", f"{work}/up.conf", "-p", work], up_port)
    procs = [Server(f"replica{i}", [args.binary, "--config", r["conf"], "--threads", "1"], r["port"], env=env,
                    log=f"{work}/replica{i}.log") for i, r in enumerate(replicas)]
    for r in replicas:
        wait_port(r["admin"])
    lb = Server("lb", ["nginx", "-c", f"{work}/lb.conf", "-p", work], lb_port)
    time.sleep(1)
    tokens_before = [metric(r["admin"], 'arcgis_proxy_token_fetches_total{credential="online",outcome="ok"}') for r in replicas]

    url = f"http://127.0.0.1:{lb_port}/features/Parks/FeatureServer/0/query?where=1%3D1&f=json"
    out = {}

    def load():
        out["wrk"] = subprocess.run(
            ["wrk", "-t1", "-c32", f"-d{args.seconds}s", "-H", "Referer: https://app.example.com/", url],
            capture_output=True, text=True).stdout

    t = threading.Thread(target=load)
    t.start()
    time.sleep(args.seconds / 4)
    procs[1].proc.send_signal(signal.SIGHUP)  # reload replica 1
    time.sleep(args.seconds / 4)
    procs[2].proc.send_signal(signal.SIGTERM)  # stop replica 2
    t.join()
    procs[2].proc.wait(15)
    tokens_after = [metric(r["admin"], 'arcgis_proxy_token_fetches_total{credential="online",outcome="ok"}')
                    if i != 2 else None for i, r in enumerate(replicas)]
    w = out["wrk"]
    total = int(re.search(r"(\d+) requests in", w).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", w)
    sock = re.search(r"Socket errors: (.*)", w)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", w).group(1))
    print(f"\nfleet: 3 replicas behind nginx, {args.seconds} s of wrk -c32; SIGHUP replica 1 at "
          f"{args.seconds/4:.0f} s, SIGTERM replica 2 at {args.seconds/2:.0f} s")
    print(f"  requests: {total} ({rps:.0f}/s)")
    print(f"  errors seen by clients: non-2xx {int(non2xx.group(1)) if non2xx else 0}, "
          f"socket errors {sock.group(1) if sock else 'none'}  (goal: zero)")
    print(f"  replica 2 exit code after SIGTERM: {procs[2].proc.returncode}")
    for i in range(3):
        after = tokens_after[i]
        print(f"  replica {i}: token requests {int(tokens_before[i])} at start"
              + ("" if after is None else f", {int(after)} at the end"))
    for s in [lb, procs[0], procs[1], upstream]:
        s.stop()


if __name__ == "__main__":
    sys.exit(main())
