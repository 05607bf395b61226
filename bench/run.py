#!/usr/bin/env python3
"""Side-by-side benchmark: direct to nginx, haproxy, `ssh -R` and tunnel.py.

Every row is measured in the same run on the same machine, and the report gives
ratios (tunnel.py / ssh -R, / haproxy, / direct) and issue 16's targets as PASS/FAIL
lines, since absolute numbers on a shared machine are noise.  Everything runs on
127.0.0.1.

    bash bench/setup.sh          # nginx, wrk, curl, openssh, haproxy (Debian packages)
    python3 bench/run.py         # about 12 minutes; --quick for a short smoke run

Rows: direct nginx; haproxy `mode tcp` (one thread, one hop 127.0.0.1 -> nginx, its
config written here); ssh -R; tunnel.py as a user runs it (TLS, access log on, the
client's stdout going to a file: nothing in this process reads it); tunnel.py with -q on
both sides; tunnel.py over the WebSocket transport (relay --control-port off, client
--relay http://..., access log on, to a file).  Metrics (issue 3): wrk at 1 and 50
connections (rps, p99), a 1-connection run where the origin sends head and body in
separate segments (split), an origin without TCP_NODELAY, small-request p99 while a
bulk download runs, a 256 MiB download and upload (curl, SHA-256), memory (idle, peak
under load, 1,000 idle visitors), and 500 tunnel clients on a new relay.

--transport: issue 12's WebSocket transport through a CONNECT proxy
(bench/connect_proxy.py, a process of its own) against the raw control port, in about
3 minutes.  --tls-cost: TLS against --plaintext.  --drain-cost: the default client's
stdout to a file against a pipe drained by a thread of this process (as this benchmark
did before), next to ssh -R.

--inspect-cost: the client with its request inspector on (expose --inspect, which parses
and keeps every request and response) against off, at 50 and 1 connections.
"""

import argparse
import contextlib
import hashlib
import os
import py_compile
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TUNNEL_PY = os.path.join(os.path.dirname(HERE), "tunnel.py")
sys.path.insert(0, os.path.dirname(HERE))
import tunnel  # noqa: E402  (for the 500-client scale test)

TOKEN = "bench-token-" + "x" * 20
HOST = "bench.localhost"
BIG = 256 * 1024 * 1024
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("port %d did not open" % port)


def spawn(args, **kw):
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)
    PROCS.append(p)
    return p


def rss_kib(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid):
    """Proportional set size: shared pages (libpython, libcrypto) split between users."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples the summed RSS of some processes every few ms while a load runs (VmHWM
    would report the start-up peak of compiling tunnel.py instead)."""

    def __init__(self, pids, interval=0.01):
        self.pids, self.interval = pids, interval
        self.peak = {pid: 0 for pid in pids}
        self.peak_sum = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            now = {pid: rss_kib(pid) for pid in self.pids}
            for pid, kib in now.items():
                self.peak[pid] = max(self.peak[pid], kib)
            self.peak_sum = max(self.peak_sum, sum(now.values()))
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def sampling(self):
        """Sample while the block runs (may be entered again: the peaks accumulate)."""
        self._stop.clear()
        thread = threading.Thread(target=self._run)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def bare_interpreter_kib(python=sys.executable):
    """RSS of this Python doing nothing: the floor under each tunnel.py process."""
    out = subprocess.run([python, "-c", "print(open('/proc/self/status').read())"],
                         capture_output=True, text=True).stdout
    return int(re.search(r"VmRSS:\s+(\d+)", out).group(1))


def best_of(n, measure):
    """The fastest of n transfers (all must verify): shared machines are noisy."""
    runs = [measure() for _ in range(n)]
    best = max(runs, key=lambda r: r["MBps"])
    best["ok"] = all(r["ok"] for r in runs)
    return best


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far (/proc/PID/stat)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids = [int(x) for x in out.split()]
    return pids + [g for c in pids for g in children(c)]


# -- origin and peers -------------------------------------------------------------------

NGINX_CONF = """
{user}
worker_processes 1;
worker_rlimit_nofile 8192;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {dir}/www;
        sendfile off;
        location /split/ {{ sendfile on; tcp_nopush off; tcp_nodelay on; }}
        location /upload/ {{
            dav_methods PUT; client_max_body_size 0; create_full_put_path on;
            client_body_buffer_size 1m;
        }}
    }}
}}
"""


