#!/usr/bin/env python3
"""Side-by-side benchmark: arcgis-app-proxy vs nginx (anchor) vs the upstream.

Everything runs on 127.0.0.1:
  upstream  nginx, 2 workers (--upstream-workers): ~1 KiB ArcGIS-like JSON, a token endpoint, a 200 MB file,
            a 680 KB feature answer stored gzipped
  nginx     the anchor: TLS 1.3, same certificate, HTTP/1.1 keep-alive + h2,
            upstream keepalive pool, valid_referers with the same allowlist,
            proxy_set_header X-Esri-Authorization "Bearer ...", access_log off,
            2 workers, each with its own listening socket (reuseport)
  proxy     arcgis-app-proxy with the equivalent config (referer allowlist,
            token injection from a real token fetch, response scrubbing on),
            RUST_LOG=warn (no access log, like nginx's access_log off)
  direct    the upstream itself, cleartext: the physical limit

Each scenario runs for each target in turn, the order turning by one place
every round (A B C, B C A, C A B); the median round is reported. CPU per
request comes from /proc/<pid>/stat of the server processes (utime+stime),
RSS from /proc/<pid>/status. wrk and h2load run with 2 threads
(--client-threads).

Run through bench/run, which installs the tools and builds the binary.
"""

import argparse
import gzip
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLK = os.sysconf("SC_CLK_TCK")
TOKEN = "BENCHTOKENxK3nq9Zt7Lw2Rv5Pp1Mm8Jj4Hh6Gg0Ff3Dd5Ss7Aa9Qq2Ww4Ee6Rr8Tt1Yy3Uu5Ii7Oo9"
REFERER = "https://app.example.com/map.html"
# Threads of each load generator (wrk -t, h2load -t); --client-threads.
CLIENT_THREADS = 2
# A wrk script that prints p99.9 beside wrk's own percentiles.
TAIL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk-tail.lua")
QUERY = "/Parks/FeatureServer/0/query?where=1%3D1&outFields=*&f=json"


def feature_json():
    feats = []
    i = 0
    while True:
        feats.append(
            '{"attributes":{"OBJECTID":%d,"NAME":"Park %d","TYPE":"park"},'
            '"geometry":{"x":-118.%05d,"y":34.%05d}}' % (i, i, i * 37, i * 91)
        )
        body = (
            '{"objectIdFieldName":"OBJECTID","geometryType":"esriGeometryPoint",'
            '"spatialReference":{"wkid":4326},"features":[' + ",".join(feats) + "]}"
        )
        if len(body) >= 1000:
            return body
        i += 1


def large_feature_json():
    """About 680 KB of polygon features with varied coordinates: a large
    query answer, compressing about as well as real ones (3:1 at level 1)."""
    rng = random.Random(1)
    feats = []
    for i in range(1200):
        ring = [[round(-122 + rng.random(), 6), round(37 + rng.random(), 6)] for _ in range(20)]
        feats.append({"attributes": {"OBJECTID": i, "NAME": f"Park {i}", "ACRES": round(rng.random() * 100, 2),
                                     "TYPE": rng.choice(["City", "County", "State"])},
                      "geometry": {"rings": [ring]}})
    doc = {"objectIdFieldName": "OBJECTID", "geometryType": "esriGeometryPolygon",
           "spatialReference": {"wkid": 4326}, "features": feats}
    return json.dumps(doc, separators=(",", ":"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} never opened")


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(d))
        except OSError:
            pass
    return out


def stat_ticks(path):
    """utime + stime from a /proc .../stat file; 0 if it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def cpu_ticks(pids):
    return sum(stat_ticks(f"/proc/{p}/stat") for p in pids)


def busy_ns(pid, tid):
    """Time one thread spent on a CPU or waiting for one (ns), from
    /proc/.../schedstat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            run, wait = f.read().split()[:2]
        return int(run) + int(wait)
    except (OSError, ValueError):
        return None


class Helpers:
    """Samples, while a round runs, how busy the load generator's threads and
    the upstream's workers are: the share of wall time each spent running or
    waiting for a CPU. A single-threaded helper near 1.00 while the machine
    idles sets the pace of the whole round — it, not the server under test,
    is the bottleneck."""

    def __init__(self, upstream):
        self.upstream = upstream.pids()
        self.stop = threading.Event()
        self.first = self.last = None
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def snapshot(self, gen):
        out = {}
        for group, pids in (("client", gen), ("upstream", self.upstream)):
            for p, t in threads(pids):
                v = busy_ns(p, t)
                if v is not None:
                    out[(group, p, t)] = v
        return time.monotonic(), out

    def sample(self):
        # Let the load generator start its threads, then find it once.
        if self.stop.wait(0.5):
            return
        gen = []
        for c in children(os.getpid()):
            try:
                with open(f"/proc/{c}/comm") as f:
                    if f.read().strip() in ("wrk", "h2load"):
                        gen.append(c)
            except OSError:
                pass
        self.first = self.snapshot(gen)
        present = set(self.first[1])
        while not self.stop.wait(0.5):
            snap = self.snapshot(gen)
            # Stop once the load generator starts to exit (threads vanish).
            if set(snap[1]) != present:
                break
            self.last = snap

    def finish(self):
        """Busiest load-generator thread's and busiest upstream worker's
        busy share over the sampled part of the round (NaN if too short)."""
        self.stop.set()
        self.thread.join()
        nan = float("nan")
        if not self.first or not self.last or self.last[0] <= self.first[0]:
            return nan, nan
        wall = (self.last[0] - self.first[0]) * 1e9
        shares = {"client": [], "upstream": []}
        for k, v in self.last[1].items():
            if k in self.first[1]:
                shares[k[0]].append((v - self.first[1][k]) / wall)
        return max(shares["client"], default=nan), max(shares["upstream"], default=nan)


