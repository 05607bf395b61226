#!/usr/bin/env python3
"""A small HTTP CONNECT proxy for the benchmark (and for trying expose --proxy by hand).

    python3 bench/connect_proxy.py [--port 3128] [--auth USER:PASS] [--scheme NTLM]
                                   [--refuse] [--nagle]

It runs as its own process, so the process that measures is not on the path.  Each
tunnel gets two threads, one per direction, each moving up to BUFFER bytes per
recv_into/sendall, with TCP_NODELAY on both sockets; --nagle leaves it off, as some
proxies do (tinyproxy 1.11 among them), so that Nagle's algorithm holds back a small
write while an earlier one is not yet ACKed: the case the tunnel's own ACKs must cover.

Prints "listening HOST:PORT" once it accepts, then one line per CONNECT it answers:
"CONNECT host:port 200" (or the refusal's status), so a caller can see the route.

--auth USER:PASS wants Basic credentials (407 otherwise); --scheme NTLM (or Negotiate,
Digest) answers every CONNECT with a 407 asking for that scheme instead; --refuse
answers 403 Forbidden.  Standard library only.
"""

import argparse
import base64
import socket
import sys
import threading

BUFFER = 256 * 1024          # bytes per recv_into: large, so bulk costs few system calls
HEAD_LIMIT = 16 * 1024       # a CONNECT request head longer than this: 431
DIAL_TIMEOUT = 10.0          # seconds to reach the upstream host
HEAD_TIMEOUT = 10.0          # seconds for the client to send its request head

print_lock = threading.Lock()


def say(line):
    with print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def reply(conn, status, extra=""):
    body = status.encode() + b"\n"
    conn.sendall(("HTTP/1.1 %s\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % (status, extra, len(body))).encode() + body)


def pump(src, dst, done):
    """Copy src to dst until EOF, then half-close dst; ``done`` counts finished sides."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    with done[0]:
        done[1] += 1
        last = done[1] == 2
    if last:
        src.close()
        dst.close()


def handle(conn, args):
    if not args.nagle:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(HEAD_TIMEOUT)
    head = bytearray()
    try:
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                conn.close()
                return
            head += data
            if len(head) > HEAD_LIMIT:
                reply(conn, "431 Request Header Fields Too Large")
                conn.close()
                return
    except OSError:
        conn.close()
        return
    end = head.index(b"\r\n\r\n") + 4
    rest = bytes(head[end:])
    lines = head[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split()
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    try:
        if len(parts) != 3 or parts[0] != "CONNECT":
            reply(conn, "405 Method Not Allowed")
            return conn.close()
        target = parts[1]
        host, sep, port = target.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not port.isdigit():
            reply(conn, "400 Bad Request")
            return conn.close()
        if args.refuse:
            say("CONNECT %s 403" % target)
            reply(conn, "403 Forbidden")
            return conn.close()
        if args.scheme:
            say("CONNECT %s 407 %s" % (target, args.scheme))
            reply(conn, "407 Proxy Authentication Required",
                  "Proxy-Authenticate: %s\r\n" % args.scheme)
            return conn.close()
        if args.auth:
            want = "Basic " + base64.b64encode(args.auth.encode()).decode()
            if fields.get("proxy-authorization") != want:
                say("CONNECT %s 407" % target)
                reply(conn, "407 Proxy Authentication Required",
                      'Proxy-Authenticate: Basic realm="bench"\r\n')
                return conn.close()
        try:
            up = socket.create_connection((host, int(port)), DIAL_TIMEOUT)
        except OSError as exc:
            say("CONNECT %s 502 %s" % (target, exc))
            reply(conn, "502 Bad Gateway")
            return conn.close()
        up.settimeout(None)
        conn.settimeout(None)
        if not args.nagle:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        say("CONNECT %s 200" % target)
        if rest:
            up.sendall(rest)
    except OSError:
        conn.close()
        return
    done = [threading.Lock(), 0]
    threading.Thread(target=pump, args=(up, conn, done), daemon=True).start()
    pump(conn, up, done)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="default: any free port")
    ap.add_argument("--auth", metavar="USER:PASS", help="want these Basic credentials")
    ap.add_argument("--scheme", metavar="NAME",
                    help="answer 407 asking for this scheme (NTLM, Negotiate, Digest)")
    ap.add_argument("--refuse", action="store_true", help="answer 403 Forbidden")
    ap.add_argument("--nagle", action="store_true",
                    help="leave TCP_NODELAY off on both sockets (as some proxies do)")
    args = ap.parse_args()
    srv = socket.socket(socket.AF_INET6 if ":" in args.bind else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(128)
    say("listening %s:%d" % srv.getsockname()[:2])
    try:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn, args), daemon=True).start()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