def start_nginx(work, with_big=True):
    port = free_port()
    www = os.path.join(work, "www")
    os.makedirs(os.path.join(www, "split"))
    os.makedirs(os.path.join(www, "upload"))
    small = b"x" * 99 + b"\n"
    for path in ("small", "split/small"):
        with open(os.path.join(www, path), "wb") as f:
            f.write(small)
    big = os.path.join(www, "big")
    digest = hashlib.sha256()
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range((BIG >> 20) if with_big else 0):
            chunk = hashlib.sha256(b"%d" % i).digest() + block[32:]
            digest.update(chunk)
            f.write(chunk)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(dir=work, port=port,
                                  user="user root;" if os.geteuid() == 0 else ""))
    spawn(["nginx", "-c", conf, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    wait_port(port)
    return port, digest.hexdigest()


PY_ORIGIN = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive, and no TCP_NODELAY:
    def log_message(self, *a): pass        # head and body go out in two writes
    def do_GET(self):
        body = b"x" * 99 + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def start_python_origin():
    """An origin that writes head and body separately without TCP_NODELAY (the case
    where Nagle meets delayed ACKs: 40 ms per request on a naive path)."""
    port = free_port()
    spawn([sys.executable, "-c", PY_ORIGIN, str(port)])
    wait_port(port)
    return port


def start_ssh(work, nginx_port, py_port=None):
    os.makedirs("/run/sshd", exist_ok=True)
    key = os.path.join(work, "id_ed25519")
    hostkey = os.path.join(work, "host_ed25519")
    for k in (key, hostkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], check=True)
    auth = os.path.join(work, "authorized_keys")
    shutil.copy(key + ".pub", auth)
    os.chmod(auth, 0o600)
    sport, rport, rport2 = free_port(), free_port(), free_port()
    conf = os.path.join(work, "sshd_config")
    with open(conf, "w") as f:
        f.write("Port %d\nListenAddress 127.0.0.1\nHostKey %s\nAuthorizedKeysFile %s\n"
                "PermitRootLogin yes\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
                "PidFile %s/sshd.pid\nAllowTcpForwarding yes\nGatewayPorts no\n"
                % (sport, hostkey, auth, work))
    sshd = spawn(["/usr/sbin/sshd", "-D", "-e", "-f", conf], stderr=subprocess.DEVNULL)
    wait_port(sport)
    user = os.environ.get("USER") or "root"
    client = spawn(["ssh", "-N", "-q", "-i", key, "-p", str(sport), "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "ExitOnForwardFailure=yes",
                    "-R", "127.0.0.1:%d:127.0.0.1:%d" % (rport, nginx_port),
                    "-R", "127.0.0.1:%d:127.0.0.1:%d" % (rport2, py_port or nginx_port),
                    "%s@127.0.0.1" % user])
    wait_port(rport)
    wait_port(rport2)
    return rport, rport2, [sshd, client]


def expose(route, port, name):
    """One more tunnel client (-q) for ``port``, named ``name``; ``route``: the relay
    arguments (--relay ...), as start_tunnel returns them."""
    client = spawn([sys.executable, TUNNEL_PY, "expose", str(port)] + route
                   + ["--token", TOKEN, "--subdomain", name, "-q"],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if not client.stdout.readline().startswith(b"Forwarding"):
        raise SystemExit("tunnel %s did not come up" % name)
    return client


HAPROXY_CONF = """
global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend small
    bind 127.0.0.1:{port}
    default_backend nginx
backend nginx
    server origin 127.0.0.1:{nginx_port}
frontend nagle
    bind 127.0.0.1:{py_front}
    default_backend pyorigin
backend pyorigin
    server origin 127.0.0.1:{py_port}
"""


def start_haproxy(work, nginx_port, py_port):
    """haproxy in ``mode tcp``, one thread, one hop 127.0.0.1 -> nginx (and a second
    frontend to the no-NODELAY Python origin): a C proxy as the yardstick."""
    port, py_front = free_port(), free_port()
    conf = os.path.join(work, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(HAPROXY_CONF.format(port=port, nginx_port=nginx_port, py_front=py_front,
                                    py_port=py_port))
    proc = spawn(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    wait_port(port)
    wait_port(py_front)
    return port, py_front, proc


def start_connect_proxy(nagle=False):
    """bench/connect_proxy.py in a process of its own (so this one is off the path);
    ``nagle``: without TCP_NODELAY.  Returns its port and the process; its stdout has
    one line per CONNECT."""
    proxy = spawn([sys.executable, os.path.join(HERE, "connect_proxy.py")]
                  + (["--nagle"] if nagle else []),
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proxy.stdout.readline().decode()
    if not line.startswith("listening "):
        raise SystemExit("the CONNECT proxy did not start: %r" % line)
    return int(line.rsplit(":", 1)[1]), proxy


def clean_python(work):
    """A venv without site-packages: the interpreter of a fresh machine, for memory."""
    venv = os.path.join(work, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    return os.path.join(venv, "bin", "python3")


# Proxy variables would send curl, wrk or a tunnel client elsewhere: every row here
# chooses its route explicitly.
for _var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_var, None)
    os.environ.pop(_var.upper(), None)

STATE_DIR = tempfile.mkdtemp(prefix="tunnel-bench-state-")   # the relay's generated key
os.environ["TUNNEL_STATE_DIR"] = STATE_DIR
# The tunnel processes' stdout and stderr (tmpfs where there is one, like the work dir).
LOG_DIR = tempfile.mkdtemp(prefix="tunnel-bench-out-", dir="/dev/shm" if os.path.isdir(
    "/dev/shm") else None)


def wait_forwarding(path, proc, timeout=30.0):
    """Until the client's stdout file ``path`` has its Forwarding line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            first = f.readline()
        if first.endswith(b"\n"):
            if first.startswith(b"Forwarding"):
                return
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit("tunnel did not come up: %r" % first)


def start_tunnel(nginx_port, python=sys.executable, plaintext=False, proxy_port=None,
                 output="file", websocket=False, client_args=()):
    """A relay and a client as a user runs them: by default TLS on the control channel
    (the relay's own certificate, channel binding), access log on, the client's stdout
    going to a file (as a terminal would take it: nothing in this process reads it) and
    both sides' stderr to files; ``plaintext`` runs both with --plaintext, for the
    TLS-cost row.  ``output``: "file" (the default), "quiet" (-q on both sides, the
    stdout file has the Forwarding line only) or "pipe" (the client's stdout drained by a
    thread of this process, as this benchmark did before: only for --drain-cost).  With
    ``websocket`` the relay has no control port (--control-port off) and the client
    reaches it as ``--relay http://127.0.0.1:HTTP_PORT``: a WebSocket on the visitor
    port, TLS inside it; ``proxy_port`` does the same through the CONNECT proxy on that
    port (``--relay http://localhost:HTTP_PORT --proxy ...``).  control_port is then None.
    ``client_args``: more flags for the client (--inspect-cost's --inspect).  Returns
    (http_port, control_port, relay, client, route): ``route`` are the client's relay
    arguments, for more clients of the same relay."""
    http_port = free_port()
    websocket = websocket or bool(proxy_port)
    control_port = None if websocket else free_port()
    plain = ["--plaintext"] if plaintext else []
    quiet = ["-q"] if output == "quiet" else []
    logs = tempfile.mkdtemp(prefix="out-", dir=LOG_DIR)
    # Every connection comes from 127.0.0.1: lift the per-source caps above what the runs
    # open (1,000 idle visitors on one tunnel, up to 500 clients connecting at once).
    with open(os.path.join(logs, "relay.err"), "wb") as err:
        relay = spawn([python, TUNNEL_PY, "serve", "--bind", "127.0.0.1", "--http-port",
                       str(http_port), "--control-port", str(control_port or "off"),
                       "--token", TOKEN, "--max-visitors-per-source", "5000",
                       "--max-visitors-per-source-per-tunnel", "5000",
                       "--max-unauthenticated-per-source", "64"] + quiet + plain,
                      stdout=subprocess.DEVNULL, stderr=err)
    wait_port(control_port or http_port)
    if proxy_port:
        route = ["--relay", "http://localhost:%d" % http_port,
                 "--proxy", "http://127.0.0.1:%d" % proxy_port]
    elif websocket:
        route = ["--relay", "http://127.0.0.1:%d" % http_port]
    else:
        route = ["--relay", "127.0.0.1:%d" % control_port]
    args = ([python, TUNNEL_PY, "expose", str(nginx_port)] + route
            + ["--token", TOKEN, "--subdomain", "bench"] + quiet + plain + list(client_args))
    out_path = os.path.join(logs, "client.out")
    with open(out_path, "wb") as out, open(os.path.join(logs, "client.err"), "wb") as err:
        if output == "pipe":
            client = spawn(args, stdout=subprocess.PIPE, stderr=err)
        else:
            client = spawn(args, stdout=out, stderr=err)
    if output == "pipe":
        line = client.stdout.readline().decode()
        if not line.startswith("Forwarding"):
            raise SystemExit("tunnel did not come up: %r" % line)
        threading.Thread(target=lambda: [None for _ in client.stdout], daemon=True).start()
    else:
        wait_forwarding(out_path, client)
    client.out_path = out_path
    return http_port, control_port, relay, client, route


# -- measurements -------------------------------------------------------------------------

def parse_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000.0 if unit == "us" else value * 1000.0 if unit == "s" else value


def wrk(url, conns, seconds, host=None):
    args = ["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--latency", "--timeout", "5s"]
    if host:
        args += ["-H", "Host: " + host]
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    done = re.search(r"(\d+) requests in", out)
    top = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    return {"rps": rps, "p50": parse_ms(lat["50"]), "p99": parse_ms(lat["99"]),
            "errors": errors, "requests": int(done.group(1)) if done else 0,
            "max": parse_ms(top.group(1)) if top else float("nan")}


def curl_download(url, host, expect_sha, work):
    # To a file on tmpfs (the work directory), hashed afterwards: a pipe into a hash
    # would cap every row near 500 MB/s on a 2-core machine.
    out = os.path.join(work, "download")
    args = ["curl", "-s", "-o", out, "-w", "%{size_download} %{time_total} %{http_code}"]
    if host:
        args += ["-H", "Host: " + host]
    res = subprocess.run(args + [url], capture_output=True, text=True).stdout.split()
    size, seconds = int(res[0]), float(res[1])
    ok = res[2] == "200" and size == BIG and sha_file(out) == expect_sha
    os.unlink(out)
    return {"MBps": size / seconds / 1e6, "ok": ok}


def curl_upload(url, host, source, expect_sha, work, name):
    args = ["curl", "-s", "-T", source, "-o", "/dev/null", "-w",
            "%{size_upload} %{time_total} %{http_code}"]
    if host:
        args += ["-H", "Host: " + host]
    res = subprocess.run(args + [url + "upload/" + name], capture_output=True,
                         text=True).stdout.split()
    size, seconds = int(res[0]), float(res[1])
    stored = os.path.join(work, "www", "upload", name)
    ok = (res[2] in ("201", "204") and os.path.exists(stored)
          and os.path.getsize(stored) == BIG and sha_file(stored) == expect_sha)
    if os.path.exists(stored):
        os.unlink(stored)
    return {"MBps": size / seconds / 1e6, "ok": ok}


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fairness(url, host, seconds):
    """p99 of small requests while bulk downloads run on the same path."""
    stop = threading.Event()
    args = ["curl", "-s", "-o", "/dev/null"] + (["-H", "Host: " + host] if host else [])

    def bulk():
        while not stop.is_set():
            subprocess.run(args + [url + "big"])
    t = threading.Thread(target=bulk)
    t.start()
    time.sleep(0.5)   # let the download reach full speed
    try:
        return wrk(url + "small", 1, seconds, host)
    finally:
        stop.set()
        t.join()


def acking_p99(port, seconds):
    """p99 (ms) of one keep-alive connection to ``port`` read by a client that ACKs every
    read at once (TCP_QUICKACK), so an origin's Nagle costs nothing: the origin's own tail."""
    req = b"GET /small HTTP/1.1\r\nHost: origin\r\n\r\n"
    lat = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            s.sendall(req)
            buf = b""
            while True:
                data = s.recv(65536)
                if not data:
                    raise SystemExit("the Python origin closed the connection")
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end >= 0 and len(buf) >= end + 4 + 100:
                    break
            lat.append(time.perf_counter() - started)
    lat.sort()
    return lat[int(len(lat) * 0.99)] * 1e3


def hold_idle(port, host, n):
    socks = []
    req = ("GET /small HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), 10)
        s.sendall(req)
        socks.append(s)
    for s in socks:
        data = b""
        while not data.endswith(b"x\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("idle visitor connection closed early")
            data += chunk
    return socks


def scale(control_port, n):
    """n tunnel clients in this process (one event loop), connected to one relay.
    Clients beyond the relay's unauthenticated cap are refused and back off."""
    import logging
    logging.getLogger("tunnel").setLevel(logging.ERROR)   # their retries are expected
    loop = tunnel.EventLoop()
    clients = []
    for i in range(n):
        cfg = tunnel.ClientConfig(target_port=1, relay_host="127.0.0.1",
                                  relay_port=control_port, token=TOKEN,
                                  subdomain="scale-%d" % i, access_log=False)
        clients.append(tunnel.Client(cfg, loop=loop, output=lambda line: None))
    started = time.monotonic()
    for c in clients:
        c.connect()
    deadline = started + 60
    while sum(c.ready.is_set() for c in clients) < n and time.monotonic() < deadline:
        loop.run_once(0.05)
    elapsed = time.monotonic() - started
    up = sum(c.ready.is_set() for c in clients)
    return loop, up, elapsed


# -- the run ------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="per wrk run (default 5)")
    ap.add_argument("--quick", action="store_true", help="1-second runs, fewer clients")
    ap.add_argument("--rounds", type=int, default=3,
                    help="wrk runs per row (1 and 50 connections, split, no-NODELAY, under "
                         "bulk), taking turns; the median is reported (default 3)")
    ap.add_argument("--tls-cost", action="store_true",
                    help="only tunnel.py with TLS on the control channel (the default) "
                         "against --plaintext: 50 and 1 connections taking turns, downloads")
    ap.add_argument("--transport", action="store_true",
                    help="only the WebSocket transport through a CONNECT proxy (relay with "
                         "--control-port off, client --relay http://... --proxy ...) against "
                         "the raw control port: 50 and 1 connections, split, 256 MiB each way")
    ap.add_argument("--drain-cost", action="store_true",
                    help="only the default client with its stdout to a file against a pipe "
                         "drained by a thread of this process, and ssh -R")
    ap.add_argument("--access-log", action="store_true",
                    help="only tunnel.py as a user runs it (the client's access log on, to "
                         "a file) against the client with -q: 50 and 1 connections taking "
                         "turns")
    ap.add_argument("--inspect-cost", action="store_true",
                    help="only tunnel.py with the request inspector on (expose --inspect) "
                         "against off: 50 and 1 connections taking turns")
    ap.add_argument("--tunnel-only", action="store_true",
                    help="only the tunnel.py row's rps, transfer and fairness (for tuning)")
    args = ap.parse_args()
    for tool in ("nginx", "wrk", "curl", "ssh", "/usr/sbin/sshd", "haproxy"):
        if not shutil.which(tool):
            raise SystemExit("%s is missing: run bash bench/setup.sh first" % tool)
    secs = 1 if args.quick else args.seconds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    work = tempfile.mkdtemp(prefix="tunnel-bench-", dir="/dev/shm" if os.path.isdir(
        "/dev/shm") else None)
    try:
        if args.tls_cost:
            tls_cost(work, secs, 1 if args.quick else args.rounds)
        elif args.transport:
            transport(work, secs, 1 if args.quick else args.rounds)
        elif args.drain_cost:
            drain_cost(work, secs, 1 if args.quick else args.rounds)
        elif args.access_log:
            access_log_cost(work, secs, 1 if args.quick else args.rounds)
        elif args.inspect_cost:
            inspect_cost(work, secs, 1 if args.quick else args.rounds)
        else:
            run(work, secs, args.quick, args.tunnel_only, 1 if args.quick else args.rounds)
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        shutil.rmtree(LOG_DIR, ignore_errors=True)


def tls_cost(work, secs, rounds):
    """TLS on the control channel (the default) against --plaintext, in one run: the
    two tunnels take turns, each reports its median run."""
    print("preparing nginx and two tunnels (TLS, plaintext) on 127.0.0.1 ...", flush=True)
    py_compile.compile(TUNNEL_PY, doraise=True)
    nginx_port, big_sha = start_nginx(work)
    rows = []
    for label, plaintext in (("TLS (default)", False), ("--plaintext", True)):
        http_port = start_tunnel(nginx_port, plaintext=plaintext)[0]
        rows.append((label, "http://127.0.0.1:%d/" % http_port))
    runs = {(label, kind): [] for label, _ in rows for kind in ("c50", "c1")}
    for i in range(rounds):
        print("round %d of %d ..." % (i + 1, rounds), flush=True)
        for label, url in rows:
            runs[label, "c50"].append(wrk(url + "small", 50, secs, HOST))
            runs[label, "c1"].append(wrk(url + "small", 1, secs, HOST))
    res = {}
    for label, url in rows:
        res[label] = {kind: sorted(runs[label, kind], key=lambda r: r["rps"])[rounds // 2]
                      for kind in ("c50", "c1")}
        res[label]["errors"] = sum(r["errors"] for k in ("c50", "c1") for r in runs[label, k])
        res[label]["down"] = best_of(2, lambda: curl_download(url + "big", HOST, big_sha, work))
    lines = ["", "## Control channel: TLS against --plaintext (wrk -t1, %ds, median of %d; %s)"
             % (secs, rounds, time.strftime("%Y-%m-%d")), "",
             "| control channel | 50 conn rps | 50 conn p99 | 1 conn rps | 1 conn p99 | "
             "256 MiB down | errors |", "|---|---|---|---|---|---|---|"]
    for label, _ in rows:
        r = res[label]
        lines.append("| %s | %.0f | %.2f ms | %.0f | %.2f ms | %.0f MB/s%s | %d |" % (
            label, r["c50"]["rps"], r["c50"]["p99"], r["c1"]["rps"], r["c1"]["p99"],
            r["down"]["MBps"], "" if r["down"]["ok"] else " BYTES WRONG", r["errors"]))
    t, p = res["TLS (default)"], res["--plaintext"]
    lines += ["", "TLS / plaintext: 50 conn %.2f, 1 conn %.2f, download %.2f" % (
        t["c50"]["rps"] / p["c50"]["rps"], t["c1"]["rps"] / p["c1"]["rps"],
        t["down"]["MBps"] / p["down"]["MBps"])]
    print("\n".join(lines))


def access_log_cost(work, secs, rounds):
    """The client's access log (on by default, its stdout a file) against -q, in one run:
    the two tunnels take turns, each reports its median run.  Above SUMMARY_RATE
    requests a second the console prints one summary line a second."""
    print("preparing nginx and two tunnels (access log on, -q) on 127.0.0.1 ...", flush=True)
    py_compile.compile(TUNNEL_PY, doraise=True)
    nginx_port, _ = start_nginx(work, with_big=False)
    rows = []
    for label, quiet in (("access log on (default)", False), ("-q", True)):
        http_port, _, relay, client, _ = start_tunnel(nginx_port, output="quiet" if quiet else "file")
        rows.append((label, "http://127.0.0.1:%d/small" % http_port, (relay, client)))
    runs = {(label, kind): [] for label, _, _ in rows for kind in ("c50", "c1")}

    def measured(url, conns, procs):
        """A wrk run, and the CPU time relay and client took per request (steadier than
        requests/s on a shared machine: it does not count the time spent waiting)."""
        before = sum(cpu_seconds(p.pid) for p in procs)
        r = wrk(url, conns, secs, HOST)
        r["cpu_us"] = (sum(cpu_seconds(p.pid) for p in procs) - before) / max(
            r["requests"], 1) * 1e6
        return r
    for i in range(rounds):
        print("round %d of %d ..." % (i + 1, rounds), flush=True)
        for label, url, procs in rows if i % 2 == 0 else rows[::-1]:   # neither first always
            runs[label, "c50"].append(measured(url, 50, procs))
            runs[label, "c1"].append(measured(url, 1, procs))
    res = {}
    for label, _, (_, client) in rows:
        res[label] = {kind: sorted(runs[label, kind], key=lambda r: r["rps"])[rounds // 2]
                      for kind in ("c50", "c1")}
        res[label]["cpu"] = sorted(r["cpu_us"] for r in runs[label, "c50"])[rounds // 2]
        res[label]["errors"] = sum(r["errors"] for k in ("c50", "c1") for r in runs[label, k])
        with open(client.out_path) as f:
            res[label]["lines"] = sum(1 for _ in f)
    lines = ["", "## The client's access log against -q (wrk -t1, %ds, median of %d; %s)"
             % (secs, rounds, time.strftime("%Y-%m-%d")), "",
             "| client output | 50 conn rps | 50 conn p99 | 50 conn CPU/request | 1 conn rps "
             "| 1 conn p99 | console lines | errors |", "|---|---|---|---|---|---|---|---|"]
    for label, _, _ in rows:
        r = res[label]
        lines.append("| %s | %.0f | %.2f ms | %.0f us | %.0f | %.2f ms | %d | %d |" % (
            label, r["c50"]["rps"], r["c50"]["p99"], r["cpu"], r["c1"]["rps"],
            r["c1"]["p99"], r["lines"], r["errors"]))
    on, quiet = res["access log on (default)"], res["-q"]
    lines += ["", "access log on / -q: 50 conn %.2f (CPU per request %.2f), 1 conn %.2f" % (
        on["c50"]["rps"] / quiet["c50"]["rps"], on["cpu"] / quiet["cpu"],
        on["c1"]["rps"] / quiet["c1"]["rps"])]
    print("\n".join(lines))


def inspect_cost(work, secs, rounds):
    """The client with its request inspector on (expose --inspect, capturing every
    request and response) against without, in one run: the two tunnels take turns at
    50 and 1 connections, each reports its median run; CPU per request of the client."""
    print("preparing nginx and two tunnels (inspector off, on) on 127.0.0.1 ...", flush=True)
    py_compile.compile(TUNNEL_PY, doraise=True)
    nginx_port, _ = start_nginx(work, with_big=False)
    rows = []
    for label, args in (("inspector off (default)", ()),
                        ("--inspect", ("--inspect", "127.0.0.1:0"))):
        http_port, _, _, client, _ = start_tunnel(nginx_port, client_args=args)
        rows.append((label, "http://127.0.0.1:%d/" % http_port, client.pid))
    runs = {(label, kind): [] for label, _, _ in rows for kind in ("c50", "c1")}
    cpu = {label: [] for label, _, _ in rows}
    for i in range(rounds):
        print("round %d of %d ..." % (i + 1, rounds), flush=True)
        for label, url, pid in rows:
            before = cpu_seconds(pid)
            r = wrk(url + "small", 50, secs, HOST)
            cpu[label].append((cpu_seconds(pid) - before) * 1e6 / max(1, r["requests"]))
            runs[label, "c50"].append(r)
            runs[label, "c1"].append(wrk(url + "small", 1, secs, HOST))
    res = {}
    for label, _, _ in rows:
        res[label] = {kind: sorted(runs[label, kind], key=lambda r: r["rps"])[rounds // 2]
                      for kind in ("c50", "c1")}
        res[label]["cpu"] = cpu[label][runs[label, "c50"].index(res[label]["c50"])]
        res[label]["errors"] = sum(r["errors"] for k in ("c50", "c1") for r in runs[label, k])
    lines = ["", "## Request inspector: expose --inspect against without (wrk -t1, %ds, "
             "median of %d; %s)" % (secs, rounds, time.strftime("%Y-%m-%d")), "",
             "| client | 50 conn rps | 50 conn p99 | 1 conn rps | 1 conn p99 | client CPU "
             "per request at 50 conn | errors |", "|---|---|---|---|---|---|---|"]
    for label, _, _ in rows:
        r = res[label]
        lines.append("| %s | %.0f | %.2f ms | %.0f | %.2f ms | %.0f us | %d |" % (
            label, r["c50"]["rps"], r["c50"]["p99"], r["c1"]["rps"], r["c1"]["p99"],
            r["cpu"], r["errors"]))
    off, on = res["inspector off (default)"], res["--inspect"]
    lines += ["", "--inspect / off: 50 conn %.2f, 1 conn %.2f (aim: 0.85 or more at 50); "
              "client CPU per request %.2f" % (
                  on["c50"]["rps"] / off["c50"]["rps"], on["c1"]["rps"] / off["c1"]["rps"],
                  on["cpu"] / off["cpu"])]
    print("\n".join(lines))


def transport(work, secs, rounds):
    """Only the WebSocket-through-a-proxy comparison (bench/run.py --transport)."""
    print("preparing nginx and a tunnel on the control port on 127.0.0.1 ...", flush=True)
    py_compile.compile(TUNNEL_PY, doraise=True)
    nginx_port, big_sha = start_nginx(work)
    http_port, _, relay, client, _ = start_tunnel(nginx_port)
    print("\n".join(transport_compare(work, nginx_port, big_sha, (http_port, relay, client),
                                      secs, rounds)))


def through_proxy(nginx_port, nagle=False):
    """A relay with --control-port off and its client coming through a new
    bench/connect_proxy.py (``nagle``: one without TCP_NODELAY), checked to have gone
    through it.  Returns (http_port, relay, client, proxy, connects): ``connects``
    collects the proxy's CONNECT lines."""
    import select
    proxy_port, proxy = start_connect_proxy(nagle)
    http_port, _, relay, client, _ = start_tunnel(nginx_port, proxy_port=proxy_port)
    ready, _, _ = select.select([proxy.stdout], [], [], 10)
    line = proxy.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("CONNECT localhost:%d 200" % http_port):
        raise SystemExit("the WebSocket client did not come through the proxy: %r" % line)
    connects = [line]
    threading.Thread(target=lambda: connects.extend(proxy.stdout), daemon=True).start()
    return http_port, relay, client, proxy, connects


def transport_compare(work, nginx_port, big_sha, raw, secs, rounds):
    """The tunnel ``raw`` = (http_port, relay, client) on the control port (TLS, the
    default) against a second relay with --control-port off, reached by its client as
    ``--relay http://localhost:PORT --proxy http://127.0.0.1:PPORT`` (a WebSocket on the
    visitor port through bench/connect_proxy.py, TLS inside it, the default): the two take
    turns; 50 and 1 connections and split (median of ``rounds``), 256 MiB each way (best of
    two, SHA-256), and the CPU each process spends.  A third relay is reached the same way
    through a proxy without TCP_NODELAY (as some are), for the wrk runs only: Nagle's
    algorithm in the proxy meets the delayed ACKs of the relay and the client there.
    Returns the report's lines."""
    ws_http, ws_relay, ws_client, proxy, connects = through_proxy(nginx_port)
    ng_http, ng_relay, ng_client, ng_proxy, ng_connects = through_proxy(nginx_port, True)
    rows = [("control port, TLS (default)", "http://127.0.0.1:%d/" % raw[0],
             {"relay": raw[1].pid, "client": raw[2].pid}),
            ("WebSocket via CONNECT proxy, TLS inside", "http://127.0.0.1:%d/" % ws_http,
             {"relay": ws_relay.pid, "client": ws_client.pid, "proxy": proxy.pid}),
            ("the same via a proxy without TCP_NODELAY", "http://127.0.0.1:%d/" % ng_http,
             {"relay": ng_relay.pid, "client": ng_client.pid, "proxy": ng_proxy.pid})]
    bulk = rows[:2]
    kinds = ("c50", "c1", "split")
    runs = {(label, kind): [] for label, _, _ in rows for kind in kinds}
    cpu = {label: [] for label, _, _ in rows}      # CPU us per request, each c50 run
    for i in range(rounds):
        print("transport: round %d of %d ..." % (i + 1, rounds), flush=True)
        for label, url, pids in rows:
            before = {who: cpu_seconds(pid) for who, pid in pids.items()}
            r = wrk(url + "small", 50, secs, HOST)
            cpu[label].append({who: (cpu_seconds(pid) - before[who]) * 1e6
                               / max(1, r["requests"]) for who, pid in pids.items()})
            runs[label, "c50"].append(r)
            runs[label, "c1"].append(wrk(url + "small", 1, secs, HOST))
            runs[label, "split"].append(wrk(url + "split/small", 1, secs, HOST))
    res = {}
    for label, url, pids in rows:
        r = res[label] = {}
        for kind in kinds:
            key = "p99" if kind == "split" else "rps"
            r[kind] = sorted(runs[label, kind], key=lambda x: x[key])[rounds // 2]
        r["errors"] = sum(x["errors"] for k in kinds for x in runs[label, k])
        r["split max"] = max(x["max"] for x in runs[label, "split"])
        # the c50 run reported above is the median by rps; its CPU goes with it
        r["cpu"] = cpu[label][runs[label, "c50"].index(r["c50"])]
    for label, url, pids in bulk:
        r = res[label]
        print("transport: transfers, %s ..." % label, flush=True)
        for kind, measure in (
                ("down", lambda: curl_download(url + "big", HOST, big_sha, work)),
                ("up", lambda: curl_upload(url, HOST, os.path.join(work, "www", "big"),
                                           big_sha, work, "transport.bin"))):
            before = {who: cpu_seconds(pid) for who, pid in pids.items()}
            r[kind] = best_of(2, measure)
            r[kind + " cpu"] = {who: (cpu_seconds(pid) - before[who]) / 2
                                for who, pid in pids.items()}
    for p in (ws_client, ws_relay, proxy, ng_client, ng_relay, ng_proxy):
        p.terminate()
        p.wait()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    raw_r, ws_r, ng_r = (res[label] for label, _, _ in rows)
    lines = ["", "## WebSocket transport through a CONNECT proxy (wrk -t1, %ds per run, "
             "median of %d; 256 MiB best of two, SHA-256; %s)"
             % (secs, rounds, time.strftime("%Y-%m-%d")), "",
             "| route to the relay | 50 conn rps | 50 conn p99 | 1 conn rps | 1 conn p99 | "
             "split p99 | 256 MiB down | 256 MiB up | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, _, _ in rows:
        r = res[label]
        if "down" in r:
            transfers = "%.0f MB/s | %.0f MB/s" % (r["down"]["MBps"], r["up"]["MBps"])
            ok = r["down"]["ok"] and r["up"]["ok"]
        else:
            transfers, ok = "- | -", True
        lines.append("| %s | %.0f | %.2f ms | %.0f | %.2f ms | %.2f ms | %s | %d%s |" % (
            label, r["c50"]["rps"], r["c50"]["p99"], r["c1"]["rps"], r["c1"]["p99"],
            r["split"]["p99"], transfers, r["errors"], "" if ok else ", BYTES WRONG"))
    lines += ["", "WebSocket via proxy / control port: 50 conn %.2f, 1 conn %.2f, download "
              "%.2f, upload %.2f (aim: 0.80 or more); split p99 via the proxy %.2f ms "
              "(aim: under 2 ms), slowest split request in any round %.1f ms (a Nagle "
              "stall would be 40 ms or more). Via the proxy without TCP_NODELAY: 50 conn "
              "%.2f, 1 conn %.2f, split p99 %.2f ms." % (
                  ratio(ws_r["c50"]["rps"], raw_r["c50"]["rps"]),
                  ratio(ws_r["c1"]["rps"], raw_r["c1"]["rps"]),
                  ratio(ws_r["down"]["MBps"], raw_r["down"]["MBps"]),
                  ratio(ws_r["up"]["MBps"], raw_r["up"]["MBps"]), ws_r["split"]["p99"],
                  ws_r["split max"], ratio(ng_r["c50"]["rps"], raw_r["c50"]["rps"]),
                  ratio(ng_r["c1"]["rps"], raw_r["c1"]["rps"]), ng_r["split"]["p99"]), ""]
    fmt = lambda d, f: ", ".join(f % (who, v) for who, v in d.items())  # noqa: E731
    for label, _, _ in bulk:
        r = res[label]
        lines.append("- CPU, %s: per request at 50 conn %s; per 256 MiB down %s; up %s"
                     % (label, fmt(r["cpu"], "%s %.0f us"), fmt(r["down cpu"], "%s %.2f s"),
                        fmt(r["up cpu"], "%s %.2f s")))
    lines.append("- CONNECTs the proxies answered: %d and %d (1 each: the clients never "
                 "reconnected)" % (len(connects), len(ng_connects)))
    return lines


def stop_all():
    """SIGTERM every process this run started (tunnel.py exits 0 on it), then reap."""
    for p in reversed(PROCS):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in PROCS:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


# The rows of the main table: key, label.  TUNNEL_ROWS are tunnel.py's.
ROWS = (("direct", "direct nginx"),
        ("haproxy", "haproxy `mode tcp` (C, one hop, 1 thread)"),
        ("ssh", "ssh -R"),
        ("default", "tunnel.py as a user runs it (access log on, to a file)"),
        ("quiet", "tunnel.py `-q` on both sides"),
        ("ws", "tunnel.py, WebSocket transport (access log on, to a file)"))
TUNNEL_ROWS = ("default", "quiet", "ws")
KINDS = ("c1", "c50", "split", "nagle", "fair")
# issue 16's targets
AIM_DEFAULT_VS_SSH = 2.0        # default output, c50 rps / ssh -R's
AIM_QUIET_VS_HAPROXY = 0.8      # -q, c50 rps / haproxy's
AIM_QUIET_C1_VS_SSH = 1.2       # -q, c1 rps / ssh -R's
AIM_P99_MS = 2.0                # c1 and split p99, every run
AIM_FAIR = 3.0                  # p99 under a bulk download / unloaded
AIM_PEAK_MIB = 40.0             # relay + client RSS at 50 connections
AIM_IDLE_VISITORS_MIB = 8.0     # 1,000 idle keep-alive visitors add at most
AIM_TUNNELS_MIB = 30.0          # relay RSS with 500 tunnels
SCALE_TUNNELS = 500


def run(work, secs, quick, tunnel_only=False, rounds=3):
    print("preparing nginx, haproxy, sshd and tunnel.py on 127.0.0.1 ...", flush=True)
    load_start = os.getloadavg()[0]
    # The bytecode cache any earlier run leaves (this machine may set
    # PYTHONDONTWRITEBYTECODE, so make it here): tunnel.py then starts without compiling.
    py_compile.compile(TUNNEL_PY, doraise=True)
    nginx_port, big_sha = start_nginx(work)
    t_http, t_control, relay, client, route = start_tunnel(nginx_port)
    if tunnel_only:
        url = "http://127.0.0.1:%d/" % t_http
        for label, r in (("50 conn", wrk(url + "small", 50, secs, HOST)),
                         ("1 conn", wrk(url + "small", 1, secs, HOST)),
                         ("1 conn under bulk", fairness(url, HOST, secs))):
            print("%-18s %8.0f rps  p50 %.2f ms  p99 %.2f ms  errors %d"
                  % (label, r["rps"], r["p50"], r["p99"], r["errors"]))
        print("download %.0f MB/s" % curl_download(url + "big", HOST, big_sha, work)["MBps"])
        return
    py_port = start_python_origin()
    ssh_port, ssh_py_port, ssh_procs = start_ssh(work, nginx_port, py_port)
    ha_port, ha_py_port, _ = start_haproxy(work, nginx_port, py_port)
    q_http, _, q_relay, q_client, q_route = start_tunnel(nginx_port, output="quiet")
    w_http, _, w_relay, w_client, w_route = start_tunnel(nginx_port, websocket=True)
    for r in (route, q_route, w_route):
        expose(r, py_port, "pyorigin")
    idle = {"relay": rss_kib(relay.pid), "client": rss_kib(client.pid),
            "pss": pss_kib(relay.pid) + pss_kib(client.pid), "bare": bare_interpreter_kib()}
    local = "http://127.0.0.1:%d/"
    # key: (url, Host, no-NODELAY origin's url, its Host)
    paths = {"direct": (local % nginx_port, None, local % py_port, None),
             "haproxy": (local % ha_port, None, local % ha_py_port, None),
             "ssh": (local % ssh_port, None, local % ssh_py_port, None),
             "default": (local % t_http, HOST, local % t_http, "pyorigin.localhost"),
             "quiet": (local % q_http, HOST, local % q_http, "pyorigin.localhost"),
             "ws": (local % w_http, HOST, local % w_http, "pyorigin.localhost")}
    sides = {"default": (relay, client), "quiet": (q_relay, q_client),
             "ws": (w_relay, w_client)}
    peaks = {key: PeakRSS([p.pid for p in procs]) for key, procs in sides.items()}
    results = {key: {} for key, _ in ROWS}
    # The wrk runs: the rows take turns, `rounds` times, and each reports its median run
    # (by rps for the throughput runs, by p99 for the latency ones), so a slow spell of
    # this shared machine does not land on one row only.
    runs: dict = {(key, kind): [] for key, _ in ROWS for kind in KINDS}
    runs["origin alone"] = []
    for i in range(rounds):
        print("wrk runs, round %d of %d ..." % (i + 1, rounds), flush=True)
        for key, _ in ROWS:
            url, host, py_url, py_host = paths[key]
            runs[key, "c1"].append(wrk(url + "small", 1, secs, host))
            with peaks[key].sampling() if key in peaks else contextlib.nullcontext():
                runs[key, "c50"].append(wrk(url + "small", 50, secs, host))
            runs[key, "split"].append(wrk(url + "split/small", 1, secs, host))
            runs[key, "nagle"].append(wrk(py_url + "small", 1, secs, py_host))
            runs[key, "fair"].append(fairness(url, host, secs))
        runs["origin alone"].append(acking_p99(py_port, secs))
    origin_alone = sorted(runs.pop("origin alone"))[rounds // 2]
    for (key, kind), rs in runs.items():
        by = "rps" if kind in ("c1", "c50") else "p99"
        median = sorted(rs, key=lambda r: r[by])[len(rs) // 2]
        results[key][kind] = dict(median, errors=sum(r["errors"] for r in rs),
                                  worst_p99=max(r["p99"] for r in rs))
    results["origin alone"] = origin_alone
    for key, (r_proc, c_proc) in sides.items():
        results[key]["peak"] = {"relay": peaks[key].peak[r_proc.pid],
                                "client": peaks[key].peak[c_proc.pid],
                                "sum": peaks[key].peak_sum,
                                "pss": pss_kib(r_proc.pid) + pss_kib(c_proc.pid)}
    for key, label in ROWS:
        url, host = paths[key][:2]
        r = results[key]
        print("256 MiB down and up, %s ..." % label, flush=True)
        r["down"] = best_of(2, lambda: curl_download(url + "big", host, big_sha, work))
        r["up"] = best_of(2, lambda: curl_upload(
            url, host, os.path.join(work, "www", "big"), big_sha, work, key + ".bin"))
    ssh_rss = sum(rss_kib(p) for p in [ssh_procs[1].pid] + children(ssh_procs[0].pid))
    lines = report(results, origin_alone, secs, rounds, load_start)
    with open(client.out_path, "rb") as f:
        logged = sum(1 for _ in f) - 1

    print("measuring memory with a clean interpreter (a venv without site-packages) ...",
          flush=True)
    clean = clean_python(work)
    c_http, _, c_relay, c_client, _ = start_tunnel(nginx_port, clean)
    peak = PeakRSS([c_relay.pid, c_client.pid])
    with peak.sampling():
        c50 = wrk("http://127.0.0.1:%d/small" % c_http, 50, secs, HOST)
    clean_res = {"relay": peak.peak[c_relay.pid], "client": peak.peak[c_client.pid],
                 "sum": peak.peak_sum, "bare": bare_interpreter_kib(clean),
                 "errors": c50["errors"]}
    for p in (c_client, c_relay):
        p.terminate()
        p.wait()

    print("holding 1,000 idle visitor connections ...", flush=True)
    before = rss_kib(relay.pid) + rss_kib(client.pid)
    socks = hold_idle(t_http, HOST, 1000)
    held = rss_kib(relay.pid) + rss_kib(client.pid)
    for s in socks:
        s.close()

    n = 100 if quick else SCALE_TUNNELS
    print("connecting %d tunnel clients to a new relay ..." % n, flush=True)
    s_control, s_relay = start_tunnel(nginx_port, output="quiet")[1:3]
    relay_before = rss_kib(s_relay.pid)      # with its first client (the bench tunnel)
    loop, up, elapsed = scale(s_control, n)
    relay_scaled = rss_kib(s_relay.pid)
    loop.close()

    mib = lambda kib: kib / 1024.0  # noqa: E731
    t = results["default"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines += [
        "- %s memory: relay + client peak at 50 connections (access log on, `%s`, "
        "sampled every 10 ms) %.1f MiB (relay %.1f, client %.1f; aim <= %.0f MiB)"
        % (verdict(mib(t["peak"]["sum"]) <= AIM_PEAK_MIB), sys.executable,
           mib(t["peak"]["sum"]), mib(t["peak"]["relay"]), mib(t["peak"]["client"]),
           AIM_PEAK_MIB),
        "- %s memory: 1,000 idle keep-alive visitors add %.1f MiB (relay + client; aim "
        "<= %.0f MiB)" % (verdict(mib(held - before) <= AIM_IDLE_VISITORS_MIB),
                         mib(held - before), AIM_IDLE_VISITORS_MIB),
        ("- %s memory: %d tunnel clients on a new relay (%d connected in %.2f s): relay RSS "
         "%.1f -> %.1f MiB (aim <= %.0f MiB)" % (
             verdict(mib(relay_scaled) <= AIM_TUNNELS_MIB and up == n) if n == SCALE_TUNNELS
             else "n/a (--quick)", n, up, elapsed, mib(relay_before), mib(relay_scaled),
             AIM_TUNNELS_MIB)),
        "", "Memory (RSS) in detail:", "",
        "- idle: relay %.1f MiB, client %.1f MiB (PSS of both: %.1f MiB; RSS counts the "
        "shared libpython/libcrypto pages twice); this Python doing nothing has %.1f MiB"
        % (mib(idle["relay"]), mib(idle["client"]), mib(idle["pss"]), mib(idle["bare"])),
        "- peak at 50 connections, relay + client: "
        + ", ".join("%s %.1f MiB" % (key, mib(results[key]["peak"]["sum"]))
                    for key in TUNNEL_ROWS),
        "- the same load with a clean interpreter (a venv without site-packages; bare "
        "%.1f MiB): relay %.1f MiB, client %.1f MiB, together %.1f MiB, errors %d"
        % (mib(clean_res["bare"]), mib(clean_res["relay"]), mib(clean_res["client"]),
           mib(clean_res["sum"]), clean_res["errors"]),
        "- ssh -R (ssh client + sshd session) after its runs: %.1f MiB" % mib(ssh_rss),
        "- the default client's stdout file: %d access-log lines" % logged]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "latest.md"), "w") as f:
        f.write(text + "\n")


def report(res, origin_alone, secs, rounds, load_start):
    """The table, the ratios and issue 16's targets as PASS/FAIL lines (memory's are
    added by run())."""
    lines = ["", "## Results (wrk -t1, %ds per run, median of %d for every wrk column, "
             "nginx origin, 100-byte file; 256 MiB best of two, SHA-256; %s; load average "
             "%.2f at the start, %.2f after the wrk runs)"
             % (secs, rounds, time.strftime("%Y-%m-%d"), load_start, os.getloadavg()[0]), "",
             "| path | 1 conn rps | 1 conn p99 | 50 conn rps | 50 conn p99 | split p99 | "
             "no-NODELAY origin p99 | 256 MiB down | 256 MiB up | p99 under bulk | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in ROWS:
        r = res[key]
        errors = sum(r[k]["errors"] for k in KINDS)
        ok = r["down"]["ok"] and r["up"]["ok"]
        lines.append("| %s | %.0f | %.2f ms | %.0f | %.2f ms | %.2f ms | %.2f ms | %.0f MB/s | "
                     "%.0f MB/s | %.2f ms | %d%s |" % (
                         label, r["c1"]["rps"], r["c1"]["p99"], r["c50"]["rps"],
                         r["c50"]["p99"], r["split"]["p99"], r["nagle"]["p99"],
                         r["down"]["MBps"], r["up"]["MBps"], r["fair"]["p99"], errors,
                         "" if ok else ", BYTES WRONG"))
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    d, ha, s, t, q = (res[k] for k in ("direct", "haproxy", "ssh", "default", "quiet"))
    lines += ["", "| ratio | 1 conn rps | 50 conn rps | download | upload |",
              "|---|---|---|---|---|"]
    for key, label in ROWS[3:]:
        for base_key, base in (("ssh", "ssh -R"), ("haproxy", "haproxy"),
                               ("direct", "direct")):
            r, b = res[key], res[base_key]
            lines.append("| %s / %s | %.2f | %.2f | %.2f | %.2f |" % (
                key, base, ratio(r["c1"]["rps"], b["c1"]["rps"]),
                ratio(r["c50"]["rps"], b["c50"]["rps"]),
                ratio(r["down"]["MBps"], b["down"]["MBps"]),
                ratio(r["up"]["MBps"], b["up"]["MBps"])))
    lines += ["", "Issue 16's targets (default = as a user runs it, quiet = `-q` on both "
              "sides):", ""]
    lines.append("- %s default c50 / ssh -R c50 = %.2f (aim >= %.1f)" % (
        verdict(ratio(t["c50"]["rps"], s["c50"]["rps"]) >= AIM_DEFAULT_VS_SSH),
        ratio(t["c50"]["rps"], s["c50"]["rps"]), AIM_DEFAULT_VS_SSH))
    lines.append("- %s quiet c50 / haproxy c50 = %.2f (aim >= %.1f)" % (
        verdict(ratio(q["c50"]["rps"], ha["c50"]["rps"]) >= AIM_QUIET_VS_HAPROXY),
        ratio(q["c50"]["rps"], ha["c50"]["rps"]), AIM_QUIET_VS_HAPROXY))
    lines.append("- %s quiet c1 / ssh -R c1 = %.2f (aim >= %.1f)" % (
        verdict(ratio(q["c1"]["rps"], s["c1"]["rps"]) >= AIM_QUIET_C1_VS_SSH),
        ratio(q["c1"]["rps"], s["c1"]["rps"]), AIM_QUIET_C1_VS_SSH))
    for way in ("down", "up"):
        lines.append("- %s 256 MiB %s: default %.0f MB/s, quiet %.0f MB/s, haproxy %.0f MB/s "
                     "(default / haproxy %.2f, aim >= 1.0)" % (
                         verdict(t[way]["MBps"] >= ha[way]["MBps"]), way, t[way]["MBps"],
                         q[way]["MBps"], ha[way]["MBps"],
                         ratio(t[way]["MBps"], ha[way]["MBps"])))
    for key in TUNNEL_ROWS:
        r = res[key]
        worst = max(r["c1"]["worst_p99"], r["split"]["worst_p99"])
        lines.append("- %s %s: c1 p99 and split p99 in every run < %.0f ms (worst run: c1 "
                     "%.2f ms, split %.2f ms)" % (
                         verdict(worst < AIM_P99_MS), key, AIM_P99_MS,
                         r["c1"]["worst_p99"], r["split"]["worst_p99"]))
    for key in TUNNEL_ROWS:
        r = res[key]
        lines.append("- %s %s: p99 under a bulk download / unloaded = %.2f ms / %.2f ms = "
                     "%.2f (aim <= %.0f)" % (
                         verdict(ratio(r["fair"]["p99"], r["c1"]["p99"]) <= AIM_FAIR), key,
                         r["fair"]["p99"], r["c1"]["p99"],
                         ratio(r["fair"]["p99"], r["c1"]["p99"]), AIM_FAIR))
    errors = sum(res[key][k]["errors"] for key, _ in ROWS for k in KINDS)
    ok = all(res[key][w]["ok"] for key, _ in ROWS for w in ("down", "up"))
    lines.append("- %s errors %d, every 256 MiB transfer's SHA-256 %s" % (
        verdict(errors == 0 and ok), errors, "right" if ok else "WRONG"))
    lines += ["", "The no-NODELAY origin alone, read by a client that ACKs every read at once "
              "(so Nagle costs nothing there): p99 %.2f ms (median of %d)."
              % (origin_alone, rounds), ""]
    return lines


def drain_cost(work, secs, rounds):
    """The default client with its stdout going to a file against the same client with
    its stdout in a pipe that a thread of this process drains (as bench/run.py did
    before), and ssh -R, taking turns: what draining in the benchmark costs."""
    print("preparing nginx, sshd and two default tunnels on 127.0.0.1 ...", flush=True)
    py_compile.compile(TUNNEL_PY, doraise=True)
    nginx_port, _ = start_nginx(work, with_big=False)
    ssh_port = start_ssh(work, nginx_port)[0]
    rows = [("ssh -R", "http://127.0.0.1:%d/" % ssh_port, None)]
    for label, output in (("stdout to a file", "file"),
                          ("stdout to a pipe drained by a thread here", "pipe")):
        rows.append((label, "http://127.0.0.1:%d/" % start_tunnel(
            nginx_port, output=output)[0], HOST))
    runs = {(label, kind): [] for label, _, _ in rows for kind in ("c50", "c1")}
    own = {label: [] for label, _, _ in rows}   # this process's CPU us per request, c50

    def cpu_self():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    for i in range(rounds):
        print("round %d of %d ..." % (i + 1, rounds), flush=True)
        for label, url, host in rows:
            before = cpu_self()
            r = wrk(url + "small", 50, secs, host)
            own[label].append((cpu_self() - before) * 1e6 / max(1, r["requests"]))
            runs[label, "c50"].append(r)
            runs[label, "c1"].append(wrk(url + "small", 1, secs, host))
    res = {label: {kind: sorted(runs[label, kind], key=lambda r: r["rps"])[rounds // 2]
                   for kind in ("c50", "c1")} for label, _, _ in rows}
    lines = ["", "## The default client's stdout: a file against a pipe drained here "
             "(wrk -t1, %ds, median of %d; %s; load average %.2f at the end)"
             % (secs, rounds, time.strftime("%Y-%m-%d"), os.getloadavg()[0]),
             "", "| path | 50 conn rps | 1 conn rps | 50 conn / ssh -R | 1 conn / ssh -R | "
             "this process's CPU per request at 50 conn | errors |",
             "|---|---|---|---|---|---|---|"]
    s = res["ssh -R"]
    for label, _, _ in rows:
        r = res[label]
        lines.append("| %s | %.0f | %.0f | %.2f | %.2f | %.1f us | %d |" % (
            label, r["c50"]["rps"], r["c1"]["rps"], r["c50"]["rps"] / s["c50"]["rps"],
            r["c1"]["rps"] / s["c1"]["rps"], sorted(own[label])[rounds // 2],
            sum(x["errors"] for k in ("c50", "c1") for x in runs[label, k])))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