def machine_ticks():
    """(idle + iowait, all) jiffies of every CPU together, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)


def rss_kib(pids, field="VmRSS:"):
    """Resident memory of `pids` summed, or with field="VmHWM:" each one's
    peak since it started (summed over nginx's processes, that is at least
    their peak together)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Server:
    def __init__(self, name, cmd, port, env=None, log=None):
        self.name = name
        self.port = port
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log)
        wait_port(port)

    def pids(self):
        return [self.proc.pid] + children(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class SlowTokenEndpoint:
    """Token endpoint answering after a delay, counting requests (cold start)."""

    def __init__(self, delay):
        self.count = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.count += 1
                self.rfile.read(int(self.headers.get("content-length", 0)))
                time.sleep(delay)
                body = json.dumps({"access_token": TOKEN, "expires_in": 7200}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def run(cmd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def wrk(url, conns, secs, extra=()):
    out = run(["wrk", f"-t{CLIENT_THREADS}", f"-c{conns}", f"-d{secs}s", "--latency", "-s", TAIL_SCRIPT,
               "-H", f"Referer: {REFERER}", *extra, url])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    p999 = re.search(r"p99\.9 latency us: (\d+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "requests": n,
        "p50_ms": to_ms(lat["50"]),
        "p99_ms": to_ms(lat["99"]),
        "p999_ms": int(p999.group(1)) / 1000,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": sock.group(1) if sock else "",
    }


def h2load(url, conns, streams, secs, extra=()):
    out = run(["h2load", f"-t{CLIENT_THREADS}", f"-c{conns}", f"-m{streams}", f"-D{secs}", "-H", f"referer: {REFERER}",
               *extra, url])
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    return {
        "rps": rps,
        "requests": int(done.group(3)),
        "succeeded": int(done.group(4)),
        "mean_ms": to_ms(mean.group(1)) if mean else None,
    }


def threads(pids):
    """(pid, tid) of every thread of `pids` that still exists."""
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            yield p, t


def thread_ticks(pids):
    """CPU ticks of every thread of `pids`, keyed by (pid, tid)."""
    return {(p, t): stat_ticks(f"/proc/{p}/task/{t}/stat") for p, t in threads(pids)}


def sleeps(pids):
    """Voluntary context switches of every thread of `pids`: each is a
    thread going to sleep (for a server, mostly in epoll_wait) and being
    woken again."""
    n = 0
    for p, t in threads(pids):
        try:
            with open(f"/proc/{p}/task/{t}/status") as f:
                n += next(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt_switches:"))
        except (OSError, StopIteration):
            pass
    return n


def children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measured(server, fn, upstream=None):
    """Runs `fn` (a load generator) and adds CPU per request: the server's,
    the upstream's (when given) and the load generator's, plus the busiest
    server thread's share of the server's CPU (0.5 is an even split over
    two serving threads or workers; 1.0 means one did everything) and the
    share of the machine's CPU time nobody used."""
    pids = server.pids()
    t0, th0, c0 = cpu_ticks(pids), thread_ticks(pids), children_cpu_s()
    s0 = sleeps(pids)
    u0 = cpu_ticks(upstream.pids()) if upstream else 0
    i0, a0 = machine_ticks()
    helpers = Helpers(upstream) if upstream else None
    r = fn()
    if helpers:
        r["client_busy"], r["upstream_busy"] = helpers.finish()
    t1, th1, c1 = cpu_ticks(pids), thread_ticks(pids), children_cpu_s()
    s1 = sleeps(pids)
    u1 = cpu_ticks(upstream.pids()) if upstream else 0
    i1, a1 = machine_ticks()
    r["machine_idle"] = (i1 - i0) / max(a1 - a0, 1)
    n = max(r["requests"], 1)
    r["cpu_us_per_req"] = (t1 - t0) / CLK * 1e6 / n
    r["client_cpu_us_per_req"] = (c1 - c0) * 1e6 / n
    r["sleeps_per_req"] = (s1 - s0) / n
    if upstream:
        r["upstream_cpu_us_per_req"] = (u1 - u0) / CLK * 1e6 / n
    busy = [th1[k] - th0.get(k, 0) for k in th1]
    r["busiest_thread_share"] = max(busy) / sum(busy) if sum(busy) else float("nan")
    r["rss_mib"] = rss_kib(pids) / 1024
    r["peak_rss_mib"] = rss_kib(pids, "VmHWM:") / 1024
    return r


def h2load_n(url, n, conns=2, streams=16):
    """h2load for exactly `n` requests; returns requests done and failures."""
    out = run(["h2load", f"-n{n}", f"-c{conns}", f"-m{streams}", "-H", f"referer: {REFERER}", url])
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
    return {"requests": int(done.group(3)), "non_2xx": int(done.group(3)) - int(done.group(4))}


def callgrind_count(name, cmd, port, url, env, work, secs, h2=False, extra=()):
    """User-space instructions per request of one server process run under
    callgrind (one serving thread / worker): warm up, zero the counters,
    drive it (wrk -c8 for `secs` with `extra` arguments, or h2load for a
    fixed count), dump. Deterministic to about 1%, unlike CPU time on a
    shared VM."""
    out = f"{work}/callgrind.{name}"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=120)
        h2load_n(url, 2000) if h2 else wrk(url, 8, 3, extra)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        r = h2load_n(url, 4000 * secs) if h2 else wrk(url, 8, secs, extra)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    dumps = [f for f in os.listdir(work) if f.startswith(f"callgrind.{name}.")]
    path = os.path.join(work, sorted(dumps, key=lambda f: os.path.getmtime(os.path.join(work, f)))[-1])
    with open(path) as f:
        total = next(int(l.split()[1]) for l in f if l.startswith(("summary:", "totals:")))
    return {"requests": r["requests"], "instructions_per_req": total / max(r["requests"], 1),
            "non_2xx": r["non_2xx"]}


def alternate(targets, load, rounds, upstream=None, after_round=None):
    """Runs `load(url)` against each target in turn, `rounds` times, each
    round `measured`; `after_round(rs)` runs after each round. The order
    turns by one place every round (A B C, B C A, C A B, ...), so over
    as many rounds as targets each takes every place once (why: run BH in
    BENCHMARKS.md). Returns every round by target."""
    rs = {name: [] for name in targets}
    names = list(targets)
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            server, url = targets[name]
            rs[name].append(measured(server, lambda: load(url), upstream))
        if after_round:
            after_round(rs)
    return rs


def resumes(port):
    """Whether a returning client resumes its TLS session: openssl s_client
    saves the session after one request (reading the answer to the end, so
    TLS 1.3 tickets are taken in) and offers it on a second connection."""
    req = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with tempfile.TemporaryDirectory() as d:
        base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-ign_eof"]
        subprocess.run(base + ["-sess_out", f"{d}/s.pem"], input=req, capture_output=True, timeout=20)
        again = subprocess.run(base + ["-sess_in", f"{d}/s.pem"], input=req, capture_output=True, timeout=20)
    return b"\nReused, " in again.stdout


def keep_rounds(results, key, rs):
    """Stores the median round of each target under `key`, and every round
    under `key`_rounds."""
    results[key] = {k: median_round(v) for k, v in rs.items()}
    results[f"{key}_rounds"] = rs


def median_round(results, key="rps"):
    ordered = sorted(results, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def stream(url, server):
    pids = server.pids()
    before = rss_kib(pids)
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pids))
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    out = run(["curl", "-sk", "-o", "/dev/null", "-H", f"Referer: {REFERER}",
               "-w", "%{http_code} %{size_download} %{speed_download}", url])
    stop.set()
    t.join()
    code, size, speed = out.split()
    return {
        "status": int(code),
        "bytes": int(size),
        "mib_per_s": float(speed) / 2**20,
        "rss_before_mib": before / 1024,
        "rss_growth_mib": (peak[0] - before) / 1024,
    }


# oha asks for `gzip, compress, deflate, br` unless told otherwise, and the
# upstream compresses for whoever asks; wrk and h2load ask for nothing. The
# fixed-rate rounds ask for identity like the closed-loop ones (before run
# BA they did not, so the proxy inflated every answer there and the anchors
# did not); compressed answers have their own scenario, h1gzip.
OHA_IDENTITY = ("-H", "Accept-Encoding: identity")


def oha(url, secs, conns, extra=()):
    """oha for `secs` over `conns` connections, asking for identity; its
    JSON summary."""
    out = run(["oha", "-z", f"{secs}s", "-c", str(conns), *extra, "--insecure", "--no-tui",
               "--output-format", "json", *OHA_IDENTITY, "-H", f"Referer: {REFERER}", url])
    return json.loads(out)


def oha_fixed(url, rate, secs, conns=64):
    """Open-loop load at `rate` requests/s (oha -q, with latency correction,
    so a stall counts against every request scheduled behind it): latency
    percentiles in ms and the share of successful answers."""
    j = oha(url, secs, conns, ("-q", str(int(rate)), "--latency-correction"))
    p = j["latencyPercentiles"]
    return {"rate": rate, "rps": j["summary"]["requestsPerSec"], "success": j["summary"]["successRate"],
            "requests": int(j["summary"]["requestsPerSec"] * secs),
            "p50_ms": p["p50"] * 1000, "p99_ms": p["p99"] * 1000, "p999_ms": p["p99.9"] * 1000}


def idle_connections(server, port, n):
    """Opens `n` TLS connections to `port`, one keep-alive request on each,
    holds them open, and returns the server's resident memory before and
    with them (all its processes), and the growth per 1,000."""
    import resource
    import socket
    import ssl
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    before = rss_kib(server.pids())
    held = []
    errors = 0
    req = (f"GET /features{QUERY} HTTP/1.1\r\nHost: localhost\r\nReferer: {REFERER}\r\n\r\n").encode()
    try:
        for _ in range(n):
            try:
                s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                    server_hostname="localhost")
                s.sendall(req)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
                if not got.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(got[:40])
                held.append(s)
            except (OSError, ConnectionError):
                errors += 1
        # Idle for 2 s: the proxy lets go of an HTTP/1 connection's hyper
        # state after 1 s idle (nginx and HAProxy free their buffers as soon
        # as a request is done), so all three are measured past that point.
        time.sleep(2.0)
        with_them = rss_kib(server.pids())
        # Still open, all of them: one more request on each.
        for s in held:
            try:
                s.sendall(req)
                if not s.recv(65536).startswith(b"HTTP/1.1 200"):
                    errors += 1
            except OSError:
                errors += 1
    finally:
        for s in held:
            s.close()
    return {"rss_before_mib": before / 1024, "rss_with_mib": with_them / 1024, "held": len(held),
            "errors": errors, "mib_per_1000": (with_them - before) / 1024 * 1000 / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="leave the servers running (for profiling)")
    ap.add_argument("--proxy-args", default="", help="extra arguments for the proxy, e.g. '--threads 1'")
    ap.add_argument("--versus", default="",
                    help="a second proxy binary (e.g. the previous commit's) run in the same rounds as "
                         "nginx and --binary, for the h1 and h2 scenarios; its ratios are printed too")
    # Two of each by default, so neither helper is a single-threaded station
    # that sets the pace: with one, wrk's thread was running or waiting for a
    # CPU 86-94 % of each HTTP/1 round and the upstream's worker 71-84 %, and
    # 5-10 % of all CPU time went unused (BENCHMARKS.md, runs AA-AD). The report
    # prints both busy shares for every round, so this can be checked.
    ap.add_argument("--client-threads", type=int, default=2, help="threads of wrk and h2load (-t)")
    ap.add_argument("--upstream-workers", type=int, default=2, help="worker processes of the upstream nginx")
    args = ap.parse_args()
    global CLIENT_THREADS
    CLIENT_THREADS = args.client_threads
    secs = 3 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    want = lambda s: not args.only or s in args.only.split(",")

    work = tempfile.mkdtemp(prefix="aap-bench-")
    # nginx workers run unprivileged and must read big.bin.
    os.chmod(work, 0o755)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", f"{work}/key.pem", "-out", f"{work}/cert.pem", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    with open(f"{work}/big.bin", "wb") as f:
        chunk = (b'{"x":"' + b"a" * 1000 + b'"},') * 1024
        for _ in range(200 * 1024 * 1024 // len(chunk)):
            f.write(chunk)
    os.chmod(f"{work}/big.bin", 0o644)
    # A large feature query answer (about 680 KB of JSON), stored gzipped as
    # an upstream would send it to a browser (gzip level 1, like nginx's
    # gzip_comp_level 1 above): served by gzip_static, so the upstream does
    # not compress per request.
    with open(f"{work}/large.json", "w") as f:
        f.write(large_feature_json())
    with open(f"{work}/large.json", "rb") as f, open(f"{work}/large.json.gz", "wb") as g:
        g.write(gzip.compress(f.read(), compresslevel=1, mtime=0))
    for name in ("large.json", "large.json.gz"):
        os.chmod(f"{work}/{name}", 0o644)

    up_port, ng_port, px_port, px_admin = free_port(), free_port(), free_port(), free_port()
    body = feature_json()
    tok = json.dumps({"access_token": TOKEN, "expires_in": 7200})
    upstream_conf = f"""
worker_processes {args.upstream_workers};
daemon off;
pid {work}/up.pid;
error_log {work}/up.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  # Only for requests that ask (the icount scenario's gzip count): browsers
  # always do, and ArcGIS compresses JSON; every other scenario sends no
  # Accept-Encoding and gets the same bytes as before.
  gzip on;
  gzip_types application/json;
  gzip_min_length 0;
  gzip_comp_level 1;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{up_port} backlog=4096;
    location = /sharing/rest/oauth2/token {{
      access_log {work}/token.log;
      default_type application/json;
      return 200 '{tok}';
    }}
    location /arcgis/rest/services/ {{
      default_type application/json;
      return 200 '{body}';
    }}
    location = /arcgis/rest/services/Large/FeatureServer/0/query {{
      default_type application/json;
      gzip_static on;
      alias {work}/large.json;
    }}
    location = /big {{
      default_type application/octet-stream;
      alias {work}/big.bin;
    }}
  }}
}}
"""
    nginx_conf = f"""
worker_processes 2;
daemon off;
pid {work}/ng.pid;
error_log {work}/ng.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  upstream arcgis {{ server 127.0.0.1:{up_port}; keepalive 128; }}
  server {{
    # reuseport: a listening socket per worker, so connections spread over
    # both; with one shared socket a worker often took most of wrk's 64
    # (busiest-worker share up to 0.82) and nginx ran slower than it can.
    listen 127.0.0.1:{ng_port} ssl http2 backlog=4096 reuseport;
    ssl_certificate {work}/cert.pem;
    ssl_certificate_key {work}/key.pem;
    http2_max_concurrent_streams 256;
    # At server level: an `if` in `location /` is not run for requests that
    # a nested location (/features/) takes, so until run AK nginx checked
    # no Referer at all (found when the foreign-Referer check below was added).
    valid_referers app.example.com *.example.org localhost;
    if ($invalid_referer) {{ return 403 '{{"error":{{"code":403,"message":"Referer not allowed.","details":[]}}}}'; }}
    location / {{
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Cookie "";
      proxy_set_header Authorization "";
      proxy_set_header X-Esri-Authorization "Bearer {TOKEN}";
      location /features/ {{ proxy_pass http://arcgis/arcgis/rest/services/; }}
      location = /raw/big {{ proxy_pass http://arcgis/big; }}
    }}
  }}
}}
"""

    # The second anchor: HAProxy doing the same job as nginx above (TLS with
    # ALPN h2/http1.1, Referer ACL -> 403 JSON, Cookie and Authorization
    # removed, X-Esri-Authorization set, Set-Cookie removed, upstream
    # connections reused). Two threads, as nginx has two workers.
    ha_port = free_port()
    haproxy_conf = f"""
global
  nbthread 2
  maxconn 9000
  log stderr format raw local0 err
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{ha_port} ssl crt {work}/haproxy.pem alpn h2,http/1.1
  acl ok_referer req.hdr(referer) -m reg -i ^https?://(app\\.example\\.com|[^/]*\\.example\\.org|localhost)(:[0-9]+)?(/|$)
  http-request return status 403 content-type application/json string '{{"error":{{"code":403,"message":"Referer not allowed.","details":[]}}}}' if !ok_referer
  http-request del-header Cookie
  http-request del-header Authorization
  http-request set-header X-Esri-Authorization "Bearer {TOKEN}"
  http-response del-header Set-Cookie
  use_backend features if {{ path_beg /features/ }}
  use_backend raw if {{ path /raw/big }}
backend features
  http-reuse always
  http-request set-path %[path,regsub(^/features/,/arcgis/rest/services/)]
  server up 127.0.0.1:{up_port}
backend raw
  http-reuse always
  http-request set-path /big
  server up 127.0.0.1:{up_port}
"""
    with open(f"{work}/haproxy.pem", "w") as f:
        f.write(open(f"{work}/cert.pem").read() + open(f"{work}/key.pem").read())
    with open(f"{work}/haproxy.cfg", "w") as f:
        f.write(haproxy_conf)

    def proxy_conf(port, admin, token_url):
        return f"""
[server]
listen = "127.0.0.1:{port}"
tls_cert = "{work}/cert.pem"
tls_key = "{work}/key.pem"
admin_listen = "127.0.0.1:{admin}"
[referers]
allowed = ["https://app.example.com", "https://*.example.org", "http://localhost:*"]
[credentials.online]
token_url = "{token_url}"
client_id = "bench"
client_secret_env = "BENCH_SECRET"
[[routes]]
name = "features"
upstream = "http://127.0.0.1:{up_port}/arcgis/rest/services"
credential = "online"
mount = "/features"
[[routes]]
name = "raw"
upstream = "http://127.0.0.1:{up_port}"
credential = "online"
mount = "/raw"
"""

    token_url = f"http://127.0.0.1:{up_port}/sharing/rest/oauth2/token"

    def big_proxy_conf(port, admin, token_url, up_port):
        """The main proxy config grown to 1,000 apps x 10 Referer entries
        (exact origins, explicit ports, wildcard hosts, `:*` ports) and
        1,002 routes; the bench's Referer is in the last app, its route
        declared last."""
        lines = [proxy_conf(port, admin, token_url).replace(
            'allowed = ["https://app.example.com", "https://*.example.org", "http://localhost:*"]',
            "allowed = []").split("[[routes]]")[0]]
        for i in range(1000):
            refs = [f"https://a{i}-{j}.example.net" for j in range(6)]
            refs += [f"https://b{i}.example.net:8443", f"https://*.w{i}.example.com",
                     f"http://h{i}.example.net:*", f"https://c{i}.example.net"]
            if i == 999:
                refs[-1] = "https://app.example.com"
            lines.append(f'[[apps]]\nname = "app-{i:04}"\nreferers = {json.dumps(refs)}\n')
        for i in range(1000):
            lines.append(f'[[routes]]\nname = "r{i:04}"\nupstream = "http://127.0.0.1:{up_port}/arcgis/rest/services/r{i}"\n'
                         f'credential = "online"\nmount = "/m{i:04}"\n')
        lines.append(f'[[routes]]\nname = "features"\nupstream = "http://127.0.0.1:{up_port}/arcgis/rest/services"\n'
                     f'credential = "online"\nmount = "/features"\n')
        return "\n".join(lines)

    def side_configs(tag, workers):
        """`{tag}-proxy.toml` and `{tag}-ng.conf` in the work directory: the
        main configs on fresh ports, nginx's worker line replaced by
        `workers`. Returns the proxy's and nginx's ports."""
        port, admin, ng = free_port(), free_port(), free_port()
        with open(f"{work}/{tag}-proxy.toml", "w") as f:
            f.write(proxy_conf(port, admin, token_url))
        with open(f"{work}/{tag}-ng.conf", "w") as f:
            f.write(nginx_conf.replace("worker_processes 2;", workers)
                    .replace(f"127.0.0.1:{ng_port}", f"127.0.0.1:{ng}")
                    .replace(f"{work}/ng.pid", f"{work}/{tag}-ng.pid"))
        return port, ng

    for name, conf in [("up", upstream_conf), ("ng", nginx_conf)]:
        with open(f"{work}/{name}.conf", "w") as f:
            f.write(conf)
    with open(f"{work}/proxy.toml", "w") as f:
        f.write(proxy_conf(px_port, px_admin, token_url))
    env = dict(os.environ, BENCH_SECRET="bench-secret", RUST_LOG="warn")

    upstream = Server("upstream", ["nginx", "-c", f"{work}/up.conf", "-p", work], up_port)
    anchor = Server("nginx", ["nginx", "-c", f"{work}/ng.conf", "-p", work], ng_port)
    haproxy = Server("haproxy", ["haproxy", "-f", f"{work}/haproxy.cfg"], ha_port,
                     log=f"{work}/haproxy.log") if shutil.which("haproxy") else None
    proxy = Server("proxy", [args.binary, "--config", f"{work}/proxy.toml", *args.proxy_args.split()], px_port, env=env,
                   log=f"{work}/proxy.log")
    versus = None
    if args.versus:
        vs_port, vs_admin = free_port(), free_port()
        with open(f"{work}/versus.toml", "w") as f:
            f.write(proxy_conf(vs_port, vs_admin, token_url))
        versus = Server("versus", [args.versus, "--config", f"{work}/versus.toml", *args.proxy_args.split()],
                        vs_port, env=env, log=f"{work}/versus.log")
    time.sleep(0.5)
    results = {"machine": {"cpus": os.cpu_count()}, "secs": secs, "rounds": rounds, "binary": args.binary,
               "versus": args.versus or None,
               "client_threads": args.client_threads, "upstream_workers": args.upstream_workers}
    targets = {
        "nginx": (anchor, f"https://127.0.0.1:{ng_port}/features{QUERY}"),
        "proxy": (proxy, f"https://127.0.0.1:{px_port}/features{QUERY}"),
    }
    if haproxy:
        targets["haproxy"] = (haproxy, f"https://127.0.0.1:{ha_port}/features{QUERY}")
    if versus:
        targets["versus"] = (versus, f"https://127.0.0.1:{vs_port}/features{QUERY}")
    direct_url = f"http://127.0.0.1:{up_port}/arcgis/rest/services{QUERY}"

    if args.keep:
        print(f"upstream :{up_port}  nginx :{ng_port}  proxy :{px_port} (pid {proxy.proc.pid})  work {work}")
        print(f"  wrk -t{CLIENT_THREADS} -c64 -d10s -H 'Referer: {REFERER}' https://127.0.0.1:{px_port}/features{QUERY}")
        signal.pause()
    try:
        # Sanity: both answer the same body, proxy injected a real token.
        for name, (_, url) in targets.items():
            out = run(["curl", "-sk", "-H", f"Referer: {REFERER}", url])
            assert out == body, f"{name} answered {out[:200]!r}"
        # The anchors refuse what the proxy refuses, in the same shape.
        for name, (_, url) in targets.items():
            out = run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Referer: https://evil.example/", url])
            assert out == "403", f"{name} answered {out} to a foreign Referer"
        results["idle_rss_mib"] = {
            "proxy": rss_kib(proxy.pids()) / 1024,
            "nginx": rss_kib(anchor.pids()) / 1024,
        }
        if haproxy:
            results["idle_rss_mib"]["haproxy"] = rss_kib(haproxy.pids()) / 1024

        if want("fixedrate") and shutil.which("oha"):
            # Tail latency at fixed rates: shares of nginx's maximum under
            # oha itself (closed loop, the same 64 connections; median of
            # three 5 s runs). Before run BA the base was nginx's maximum
            # under wrk, which oha costs too much CPU to reach on two
            # shared cores: at "90 %" every server fell behind the
            # generator and the p99 measured oha's own backlog.
            # Closed loop, no rate limit: the most oha can drive.
            tops = sorted(oha(targets["nginx"][1], min(5, secs), 64)["summary"]["requestsPerSec"] for _ in range(3))
            top = tops[1]
            fr = {"base": {"oha_max_rps": tops}}
            # 25 % too: oha itself needs most of a core at the higher
            # rates, so there it shares the tail with the servers.
            for share in (0.25, 0.5, 0.9):
                rs = alternate({k: targets[k] for k in ["nginx", "proxy", "haproxy", "versus"] if k in targets},
                               lambda url: oha_fixed(url, top * share, secs), rounds)
                fr[f"{int(share * 100)}"] = {k: sorted(v, key=lambda r: r["p99_ms"])[len(v) // 2] for k, v in rs.items()}
                fr[f"{int(share * 100)}_rounds"] = rs
            results["fixed_rate"] = fr

        if want("idle1000"):
            # Resident memory per 1,000 idle keep-alive TLS connections:
            # each connection does one request, then stays open.
            rs = {}
            for name in [n for n in ["proxy", "nginx", "haproxy"] if n in targets]:
                server, url = targets[name]
                rs[name] = idle_connections(server, int(url.split(":")[2].split("/")[0]), 1000)
            results["idle_1000_connections"] = rs

        if want("hold10k"):
            # 10,000 concurrent keep-alive TLS connections, each used twice.
            # HAProxy is left out: its maxconn needs twice the descriptors,
            # beyond this machine's hard limit of 20,000.
            # The proxy keeps an idle HTTP/1 connection for
            # `header_read_timeout_secs` (10 s by default); opening 10,000
            # takes longer than that, so this proxy keeps them 120 s, as the
            # nginx anchor does (keepalive_timeout 120s).
            h_port, h_admin = free_port(), free_port()
            with open(f"{work}/hold-proxy.toml", "w") as f:
                f.write(proxy_conf(h_port, h_admin, token_url) + "[limits]\nheader_read_timeout_secs = 120\n")
            hold = Server("proxy-hold", [args.binary, "--config", f"{work}/hold-proxy.toml"], h_port, env=env)
            try:
                run(["curl", "-sk", "-H", f"Referer: {REFERER}", f"https://127.0.0.1:{h_port}/features{QUERY}"])
                rs = {"proxy": idle_connections(hold, h_port, 10000),
                      "nginx": idle_connections(anchor, ng_port, 10000)}
            finally:
                hold.stop()
            results["hold_10000_connections"] = rs

        if want("h1"):
            direct = []
            rs = alternate(targets, lambda url: wrk(url, 64, secs), rounds, upstream,
                           after_round=lambda _: direct.append(measured(upstream, lambda: wrk(direct_url, 64, secs))))
            rs["direct"] = direct
            keep_rounds(results, "h1_keepalive_64", rs)

        if want("h1gzip"):
            # What a browser gets: the same h1 load asking for gzip. The
            # upstream compresses; the proxy inflates each answer to look
            # for the token (SPEC: never the token, gzip-encoded included)
            # and sends the compressed bytes on; nginx and HAProxy pass
            # them through without looking.
            rs = alternate(targets, lambda url: wrk(url, 64, secs, ("-H", "Accept-Encoding: gzip")), rounds, upstream)
            keep_rounds(results, "h1_gzip_64", rs)

        if want("gziplarge"):
            # A browser's large feature query: 680 KB of JSON the upstream
            # sends gzipped (241 KB). The proxy inflates it to look for the
            # token and passes the upstream's bytes on; the anchors pass
            # them on without looking.
            large = {name: (srv, url.replace("/Parks/", "/Large/")) for name, (srv, url) in targets.items()}
            with open(f"{work}/large.json", "rb") as f:
                plain = f.read()
            for name, (_, url) in large.items():
                out = subprocess.run(["curl", "-sk", "--compressed", "-H", f"Referer: {REFERER}", url],
                                     check=True, capture_output=True).stdout
                assert out == plain, f"{name} answered {len(out)} bytes, not the large answer"
            rs = alternate(large, lambda url: wrk(url, 8, secs, ("-H", "Accept-Encoding: gzip")), rounds, upstream)
            keep_rounds(results, "h1_gzip_large_8", rs)

        if want("h1single"):
            # The same comparison with one serving thread and one nginx
            # worker: with two of each, four busy threads (two server
            # threads, wrk, the upstream) share the two cores and the
            # scheduler switches about once per five requests; with one,
            # almost never. Both servers gain from it; the h1 scenario above
            # keeps the setting (2 workers, threads = CPUs).
            s_px, s_ng = side_configs("single", "worker_processes 1;")
            single = {
                "nginx": (Server("nginx-1", ["nginx", "-c", f"{work}/single-ng.conf", "-p", work], s_ng),
                          f"https://127.0.0.1:{s_ng}/features{QUERY}"),
                "proxy": (Server("proxy-1", [args.binary, "--config", f"{work}/single-proxy.toml", "--threads", "1"],
                                 s_px, env=env), f"https://127.0.0.1:{s_px}/features{QUERY}"),
            }
            try:
                rs = alternate(single, lambda url: wrk(url, 64, secs), rounds, upstream)
                keep_rounds(results, "h1_single_thread_64", rs)
            finally:
                for server, _ in single.values():
                    server.stop()

        if want("bigconfig"):
            # Cost as the configuration grows: the same h1 load against the
            # main proxy (3 Referer entries, 2 routes) and one configured
            # with 1,000 apps of 10 Referer entries each and 1,000 more
            # routes, alternating. The bench's Referer belongs to the last
            # app and its route comes after all the others, so a lookup
            # that walked the lists would pay for all of them.
            b_port, b_admin = free_port(), free_port()
            with open(f"{work}/big-proxy.toml", "w") as f:
                f.write(big_proxy_conf(b_port, b_admin, token_url, up_port))
            big = Server("proxy-big", [args.binary, "--config", f"{work}/big-proxy.toml", *args.proxy_args.split()],
                         b_port, env=env, log=f"{work}/big-proxy.log")
            try:
                b_url = f"https://127.0.0.1:{b_port}/features{QUERY}"
                out = run(["curl", "-sk", "-H", f"Referer: {REFERER}", b_url])
                assert out == body, f"the big-config proxy answered {out[:200]!r}"
                out = run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                           "Referer: https://evil.example/", b_url])
                assert out == "403", f"the big-config proxy answered {out} to a foreign Referer"
                pair = {"proxy": targets["proxy"], "big": (big, b_url)}
                rs = alternate(pair, lambda url: wrk(url, 64, secs), rounds, upstream)
                keep_rounds(results, "big_config_h1", rs)
            finally:
                big.stop()

        if want("h2"):
            rs = alternate(targets, lambda url: h2load(url, 8, 32, secs), rounds, upstream)
            keep_rounds(results, "h2_8x32", rs)

        if want("h2large"):
            # 64 KiB answers (the first 64 KiB of the 200 MB file, by Range):
            # four full DATA frames each, which h2 hands to the socket as
            # header and payload apart, so this counts how frames reach the
            # socket (BENCHMARKS.md run BN), which ~1 KiB answers never show.
            large = {k: (srv, url.split("/features")[0] + "/raw/big") for k, (srv, url) in targets.items()}
            rs = alternate(large, lambda url: h2load(url, 8, 8, secs, ("-H", "range: bytes=0-65535")), rounds, upstream)
            keep_rounds(results, "h2_large_8x8", rs)

        if want("newconn"):
            two = {k: targets[k] for k in ["nginx", "proxy", "haproxy"] if k in targets}
            rs = alternate(two, lambda url: wrk(url, 16, secs, ("-H", "Connection: close")), rounds)
            keep_rounds(results, "new_tls_connection_per_request", rs)
            results["tls_session_resumed"] = {"nginx": resumes(ng_port), "proxy": resumes(px_port)}

        if want("stream"):
            rs = {}
            for name in [n for n in ["nginx", "proxy", "haproxy"] if n in targets]:
                server, url = targets[name]
                port = int(url.split(":")[2].split("/")[0])
                rs[name] = stream(f"https://127.0.0.1:{port}/raw/big", server)
            results["stream_200mb"] = rs

        if want("icount"):
            # Same configs, one serving thread / one nginx worker without a
            # master, each under callgrind on its own port.
            ic_px, ic_ng = side_configs("ic", "worker_processes 1;\nmaster_process off;")
            isecs = 3 if args.quick else 6
            px_cmd = [args.binary, "--config", f"{work}/ic-proxy.toml", "--threads", "1"]
            ng_cmd = ["nginx", "-c", f"{work}/ic-ng.conf", "-p", work]
            px_url = f"https://127.0.0.1:{ic_px}/features{QUERY}"
            ng_url = f"https://127.0.0.1:{ic_ng}/features{QUERY}"
            results["instructions_per_request"] = {
                "proxy": callgrind_count("proxy", px_cmd, ic_px, px_url, env, work, isecs),
                "nginx": callgrind_count("nginx", ng_cmd, ic_ng, ng_url, None, work, isecs),
            }
            results["instructions_per_request_h2"] = {
                "proxy": callgrind_count("proxy-h2", px_cmd, ic_px, px_url, env, work, isecs, h2=True),
                "nginx": callgrind_count("nginx-h2", ng_cmd, ic_ng, ng_url, None, work, isecs, h2=True),
            }
            # gzip answers: nginx passes them through; the proxy inflates each
            # small one to check it for a token error and for the token.
            gz = ["-H", "Accept-Encoding: gzip"]
            results["instructions_per_request_gzip"] = {
                "proxy": callgrind_count("proxy-gz", px_cmd, ic_px, px_url, env, work, isecs, extra=gz),
                "nginx": callgrind_count("nginx-gz", ng_cmd, ic_ng, ng_url, None, work, isecs, extra=gz),
            }

        if want("cold"):
            slow = SlowTokenEndpoint(0.5)
            port, admin = free_port(), free_port()
            with open(f"{work}/cold.toml", "w") as f:
                f.write(proxy_conf(port, admin, f"http://127.0.0.1:{slow.port}/token"))
            cold = Server("cold", [args.binary, "--config", f"{work}/cold.toml"], port, env=env)
            t0 = time.time()
            out = run(["h2load", "-n1000", "-c10", "-m100", "-H", f"referer: {REFERER}",
                       f"https://127.0.0.1:{port}/features{QUERY}"])
            done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
            results["cold_start_1000"] = {
                "succeeded": int(done.group(4)),
                "token_requests": slow.count,
                "seconds": time.time() - t0,
            }
            cold.stop()
            slow.stop()
    finally:
        for s in [proxy, anchor, haproxy, upstream, versus]:
            if s:
                s.stop()
        # Certificates, configs and the 200 MB file: 231 MB a run.
        shutil.rmtree(work, ignore_errors=True)

    print_report(results)
    if results.get("versus"):
        print_versus(results)
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/latest.json", "w") as f:
        json.dump(results, f, indent=2)
    print("\nfull results: bench/results/latest.json")


def print_versus(r):
    """--binary against --versus, both measured in the same rounds."""
    print(f"\n--binary against --versus ({r['versus']}), median rounds, same rounds as above:")
    for key, label in [("h1_keepalive_64", "h1 keep-alive"), ("h2_8x32", "HTTP/2"), ("h2_large_8x8", "HTTP/2 64 KiB"),
                       ("h1_gzip_large_8", "large gzip")]:
        if key not in r or "versus" not in r[key]:
            continue
        p, v = r[key]["proxy"], r[key]["versus"]
        pairs = [a["rps"] / b["rps"] for a, b in zip(r[f"{key}_rounds"]["proxy"], r[f"{key}_rounds"]["versus"])]
        print(f"  {label:14} requests/s {p['rps']:.0f} vs {v['rps']:.0f} (ratio {p['rps'] / v['rps']:.2f}; "
              f"each round {' / '.join(f'{x:.2f}' for x in pairs)}), CPU per request {p['cpu_us_per_req']:.1f} vs "
              f"{v['cpu_us_per_req']:.1f} us (ratio {p['cpu_us_per_req'] / v['cpu_us_per_req']:.2f})"
              + (f", p99 {p['p99_ms']:.2f} vs {v['p99_ms']:.2f} ms" if "p99_ms" in p else ""))
    for share, rs in sorted((k, v) for k, v in r.get("fixed_rate", {}).items() if k.endswith("_rounds")):
        if "versus" not in rs:
            continue
        share = share.removesuffix("_rounds")
        p99 = lambda n: " / ".join(f"{x['p99_ms']:.2f}" for x in rs[n])
        cpu = lambda n: " / ".join(f"{x['cpu_us_per_req']:.1f}" for x in rs[n] if "cpu_us_per_req" in x)
        print(f"  fixed rate {share:>2} %  p99 ms each round: {p99('proxy')} vs {p99('versus')}; "
              f"CPU us per request: {cpu('proxy')} vs {cpu('versus')}")


def print_report(r):
    print(f"\narcgis-app-proxy vs nginx and HAProxy — {r['machine']['cpus']} CPUs, {r['rounds']} rounds × {r['secs']} s, median round")
    print(f"proxy binary: {r['binary']}")
    print(f"load generator threads: {r['client_threads']}, upstream workers: {r['upstream_workers']}\n")
    def rounds(key):
        # Every round, not just the median: shows how far this VM moved.
        rs = r.get(f"{key}_rounds", {})
        line = "   ".join(f"{n} " + " / ".join(f"{x['rps']:.0f}" for x in rs[n]) for n in ["proxy", "nginx", "haproxy"] if n in rs)
        if line:
            print(f"  {'requests/s of each round':34} {line}")
        # Round i of nginx ran just before round i of the proxy; the ratio of
        # each such pair shows how much of a ratio this VM's drift can move.
        pairs = [p["rps"] / n["rps"] for p, n in zip(rs.get("proxy", []), rs.get("nginx", [])) if n["rps"]]
        if pairs:
            print(f"  {'requests/s ratio of each pair':34} " + " / ".join(f"{x:.2f}" for x in pairs)
                  + f"   (median {statistics.median(pairs):.2f})")
    def parties(h, busiest=True):
        # Everything shares the machine's cores, so requests/s follows the
        # sum of all three parties' CPU per request, not the server's alone.
        for name in ["proxy", "nginx"]:
            x = h[name]
            if "upstream_cpu_us_per_req" not in x:
                return
            total = x["cpu_us_per_req"] + x["upstream_cpu_us_per_req"] + x["client_cpu_us_per_req"]
            print(f"  {'CPU per request, all parties':34} {name:5}: server {x['cpu_us_per_req']:.1f} + upstream "
                  f"{x['upstream_cpu_us_per_req']:.1f} + load generator {x['client_cpu_us_per_req']:.1f} = {total:.1f} us")
        print(f"  {'machine idle (no one on a CPU)':34} proxy {h['proxy']['machine_idle']:.3f}   "
              f"nginx {h['nginx']['machine_idle']:.3f}   (share of all CPU time)")
        if "client_busy" in h["proxy"]:
            busy = lambda x: f"load generator {x['client_busy']:.2f}, upstream {x['upstream_busy']:.2f}"
            print(f"  {'busiest helper thread, busy share':34} proxy run: {busy(h['proxy'])}   nginx run: "
                  f"{busy(h['nginx'])}   (on a CPU or waiting for one; one near 1.00 while the machine idles sets the pace)")
        if not busiest:
            return
        print(f"  {'busiest thread, share of server CPU':34} proxy {h['proxy']['busiest_thread_share']:.2f}   "
              f"nginx {h['nginx']['busiest_thread_share']:.2f}   (0.50 = even over two)")
    def peak(h):
        if "peak_rss_mib" in h["proxy"]:
            row("peak RSS so far (VmHWM)", h["proxy"]["peak_rss_mib"], h["nginx"]["peak_rss_mib"], "MiB",
                "lower is better")
    def anchors(h, p99=True):
        # The second anchor, and the better of the two: the targets are
        # ratios against whichever anchor did better in the same run.
        if "haproxy" not in h:
            return
        p, n, a = h["proxy"], h["nginx"], h["haproxy"]
        row("requests/s vs HAProxy", p["rps"], a["rps"], "req/s", "higher is better", other="haproxy")
        row("CPU per request vs HAProxy", p["cpu_us_per_req"], a["cpu_us_per_req"], "us", "lower is better", other="haproxy")
        if p99 and "p99_ms" in a:
            row("p99 latency vs HAProxy", p["p99_ms"], a["p99_ms"], "ms", "lower is better", other="haproxy")
        if p99 and "p999_ms" in a:
            row("p99.9 latency vs HAProxy", p["p999_ms"], a["p999_ms"], "ms", "lower is better", other="haproxy")
        best_rps = max(n["rps"], a["rps"])
        best_cpu = min(n["cpu_us_per_req"], a["cpu_us_per_req"])
        line = (f"  {'against the better anchor':34} requests/s {p['rps'] / best_rps:.2f}, "
                f"CPU per request {p['cpu_us_per_req'] / best_cpu:.2f}")
        if p99 and "p99_ms" in a and "p99_ms" in n:
            line += f", p99 {p['p99_ms'] / min(n['p99_ms'], a['p99_ms']):.2f}"
        if p99 and "p999_ms" in a and "p999_ms" in n:
            line += f", p99.9 {p['p999_ms'] / min(n['p999_ms'], a['p999_ms']):.2f}"
        print(line)
    def row(label, a, b, unit, better, other="nginx"):
        ratio = a / b if b else float("nan")
        print(f"  {label:34} proxy {a:10.1f} {unit:8} {other:7} {b:8.1f} {unit:8} ratio {ratio:5.2f} ({better})")
    if "h1_keepalive_64" in r:
        h = r["h1_keepalive_64"]
        print("TLS h1 keep-alive, 64 connections (wrk):")
        row("requests/s", h["proxy"]["rps"], h["nginx"]["rps"], "req/s", "target >= 1.10")
        row("CPU per request", h["proxy"]["cpu_us_per_req"], h["nginx"]["cpu_us_per_req"], "us", "target <= 0.90")
        row("p50 latency", h["proxy"]["p50_ms"], h["nginx"]["p50_ms"], "ms", "lower is better")
        row("p99 latency", h["proxy"]["p99_ms"], h["nginx"]["p99_ms"], "ms", "target <= 1.00")
        if "p999_ms" in h["proxy"]:
            row("p99.9 latency", h["proxy"]["p999_ms"], h["nginx"]["p999_ms"], "ms", "lower is better")
        anchors(h)
        print(f"  {'direct upstream (cleartext)':34} {h['direct']['rps']:10.1f} req/s, p99 {h['direct']['p99_ms']:.2f} ms")
        parties(h)
        print(f"  non-2xx: proxy {h['proxy']['non_2xx']}, nginx {h['nginx']['non_2xx']}")
        peak(h)
        rounds("h1_keepalive_64")
    for key, what in [("h1_gzip_64", "64 connections, gzip answers"),
                      ("h1_gzip_large_8", "8 connections, a 680 KB feature answer sent gzipped (241 KB)")]:
        if key not in r:
            continue
        h = r[key]
        print(f"TLS h1 keep-alive, {what} (wrk, Accept-Encoding: gzip; the proxy inflates each answer to look for "
              "the token, the anchors do not look):")
        row("requests/s", h["proxy"]["rps"], h["nginx"]["rps"], "req/s", "higher is better; no target")
        row("CPU per request", h["proxy"]["cpu_us_per_req"], h["nginx"]["cpu_us_per_req"], "us", "lower is better")
        row("p99 latency", h["proxy"]["p99_ms"], h["nginx"]["p99_ms"], "ms", "lower is better")
        anchors(h)
        rounds(key)
    if "h1_single_thread_64" in r:
        h = r["h1_single_thread_64"]
        print("TLS h1 keep-alive, 64 connections, one serving thread / one nginx worker each (not the issue's setting):")
        row("requests/s", h["proxy"]["rps"], h["nginx"]["rps"], "req/s", "higher is better")
        row("CPU per request", h["proxy"]["cpu_us_per_req"], h["nginx"]["cpu_us_per_req"], "us", "lower is better")
        row("p99 latency", h["proxy"]["p99_ms"], h["nginx"]["p99_ms"], "ms", "lower is better")
        parties(h, busiest=False)
        rounds("h1_single_thread_64")
    if "big_config_h1" in r:
        h = r["big_config_h1"]
        print("CPU per request as the config grows (TLS h1 keep-alive, 64 connections; 3 Referer entries / 2 routes "
              "vs 10,000 entries in 1,000 apps / 1,002 routes):")
        p, b = h["proxy"], h["big"]
        print(f"  {'requests/s':34} small {p['rps']:10.1f}   big {b['rps']:10.1f}   ratio {b['rps'] / p['rps']:.3f}")
        print(f"  {'CPU per request':34} small {p['cpu_us_per_req']:8.2f} us   big {b['cpu_us_per_req']:8.2f} us   "
              f"ratio {b['cpu_us_per_req'] / p['cpu_us_per_req']:.3f} (target <= 1.05)")
        pairs = [bb["cpu_us_per_req"] / pp["cpu_us_per_req"] for pp, bb in zip(r["big_config_h1_rounds"]["proxy"],
                                                                                  r["big_config_h1_rounds"]["big"])]
        print(f"  {'CPU ratio of each pair':34} " + " / ".join(f"{x:.3f}" for x in pairs))
        print(f"  {'RSS after the rounds':34} small {p['rss_mib']:.1f} MiB   big {b['rss_mib']:.1f} MiB")
    def h2(key, title, rps_target):
        h = r[key]
        print(title)
        row("requests/s", h["proxy"]["rps"], h["nginx"]["rps"], "req/s", rps_target)
        row("CPU per request", h["proxy"]["cpu_us_per_req"], h["nginx"]["cpu_us_per_req"], "us", "lower is better")
        anchors(h, p99=False)
        print(f"  succeeded: proxy {h['proxy']['succeeded']}/{h['proxy']['requests']}, nginx {h['nginx']['succeeded']}/{h['nginx']['requests']}")
        parties(h)
        peak(h)
        rounds(key)
    if "h2_8x32" in r:
        h2("h2_8x32", "HTTP/2, 8 connections x 32 streams (h2load):", "target >= 1.20")
    if "h2_large_8x8" in r:
        h2("h2_large_8x8", "HTTP/2 64 KiB answers, 8 connections x 8 streams (h2load):", "higher is better")
    if "new_tls_connection_per_request" in r:
        h = r["new_tls_connection_per_request"]
        print("New TLS connection per request, 16 concurrent (wrk, Connection: close):")
        row("requests/s", h["proxy"]["rps"], h["nginx"]["rps"], "req/s", "target >= 1.00")
        row("CPU per request", h["proxy"]["cpu_us_per_req"], h["nginx"]["cpu_us_per_req"], "us", "lower is better")
        anchors(h, p99=False)
        peak(h)
        rounds("new_tls_connection_per_request")
        if "tls_session_resumed" in r:
            t = r["tls_session_resumed"]
            yes = lambda b: "yes" if b else "NO"
            print(f"  {'returning client resumes (openssl)':34} proxy {yes(t['proxy'])}   nginx {yes(t['nginx'])}")
    if "stream_200mb" in r:
        s = r["stream_200mb"]
        print("200 MB streamed response (curl):")
        row("throughput", s["proxy"]["mib_per_s"], s["nginx"]["mib_per_s"], "MiB/s", "higher is better")
        row("RSS growth", s["proxy"]["rss_growth_mib"], s["nginx"]["rss_growth_mib"], "MiB", "target proxy < 32")
        if "haproxy" in s:
            row("throughput vs HAProxy", s["proxy"]["mib_per_s"], s["haproxy"]["mib_per_s"], "MiB/s", "higher is better",
                other="haproxy")
            row("RSS growth vs HAProxy", s["proxy"]["rss_growth_mib"], s["haproxy"]["rss_growth_mib"], "MiB",
                "target proxy < 32", other="haproxy")
    if "cold_start_1000" in r:
        c = r["cold_start_1000"]
        print(f"Cold start, 1000 concurrent requests, token endpoint slowed to 500 ms:")
        print(f"  succeeded {c['succeeded']}/1000, token requests {c['token_requests']} (target 1), all served in {c['seconds']:.2f} s")
    if "instructions_per_request" in r:
        c = r["instructions_per_request"]
        print("User-space instructions per request under callgrind (TLS h1 keep-alive, wrk -c8, one thread/worker):")
        row("instructions", c["proxy"]["instructions_per_req"] / 1000, c["nginx"]["instructions_per_req"] / 1000,
            "k", "lower is better")
    if "instructions_per_request_h2" in r:
        c = r["instructions_per_request_h2"]
        print("User-space instructions per request under callgrind (HTTP/2, h2load -c2 -m16, one thread/worker):")
        row("instructions", c["proxy"]["instructions_per_req"] / 1000, c["nginx"]["instructions_per_req"] / 1000,
            "k", "lower is better")
    if "instructions_per_request_gzip" in r:
        c = r["instructions_per_request_gzip"]
        print("User-space instructions per request under callgrind (TLS h1, gzip answers, wrk -c8, one thread/worker):")
        row("instructions", c["proxy"]["instructions_per_req"] / 1000, c["nginx"]["instructions_per_req"] / 1000,
            "k", "lower is better; nginx does not look inside")
    if "fixed_rate" in r:
        print("Open-loop fixed rates (oha -q, latency correction, 64 connections), median round by p99:")
        base = r["fixed_rate"].get("base")
        if base:
            print(f"  nginx's maximum under oha, closed loop: {' / '.join(f'{x:.0f}' for x in base['oha_max_rps'])} req/s"
                  " (the median is the base)")
        for share in ("25", "50", "90"):
            h = r["fixed_rate"][share]
            print(f"  at {share} % of nginx's maximum under oha ({h['nginx']['rate']:.0f} req/s):")
            for name, x in h.items():
                print(f"    {name:8} p50 {x['p50_ms']:.2f} ms  p99 {x['p99_ms']:.2f} ms  p99.9 {x['p999_ms']:.2f} ms  "
                      f"({x['rps']:.0f} req/s, success {x['success']:.3f}; CPU {x['cpu_us_per_req']:.1f} us, "
                      f"sleeps {x['sleeps_per_req']:.2f} per request)")
            # The anchors only: the --versus binary is another proxy build.
            best = min(x["p99_ms"] for n, x in h.items() if n in ("nginx", "haproxy"))
            print(f"    p99 against the better anchor {h['proxy']['p99_ms'] / best:.2f} (target <= 1.00)")
    if "idle_1000_connections" in r:
        c = r["idle_1000_connections"]
        print("Resident memory per 1,000 idle keep-alive TLS connections (one request each, then held):")
        print("  " + "   ".join(f"{n} {v['mib_per_1000']:.1f} MiB ({v['rss_before_mib']:.1f} -> {v['rss_with_mib']:.1f})"
                               for n, v in c.items()) + "   (target: proxy <= the anchors)")
    if "hold_10000_connections" in r:
        c = r["hold_10000_connections"]
        print("10,000 concurrent keep-alive TLS connections, two requests on each:")
        print("  " + "   ".join(f"{n} held {v['held']}, errors {v['errors']}, RSS {v['rss_with_mib']:.0f} MiB"
                               for n, v in c.items()) + "   (target: proxy 0 errors)")
    i = r["idle_rss_mib"]
    print(f"Idle RSS after start: proxy {i['proxy']:.1f} MiB (target < 20), nginx (master + 2 workers) {i['nginx']:.1f} MiB"
          + (f", HAProxy {i['haproxy']:.1f} MiB" if "haproxy" in i else ""))


if __name__ == "__main__":
    sys.exit(main())
