#!/usr/bin/env python3
"""Instructions per request for the relay and the client, counted by valgrind.

Timings on a shared 2-core VM drift by a third from one minute to the next; the
number of instructions a process executes for the same work does not (repeat runs
agree within about 1 %).  This runs one side at a time under ``valgrind --tool=callgrind``
(the other side runs normally), sends a fixed number of keep-alive GETs over 50
connections through the tunnel to nginx, and reports

    (instructions with N requests - instructions with none) / N

so start-up and shutdown cancel out.  Compare two versions of tunnel.py with
``--against REV`` (any git revision); the table then shows both and their ratio.

    bash bench/setup.sh                      # nginx, valgrind (Debian packages)
    python3 bench/instructions.py            # about 2 minutes
    python3 bench/instructions.py --against HEAD~3 --requests 5000

The client runs as a user would, with its access log on (drained to /dev/null), unless
``--quiet`` runs it with ``-q``; ``--inspect`` also runs it with its request inspector
on (expose --inspect), counted in a row of its own.
"""

import argparse
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as bench  # noqa: E402  (nginx, ports and process helpers)

CONNECTIONS = 50              # as in the 50-connection wrk row
REQUEST = b"GET /small HTTP/1.1\r\nHost: %s\r\n\r\n" % bench.HOST.encode()
SMALL_SIZE = 100              # bytes of the origin's /small
UP_TIMEOUT = 120.0            # seconds for a side to come up under valgrind


def load(port, total, conns=CONNECTIONS):
    """``total`` GETs over ``conns`` keep-alive connections; every response checked."""
    sel = selectors.DefaultSelector()
    bufs = {}
    sent = done = 0
    for _ in range(min(conns, total)):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQUEST)
        sent += 1
        bufs[s] = bytearray()
        sel.register(s, selectors.EVENT_READ)
    try:
        while done < total:
            events = sel.select(60)
            if not events:
                raise SystemExit("no response for 60 s")
            for key, _ in events:
                s, buf = key.fileobj, bufs[key.fileobj]
                data = s.recv(65536)
                if not data:
                    raise SystemExit("the relay closed a visitor connection")
                buf += data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    if not buf.startswith(b"HTTP/1.1 200 "):
                        raise SystemExit("unexpected response: %r" % bytes(buf[:60]))
                    if len(buf) < end + 4 + SMALL_SIZE:
                        break
                    del buf[:end + 4 + SMALL_SIZE]
                    done += 1
                    if sent < total:
                        s.sendall(REQUEST)
                        sent += 1
    finally:
        for s in bufs:
            sel.unregister(s)
            s.close()
        sel.close()


def counted(tunnel_py, side, requests, nginx_port, work, extra=(), client_extra=()):
    """Instructions the ``side`` ("relay" or "client") executed, serving ``requests``."""
    http_port, control_port = bench.free_port(), bench.free_port()
    out = os.path.join(work, "callgrind.out")
    grind = ["valgrind", "--tool=callgrind", "--trace-children=yes",   # tunnel.py re-execs
             "--callgrind-out-file=" + out]
    relay_cmd = [sys.executable, tunnel_py, "serve", "--bind", "127.0.0.1", "--http-port",
                 str(http_port), "--control-port", str(control_port), "--token", bench.TOKEN,
                 "-q"] + list(extra)
    client_cmd = [sys.executable, tunnel_py, "expose", str(nginx_port), "--relay",
                  "127.0.0.1:%d" % control_port, "--token", bench.TOKEN, "--subdomain",
                  bench.HOST.split(".")[0]] + list(extra) + list(client_extra)
    with open(os.path.join(work, "valgrind.log"), "w+") as log:
        relay = subprocess.Popen((grind if side == "relay" else []) + relay_cmd,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=log if side == "relay" else subprocess.DEVNULL)
        client = None
        try:
            bench.wait_port(control_port, UP_TIMEOUT)
            client = subprocess.Popen((grind if side == "client" else []) + client_cmd,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=log if side == "client" else subprocess.DEVNULL)
            wait_tunnel(http_port)
            if requests:
                load(http_port, requests)
        finally:
            for proc in (client, relay):       # SIGTERM: a graceful stop, counters written
                if proc is not None:
                    proc.terminate()
                    proc.wait(UP_TIMEOUT)
        log.seek(0)
        found = re.findall(r"Collected : (\d+)", log.read())
    if not found:
        raise SystemExit("valgrind reported no count for the %s" % side)
    return int(found[-1])


