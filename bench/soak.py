#!/usr/bin/env python3
"""Soak test: many requests through one tunnel, every body checked, memory watched.

    python3 bench/soak.py                      # 100,000 requests, 100 connections
    python3 bench/soak.py --requests 20000     # shorter

Runs a relay and a client as subprocesses (as a user would) in front of an origin on
127.0.0.1: nginx when it is installed (bash bench/setup.sh), else a Python origin.
Reports errors (must be 0) and relay/client RSS idle, after a warm-up of the first 10 % of
the requests at full load ("start"), and at the end.  Growth from start to end must stay
under 10 %: a leak grows with the request count, while buffers and allocator arenas reach
their working size during the warm-up.  Exit status 0 only when both hold.  Not run in CI.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as bench  # noqa: E402  (process and nginx helpers)

SIZES = [100, 1000, 20000, 300000]   # bytes; files body-<size> on the origin


def body_for(size):
    return (hashlib.sha256(b"%d" % size).digest() * (size // 32 + 1))[:size]


class PythonOrigin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = body_for(int(self.path.rsplit("-", 1)[1]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def start_origin(work):
    if shutil.which("nginx"):
        port, _ = bench.start_nginx(work, with_big=False)
        for size in SIZES:
            with open(os.path.join(work, "www", "body-%d" % size), "wb") as f:
                f.write(body_for(size))
        return port, "nginx"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PythonOrigin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], "python http.server"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--connections", type=int, default=100)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tunnel-soak-")
    try:
        return soak(work, args.requests, args.connections)
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def soak(work, total, conns):
    origin_port, origin_kind = start_origin(work)
    http_port, _, relay, client, _ = bench.start_tunnel(origin_port)
    expected = {size: body_for(size) for size in SIZES}
    counter = iter(range(total))
    lock = threading.Lock()
    errors = []
    done = [0]
    warm = threading.Event()
    warmup = max(1, total // 10)

    def worker(k):
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            size = SIZES[(i * 7 + k) % len(SIZES)]
            try:
                c.request("GET", "/body-%d" % size, headers={"Host": bench.HOST})
                r = c.getresponse()
                data = r.read()
                if r.status != 200 or data != expected[size]:
                    errors.append("request %d: status %d, %d bytes" % (i, r.status, len(data)))
            except (OSError, http.client.HTTPException) as exc:
                errors.append("request %d: %r" % (i, exc))
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            with lock:
                done[0] += 1
                if done[0] >= warmup:
                    warm.set()
        c.close()

    # Warm up, then take the starting RSS.
    for size in SIZES:
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        c.request("GET", "/body-%d" % size, headers={"Host": bench.HOST})
        c.getresponse().read()
        c.close()
    idle_rss = (bench.rss_kib(relay.pid), bench.rss_kib(client.pid))
    started = time.monotonic()
    print("soak: %d requests over %d connections, origin %s" % (total, conns, origin_kind),
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(conns) as pool:
        futures = [pool.submit(worker, k) for k in range(conns)]
        warm.wait(600)
        start_rss = (bench.rss_kib(relay.pid), bench.rss_kib(client.pid))
        print("  warm-up done (%d requests): relay %.1f MiB, client %.1f MiB" % (
            warmup, start_rss[0] / 1024, start_rss[1] / 1024), flush=True)
        while not all(f.done() for f in futures):
            time.sleep(5)
            print("  %d done, %d errors, relay %.1f MiB, client %.1f MiB" % (
                done[0], len(errors), bench.rss_kib(relay.pid) / 1024,
                bench.rss_kib(client.pid) / 1024), flush=True)
        for f in futures:
            f.result()
    elapsed = time.monotonic() - started
    end_rss = (bench.rss_kib(relay.pid), bench.rss_kib(client.pid))
    growth = [(e - s) / s * 100.0 for s, e in zip(start_rss, end_rss)]
    print("requests: %d in %.1f s (%.0f/s)" % (done[0], elapsed, done[0] / elapsed))
    print("errors:   %d%s" % (len(errors), (" (first: %s)" % errors[0]) if errors else ""))
    for k, who in enumerate(("relay", "client")):
        print("%-7s RSS: idle %.1f MiB, after warm-up %.1f MiB, end %.1f MiB (%+.1f %%)" % (
            who, idle_rss[k] / 1024, start_rss[k] / 1024, end_rss[k] / 1024, growth[k]))
    ok = not errors and done[0] == total and max(growth) < 10.0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