def wait_tunnel(http_port):
    """Until one request goes through (the client connects slowly under valgrind)."""
    for _ in range(int(UP_TIMEOUT * 10)):
        try:
            load(http_port, 1, 1)
            return
        except (OSError, SystemExit):
            time.sleep(0.1)
    raise SystemExit("the tunnel did not come up")


def per_request(tunnel_py, side, requests, nginx_port, work, extra=(), client_extra=()):
    idle = counted(tunnel_py, side, 0, nginx_port, work, extra, client_extra)
    busy = counted(tunnel_py, side, requests, nginx_port, work, extra, client_extra)
    return (busy - idle) / requests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests per count (3000)")
    ap.add_argument("--against", metavar="REV", help="also count tunnel.py at this git revision")
    ap.add_argument("--plaintext", action="store_true",
                    help="run the control channel with --plaintext where the version has it "
                    "(versions before TLS by default are plain anyway): to compare data paths")
    ap.add_argument("--quiet", action="store_true",
                    help="run the client with -q (no access log, so no LOG frames either): "
                    "the access log's cost is the difference to a run without it")
    ap.add_argument("--inspect", action="store_true",
                    help="also count this tree's client with --inspect 127.0.0.1:0 (the "
                    "request inspector on), in a row of its own")
    args = ap.parse_args()
    for tool in ("nginx", "valgrind"):
        if shutil.which(tool) is None:
            raise SystemExit("%s not found: run bash bench/setup.sh" % tool)
    work = tempfile.mkdtemp(prefix="tunnel-instr-")
    # The relay's key and certificate, made before anything is counted: the first relay
    # start would make them (pure-Python Ed25519, ~60M instructions) in its idle count,
    # which took about 20k off that version's figure per request.
    sys.path.insert(0, os.path.dirname(bench.TUNNEL_PY))
    import tunnel
    tunnel.relay_identity(bench.STATE_DIR)
    versions = [("this tree", bench.TUNNEL_PY)]
    if args.against:
        old = os.path.join(work, "tunnel_%s.py" % re.sub(r"\W", "_", args.against))
        with open(old, "wb") as f:
            f.write(subprocess.run(["git", "-C", os.path.dirname(bench.TUNNEL_PY), "show",
                                    "%s:tunnel.py" % args.against], check=True,
                                   capture_output=True).stdout)
        versions.insert(0, (args.against, old))
    try:
        nginx_port, _ = bench.start_nginx(work, with_big=False)
        print("instructions per request (callgrind), %d requests over %d connections, "
              "nginx origin, 100-byte file:\n" % (args.requests, CONNECTIONS))
        print("| tunnel.py | relay | client |")
        print("|---|---|---|")
        counts = []
        for name, path in versions:
            with open(path, "rb") as f:
                extra = (["--plaintext"] if args.plaintext and b'"--plaintext"' in f.read()
                         else []) + (["-q"] if args.quiet else [])
            relay = per_request(path, "relay", args.requests, nginx_port, work, extra)
            client = per_request(path, "client", args.requests, nginx_port, work, extra)
            counts.append((relay, client))
            print("| %s | %.0f | %.0f |" % (name, relay, client), flush=True)
        if len(counts) == 2:
            (r0, c0), (r1, c1) = counts
            print("| ratio | %.3f | %.3f |" % (r1 / r0, c1 / c0))
        if args.inspect:
            client = per_request(bench.TUNNEL_PY, "client", args.requests, nginx_port, work,
                                 client_extra=["--inspect", "127.0.0.1:0"])
            print("| this tree, client --inspect | | %.0f |" % client)
            print("| --inspect / off (this tree) | | %.3f |" % (client / counts[-1][1]))
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
