#!/usr/bin/env python3
"""tunnel.py -- expose a local port through a relay you host yourself.

One file, standard library only.  The same module is the *relay* (run it on a
machine with a public address) and the *client* (run it next to the service
you want to share)::

    relay$   python3 tunnel.py serve --domain example.com
    laptop$  python3 tunnel.py expose 5000 --relay example.com:7835 --token T
    Forwarding http://brave-otter-17.example.com -> http://127.0.0.1:5000
    lab$     HTTPS_PROXY=http://proxy:3128 python3 tunnel.py expose 5000 \
                 --relay https://example.com --token T    # only 443, through a proxy

Picture::

      visitor (browser, curl)                 private machine
           |                                 +----------------------+
           | HTTP, Host: NAME.DOMAIN         |  tunnel.py expose    |
           v                                 |   (client)           |
    +-------------------+   one TCP control  |      |               |
    | tunnel.py serve   |<===================|      v               |
    |   (relay)         |  socket, framed,   |  127.0.0.1:5000      |
    |  :8080 visitors   |  many streams      |  (your service)      |
    |  :7835 clients    |                    +----------------------+
    +-------------------+   (or that socket as a WebSocket on :8080 or
                             HTTPS :443, GET /_tunnel: one port for all)

The client dials *out* to the relay's control port (so it works from behind
NAT and firewalls), proves it holds the shared token, and claims a name.  Each
visitor connection to ``NAME.DOMAIN`` becomes one *stream* multiplexed over that
single control socket; the client opens a fresh connection to the local target
for every stream and copies bytes both ways.  The relay parses every HTTP
request on a visitor connection (routing by ``Host``, rejecting ambiguous
framing, replacing ``X-Forwarded-*``) and every response (to find message
boundaries, spot ``101 Switching Protocols`` and write an access log).  Bodies
are streamed, never buffered whole.

Theory of operation: one request, and its response, through both event loops
(each side runs one ``EventLoop``; a ready socket calls its ``Conn``'s
``on_read``/``on_write``, which the selector key's data names)::

    relay    Listener.on_read -> Relay._accept_visitor -> VisitorConn
             VisitorConn.on_read (Pipe) -> on_socket_data -> HTTPParser.feed
               -> _handle_requests -> _forward_head: Relay.route (Host -> name),
                  tunnel_for, _check_access (AccessPolicy), Session.open_stream
                  (OPEN) and the rewritten head, Stream.write -> DATA frames
             Session.flush (once per loop turn) -> the control socket
    client   Session.on_read -> FrameDecoder.feed -> Session._dispatch
               OPEN -> Session._on_open -> Client.on_stream_open -> TargetConn
                  (its Dialer: connect, TLS)
               DATA -> Stream._on_data -> TargetConn.on_stream_data -> origin
             TargetConn.on_read (Pipe) -> Stream.write -> DATA (WINDOW as it drains)
    relay    Session._dispatch -> Stream._on_data -> VisitorConn.on_stream_data
               -> send_bytes (to the visitor), HTTPParser.feed of the response
               -> _on_response_head (101: a raw pipe from here) and
                  _on_response_end -> Session.send_log (LOG)
    client   Session._on_log -> Client.on_access_log -> AccessConsole (AccessSummary:
               a line a request, or a summary line a second when busy)

With ``expose --inspect`` the client's TargetConn is an InspectedTarget: it hands a copy
of both directions to an InspectCapture (a request and a response HTTPParser, as the
relay has) before passing them on, and the Inspector keeps the last requests and serves
a page and a JSON API from the same loop (see "Inspector"); without it, nothing changes.

A connection ends in ``Conn._leave`` (closed by ``close_socket`` or handed on by
``detach``), which runs its ``connection_lost`` once: the selector key goes, what it
holds is released (a Pipe's stream is finished by ``Pipe.finish`` or reset by
``abort`` before); flow control is ``Stream.consumed`` (WINDOW) and
the session's budget (below).  Socket plumbing (``Listener``, ``Lingering``,
``TLSChannel``, ``WSChannel``, ``TLSHandshake``, ``Dialer``) sits together in
"Event loop and socket plumbing"; the codecs above it touch no socket.

The control channel is TLS by default.  A relay without ``--tls-cert`` makes its
own Ed25519 key and self-signed certificate on first start (standard library
only: ``ed25519_sign``, ``self_signed_certificate``), keeps them in its state
directory (``--state-dir``, mode 0600) and prints the SHA-256 fingerprint.  No CA
is needed: the handshake binds the certificate each side saw.  Plain TCP is an
explicit ``--plaintext`` on both sides, warned about.  The control channel's TLS
runs through ``TLSChannel`` (an ``ssl.SSLObject`` over memory BIOs): one system
call per read or write, as on plain TCP, where ``ssl.SSLSocket`` would make two
per 16 KiB record.

Where only the web ports get out, a client reaches the relay on its visitor
port instead: a WebSocket upgrade (RFC 6455) of ``GET /_tunnel`` on the bare
relay domain (or any Host that is not ``NAME.DOMAIN``: an address, a load
balancer's name), answered ``101``, after which the same control connection runs
inside binary frames (``WSChannel``: masked from the client, ping/pong, close and
fragmented messages handled; message boundaries mean nothing, it is one byte
stream).  The subprotocol says where TLS is: ``tunnel.py.2.tls`` runs TLS with
the control certificate inside the WebSocket (the plain HTTP port), and
``tunnel.py.2`` the tunnel protocol straight inside, TLS being outside (the
HTTPS port, whose certificate is then the binding, or a TLS proxy in front,
declared with ``--tls-proxy-fingerprint``).  The path obeys the control port's
handshake timeout, caps and failed-handshake penalties (at most WS_PREAUTH_FRAMES
frames before the session is up; behind ``--trusted-proxy`` a client counts by
X-Forwarded-For); without an upgrade it is an ordinary 404, a browser's upgrade
(Origin) is 403, and ``NAME.DOMAIN/_tunnel`` is just a path of tunnel NAME, to
which an upgrade offering our subprotocols is refused (never handed to that
tunnel's owner).
``serve --control-port off`` leaves only the visitor port(s).

The client's way out is one ``Dialer`` (used for every stream's target too: no
stages, or TLS for an ``https://`` TARGET, checked unless ``--target-insecure``): TCP
to each address of the first hop in turn, then its stages, each within
``--connect-timeout``::

    [TLS to an https:// proxy] -> CONNECT or SOCKS5 through the proxy
      -> by --relay:  HOST:PORT    TLS (the channel)
                      https://     TLS (the channel), WebSocket upgrade
                      http://      WebSocket upgrade, TLS inside (the channel)

The proxy comes from ``--proxy`` or, by curl's rules, ``HTTPS_PROXY`` (https://
relays), ``HTTP_PROXY`` (http://), ``ALL_PROXY`` (any, the control port too),
with ``NO_PROXY`` honoured (``proxy_for``); ``socks5://`` resolves the relay's
name here, ``socks5h://`` lets the proxy do it.  The proxy's codecs are pure
(``connect_request``, ``ConnectReply``, ``Socks5Handshake``); its refusals are one
line and a retry, except a 407 or a SOCKS credential failure, which are
configuration errors (exit status 2; ``ProxyError.fatal``).  So is a relay URL
answered with a 3xx (its Location named) or a 4xx but 408/429 (the start of the
relay's body in the line) the same way three times in a row before the tunnel was
ever up (UPGRADE_REFUSALS_FATAL: the answer is not authenticated); a 5xx, 408 or
429 is retried (``Dialer._upgrade_refused``, DIAL_REFUSED).

Handshake, inside TLS (over TCP or in the WebSocket; client C, relay R, token K;
the token never crosses)::

    C -> R  preamble  b"TUNNEL" + u16 version          (8 bytes; version 2)
    C -> R  HELLO     client nonce Nc                   (32 random bytes)
    R -> C  CHALLENGE relay nonce Nr                    (32 random bytes)
    C -> R  AUTH      Mc + request JSON                 {"subdomain", "version", "user",
                                                         "log", "log_upgrades", "log_batch",
                                                         "binding",
                                                         "sealed", "tls_interception",
                                                         "host_header", "target_origin"}
            binding = hex SHA-256 of the relay certificate C saw ("" over plain TCP)
            sealed  = base64(JSON {"access", "client_secret"} XOR HMAC-SHA256 key
                      stream under S), S = HMAC-SHA256(K, "tunnel.py/1 seal" 0 Nc Nr)
            Mc = HMAC-SHA256(K, "tunnel.py/1 client" 0 Nc Nr request)
    R -> C  WELCOME   Mr + welcome JSON                 {"name", "url", "heartbeat_interval"}
            Mr = HMAC-SHA256(K, "tunnel.py/1 relay" 0 Nr Nc Mc welcome)
       or   REFUSE    JSON {"error": CODE, "message": TEXT}   (codes: REFUSALS)

Both sides check the other's MAC with ``hmac.compare_digest``, so each knows
the other holds K.  The relay then checks ``binding`` against its own
certificate (the ``tls-server-end-point`` idea of RFC 5929): a man in the
middle that terminates TLS shows the client another certificate, so the relay
refuses with ``binding`` and logs it, and the client (which cannot be shown a
WELCOME without K, and whose Mr covers Mc and so the binding) exits with status
2 naming the certificate it saw.  Once bound, the TLS session is known to end at
the relay, which protects everything after the handshake.  A TLS-terminating
proxy in front of the relay is declared on the relay (``--tls-proxy-fingerprint``),
a TLS-inspecting middlebox on the client (``--tls-interception``, logged by the
relay); neither is ever a silent downgrade, since the request that says so is
under Mc.  The sealed part (the visitor policy and a per-client secret) opens
only with K and both nonces, so a middlebox that sees AUTH learns nothing to
crack offline; a plain-TCP client never sends visitor credentials to a relay
off loopback at all.  The client secret's SHA-256 is what a name reservation is
bound to: after a drop, a name is kept 60 s (NAME_RESERVATION) for that client
(or, with ``--tokens``, that user), not for any holder of a shared token; a
client that says goodbye (GOAWAY) frees its name at once.

On a relay with per-user tokens (``serve --tokens``) the request names its user
and K is that user's token; an unknown user is checked against a random key,
so the refusal is the same.  Failures count per (source, user) (an IPv6 source
is its /64): refusals grow slower (0.25 s, doubling) and end in a temporary ban,
which is checked when AUTH arrives, before its MAC is looked at.  ``access`` is
the visitor policy the relay enforces for this tunnel: a basic-auth user with a
PBKDF2 hash (never the password; 1,000-600,000 iterations, checked off the
event loop), the SHA-256 of a visitor token, allow/deny CIDR lists.  Handshake
JSON is bounded in size (4 KiB) and depth (MAX_JSON_CONTAINERS) before parsing.

Frames (after the preamble, everything on the control socket is a frame)::

    +--------+--------+----------------+----------------+----------...
    | type 1 | flags 1| stream id 4    | length 4       | payload
    +--------+--------+----------------+----------------+----------...
    network byte order; length <= MAX_FRAME_PAYLOAD (handshake: 4 KiB)

    type       stream  payload                       meaning
    ---------  ------  ----------------------------  ------------------------
    1 HELLO      0     nonce                         handshake, see above
    2 CHALLENGE  0     nonce
    3 AUTH       0     MAC + JSON
    4 WELCOME    0     MAC + JSON
    5 REFUSE     0     JSON
    6 OPEN       id    JSON {"peer", "host",         relay opens a stream and
                       "window"}                     grants "window" bytes of credit
    7 DATA       id    bytes                         counts against the window
    8 WINDOW     id    u32 increment                 grant send credit
    9 FIN        id    -                             half-close: no more DATA
   10 RST        id    reason text                   abort the stream
   11 PING       0     8 random bytes; flag ACK=1    heartbeat and RTT probe
   12 GOAWAY     0     u32 code + reason text        sender is shutting down
   13 LOG        id    u16 status, u32 us, u64 bytes, one finished request,
                       "METHOD target"               for the client's log
                       flag UPGRADED=2: u64 bytes    an upgraded connection's end (to
                       in after the u64 bytes out;   clients that asked: "log_upgrades");
                       flag WEBSOCKET=4              status 101, duration and bytes from
                                                     the request to the close
                       flag BATCH=8 (id 0): u16 k,   the requests of one loop turn in one
                       k records of u16 status, u32  frame (to clients that asked:
                       us, u64 bytes, u16 n; then    "log_batch"); an upgraded end keeps
                       the k texts ("METHOD target",  its own frame
                       n bytes each), in order

Streams are opened only by the relay, with increasing ids.  A frame for a
stream id that was never opened, an unknown type, an over-long frame or a
flow-control violation is a protocol error: that session is closed with a
logged reason, other sessions are untouched.  Frames for a stream that was
already closed or reset are dropped silently (they may have crossed a RST).

Flow control (in the spirit of yamux): each direction of each stream starts
with INITIAL_WINDOW bytes of credit, except the client's: the relay announces
it in OPEN ("window", 1..INITIAL_WINDOW, else a protocol error), out of what
the session's budget has left, down to MIN_INITIAL_WINDOW once it is spent, so
stalled streams hold at most the budget plus that floor each.  (The client's
grant to the relay stays implicit, so a hostile relay can make a client hold
up to MAX_STREAMS x INITIAL_WINDOW.)  A sender stops reading its socket when
the credit is spent; the receiver grants more (WINDOW) as it writes the data
out to its own socket, so memory per stream is bounded by the window.  A
stream whose grants come less than two round trips apart (the interval
smoothed, so that a burst of quick grants does not count; the round trip is
the least of the last few PINGs, so that one stuck behind bulk data does not
count either, and at most MAX_RTT) is window-bound, and its window doubles, up
to MAX_WINDOW, but only within the session's budget: the receive windows of
all streams of a session together stay within SESSION_BUDGET (``serve
--session-budget``), so stalled streams hold at most that, not MAX_WINDOW each.
Every byte of window is a byte of queue in front of the session's other
streams, so it grows only when the peer really waits for credit, and while
other streams of the session move data too (within ACTIVITY_WINDOW) it shrinks
toward two bandwidth-delay products (rate times round trip, at least
SHARED_WINDOW) by granting back less than was consumed.  When the control
socket's own output queue passes SESSION_HIGH_WATER every stream of that
session stops reading until it drains, so one bulk stream cannot build a
queue in front of the others (no read or write takes DATA past that mark).
Above SESSION_READ_PAUSE (far above what an honest peer makes it queue) the
control socket itself is not read until the queue is below
SESSION_READ_RESUME: a peer that sends (PINGs, say) and never reads cannot make
us queue answers without bound.  A client accepts at most MAX_STREAMS streams.

Both sides send PING every heartbeat interval (a random payload, timed on the
sender's clock) and declare the session dead after the heartbeat timeout
without any incoming frame (or with its input paused).  LOG frames are sent
only to clients that asked for them in the handshake ("log": true).

Visitor HTTP at the relay (RFC 9110/9112): every request on a connection is
parsed.  Ambiguous framing is refused with 400 and never forwarded (both
Content-Length and Transfer-Encoding, differing lengths, a coding list other
than one chunked (other codings: 501), chunk sizes over 10 hex digits or
chunk lines off the RFC 9112 grammar (no whitespace, no bare ";"), obs-fold,
whitespace before a colon, control bytes, raw non-ASCII in the request line,
a missing, empty or duplicate Host, an absolute-form target naming another
host).  A chunked request reaches the origin with one plain
``Transfer-Encoding: chunked``.  Hop-by-hop fields go; every forwarding field
(any case, "_" read as "-": Forwarded, X-Forwarded-*, X-Real-IP,
X-Client-IP, True-Client-IP, CF-Connecting-IP, ...) is dropped and the relay
adds its own X-Forwarded-For/-Proto/-Host and Forwarded; the other fields are
forwarded byte for byte.  The body bytes of one read go out as one DATA frame,
however small its chunks.  The field patterns run in linear time (no lazy
repeats), so a hostile head costs milliseconds, not the loop.  Heads are
limited (64 KiB, 431; request line 8 KiB, 414; 100 fields, 431) and must
arrive within the head timeout (408), a body must keep moving (1 KiB per
body timeout, 408), a visitor must take the bytes waiting for it (send
timeout); idle keep-alive connections are closed; caps answer 503, per source
address (an IPv6 source is its /64) as well as per tunnel and in total.
Requests on one connection must name one tunnel (421 otherwise); responses
come back in order.  ``Connection: Upgrade`` requests become a raw two-way pipe once the
origin answers 101.  Relay-made answers use a lingering close so the visitor
reads them even while still sending.

For the relay's operator: ``serve --admin [HOST:]PORT`` serves ``/status`` (a page, or
``?format=json``: tunnels, reservations, refusals, bans) and ``/metrics`` (Prometheus
text format) from the same loop (``RelayAdmin``; loopback unless told otherwise, and
off loopback only with ``--admin-token``, a Bearer token); ``serve --access-log
FILE|-`` writes a line per visitor request (``AccessLog``: Combined Log Format with the
tunnel's name first, or ``--log-format json``).  Both count only what the relay
already looks at: a response's status where its end is found, a stream's bytes when
its visitor connection ends.

Run ``python3 tunnel.py --help`` for the command line.
"""

from __future__ import annotations

import os
import sys

# -- Start-up memory: a re-exec and malloc_trim, which only work as a pair -----------
# Run as ``python3 tunnel.py``, CPython compiles the whole script and keeps its parse
# tree (about 8 MiB) until the script ends, which for a relay is never; an *import*
# frees it after compiling.  So ``serve`` and ``expose`` hand over at once, before the
# module body runs, to a fresh interpreter that imports this file as a module
# (``python3 FLAGS -c _REEXEC tunnel.py ARGS``: same process id, interpreter flags from
# ``sys.orig_argv`` (3.10+), exit status; later starts load the bytecode the import
# caches in __pycache__, 2 MiB less again).  Freed, those pages still sit in the C
# heap: ``release_free_memory`` (glibc's malloc_trim, called by main) gives them back
# to the system.  Either one alone saves little.  TUNNEL_NO_REEXEC=1 turns the re-exec
# off (profilers, debuggers); Python 3.9, Windows and ``python -m tunnel`` run in place.
# Ctrl-C before main installs its handlers exits 0 quietly, here and in the stub.
# (-c puts the working directory first in sys.path, a script its own directory: the
# stub puts the script's back before it imports anything that is not loaded yet.)
_REEXEC = ("import os, sys; sys.path[:1] == [''] and sys.path.__setitem__(0, "
           "os.path.dirname(sys.argv[1])); import signal, importlib.util as u; "
           "signal.signal(signal.SIGINT, lambda *a: os._exit(0)); "
           "s = u.spec_from_file_location('tunnel', sys.argv.pop(1)); "
           "m = sys.modules['tunnel'] = u.module_from_spec(s); s.loader.exec_module(m); "
           "sys.exit(m._script_main())")


# The child starts with -S as well: no site-packages on sys.path and none of their .pth
# files run.  The tool imports only the standard library, but a .pth may import a lot
# (a CA bundle's certifi pulls in importlib.resources, pathlib, zipfile, typing: 80
# modules and about 2 MiB per process on this kind of machine).  Some .pth files matter
# to TLS, though (truststore, pip-system-certs, a sandbox's egress CA put the corporate
# CA in the system store), so ``load_site`` runs them after all, once, before the first
# TLS context that trusts the system store.  The module learns that it owes the site
# from _DEFERRED_SITE_ENV (a -S of the user's own is not ours to undo) and takes it out
# of the environment again.
_DEFERRED_SITE_ENV = "TUNNEL_DEFERRED_SITE"
_site_deferred = os.environ.pop(_DEFERRED_SITE_ENV, "") == "1"


def load_site() -> None:
    """Run the site module's start-up now if the re-exec put it off (-S): site-packages
    on sys.path, their .pth files, sitecustomize.  Once; nothing otherwise."""
    global _site_deferred
    if _site_deferred:
        _site_deferred = False
        import site
        site.main()


def _reexec_as_module() -> None:
    """Replace this process with ``python FLAGS -c _REEXEC tunnel.py ARGS`` if possible."""
    orig = getattr(sys, "orig_argv", None)
    if os.name != "posix" or not orig or not sys.executable or __spec__ is not None:
        return
    script = os.path.abspath(sys.argv[0])
    try:
        at = orig.index(sys.argv[0], 1)      # interpreter flags come before the script
    except ValueError:
        return
    if not os.path.isfile(script) or orig[at + 1:] != sys.argv[1:]:
        return
    flags = orig[1:at]
    env = os.environ
    if not sys.flags.no_site:                # -S: site-packages wait for load_site()
        flags = flags + ["-S"]
        env = dict(env, **{_DEFERRED_SITE_ENV: "1"})
    try:
        os.execve(sys.executable, [sys.executable] + flags + ["-c", _REEXEC, script]
                  + sys.argv[1:], env)
    except OSError:
        pass                                 # run in this interpreter after all


if __name__ == "__main__":
    import signal as _signal                 # (_script_main puts Python's handler back)
    _signal.signal(_signal.SIGINT, lambda signum, frame: os._exit(0))
    if sys.argv[1:2] in (["serve"], ["expose"]) and not os.environ.get("TUNNEL_NO_REEXEC"):
        _reexec_as_module()

import argparse
import collections
import enum
import errno
import functools
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import operator
import random
import re
import secrets
import selectors
import signal
import socket
import struct
import threading
import time
TYPE_CHECKING = False   # typing costs 2 MiB at run time; annotations are strings anyway
if TYPE_CHECKING:
    from typing import (Any, Callable, Collection, Deque, Dict, FrozenSet, List, Mapping,
                        Optional, Tuple, Type)

__version__ = "0.1.0"

log = logging.getLogger("tunnel")
log.addHandler(logging.NullHandler())   # imported as a library: quiet unless configured

# =============================================================================
# Constants
# =============================================================================

# -- wire format --------------------------------------------------------------
MAGIC = b"TUNNEL"                       # first bytes a client sends
PROTOCOL_VERSION = 2                    # bumped on any incompatible change (2: binding, seal)
PREAMBLE = struct.Struct("!6sH")        # magic, version
FRAME_HEADER = struct.Struct("!BBII")   # type, flags, stream id, payload length
MAX_FRAME_PAYLOAD = 256 * 1024          # largest payload a peer may send
MAX_HANDSHAKE_PAYLOAD = 4 * 1024        # largest payload before authentication
NONCE_SIZE = 32                         # bytes of randomness per side
MAC_SIZE = 32                           # HMAC-SHA256 digest size
MAC_LABEL = b"tunnel.py/1 "             # domain separation for the MACs
U32 = struct.Struct("!I")               # WINDOW increment, GOAWAY code
U64 = struct.Struct("!Q")               # block counter of the seal's key stream
MAX_REFUSAL_TEXT = 300                  # characters of a REFUSE's code or message shown
#                                         (and of a GOAWAY's reason)
MAX_JSON_CONTAINERS = 64                # '[' and '{' in one handshake JSON (no deep nesting)
PING_PAYLOAD = struct.Struct("!Q")      # PING payload: 8 random bytes, echoed in the ACK
LOG_RECORD = struct.Struct("!HIQ")      # status, duration in us, bytes
MAX_CREDIT = 2 ** 31 - 1                # send credit beyond this is an error
FLAG_ACK = 0x01                         # PING: this is the answer
FLAG_LOG_UPGRADED = 0x02                # LOG: an upgraded connection (101) ended; a u64
#                                         of the bytes from the visitor follows LOG_RECORD
FLAG_LOG_WEBSOCKET = 0x04               # LOG: ... and it was a WebSocket
FLAG_LOG_BATCH = 0x08                   # LOG: a u16 count, that many LOG_BATCH_RECORDs, then
#                                         their texts: one loop turn's requests (a frame
#                                         each cost a decode, a dispatch and a send; the
#                                         fixed part first: struct.iter_unpack reads it)
LOG_BATCH_RECORD = struct.Struct("!HIQH")   # status, duration in us, bytes, text length
LOG_BATCH_COUNT = struct.Struct("!H")   # records in a batch
LOG_BATCH_LIMIT = 64 * 1024             # a batch's payload: past this, the next frame
LOG_BATCH_MAX = 2 ** 16 - 1             # ... or past this many records


class FrameType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    REFUSE = 5
    OPEN = 6
    DATA = 7
    WINDOW = 8
    FIN = 9
    RST = 10
    PING = 11
    GOAWAY = 12
    LOG = 13


FRAME_TYPES = frozenset(int(t) for t in FrameType)
LOG_FRAME = struct.Struct(FRAME_HEADER.format + LOG_RECORD.format[1:])   # the two in one
LOG_TYPE = int(FrameType.LOG)           # (an int: an enum member costs a lookup a request)
LOG_RECORD_SIZE = LOG_RECORD.size

GOAWAY_NORMAL = 0                       # planned shutdown

# -- exit statuses -------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILURE = 1                        # could not listen, relay refused, ...
EXIT_USAGE = 2                          # bad command line or token rejected

# Refusal codes (the "error" of a REFUSE frame): what each means, what the client does
# about it and with which exit status it ends then.  "stop" ends the client, "first"
# ends it only if its tunnel never came up (later it is a passing state: the old session
# still holds the name), "retry" reconnects with backoff.  Unknown codes are retried.
REFUSE_STOP, REFUSE_FIRST, REFUSE_RETRY = "stop", "first", "retry"


class Refusal(collections.namedtuple("Refusal", "meaning action exit_status")):
    __slots__ = ()



REFUSED_AUTH = "auth"
REFUSED_BINDING = "binding"
REFUSED_VERSION = "version"
REFUSED_INVALID_NAME = "invalid_name"
REFUSED_NAME_NOT_ALLOWED = "name_not_allowed"
REFUSED_INVALID_ACCESS = "invalid_access"
REFUSED_INVALID_HOST_HEADER = "invalid_host_header"
REFUSED_NAME_TAKEN = "name_taken"
REFUSED_LIMIT = "limit"
REFUSED_SHUTTING_DOWN = "shutting_down"
REFUSED_BANNED = "banned"
REFUSALS: Dict[str, Refusal] = {
    REFUSED_AUTH: Refusal("the relay does not accept the token (or user)", REFUSE_STOP,
                          EXIT_USAGE),
    REFUSED_BINDING: Refusal("the relay's certificate is not the one the client saw: a "
                             "man in the middle or an undeclared TLS proxy", REFUSE_STOP,
                             EXIT_USAGE),
    REFUSED_VERSION: Refusal("the relay speaks another protocol version", REFUSE_STOP,
                             EXIT_FAILURE),
    REFUSED_INVALID_NAME: Refusal("the subdomain is not a DNS label", REFUSE_STOP,
                                  EXIT_FAILURE),
    REFUSED_NAME_NOT_ALLOWED: Refusal("the user may not use that subdomain", REFUSE_STOP,
                                      EXIT_FAILURE),
    REFUSED_INVALID_ACCESS: Refusal("the visitor access policy is malformed", REFUSE_STOP,
                                    EXIT_FAILURE),
    REFUSED_INVALID_HOST_HEADER: Refusal("the Host to send (--host-header) is not a "
                                         "HOST[:PORT]", REFUSE_STOP, EXIT_FAILURE),
    REFUSED_NAME_TAKEN: Refusal("another client holds or has reserved the name",
                                REFUSE_FIRST, EXIT_FAILURE),
    REFUSED_LIMIT: Refusal("the user has max_tunnels tunnels already", REFUSE_FIRST,
                           EXIT_FAILURE),
    REFUSED_SHUTTING_DOWN: Refusal("the relay is stopping", REFUSE_RETRY, EXIT_FAILURE),
    REFUSED_BANNED: Refusal("too many failed handshakes from this address for this user "
                            "(said once per ban)", REFUSE_RETRY, EXIT_FAILURE),
}
UNKNOWN_REFUSAL = Refusal("a code this client does not know", REFUSE_RETRY, EXIT_FAILURE)

# -- flow control and buffering -----------------------------------------------
INITIAL_WINDOW = 256 * 1024             # per-stream credit at open (while the budget has room)
MIN_INITIAL_WINDOW = 16 * 1024          # ... and once the session's budget is spent
MAX_WINDOW = 16 * 1024 * 1024           # a busy stream's window grows to this
SESSION_BUDGET = 32 * 1024 * 1024       # all receive windows of one session together
MIN_RTT = 0.0002                        # floor for the window-growth test (s)
MAX_RTT = 1.0                           # round trips longer than this count as this (s)
PINGS_OUTSTANDING = 16                  # unanswered PINGs remembered; more: forget them
GRANT_SMOOTHING = 0.25                  # weight of the newest interval between grants
RTT_SAMPLES = 6                         # the window test uses the least of this many PINGs
SHARED_WINDOW = 128 * 1024              # a stream's window while other streams are active
ACTIVITY_WINDOW = 0.1                   # a stream that moved data this recently is active (s)
SESSION_HIGH_WATER = 256 * 1024         # control output queue: pause stream readers
SESSION_LOW_WATER = 64 * 1024           # ... and resume them below this
SESSION_READ_PAUSE = 2 * 1024 * 1024    # control output queue: stop reading that socket
SESSION_READ_RESUME = 512 * 1024        # ... and read it again below this
READ_SIZE = 64 * 1024                   # bytes per recv_into: bounds one loop turn
TLS_READ_SIZE = READ_SIZE + 1024        # ciphertext per raw recv: a READ_SIZE of plaintext
TLS_WRITE_SIZE = 256 * 1024             # plaintext encrypted per send (ciphertext held: this)
ACCEPT_BATCH = 64                       # accept() calls per readable listener
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# -- HTTP limits --------------------------------------------------------------
MAX_HEAD_SIZE = 64 * 1024               # request or response head
HEAD_PROBE = 4 * 1024                   # a head found within this many bytes is not buffered
MAX_REQUEST_LINE = 8 * 1024             # longer request line: 414
MAX_HEADER_COUNT = 100                  # more fields: 431
MAX_CHUNK_LINE = 4 * 1024               # chunk-size line or trailer line
MAX_CHUNK_SIZE_DIGITS = 10              # hex digits of a request's chunk size, leading zeros
                                        # counted: chunks up to 1 TiB - 1, far above what any
                                        # sender uses, and within every origin's counter (64-bit
                                        # or a 53-bit float); longer sizes (2^64-1, zero-padded)
                                        # exist only to overflow or truncate one differently
MAX_TRAILER_SIZE = 16 * 1024            # all trailer lines together
WHOLE_RESPONSE_PROBE = 16 * 1024        # larger reads are not checked for a whole response
MAX_LOGGED_TARGET = 300                 # characters of a request target in the access log
FORWARDING_CACHE = 1024                 # (peer, host) pairs whose added fields are kept

# -- timeouts and retry (seconds) ---------------------------------------------
HEARTBEAT_INTERVAL = 10.0               # PING this often
MIN_HEARTBEAT_INTERVAL = 0.05           # ... at most this often (a smaller one is a busy loop)
MAX_SECONDS = 86400.0                   # any timeout, interval or grace: at most a day
#                                         (longer ones overflow the selector's timeout)
HEARTBEAT_TIMEOUT = 30.0                # silent this long: session is dead
HANDSHAKE_TIMEOUT = 10.0                # control connection must authenticate
CONNECT_TIMEOUT = 10.0                  # client -> relay, client -> target
NAME_RESERVATION = 60.0                 # name kept for its owner after a drop
BACKOFF_INITIAL = 0.5                   # first reconnect delay
BACKOFF_MAX = 30.0                      # reconnect delay cap
BACKOFF_JITTER = 0.2                    # delay is scaled by 1 - U(0, this)
GRACE_PERIOD = 10.0                     # in-flight work may finish this long
API_TIMEOUT = 10.0                      # tunnel.expose waits this long for the tunnel
API_CLOSE_GRACE = 1.0                   # Tunnel.close / RunningRelay.close let requests
#                                         in flight finish this long
API_KEEP_REQUESTS = 100                 # Tunnel.requests keeps the last this many
DRAIN_POLL = 0.05                       # how often a graceful stop checks for idleness
HEAD_TIMEOUT = 10.0                     # a request head must arrive whole within (408)
IDLE_TIMEOUT = 75.0                     # idle keep-alive visitor connections are closed
SWEEP_INTERVAL = 1.0                    # how often the relay checks those deadlines
LINGER_TIMEOUT = 2.0                    # after an error page: drain input this long
THROTTLE_INTERVAL = 10.0                # repeated warnings: one line per this long
BODY_TIMEOUT = 30.0                     # a request body must advance within this (408)
BODY_MIN_PROGRESS = 1024                # ... by at least this many bytes (a trickle stalls)
SEND_TIMEOUT = 60.0                     # a visitor with bytes waiting must take some within
ACCEPT_PAUSE = 0.5                      # out of descriptors (EMFILE...): stop accepting this long

# -- caps (over a cap: 503 for visitors, a refusal for clients) -----------------
MAX_VISITORS = 10000                    # visitor connections on the relay
MAX_PIPELINED = 100                     # requests of one visitor connection awaiting their
#                                         responses; more: its reading pauses until one ends
MAX_VISITORS_PER_TUNNEL = 2000          # visitor connections bound to one tunnel
MAX_STREAMS = 2000                      # open streams in one session
MAX_UNAUTHENTICATED = 64                # control connections still in the handshake
MAX_UNAUTHENTICATED_PER_SOURCE = 8      # ... of them from one source address
MAX_VISITORS_PER_SOURCE = 256           # visitor connections from one source address
MAX_VISITORS_PER_SOURCE_PER_TUNNEL = 64  # ... bound to one tunnel
IPV6_SOURCE_PREFIX = 8                  # bytes of an IPv6 address that name its source (/64)
IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"   # ::ffff:a.b.c.d, an IPv4 peer of a v6 socket

# -- control channel security (TLS by default) --------------------------------
IDENTITY_CERT = "relay-cert.pem"        # the relay's own certificate, in --state-dir
IDENTITY_KEY = "relay-key.pem"          # ... and its Ed25519 key (mode 0600)
IDENTITY_DAYS = 3650                    # validity of a generated certificate (10 years)
IDENTITY_NAME = "tunnel.py relay"       # its subject and issuer common name
STATE_DIR_ENV = "TUNNEL_STATE_DIR"      # overrides the default state directory
TLS_HANDSHAKE_RECORD = b"\x16\x03"        # a TLS record header: handshake, version 3.x
TLS_ALERT_RECORD = b"\x15\x03"            # ... an alert (what TLS servers answer HTTP with)
HTTP_RESPONSE_START = b"HTTP/"          # what an origin's first bytes must begin with
NOT_HTTP_SHOWN = 32                     # bytes of a non-HTTP origin's first answer shown
SEAL_LABEL = b"seal"                    # MAC label of the key that seals AUTH's secrets
CLIENT_SECRET_BYTES = 32                # per-client secret: binds a name reservation

# -- WebSocket transport (RFC 6455): tunnel clients on the visitor port(s) -----------
WS_PATH = "/_tunnel"                    # reserved path on the bare relay domain
WS_PROTOCOL = "tunnel.py.2"             # subprotocol: the tunnel protocol straight inside
#                                         (TLS is outside: the HTTPS port, or a TLS proxy)
WS_PROTOCOL_TLS = "tunnel.py.2.tls"     # subprotocol: TLS with the control certificate
#                                         inside, then the tunnel protocol (plain HTTP port)
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 1.3: Sec-WebSocket-Accept
WS_VERSION = "13"                       # the one Sec-WebSocket-Version there is
WS_KEY_BYTES = 16                       # Sec-WebSocket-Key: base64 of this many bytes
WS_WRITE_SIZE = TLS_WRITE_SIZE + 16 * 1024   # payload per binary frame we send: the
#                                         ciphertext of one TLS_WRITE_SIZE (its records'
#                                         overhead included) fits in one frame
WS_MIN_READ = 16 * 1024                 # raw bytes a small recv still reads (the payload
#                                         past what was asked for is kept for the next)
MAX_WS_CONTROL = 125                    # payload limit of a control frame
WS_PONG_LIMIT = WS_WRITE_SIZE + 64 * 1024   # held output past which a PING goes unanswered
#                                         (a peer that pings and never reads; RFC 6455
#                                         5.5.3 lets us answer only the latest anyway)
WS_PREAUTH_FRAMES = 64                  # frames a WebSocket may send before its session
#                                         is up (an honest handshake takes about ten): a
#                                         peer without a token costs the relay this much
WS_MASK_KEY_SIZE = 4                    # client-to-server masking key
WS_MASK_TRANSLATE = 512                 # payloads from this size are masked lane by lane
WS_FIN = 0x80                           # first byte: final fragment
WS_RSV = 0x70                           # first byte: extension bits (none agreed: 0)
WS_OPCODE_BITS = 0x0F                   # first byte: the opcode
WS_MASKED = 0x80                        # second byte: payload is masked
WS_LENGTH_BITS = 0x7F                   # second byte: 7-bit length or an escape
WS_LENGTH_16 = 126                      # ... escape: a 16-bit length follows
WS_LENGTH_64 = 127                      # ... escape: a 64-bit length follows
WS_U16 = struct.Struct("!H")            # extended length, close code
WS_U64 = struct.Struct("!Q")            # extended length (top bit must be 0)
WS_CLOSE_NORMAL = 1000                  # close code: done
WS_CLOSE_PROTOCOL = 1002                # close code: the peer broke RFC 6455
WS_CLOSE_NO_STATUS = 1005               # what a CLOSE without a code reports (never sent)


class WSOpcode(enum.IntEnum):
    CONT = 0x0      # continuation of a fragmented message
    TEXT = 0x1      # UTF-8 text: never used by the tunnel (a protocol error here)
    BINARY = 0x2    # binary data: the tunnel's byte stream
    CLOSE = 0x8     # closing handshake: u16 code + UTF-8 reason
    PING = 0x9      # keep-alive probe: answered with PONG, same payload
    PONG = 0xA      # answer to PING (unsolicited ones are allowed and ignored)


WS_OPCODES = frozenset(int(o) for o in WSOpcode)
WS_CONTROL = 0x8                        # opcodes from here up are control frames

# -- defaults for the command line --------------------------------------------
DEFAULT_BIND = "0.0.0.0"
LOOPBACK_BIND = "127.0.0.1"             # the default bind with the default domain (localhost)
MIN_TOKEN_LENGTH = 16                   # shorter relay tokens are refused (offline guessing)
DEFAULT_HTTP_PORT = 8080
DEFAULT_CONTROL_PORT = 7835
DEFAULT_DOMAIN = "localhost"
DEFAULT_RELAY = "localhost:%d" % DEFAULT_CONTROL_PORT
LISTEN_BACKLOG = 1024
FD_LIMIT_WANTED = 65536                 # soft RLIMIT_NOFILE we ask for at start
TOKEN_BYTES = 32                        # generated tokens: 256 bits
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)   # Linux only
CONFIG_MAX_SIZE = 1024 * 1024           # --config FILE: larger is refused (not a settings file)
CONFIG_SHARED = "DEFAULT"               # --config: the section both commands read
CONFIG_NOT_SETTABLE = ("help", "config")   # flags a config file cannot set
CONFIG_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,   # a flag without a
                   "false": False, "no": False, "off": False, "0": False}   # value, in a file
CONFIG_SECRET_MODE = 0o077              # a file with a secret in it readable beyond its owner
CONFIG_WRITABLE_MODE = 0o022            # a config file others may change: warned about too
CONFIG_FOREIGN = 0o1000000              # (not a mode bit: marks a file of another user)

# -- the client's console (the access log) ------------------------------------
SUMMARY_RATE = 20                       # more lines than this in one second: one summary
#                                         line a second instead (nobody reads more) ...
SUMMARY_CALM = 10                       # ... until a second with at most this many requests
SUMMARY_PERCENTILES = (50, 99)          # request durations a summary line shows
SUMMARY_MAX_STATUSES = 8                # statuses a summary line counts by name; the rest: "other"
SUMMARY_MAX_SAMPLES = 100000            # durations one second keeps for its percentiles (past
#                                         that, a relay flooding LOG frames: a uniform sample)
SUMMARY_TICK_SLACK = 0.01               # a second's summary is printed this long after it ends
SUMMARY_NOTICE = "(busy: one summary line per second)"   # said when the summaries start

# -- client dialing: the stages of one outgoing connection (Dialer), in the order used --
DIAL_TCP = "tcp"                        # connect to each address of the first hop in turn
DIAL_TLS = "tls"                        # TLS: to an https:// proxy, to the relay's HTTPS
                                        # port, or to its control certificate (the channel)
DIAL_CONNECT = "connect"                # HTTP CONNECT through a proxy, answered 2xx
DIAL_SOCKS = "socks"                    # SOCKS5 greeting, credentials and CONNECT
DIAL_WEBSOCKET = "websocket"            # GET WS_PATH with Upgrade: websocket, answered 101
DIAL_STAGES: Dict[str, str] = {         # what a timeout or error message calls each stage
    DIAL_TCP: "connecting", DIAL_TLS: "the TLS handshake", DIAL_CONNECT: "the proxy's CONNECT",
    DIAL_SOCKS: "the SOCKS handshake", DIAL_WEBSOCKET: "the WebSocket upgrade"}
RELAY_SCHEMES = {"https": "https", "wss": "https", "http": "http", "ws": "http"}  # URL forms
RELAY_DEFAULT_PORTS = {"https": 443, "http": 80}   # ... and their ports ("tcp": control)
MAX_HOST_NAME = 253                     # longest DNS name (RFC 1035), for --relay
MAX_HOST_LABEL = 63                     # ... and its longest label
# What the dialer reports a failure as (Dialer's ``failed(why, kind)``).
DIAL_RETRY = "retry"                    # try again with backoff
DIAL_UNREACHABLE = "unreachable"        # refused or not resolvable: likely a wrong --relay
DIAL_FATAL = "fatal"                    # a configuration error: exit status 2
DIAL_TLS_FAILED = "tls_failed"          # TLS did not come up (a --plaintext relay?)
DIAL_REFUSED = "refused"                # the relay answered the upgrade with a 3xx or a 4xx
UPGRADE_REFUSALS_FATAL = 3              # ... the same answer this many times in a row before
#                                         the first tunnel: exit status 2 (a configuration
#                                         error; once could be something on the path)
                                        # (not 408/429): exit status 2 unless it was ever up
UPGRADE_RETRY_STATUSES = (408, 429)     # 4xx answers to the upgrade that are worth a retry
UPGRADE_REDIRECTS = (301, 302, 307, 308)   # answers that name the relay's URL in Location
TLS_NOT_SPOKEN = "WRONG_VERSION_NUMBER"  # OpenSSL's reason when the peer's bytes are not TLS
TLS_GOT_HTTP = "answered in plain HTTP, not TLS"   # ... and they were an HTTP response
TLS_FIRST_BYTES = 512                   # raw bytes a TLS handshake keeps, to say what the
#                                         peer spoke when it was not TLS
UPGRADE_BODY_SHOWN = 200                # bytes of a refusal's body in the message (already
                                        # read with its head: the dialer waits for no more)
LOOPBACK_HOSTS = ("127.0.0.1", "::1")   # a bare PORT TARGET, tried in this order
CONNECT_RETRY_ERRNOS = frozenset({errno.ECONNREFUSED})   # ... the next only after a refusal

# -- proxies ------------------------------------------------------------------
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")   # proxy URL schemes tunnel.py speaks
DEFAULT_PROXY_PORT = 1080               # a proxy URL without a port (curl's default) ...
DEFAULT_HTTPS_PROXY_PORT = 443          # ... unless it is https://
MAX_PROXY_REPLY = 16 * 1024             # head of a CONNECT reply (status line and fields)
PROXY_AUTH_REQUIRED = 407               # CONNECT answer: the proxy wants credentials
PROXY_FORBIDDEN = (403, 405)            # CONNECT answers of a proxy that may allow ...
PROXY_OPEN_PORT = 443                   # ... CONNECT only to this port (the usual policy)
PROXY_UNREACHABLE = (502, 503, 504)     # CONNECT answers: the proxy could not reach the relay
SOCKS_VERSION = 5                       # RFC 1928: first byte of every message but auth's
SOCKS_AUTH_VERSION = 1                  # RFC 1929: username/password subnegotiation version
SOCKS_NO_AUTH = 0x00                    # method: no authentication required
SOCKS_PASSWORD_AUTH = 0x02              # method: username/password (RFC 1929)
SOCKS_NO_METHOD = 0xFF                  # the proxy accepts none of the methods offered
SOCKS_METHODS: Dict[int, str] = {SOCKS_NO_AUTH: "no authentication",
                                 SOCKS_PASSWORD_AUTH: "username/password",
                                 SOCKS_NO_METHOD: "no acceptable methods"}
SOCKS_AUTH_OK = 0x00                    # RFC 1929 status: success (any other: failure)
SOCKS_CMD_CONNECT = 0x01                # the only command we send
SOCKS_ATYP_IPV4 = 0x01                  # address types: 4 bytes ...
SOCKS_ATYP_DOMAIN = 0x03                # ... a length byte and a name ...
SOCKS_ATYP_IPV6 = 0x04                  # ... 16 bytes
SOCKS_ADDRESS_SIZES: Dict[int, int] = {SOCKS_ATYP_IPV4: 4, SOCKS_ATYP_IPV6: 16}
SOCKS_MAX_FIELD = 255                   # user, password, domain name: one length byte
SOCKS_PORT = struct.Struct("!H")        # DST.PORT, BND.PORT
SOCKS_REPLY_OK = 0x00                   # reply code: succeeded
SOCKS5_REPLIES: Dict[int, str] = {      # RFC 1928 section 6
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

# -- relay status, metrics and access log (serve --admin, --access-log) --------------
ADMIN_TOKEN_ENV = "TUNNEL_ADMIN_TOKEN"  # serve --admin-token's default (with --admin)
ADMIN_MAX_HEAD = 8 * 1024               # request head on the admin port; more: 431
ADMIN_MAX_CONNECTIONS = 32              # admin connections at once (answers lingering
#                                         included); more are closed at accept
ADMIN_MAX_PER_SOURCE = 8                # ... of them from one source address
ADMIN_MAX_ROWS = 1000                   # tunnels, reservations and bans a page or a
#                                         scrape lists (the rest is counted, not listed):
#                                         bounds /metrics' tunnel label values too
ADMIN_REALM = "tunnel.py relay"         # WWW-Authenticate realm of a 401
ADMIN_PATHS = ("/", "/status", "/metrics")   # what the admin port serves (others: 404)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"   # Prometheus text
STATUS_CODES = 1000                     # a tunnel's response counts, by status (an
#                                         origin may send any three digits): indexed by
#                                         the status itself, cheaper than by its class
LOG_FORMAT_COMBINED = "combined"        # serve --log-format: Combined Log Format, the
#                                         tunnel's name first (Apache's vhost_combined)
LOG_FORMAT_JSON = "json"                # ... or one JSON object a line
LOG_FORMATS = (LOG_FORMAT_COMBINED, LOG_FORMAT_JSON)
ACCESS_LOG_STDOUT = "-"                 # serve --access-log -: standard output
ACCESS_LOG_MODE = 0o640                 # a new access log file's permissions (umask too)
ACCESS_LOG_BUFFER = 1024 * 1024         # bytes of lines held for a reader that is slow
#                                         (a pipe); past this, lines are dropped, counted
ACCESS_LOG_RETRY = 0.1                  # held lines are tried again this often (s)
ACCESS_LOG_EXIT_WAIT = 1.0              # at exit, a slow reader gets this long for them
ACCESS_LOG_EXIT_POLL = 0.01             # ... tried this often (s)
PIPE_BUF_MIN = 512                      # what POSIX says any pipe takes in one piece
#                                         (select.PIPE_BUF, where known, is used)
MAX_LOGGED_HEADER = 300                 # characters of a User-Agent or Referer logged

# -- request inspector (expose --inspect) -------------------------------------------
INSPECT_DEFAULT = "127.0.0.1:4040"      # --inspect without ADDR (where ngrok's is)
INSPECT_PORT_TRIES = 10                 # ... that port taken: the next ones, this many in all
INSPECT_KEEP = 200                      # requests kept (--inspect-keep)
INSPECT_KEEP_MAX = 10000                # --inspect-keep at most (each can hold 256 KiB)
INSPECT_BODY_LIMIT = 64 * 1024          # bytes of each body kept (request, response)
INSPECT_MAX_HEAD = 2 * MAX_HEAD_SIZE    # a head captured at most (a visitor's at the relay's
#                                         limit, with the relay's forwarding fields added)
INSPECT_API_BODY = 1024 * 1024          # largest request body the inspector reads (a replay)
INSPECT_MAX_CONNECTIONS = 64            # connections to the inspector at once; more: closed
INSPECT_IDLE_TIMEOUT = 60.0             # an inspector connection idle this long is closed
INSPECT_REPLAY_TIMEOUT = 30.0           # a replay's whole exchange with the target (s)
INSPECT_POLL_MS = 1000                  # the page asks for the list this often (ms)
INSPECT_HEX_PREVIEW = 2048              # bytes of a binary body the page shows as hex
INSPECT_JSON_CONTAINERS = 256           # '[' and '{' in a replay's JSON (no deep nesting)
INSPECT_REASONS = {409: "Conflict", 415: "Unsupported Media Type"}   # (not in HTTP_REASONS)
INSPECT_MAX_WS_FRAMES = 100000          # WebSocket frames counted each way, then bytes only
#                                         (counting a flood of 2-byte frames is the cost)
INSPECT_MAX_WAITING = 1000              # captured requests awaiting their responses on one
#                                         connection; more: its capture stops

# =============================================================================
# Errors
# =============================================================================


class TunnelError(Exception):
    """Base of every error this module raises on purpose."""


class ProtocolError(TunnelError):
    """The peer broke the wire protocol; the session is closed."""


class AuthError(TunnelError):
    """The other side does not hold the token."""


class RefusedError(TunnelError):
    """The relay refused the handshake for a reason other than the token."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProxyError(TunnelError):
    """A proxy refused to carry the connection.  ``fatal``: a configuration error (wrong
    or missing credentials, an auth scheme we do not speak; the client exits with status
    2); otherwise the client retries with backoff."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class ListenError(TunnelError, OSError):
    """The relay could not bind one of its ports (an OSError, as before, that says which)."""


class UsageError(TunnelError, ValueError):
    """A setting that cannot work (a flag, an API keyword, a config field): one line
    that names it; the command line exits 2, an API caller gets a ValueError."""


class ConfigError(UsageError):
    """A mistake in a ``--config`` file: "config FILE: [section] key: ..." (on the command
    line without the "see --help" hint: the fix is in the file)."""


class OptionError(UsageError, TypeError):
    """An API keyword that names no flag (a TypeError, as Python's own, and a ValueError)."""


class HTTPResponse(TunnelError):
    """The relay answers a visitor itself: ``status``, a short text and extra fields
    (its root page's 200, a sign-in's 303, the redirect port's 308; raised, like
    bottle's HTTPResponse, from wherever the request is being looked at)."""

    def __init__(self, status: int, message: str,
                 headers: Tuple[Tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers    # extra response fields, e.g. Location


class HTTPError(HTTPResponse):
    """An HTTP-level failure (4xx, 5xx) answered with ``status`` and a short text."""


# =============================================================================
# Utilities
# =============================================================================

_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_ADJECTIVES = ("amber", "brave", "calm", "clever", "cosmic", "crisp", "eager", "fancy",
               "gentle", "happy", "jolly", "keen", "lively", "lucky", "merry", "misty",
               "noble", "polite", "proud", "quick", "quiet", "rapid", "shiny", "silent",
               "smart", "sunny", "swift", "tidy", "vivid", "witty")
_NOUNS = ("badger", "beacon", "canyon", "comet", "falcon", "fern", "fox", "harbor",
          "heron", "island", "lagoon", "lemur", "lynx", "maple", "meadow", "otter",
          "panda", "pebble", "pine", "raven", "river", "robin", "salmon", "spruce",
          "tiger", "tulip", "walrus", "willow", "wombat", "zebra")
NAME_NUMBER_RANGE = 100                 # suffix 0..99 in generated names


class Settings:
    """Keyword settings with class-level defaults (a dataclass without the import cost)."""

    def __init__(self, **values: Any) -> None:
        fields = self.fields()
        for key, value in values.items():
            if key not in fields:
                raise TypeError("%s has no setting %r" % (type(self).__name__, key))
            setattr(self, key, value)

    FLAG_NAMES = {}     # type: Dict[str, str]      # fields whose flag has another name
    NO_FLAG = frozenset()    # type: FrozenSet[str]   # fields only the API sets

    @classmethod
    def fields(cls) -> List[str]:
        """The settings' names, in declaration order."""
        return list(cls.__annotations__)

    @classmethod
    def flag(cls, name: str) -> str:
        """How an error message names a field: its command-line flag, if it has one."""
        if name in cls.NO_FLAG:
            return "%s(%s=...)" % (cls.__name__, name)
        return cls.FLAG_NAMES.get(name) or "--" + name.replace("_", "-")

    def __repr__(self) -> str:
        keys = self.fields()
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (k, getattr(self, k)) for k in keys))


# Exceptions that mean "try again when the selector says so".  TLS adds its own
# two once ``load_ssl`` has imported ssl (lazily: it costs memory and start-up).
WOULD_BLOCK: Tuple[Type[BaseException], ...] = (BlockingIOError, InterruptedError)


def load_ssl() -> Any:
    """Import ``ssl`` on first use and teach ``WOULD_BLOCK`` its want-read/write errors."""
    global WOULD_BLOCK
    import ssl
    WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                   ssl.SSLWantWriteError)
    return ssl


def cert_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as colon-separated upper-case hex (like openssl)."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    """Accept ``AB:CD:...``, ``abcd...`` or ``SHA256:...``; raise ValueError otherwise."""
    text = text.strip()
    if text.lower().startswith("sha256 fingerprint="):     # openssl x509 -fingerprint
        text = text.split("=", 1)[1]
    hexdigits = re.sub(r"[\s:]", "", text.upper().replace("SHA256", "", 1))
    if not re.fullmatch(r"[0-9A-F]{64}", hexdigits):
        raise ValueError("not a SHA-256 fingerprint: %r" % text)
    return ":".join(hexdigits[i:i + 2] for i in range(0, 64, 2))


def trusting_context(cafile: Optional[str]) -> Any:
    """A client TLS context that verifies against ``cafile``, or the system store
    (after ``load_site``: a .pth file may be what puts the local CA into it)."""
    if cafile is None:
        load_site()
    return load_ssl().create_default_context(cafile=cafile)


def server_tls_context(cert: str, key: Optional[str]) -> Any:
    """A TLS server context for one certificate chain (TLS 1.2 or newer)."""
    ssl = load_ssl()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def certificate_der(cert_file: str) -> bytes:
    """The first certificate of a PEM file, as DER (for the printed fingerprint)."""
    ssl = load_ssl()
    with open(cert_file, encoding="ascii") as f:
        pem = f.read()
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(pem[start:end])


# -- the relay's own certificate, made with the standard library alone ---------
# A relay without --tls-cert still speaks TLS on its control port: on first start it
# makes an Ed25519 key (RFC 8032, below: about 7 ms of pure Python, once) and a
# self-signed X.509 certificate written here in DER, and keeps both in its state
# directory so that the fingerprint survives restarts.  Clients need not trust it by
# any CA: the handshake binds the certificate each side saw (see the docstring).

_ED_P = 2 ** 255 - 19                                              # the field prime
_ED_L = 2 ** 252 + 27742317777372353535851937790883648493          # the group order
_ED_D = -121665 * pow(121666, _ED_P - 2, _ED_P) % _ED_P            # curve constant d
_ED_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_ED_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_ED_BASE = (_ED_BX, _ED_BY, 1, _ED_BX * _ED_BY % _ED_P)           # extended coordinates


def _ed_add(p: Tuple[int, ...], q: Tuple[int, ...]) -> Tuple[int, int, int, int]:
    """Point addition in extended coordinates (RFC 8032 section 5.1.4; also doubles)."""
    m = _ED_P
    a = (p[1] - p[0]) * (q[1] - q[0]) % m
    b = (p[1] + p[0]) * (q[1] + q[0]) % m
    c = 2 * p[3] * q[3] * _ED_D % m
    d = 2 * p[2] * q[2] % m
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % m, g * h % m, f * g % m, e * h % m


def _ed_mul(scalar: int, point: Tuple[int, ...]) -> Tuple[int, ...]:
    result: Tuple[int, ...] = (0, 1, 1, 0)     # the neutral element
    while scalar:
        if scalar & 1:
            result = _ed_add(result, point)
        point = _ed_add(point, point)
        scalar >>= 1
    return result


def _ed_encode(point: Tuple[int, ...]) -> bytes:
    zinv = pow(point[2], _ED_P - 2, _ED_P)
    x, y = point[0] * zinv % _ED_P, point[1] * zinv % _ED_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _ed_expand(seed: bytes) -> Tuple[int, bytes]:
    digest = hashlib.sha512(seed).digest()
    return (int.from_bytes(digest[:32], "little") & ((1 << 254) - 8) | 1 << 254,
            digest[32:])


def ed25519_public_key(seed: bytes) -> bytes:
    """The 32-byte public key of a 32-byte Ed25519 private key (seed)."""
    return _ed_encode(_ed_mul(_ed_expand(seed)[0], _ED_BASE))


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    """A 64-byte Ed25519 signature (RFC 8032 section 5.1.6).  Not constant-time: used
    once per relay, to sign its own certificate, never on input from the network."""
    scalar, prefix = _ed_expand(seed)
    public = _ed_encode(_ed_mul(scalar, _ED_BASE))
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % _ED_L
    point_r = _ed_encode(_ed_mul(r, _ED_BASE))
    k = int.from_bytes(hashlib.sha512(point_r + public + message).digest(), "little") % _ED_L
    return point_r + ((r + k * scalar) % _ED_L).to_bytes(32, "little")


def _der(tag: int, body: bytes) -> bytes:
    """One DER element: tag, definite length, body."""
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _der_seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


_DER_ED25519 = _der_seq(_der(0x06, b"\x2b\x65\x70"))        # AlgorithmIdentifier 1.3.101.112
_DER_CN = _der(0x06, b"\x55\x04\x03")                       # id-at-commonName 2.5.4.3
_DER_BASIC_CA = _der_seq(_der(0x06, b"\x55\x1d\x13"), _der(0x01, b"\xff"),   # critical
                         _der(0x04, _der_seq(_der(0x01, b"\xff"))))        # cA: TRUE
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")   # PKCS#8 before the seed


def self_signed_certificate(seed: bytes, common_name: str = IDENTITY_NAME,
                            days: int = IDENTITY_DAYS, now: Optional[float] = None) -> bytes:
    """A DER X.509 v3 certificate for the Ed25519 key ``seed``, signed by itself."""
    now = time.time() if now is None else now

    def utc(t: float) -> bytes:     # UTCTime: fine until 2049
        return _der(0x17, time.strftime("%y%m%d%H%M%SZ", time.gmtime(t)).encode("ascii"))
    name = _der_seq(_der(0x31, _der_seq(_DER_CN, _der(0x0c, common_name.encode("utf-8")))))
    serial = secrets.randbits(126) | 1 << 126        # positive, 16 bytes, minimal DER
    tbs = _der_seq(_der(0xa0, _der(0x02, b"\x02")),  # version 3
                   _der(0x02, serial.to_bytes(16, "big")), _DER_ED25519, name,
                   _der_seq(utc(now - 86400), utc(now + days * 86400)), name,
                   _der_seq(_DER_ED25519, _der(0x03, b"\0" + ed25519_public_key(seed))),
                   _der(0xa3, _der_seq(_DER_BASIC_CA)))
    return _der_seq(tbs, _DER_ED25519, _der(0x03, b"\0" + ed25519_sign(seed, tbs)))


def pem_encode(kind: str, der: bytes) -> str:
    text = _b64(der)
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (
        kind, "\n".join(text[i:i + 64] for i in range(0, len(text), 64)), kind)


def default_state_dir() -> str:
    """$TUNNEL_STATE_DIR, else $XDG_STATE_HOME/tunnel.py, else ~/.local/state/tunnel.py."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return explicit
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "state")
    return os.path.join(base, "tunnel.py")


def write_private(path: str, text: str) -> None:
    """Create ``path`` readable by its owner only (0600) and write ``text`` to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)


def relay_identity(state_dir: str) -> Tuple[str, str, bool]:
    """(certificate file, key file, created now) of the relay's own identity in
    ``state_dir``, made on first use; raises OSError if the directory is unusable and
    TunnelError if it is unsafe (see ``check_private``)."""
    cert, key = os.path.join(state_dir, IDENTITY_CERT), os.path.join(state_dir, IDENTITY_KEY)
    if os.path.lexists(cert) and os.path.lexists(key):
        check_private(state_dir, key)
        return cert, key, False
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    check_private(state_dir, None)
    seed = secrets.token_bytes(32)
    for path in (key, cert):         # a half-written pair from an earlier crash
        if os.path.lexists(path):
            os.unlink(path)
    write_private(key, pem_encode("PRIVATE KEY", _PKCS8_ED25519 + seed))
    write_private(cert, pem_encode("CERTIFICATE", self_signed_certificate(seed)))
    return cert, key, True


def check_private(directory: str, key: Optional[str]) -> None:
    """Refuse a state directory others could write to, or a key file that is a link,
    not ours, or readable by others: whoever has the key can sit in the middle of every
    client unnoticed, since the channel binding would match."""
    if not hasattr(os, "geteuid"):   # no POSIX owners here (Windows)
        return
    import stat
    me = os.geteuid()
    st = os.stat(directory)
    if st.st_uid != me or st.st_mode & 0o022:
        raise TunnelError("refusing the state directory %s: it is not owned by this user or "
                          "others may write to it (chmod 700 it, or pass another --state-dir)"
                          % directory)
    if key is None:
        return
    st = os.lstat(key)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != me or st.st_mode & 0o077:
        raise TunnelError("refusing the relay key %s: it must be a regular file of this user "
                          "that only this user can read (chmod 600 it, or remove the "
                          "directory to make a new key)" % key)

class Throttle:
    """At most one log line per ``interval`` for a repeated event; counts the rest
    (a flood of refusals must not become a flood of log lines)."""

    def __init__(self, interval: float = THROTTLE_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def warn(self, fmt: str, *args: Any, level: int = logging.WARNING,
             exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            fmt += " (%d more like it not logged)"
            args += (self.suppressed,)
        log.log(level, fmt, *args, exc_info=exc_info)
        self.suppressed = 0
        self.next_at = now + self.interval


_FIRST, _SECOND, _FOURTH = (operator.itemgetter(i) for i in (0, 1, 3))   # (C-speed maps)


def escape_unprintable(text: str) -> str:
    """``text`` with every character a terminal could act on (C0, DEL, C1, Unicode
    format and separator characters) written as a Python escape, e.g. ``\\x9b``."""
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 0x100
                   else "\\u%04x" % ord(c) if ord(c) < 0x10000 else "\\U%08x" % ord(c)
                   for c in text)


def valid_name(name: str) -> bool:
    """True if ``name`` is one DNS label: a-z, 0-9, inner hyphens, 1-63 chars."""
    return bool(_NAME_RE.match(name))


def random_name() -> str:
    """A readable random subdomain such as ``brave-otter-17``."""
    rnd = secrets.SystemRandom()
    return "%s-%s-%d" % (rnd.choice(_ADJECTIVES), rnd.choice(_NOUNS),
                         rnd.randrange(NAME_NUMBER_RANGE))


def new_token() -> str:
    """A strong random token, URL- and shell-safe."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def compute_mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over a labelled concatenation; only the last part may vary in length."""
    return hmac.new(key, MAC_LABEL + label + b"\0" + b"".join(parts), hashlib.sha256).digest()


_ASCII_DIGITS = re.compile(r"[0-9]+")    # (str.isdigit also takes other scripts' digits)


def parse_hostport(text: str, default_host: Optional[str] = None,
                   default_port: Optional[int] = None) -> Tuple[str, int]:
    """Parse ``PORT``, ``HOST:PORT`` or ``[V6]:PORT``; raise ValueError if malformed."""
    text = text.strip()
    host, port = default_host, None
    if _ASCII_DIGITS.fullmatch(text):
        port = text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in %r" % text)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected ':PORT' after ']' in %r" % text)
            port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets, as in [::1]:5000")
    else:
        host = text
    if not host:
        raise ValueError("no host in %r" % text)
    if port is None:
        if default_port is None:
            raise ValueError("no port in %r" % text)
        return host, default_port
    if not _ASCII_DIGITS.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError("invalid port %r" % port)      # (str.isdigit takes "٥٠٠٠")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def is_loopback(host: str) -> bool:
    """Is ``host`` (an address, or ``localhost``) on this machine's loopback?"""
    import ipaddress
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.lower() == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)

def describe_oserror(exc: OSError) -> str:
    """``connection refused`` rather than ``[Errno 111] Connection refused``; a failed
    name lookup is the resolver's own words (``Name or service not known``), to follow
    ``cannot resolve HOST: ``."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):     # errno is an EAI_* code, not an errno
        return exc.strerror or str(exc) or "the name does not resolve"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or exc.__class__.__name__


def quickack(sock: Any) -> None:
    """ACK at once (Linux resets this after each ACK, so it is set after every read).

    A peer that writes a message in two small writes without TCP_NODELAY (Python's
    http.server writes the head, then the body) holds the second write until the
    first is ACKed; a delayed ACK turns that into a 40 ms stall per request."""
    if TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        except OSError:
            pass


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc; elsewhere a no-op).

    Run as a script, this file is compiled at every start; the compiler's freed
    memory (about 7 MiB) would otherwise stay in the process for its lifetime."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError, TypeError):
        pass


def kernel_unacked(sock: Any) -> int:
    """Bytes the kernel holds for ``sock`` that the peer has not ACKed (Linux TIOCOUTQ;
    0 where unknown): with what was written, what the peer really took."""
    try:
        import fcntl
        import termios
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                  b"\0\0\0\0"))[0])
    except (ImportError, OSError, AttributeError, ValueError):
        return 0


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: every write of ours is a complete message or a full buffer."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def format_size(n: int) -> str:
    """``512B``, ``1.2KB``, ``3.4MB``: for the access log."""
    if n < 1024:
        return "%dB" % n
    size = float(n)
    for unit in ("KB", "MB", "GB"):
        size /= 1024.0
        if size < 1024 or unit == "GB":
            break
    return "%.1f%s" % (size, unit)


def http_response(status: int, text: str, method: str = "GET",
                  headers: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """A complete, self-delimited plain-text response that closes the connection."""
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS.get(status, "Error")),
             "Content-Type: text/plain; charset=utf-8",
             "Content-Length: %d" % len(body),
             "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff",
             "Connection: close"]
    lines.extend("%s: %s" % kv for kv in headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + body


HTTP_REASONS = {200: "OK", 303: "See Other", 308: "Permanent Redirect", 400: "Bad Request",
                204: "No Content", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 426: "Upgrade Required", 429: "Too Many Requests",
                408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
                421: "Misdirected Request", 431: "Request Header Fields Too Large",
                500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
                503: "Service Unavailable", 505: "HTTP Version Not Supported"}

# =============================================================================
# Frame codec (pure: bytes in, frames out)
# =============================================================================


class Frame(collections.namedtuple("Frame", "type flags stream_id payload")):
    """One decoded frame; ``payload`` is ``bytes``."""

    __slots__ = ()


_new_tuple = tuple.__new__   # builds a Frame without the namedtuple's Python-level __new__


class Preamble(collections.namedtuple("Preamble", "version")):
    """The client's opening magic and protocol version, as seen by the relay."""

    __slots__ = ()


def encode_frame(ftype: int, stream_id: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """Header plus payload as one ``bytes`` (for control frames; DATA is framed in place)."""
    return FRAME_HEADER.pack(ftype, flags, stream_id, len(payload)) + bytes(payload)


def encode_preamble(version: int = PROTOCOL_VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, version)


class FrameDecoder:
    """Incremental frame decoder: ``feed(bytes) -> [Frame | Preamble]``.

    The length in each header is checked against ``max_payload`` as soon as the
    header is complete, before any of the payload is buffered.  Raises
    ``ProtocolError`` on bad magic, an unknown type or an over-long frame.
    """

    def __init__(self, expect_preamble: bool = False,
                 max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._want_preamble = expect_preamble
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: Any) -> List[Any]:
        buf = self._buf
        if buf:
            buf += data
            src: Any = buf
        else:
            src = data
        out: List[Any] = []
        pos, end = 0, len(src)
        hsize = FRAME_HEADER.size
        view = memoryview(src)
        try:
            if self._want_preamble:
                have = min(end, len(MAGIC))
                if bytes(view[:have]) != MAGIC[:have]:
                    if bytes(view[:2]) == b"\x16\x03":
                        raise ProtocolError("a TLS client on a plain control port: the relay "
                                            "runs with --plaintext: pass --plaintext to the "
                                            "client too, or drop it on the relay")
                    raise ProtocolError("not a tunnel.py client (bad magic)")
                if end < PREAMBLE.size:
                    if src is not buf:
                        buf += view
                    return out
                self._want_preamble = False
                out.append(Preamble(PREAMBLE.unpack_from(src, 0)[1]))
                pos = PREAMBLE.size
            while end - pos >= hsize:
                ftype, flags, sid, length = FRAME_HEADER.unpack_from(src, pos)
                if ftype not in FRAME_TYPES:
                    raise ProtocolError("unknown frame type %d" % ftype)
                if length > self.max_payload:
                    raise ProtocolError("frame of %d bytes exceeds the limit of %d"
                                        % (length, self.max_payload))
                stop = pos + hsize + length
                if stop > end:
                    break
                out.append(_new_tuple(Frame, (ftype, flags, sid, bytes(view[pos + hsize:stop]))))
                pos = stop
            if src is not buf and pos < end:
                buf += view[pos:]
        finally:
            view.release()
        if src is buf and pos:
            del buf[:pos]
        return out


# =============================================================================
# WebSocket (RFC 6455; pure: bytes in, events out)
# =============================================================================
# The tunnel protocol runs inside binary messages as one byte stream: message
# boundaries mean nothing, so payloads are handed on as they arrive (never a whole
# message buffered), and only headers and control payloads (<= 125 bytes) are held.

_WS_KEY_RE = re.compile(r"[A-Za-z0-9+/]{22}==\Z")    # base64 of exactly 16 bytes


def ws_key() -> str:
    """A fresh Sec-WebSocket-Key: base64 of 16 random bytes."""
    import base64
    return base64.b64encode(os.urandom(WS_KEY_BYTES)).decode("ascii")


def ws_accept(key: str) -> str:
    """The Sec-WebSocket-Accept that answers ``key``."""
    import base64
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("latin-1")).digest()
                            ).decode("ascii")


def ws_valid_key(key: str) -> bool:
    """A Sec-WebSocket-Key is base64 that decodes to exactly 16 bytes."""
    return _WS_KEY_RE.match(key) is not None


_WS_XOR_TABLES: Dict[int, bytes] = {}     # byte value k -> translate table of x ^ k


def _ws_xor_table(k: int) -> bytes:
    table = _WS_XOR_TABLES.get(k)
    if table is None:
        table = _WS_XOR_TABLES[k] = bytes(i ^ k for i in range(256))
    return table


def ws_mask(data: Any, key: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``key``, starting ``offset`` bytes into
    the payload (masks and unmasks).  Large payloads: each of the four byte lanes
    through ``bytes.translate`` (C speed, about 1 GB/s); small ones: one big-integer
    XOR.  Never a Python loop per byte."""
    n = len(data)
    if not n:
        return b""
    if key[0] == key[1] == key[2] == key[3]:    # one byte four times: one pass in C
        return bytes(data).translate(_ws_xor_table(key[0]))
    shift = offset & 3
    if shift:
        key = key[shift:] + key[:shift]
    if n < WS_MASK_TRANSLATE:
        stream = (key * (n // WS_MASK_KEY_SIZE + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(
            n, "little")
    if type(data) is not bytes:
        data = bytes(data)              # strided slices of a view are slow; of bytes, fast
    out = bytearray(n)
    for lane in range(WS_MASK_KEY_SIZE):
        out[lane::WS_MASK_KEY_SIZE] = data[lane::WS_MASK_KEY_SIZE].translate(
            _ws_xor_table(key[lane]))
    return bytes(out)


def ws_frame(opcode: int, payload: Any, mask: bool, fin: bool = True,
             sealed: bool = False) -> bytes:
    """One frame: masked with a random key (``mask``: what a client sends) or not.

    ``sealed``: the payload is TLS ciphertext to the relay (TLS inside the WebSocket;
    not TLS around it, which may end at a load balancer that passes plain frames on),
    so the key is one random non-zero byte four times, which masks in one C pass rather
    than four (2.5 times the speed: a bulk upload's cost).  Masking exists so that
    script-chosen plaintext cannot be made to look like another protocol to a proxy
    on the way (RFC 6455 10.3); ciphertext cannot be chosen that way, so 8 bits of
    unpredictability do as well as 32 there, and a proxy sees a valid masked frame
    either way.  Plain payloads (--plaintext) keep a full 32-bit key."""
    n = len(payload)
    first = (WS_FIN if fin else 0) | opcode
    bit = WS_MASKED if mask else 0
    if n < WS_LENGTH_16:
        head = bytes((first, bit | n))
    elif n < 1 << 16:
        head = bytes((first, bit | WS_LENGTH_16)) + WS_U16.pack(n)
    else:
        head = bytes((first, bit | WS_LENGTH_64)) + WS_U64.pack(n)
    if mask:
        key = (bytes((secrets.randbelow(255) + 1,)) * WS_MASK_KEY_SIZE if sealed  # (0: no
               else os.urandom(WS_MASK_KEY_SIZE))                                # mask)
        return b"".join((head, key, ws_mask(payload, key)))
    return b"".join((head, payload))


def ws_close_payload(code: int, reason: str = "") -> bytes:
    """A CLOSE frame's payload: the code and a reason cut to fit 125 bytes (whole
    UTF-8 characters only)."""
    text = reason.encode("utf-8")[:MAX_WS_CONTROL - WS_U16.size]
    return WS_U16.pack(code) + text.decode("utf-8", "ignore").encode("utf-8")


# Decoder states: what the next bytes are.
_WS_HEADER, _WS_LENGTH, _WS_MASK, _WS_PAYLOAD, _WS_CONTROL_PAYLOAD, _WS_CLOSED = range(6)
WS_EV_DATA, WS_EV_PING, WS_EV_PONG, WS_EV_CLOSE = "data", "ping", "pong", "close"


class WSDecoder:
    """Incremental frame decoder: ``feed(bytes) -> [event, ...]`` with events
    ``("data", bytes)`` (BINARY and CONT payloads, streamed: what arrived, even in the
    middle of a frame), ``("ping", bytes)``, ``("pong", bytes)`` and
    ``("close", code, reason)`` (code 1005 when the frame had none).

    ``server_side``: frames must be masked (from a client) or must not be (from a
    server).  Raises ``ProtocolError`` on anything RFC 6455 forbids or the tunnel does
    not use: RSV bits (no extension is agreed), unknown opcodes, TEXT, a CONT with no
    message started, a new message inside a fragmented one, a control frame over 125
    bytes or fragmented, a 64-bit length with the top bit set, a length not in its
    shortest form, and any byte after CLOSE.  Control frames may come between the
    fragments of a message (5.4).  The decoder is dead after an error."""

    def __init__(self, server_side: bool) -> None:
        self.server_side = server_side
        self._state = _WS_HEADER
        self._buf = bytearray()         # a header part or a control payload, never data
        self._opcode = 0
        self._ext = 0                   # bytes of extended length still to read
        self._remaining = 0             # payload bytes of this frame still to come
        self._key = b""                 # this frame's masking key (b"": unmasked)
        self._offset = 0                # payload bytes already unmasked (key rotation)
        self._fragmented = False        # a data message started and is not finished
        self.frames_left: Optional[int] = None   # frames still allowed (None: no limit)

    @property
    def closed(self) -> bool:
        return self._state == _WS_CLOSED

    def feed(self, data: Any) -> List[Tuple[Any, ...]]:
        events: List[Tuple[Any, ...]] = []
        steps = self._steps
        with memoryview(data) as view:
            pos, end = 0, len(view)
            while pos < end:
                pos = steps[self._state](self, view, pos, end, events)
        return events

    def _take(self, view: memoryview, pos: int, end: int, need: int) -> Tuple[Any, int]:
        """``need`` bytes of a header part: (bytes, new pos), or (None, end) while more
        are to come (then buffered: never more than ``need``)."""
        buf = self._buf
        if not buf and end - pos >= need:
            return bytes(view[pos:pos + need]), pos + need
        take = min(need - len(buf), end - pos)
        buf += view[pos:pos + take]
        pos += take
        if len(buf) < need:
            return None, pos
        part = bytes(buf)
        del buf[:need]
        return part, pos

    def _on_header(self, view: memoryview, pos: int, end: int,
                   events: List[Tuple[Any, ...]]) -> int:
        part, pos = self._take(view, pos, end, 2)
        if part is None:
            return pos
        if self.frames_left is not None:
            if not self.frames_left:
                raise ProtocolError("more WebSocket frames than a handshake takes (%d)"
                                    % WS_PREAUTH_FRAMES)
            self.frames_left -= 1
        first, second = part[0], part[1]
        if first & WS_RSV:
            raise ProtocolError("WebSocket frame with reserved bits set (no extension "
                                "was agreed)")
        opcode = first & WS_OPCODE_BITS
        if opcode not in WS_OPCODES:
            raise ProtocolError("unknown WebSocket opcode %d" % opcode)
        if opcode == WSOpcode.TEXT:
            raise ProtocolError("WebSocket text frame (the tunnel speaks binary only)")
        if bool(second & WS_MASKED) != self.server_side:
            raise ProtocolError("unmasked WebSocket frame from a client" if self.server_side
                                else "masked WebSocket frame from a server")
        fin = bool(first & WS_FIN)
        length = second & WS_LENGTH_BITS
        if opcode >= WS_CONTROL:
            if not fin:
                raise ProtocolError("fragmented WebSocket control frame")
            if length > MAX_WS_CONTROL:
                raise ProtocolError("WebSocket control frame over %d bytes" % MAX_WS_CONTROL)
        elif opcode == WSOpcode.CONT:
            if not self._fragmented:
                raise ProtocolError("WebSocket continuation frame without a message")
            self._fragmented = not fin
        else:
            if self._fragmented:
                raise ProtocolError("new WebSocket message inside a fragmented one")
            self._fragmented = not fin
        self._opcode = opcode
        if length == WS_LENGTH_16:
            self._ext = WS_U16.size
            self._state = _WS_LENGTH
        elif length == WS_LENGTH_64:
            self._ext = WS_U64.size
            self._state = _WS_LENGTH
        else:
            self._remaining = length
            self._after_length(events)
        return pos

    def _on_length(self, view: memoryview, pos: int, end: int,
                   events: List[Tuple[Any, ...]]) -> int:
        part, pos = self._take(view, pos, end, self._ext)
        if part is None:
            return pos
        if self._ext == WS_U16.size:
            length = WS_U16.unpack(part)[0]
            if length < WS_LENGTH_16:
                raise ProtocolError("WebSocket length %d not in its shortest form" % length)
        else:
            length = WS_U64.unpack(part)[0]
            if length >> 63:
                raise ProtocolError("WebSocket length %d has the top bit set" % length)
            if length < 1 << 16:
                raise ProtocolError("WebSocket length %d not in its shortest form" % length)
        self._remaining = length
        self._after_length(events)
        return pos

    def _after_length(self, events: List[Tuple[Any, ...]]) -> None:
        if self.server_side:
            self._state = _WS_MASK
        else:
            self._key = b""
            self._start_payload(events)

    def _on_mask(self, view: memoryview, pos: int, end: int,
                 events: List[Tuple[Any, ...]]) -> int:
        part, pos = self._take(view, pos, end, WS_MASK_KEY_SIZE)
        if part is not None:
            self._key = part
            self._start_payload(events)
        return pos

    def _start_payload(self, events: List[Tuple[Any, ...]]) -> None:
        self._offset = 0
        if self._opcode >= WS_CONTROL:
            self._state = _WS_CONTROL_PAYLOAD
            if not self._remaining:
                self._control(b"", events)
        else:
            self._state = _WS_PAYLOAD if self._remaining else _WS_HEADER

    def _on_payload(self, view: memoryview, pos: int, end: int,
                    events: List[Tuple[Any, ...]]) -> int:
        n = min(self._remaining, end - pos)
        piece = view[pos:pos + n]
        data = ws_mask(piece, self._key, self._offset) if self._key else bytes(piece)
        self._offset += n
        self._remaining -= n
        events.append((WS_EV_DATA, data))
        if not self._remaining:
            self._state = _WS_HEADER
        return pos + n

    def _on_control_payload(self, view: memoryview, pos: int, end: int,
                            events: List[Tuple[Any, ...]]) -> int:
        part, pos = self._take(view, pos, end, self._remaining)
        if part is not None:
            self._control(ws_mask(part, self._key) if self._key else part, events)
        return pos

    def _control(self, payload: bytes, events: List[Tuple[Any, ...]]) -> None:
        self._state = _WS_HEADER
        opcode = self._opcode
        if opcode == WSOpcode.PING:
            events.append((WS_EV_PING, payload))
        elif opcode == WSOpcode.PONG:
            events.append((WS_EV_PONG, payload))
        else:
            self._state = _WS_CLOSED
            if not payload:
                events.append((WS_EV_CLOSE, WS_CLOSE_NO_STATUS, ""))
                return
            if len(payload) < WS_U16.size:
                raise ProtocolError("WebSocket close frame of 1 byte")
            try:
                reason = payload[WS_U16.size:].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("WebSocket close reason is not UTF-8") from None
            events.append((WS_EV_CLOSE, WS_U16.unpack_from(payload)[0], reason))

    def _on_closed(self, view: memoryview, pos: int, end: int,
                   events: List[Tuple[Any, ...]]) -> int:
        raise ProtocolError("WebSocket data after the close frame")

    _steps = {_WS_HEADER: _on_header, _WS_LENGTH: _on_length, _WS_MASK: _on_mask,
              _WS_PAYLOAD: _on_payload, _WS_CONTROL_PAYLOAD: _on_control_payload,
              _WS_CLOSED: _on_closed}


# -- the upgrade (RFC 6455 section 4) --------------------------------------------

def ws_upgrade_request(host: str, path: str, key: str, protocol: str,
                       extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """The client's opening handshake: ``GET path HTTP/1.1`` with the upgrade fields
    (``host`` is the Host value, a port included if not the default)."""
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host, "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: %s" % key,
             "Sec-WebSocket-Version: %s" % WS_VERSION, "Sec-WebSocket-Protocol: %s" % protocol]
    lines.extend("%s: %s" % kv for kv in extra)
    if any(c in line for line in lines for c in "\r\n\0"):
        raise ValueError("CR, LF or NUL in a WebSocket upgrade field")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ws_response_head_end(buf: Any) -> int:
    """Where the response head in ``buf`` ends (the index after its blank line), or
    -1 while it is incomplete; ProtocolError once it is over MAX_HEAD_SIZE."""
    i = buf.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE + 4)      # (no copy of what came so far)
    if i >= 0:
        return i + 4
    if len(buf) >= MAX_HEAD_SIZE + 4:
        raise ProtocolError("the relay's answer to the WebSocket upgrade has a head over "
                            "%d bytes" % MAX_HEAD_SIZE)
    return -1


def _ws_list(values: List[str]) -> List[str]:
    """The items of comma-separated field values, case kept (subprotocols are
    case-sensitive)."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def ws_check_response(head: bytes, key: str, protocol: str) -> None:
    """Check the relay's answer to our upgrade (``head``: up to and including the
    blank line); ProtocolError with a one-line reason unless it is our 101."""
    m = _STATUS_LINE_RE.match(head)
    if m is None:
        raise ProtocolError("the relay did not answer the WebSocket upgrade with HTTP "
                            "(%s)" % escape_unprintable(bytes(head[:40]).decode("latin-1")))
    status = int(m.group(3))
    if m.group(1, 2) != (b"1", b"1"):
        raise ProtocolError("the relay answered the WebSocket upgrade in HTTP/%s.%s, not "
                            "HTTP/1.1" % (m.group(1).decode(), m.group(2).decode()))
    head = bytes(head)
    line, block = _split_start_line(head[:-4] if head.endswith(b"\r\n\r\n") else head)
    if status != 101:
        reason = line.split(" ", 2)[2] if line.count(" ") >= 2 else ""
        raise ProtocolError("the relay answered %d%s, not 101" % (
            status, " " + escape_unprintable(reason[:UPGRADE_BODY_SHOWN]) if reason else ""))
    try:
        headers = _parse_fields(block)
    except HTTPError as exc:
        raise ProtocolError("the relay's 101 is malformed: %s" % exc) from None
    if "websocket" not in headers.tokens("upgrade"):
        raise ProtocolError("the relay's 101 does not upgrade to websocket")
    if "upgrade" not in headers.tokens("connection"):
        raise ProtocolError("the relay's 101 lacks Connection: Upgrade")
    if headers.get_all("sec-websocket-accept") != [ws_accept(key)]:
        raise ProtocolError("the relay's 101 has a wrong Sec-WebSocket-Accept")
    chosen = _ws_list(headers.get_all("sec-websocket-protocol"))
    if chosen != [protocol]:
        raise ProtocolError("the relay's 101 chose the subprotocol %s, not %s" % (
            escape_unprintable(", ".join(chosen)) or "(none)", protocol))
    if headers.get_all("sec-websocket-extensions"):
        raise ProtocolError("the relay's 101 names extensions we did not offer")


def ws_check_upgrade(req: "Request") -> str:
    """Relay side: the subprotocol to answer a visitor's upgrade request with, or an
    HTTPError: 400 for a malformed request, 426 for another WebSocket version."""
    if req.method != "GET":
        raise HTTPError(400, "A WebSocket upgrade is a GET, not %s." % req.method)
    if req.version != (1, 1):
        raise HTTPError(400, "A WebSocket upgrade needs HTTP/1.1.")
    headers = req.headers
    if "websocket" not in headers.tokens("upgrade"):
        raise HTTPError(400, "Only Upgrade: websocket is served here.")
    if "upgrade" not in req.connection:
        raise HTTPError(400, "A WebSocket upgrade needs Connection: Upgrade.")
    if req.body != "none":
        raise HTTPError(400, "A WebSocket upgrade has no body.")
    versions = headers.get_all("sec-websocket-version")
    if not versions:
        raise HTTPError(400, "A WebSocket upgrade needs Sec-WebSocket-Version.")
    if versions != [WS_VERSION]:
        raise HTTPError(426, "This relay speaks WebSocket version %s." % WS_VERSION,
                        (("Sec-WebSocket-Version", WS_VERSION),))
    keys = headers.get_all("sec-websocket-key")
    if len(keys) != 1 or not ws_valid_key(keys[0]):
        raise HTTPError(400, "A WebSocket upgrade needs one Sec-WebSocket-Key of 16 bytes "
                        "in base64.")
    for offered in _ws_list(headers.get_all("sec-websocket-protocol")):
        if offered in (WS_PROTOCOL, WS_PROTOCOL_TLS):
            return offered
    raise HTTPError(400, "This path serves tunnel.py clients only (Sec-WebSocket-Protocol "
                    "%s or %s)." % (WS_PROTOCOL, WS_PROTOCOL_TLS))


def _offers_tunnel_protocol(req: Request) -> bool:
    """Does an upgrade request offer one of our subprotocols (any case)?"""
    for value in req.headers.get_all("sec-websocket-protocol"):
        for token in value.split(","):
            if token.strip().lower() in (WS_PROTOCOL, WS_PROTOCOL_TLS):
                return True
    return False


def ws_upgrade_response(key: str, protocol: str) -> bytes:
    """The relay's 101 for an upgrade whose key was ``key``."""
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\n\r\n"
            % (ws_accept(key), protocol)).encode("latin-1")


# =============================================================================
# Handshake (pure state machines; the session feeds them frames)
# =============================================================================


def _json_payload(payload: bytes, what: str) -> Dict[str, Any]:
    """A JSON object from the wire: its size is bounded by the frame limit, its depth
    here, before parsing (deep nesting would end in RecursionError)."""
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_CONTAINERS:
        raise ProtocolError("%s nests more than %d JSON containers" % (what, MAX_JSON_CONTAINERS))
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("%s is not valid JSON: %s" % (what, exc)) from None
    if not isinstance(value, dict):
        raise ProtocolError("%s is not a JSON object" % what)
    return value


def _json_bytes(value: Dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def seal(key: bytes, data: bytes) -> bytes:
    """XOR with an HMAC-SHA256 key stream (counter mode): it seals and unseals.  The key
    is fresh per handshake (it covers both nonces), and AUTH's MAC covers the result."""
    stream = b"".join(hmac.new(key, U64.pack(i), hashlib.sha256).digest()
                      for i in range((len(data) + MAC_SIZE - 1) // MAC_SIZE))
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream[:n], "big")).to_bytes(n, "big")


def binding_of(der: bytes) -> str:
    """Channel binding of a certificate (the idea of RFC 5929 tls-server-end-point):
    the SHA-256 of its DER, as 64 lower-case hex digits."""
    return hashlib.sha256(der).hexdigest()


class ClientHandshake:
    """Client side: ``start()`` gives the opening bytes, ``receive(frame)`` the replies.

    ``request`` is sent as it is (it should carry ``binding``, the certificate the
    client saw); ``sealed`` (visitor-access secrets, the client secret) travels
    sealed under a key only token holders can derive.  When ``done`` is true,
    ``welcome`` holds the relay's JSON answer.  Raises ``AuthError`` when the relay
    rejects the token or cannot prove it holds it, ``RefusedError`` for any other
    refusal, ``ProtocolError`` for nonsense.
    """

    def __init__(self, token: str, request: Dict[str, Any], nonce: Optional[bytes] = None,
                 version: int = PROTOCOL_VERSION,
                 sealed: Optional[Dict[str, Any]] = None) -> None:
        self._key = token.encode("utf-8")
        self._nonce = nonce or secrets.token_bytes(NONCE_SIZE)
        self._request = dict(request)
        self._sealed = sealed
        self._version = version
        self._relay_nonce = b""
        self._mac = b""
        self.done = False
        self.failed: Optional[str] = None
        self.welcome: Dict[str, Any] = {}

    def start(self) -> bytes:
        return encode_preamble(self._version) + encode_frame(FrameType.HELLO, 0, self._nonce)

    def receive(self, frame: Any) -> bytes:
        ftype = getattr(frame, "type", None)
        if ftype == FrameType.REFUSE:
            info = _json_payload(frame.payload, "refusal")
            # Not under any MAC (the relay may not know K): whatever is on the path can
            # write it, so it is escaped and cut before it reaches a log or a terminal.
            code = escape_unprintable(str(info.get("error", "")))[:MAX_REFUSAL_TEXT]
            message = escape_unprintable(str(info.get("message", "")))[:MAX_REFUSAL_TEXT]
            if code == REFUSED_AUTH:
                raise AuthError("relay rejected the token")
            raise RefusedError(code, message or "relay refused the connection (%s)" % code)
        if ftype == FrameType.CHALLENGE and not self._mac:
            if len(frame.payload) != NONCE_SIZE:
                raise ProtocolError("challenge of %d bytes, expected %d"
                                    % (len(frame.payload), NONCE_SIZE))
            self._relay_nonce = frame.payload
            request = dict(self._request)
            if self._sealed is not None:
                key = compute_mac(self._key, SEAL_LABEL, self._nonce, self._relay_nonce)
                request["sealed"] = _b64(seal(key, _json_bytes(self._sealed)))
            body = _json_bytes(request)
            self._mac = compute_mac(self._key, b"client", self._nonce, self._relay_nonce, body)
            return encode_frame(FrameType.AUTH, 0, self._mac + body)
        if ftype == FrameType.WELCOME and self._mac and not self.done:
            mac, body = frame.payload[:MAC_SIZE], frame.payload[MAC_SIZE:]
            expected = compute_mac(self._key, b"relay", self._relay_nonce, self._nonce,
                                   self._mac, body)
            if not hmac.compare_digest(mac, expected):
                raise AuthError("the relay could not prove it holds the token")
            self.welcome = _json_payload(body, "welcome")
            self.done = True
            return b""
        raise ProtocolError("unexpected %s during the handshake" % _frame_name(frame))


class RelayHandshake:
    """Relay side of the handshake.

    ``token`` is the shared token, or a function ``user -> token or None`` for a
    relay with per-user tokens: the request names its user, so exactly one token
    is checked.  An unknown user is checked against a random key, so a refusal
    takes the same time and says the same thing ("auth") whether or not the user
    exists.  ``banned(user)`` is asked first, when the credential arrives: a banned
    (address, user) is refused without a look at its MAC.  Once the MAC holds, the
    client's ``binding`` must be one of ``bindings`` (the certificates a client may
    see in front of this relay), or empty when ``unbound_ok`` (a plain-TCP control
    port), or come with ``tls_interception`` (the client declared a TLS-inspecting
    middlebox); else the refusal is ``binding``.  The sealed secrets are then opened
    into ``request`` (``access``, ``client_secret``).  ``accept(request) -> welcome``
    runs last; it may raise ``RefusedError``.  After a refusal ``failed`` holds the
    reason (``failed_code`` the code) and the caller sends the returned bytes and
    closes.  ``AuthError`` is never raised: a wrong token is a refusal.
    """

    def __init__(self, token: Any, accept: Callable[[Dict[str, Any]], Dict[str, Any]],
                 nonce: Optional[bytes] = None, bindings: FrozenSet[str] = frozenset(),
                 unbound_ok: bool = True,
                 banned: Callable[[str], bool] = lambda user: False) -> None:
        self._token_for: Callable[[str], Optional[str]] = (
            token if callable(token) else (lambda user: token))
        self._accept = accept
        self._nonce = nonce or secrets.token_bytes(NONCE_SIZE)
        self._client_nonce = b""
        self._bindings = bindings
        self._unbound_ok = unbound_ok
        self._banned = banned
        self._state = "preamble"
        self.done = False
        self.failed: Optional[str] = None
        self.failed_code = ""
        self.user = ""                  # the user the AUTH named (for penalties)
        self.request: Dict[str, Any] = {}
        self.welcome: Dict[str, Any] = {}

    def _refuse(self, code: str, message: str) -> bytes:
        self.failed = "%s: %s" % (code, message)
        self.failed_code = code
        self._state = "failed"
        return encode_frame(FrameType.REFUSE, 0, _json_bytes({"error": code, "message": message}))

    def receive(self, frame: Any) -> bytes:
        if self._state == "failed":   # refused: whatever else the client sent is moot
            return b""
        if self._state == "preamble" and isinstance(frame, Preamble):
            if frame.version != PROTOCOL_VERSION:
                return self._refuse(REFUSED_VERSION, "unsupported protocol version %d; this relay "
                                    "speaks version %d" % (frame.version, PROTOCOL_VERSION))
            self._state = "hello"
            return b""
        ftype = getattr(frame, "type", None)
        if self._state == "hello" and ftype == FrameType.HELLO:
            if len(frame.payload) != NONCE_SIZE:
                raise ProtocolError("hello nonce of %d bytes, expected %d"
                                    % (len(frame.payload), NONCE_SIZE))
            self._client_nonce = frame.payload
            self._state = "auth"
            return encode_frame(FrameType.CHALLENGE, 0, self._nonce)
        if self._state == "auth" and ftype == FrameType.AUTH:
            return self._on_auth(frame.payload[:MAC_SIZE], frame.payload[MAC_SIZE:])
        raise ProtocolError("unexpected %s during the handshake" % _frame_name(frame))

    def _on_auth(self, mac: bytes, body: bytes) -> bytes:
        request = _json_payload(body, "request")   # bounded by MAX_HANDSHAKE_PAYLOAD
        user = request.get("user")
        self.user = user if isinstance(user, str) else ""
        if self._banned(self.user):
            return self._refuse(REFUSED_BANNED, "too many failed attempts from your address; "
                                "try again later")
        token = self._token_for(self.user)
        key = token.encode("utf-8") if token else secrets.token_bytes(MAC_SIZE)
        expected = compute_mac(key, b"client", self._client_nonce, self._nonce, body)
        if not hmac.compare_digest(mac, expected) or not token:
            return self._refuse(REFUSED_AUTH, "relay rejected the token")
        problem = self._binding_problem(request)
        if problem:
            return self._refuse(REFUSED_BINDING, problem)
        request.pop("access", None)        # visitor secrets count only when sealed
        sealed = request.pop("sealed", None)
        if sealed is not None:
            opened = seal(compute_mac(key, SEAL_LABEL, self._client_nonce, self._nonce),
                          _unb64(sealed) if isinstance(sealed, str) else b"")
            secret = _json_payload(opened, "sealed part of the request")
            request["access"] = secret.get("access")
            request["client_secret"] = secret.get("client_secret")
        self.request = request
        try:
            self.welcome = self._accept(self.request)
        except RefusedError as exc:
            return self._refuse(exc.code, str(exc))
        reply = _json_bytes(self.welcome)
        proof = compute_mac(key, b"relay", self._nonce, self._client_nonce, mac, reply)
        self._state = "done"
        self.done = True
        return encode_frame(FrameType.WELCOME, 0, proof + reply)

    def _binding_problem(self, request: Dict[str, Any]) -> str:
        """Why the certificate the client saw is not one it may see here ('' if fine)."""
        seen = request.get("binding")
        seen = seen if isinstance(seen, str) else ""
        if seen in self._bindings or request.get("tls_interception") is True:
            return ""
        if not seen:
            if self._unbound_ok:
                return ""
            return ("the client spoke without TLS (--plaintext), but this relay requires "
                    "TLS")
        if not self._bindings:
            return ("the client saw a TLS certificate (SHA-256 %s) but no TLS ends at this "
                    "relay on its way: a TLS-terminating proxy or load balancer in front of "
                    "it (declare it: serve --tls-proxy-fingerprint) or a man in the middle"
                    % fingerprint_text(seen))
        return ("the client saw the certificate SHA-256 %s, not this relay's: a man in the "
                "middle, or a TLS proxy this relay was not told about" % fingerprint_text(seen))


def fingerprint_text(binding: str) -> str:
    """``AB:CD:...`` for a binding's hex digits (what serve prints)."""
    hexdigits = re.sub(r"[^0-9A-Fa-f]", "", binding)[:64].upper()
    return ":".join(hexdigits[i:i + 2] for i in range(0, len(hexdigits), 2)) or "(none)"


def _frame_name(frame: Any) -> str:
    if isinstance(frame, Preamble):
        return "preamble"
    try:
        return "%s frame" % FrameType(frame.type).name
    except ValueError:
        return "frame of type %r" % (frame.type,)


# =============================================================================
# Stream (one visitor connection, multiplexed)
# =============================================================================


class StreamState(enum.Enum):
    OPEN = "open"                   # both directions carry data
    LOCAL_CLOSED = "local-closed"   # we sent FIN; we may still receive
    REMOTE_CLOSED = "remote-closed"  # peer sent FIN; we may still send
    CLOSED = "closed"               # both FINs: done
    RESET = "reset"                 # aborted by either side


# (state, event) -> next state; anything missing is illegal.
STREAM_TRANSITIONS: Dict[Tuple[StreamState, str], StreamState] = {
    (StreamState.OPEN, "send_fin"): StreamState.LOCAL_CLOSED,
    (StreamState.OPEN, "recv_fin"): StreamState.REMOTE_CLOSED,
    (StreamState.LOCAL_CLOSED, "recv_fin"): StreamState.CLOSED,
    (StreamState.REMOTE_CLOSED, "send_fin"): StreamState.CLOSED,
}
for _state in (StreamState.OPEN, StreamState.LOCAL_CLOSED, StreamState.REMOTE_CLOSED):
    STREAM_TRANSITIONS[(_state, "send_rst")] = StreamState.RESET
    STREAM_TRANSITIONS[(_state, "recv_rst")] = StreamState.RESET
del _state

CAN_SEND = frozenset({StreamState.OPEN, StreamState.REMOTE_CLOSED})
CAN_RECEIVE = frozenset({StreamState.OPEN, StreamState.LOCAL_CLOSED})
TERMINAL = frozenset({StreamState.CLOSED, StreamState.RESET})


class StreamHandler:
    """What a stream tells its owner (a visitor or target connection)."""

    def on_stream_data(self, stream: "Stream", data: bytes) -> None: ...

    def on_stream_fin(self, stream: "Stream") -> None: ...

    def on_stream_reset(self, stream: "Stream", reason: str) -> None: ...

    def on_stream_writable(self, stream: "Stream") -> None: ...


class Stream:
    """One bidirectional byte stream inside a session, with credit-based flow control."""

    def __init__(self, session: "Session", stream_id: int, recv_window: int = INITIAL_WINDOW,
                 send_window: int = INITIAL_WINDOW) -> None:
        self.session = session
        self.id = stream_id
        self.state = StreamState.OPEN
        self.can_send = True                # derived from state (hot-path flags)
        self.can_receive = True
        self.done = False
        self.handler: StreamHandler = StreamHandler()
        self.send_window = send_window      # bytes we may still send
        self.recv_window = recv_window      # size of the window we grant
        self.recv_credit = recv_window      # bytes the peer may still send
        self.unacked = 0                    # consumed here, not yet granted
        self.held = 0                       # once done: budget still held (not written out)
        self.discarded = False              # the owner dropped what it had not written
        session.window_held += recv_window  # while open, the stream holds recv_window
        self.last_grant = time.monotonic()
        self.grant_interval = -1.0          # smoothed time between grants (s; -1: none yet)
        self.pending = bytearray()          # written while out of credit
        self.fin_pending = False
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return "<Stream %d %s>" % (self.id, self.state.value)

    # -- transitions (the one place the state changes) -----------------------
    def _transition(self, event: str) -> None:
        new = STREAM_TRANSITIONS.get((self.state, event))
        if new is None:
            raise ProtocolError("stream %d: %s while %s" % (self.id, event, self.state.value))
        self._set_state(new)
        if self.done:
            self._settle()
            self.session._forget(self)

    def _set_state(self, new: StreamState) -> None:
        self.state = new
        self.can_send = new in CAN_SEND
        self.can_receive = new in CAN_RECEIVE
        self.done = new in TERMINAL

    # -- used by the owner ----------------------------------------------------
    @property
    def writable(self) -> bool:
        """True when the owner should read more from its socket for this stream."""
        return (self.send_window > 0 and self.can_send and not self.pending
                and not self.session._congested)

    def write(self, data: Any) -> None:
        """Send bytes; what exceeds the credit waits in ``pending``."""
        if not self.can_send or self.fin_pending:
            if self.done:
                return
            raise TunnelError("stream %d: write after close" % self.id)
        if self.pending:
            self.pending += data
            return
        size = len(data)
        # Within the credit, and never past the session's high-water mark: what does not
        # fit waits in ``pending`` (the stream is not writable meanwhile) and goes out
        # when the session drains, so DATA alone never queues more than the mark.
        n = min(size, self.send_window, SESSION_HIGH_WATER - len(self.session.out))
        if n > 0:
            self.send_window -= n
            self.bytes_out += n
            self.session._send_data(self.id, data if n == size else data[:n])
        if n < size:
            self.pending += data[n:] if n > 0 else data

    def close_write(self) -> None:
        """Half-close: FIN after any pending data."""
        if not self.can_send or self.fin_pending:
            return
        if self.pending:
            self.fin_pending = True
            return
        self.session._send(encode_frame(FrameType.FIN, self.id))
        self._transition("send_fin")

    def reset(self, reason: str = "") -> None:
        """Abort both directions and tell the peer."""
        if self.done:
            return
        self.session._send(encode_frame(FrameType.RST, self.id, reason.encode("utf-8")[:200]))
        self.pending = bytearray()
        self._transition("send_rst")

    def consumed(self, n: int) -> None:
        """The owner wrote ``n`` received bytes out; grant the peer more credit."""
        if self.done:
            if self.held:               # bytes that arrived before the end, now written
                n = min(n, self.held)
                self.held -= n
                self.session.window_held -= n
            return
        self.unacked += n
        if self.unacked < self.recv_window // 2 or not self.can_receive:
            return
        now = time.monotonic()
        # Smoothed: a burst of quick grants (this side catching up on a backlog) is not
        # a sign that the peer waits for credit, and growing then only lengthens the
        # queue in front of the session's other streams.
        interval = now - self.last_grant
        if self.grant_interval < 0:
            self.grant_interval = interval
        else:
            self.grant_interval += (interval - self.grant_interval) * GRANT_SMOOTHING
        increment = self.unacked
        rtt = max(self.session.rtt, MIN_RTT)
        target = MAX_WINDOW
        if self.session.shared(now):
            # Other streams of the session are active, and what this one has in flight
            # queues in front of theirs: keep it near two bandwidth-delay products
            # (rate x round trip), but not below SHARED_WINDOW.
            rate = self.recv_window / 2 / max(self.grant_interval, MIN_RTT)
            target = min(MAX_WINDOW, max(SHARED_WINDOW, int(2 * rate * rtt)))
        if self.recv_window > target:           # shrink: grant back less
            withheld = min(self.unacked, self.recv_window - target)
            self.recv_window -= withheld
            self.session.window_held -= withheld
            increment -= withheld
        elif self.recv_window < target and self.grant_interval < 2 * rtt:
            # Only within what the session's budget has left: all its streams' windows
            # together stay within window_budget, however many of them are stalled.
            session = self.session
            extra = min(self.recv_window, target - self.recv_window,
                        session.config.window_budget - session.window_held)
            if extra > 0:
                self.recv_window += extra
                session.window_held += extra
                increment += extra
                self.grant_interval *= 2    # at the same rate, grants now come half as often
        self.unacked = 0
        self.last_grant = now
        if increment:
            self.recv_credit += increment
            self.session._send(encode_frame(FrameType.WINDOW, self.id, U32.pack(increment)))

    def discard(self) -> None:
        """The owner is gone and dropped what it had not written out: that part of the
        window is free again."""
        self.discarded = True
        if self.held:
            self.session.window_held -= self.held
            self.held = 0

    def _settle(self) -> None:
        """Done: the window goes back to the budget, except what was received and not
        yet written out (that is released by ``consumed`` or ``discard``)."""
        keep = 0 if self.discarded else max(0, self.recv_window - self.recv_credit
                                             - self.unacked)
        self.session.window_held -= self.recv_window - keep
        self.held = keep

    # -- called by the session ------------------------------------------------
    def _on_data(self, payload: bytes) -> None:
        if not self.can_receive:
            raise ProtocolError("stream %d: DATA after FIN" % self.id)
        if len(payload) > self.recv_credit:
            raise ProtocolError("stream %d: %d bytes exceed the window of %d"
                                % (self.id, len(payload), self.recv_credit))
        self.recv_credit -= len(payload)
        self.bytes_in += len(payload)
        self.handler.on_stream_data(self, payload)

    def _on_window(self, increment: int) -> None:
        self.send_window += increment
        if self.send_window > MAX_CREDIT:
            raise ProtocolError("stream %d: window overflow" % self.id)
        if not self.can_send:
            return
        if self.pending:
            # Like ``write``: never past the high-water mark; the rest goes out when the
            # session drains (``Session._after_output`` calls this with 0).
            n = min(len(self.pending), self.send_window,
                    SESSION_HIGH_WATER - len(self.session.out))
            if n <= 0:
                return
            chunk = bytes(self.pending[:n])
            del self.pending[:n]
            self.send_window -= n
            self.bytes_out += n
            self.session._send_data(self.id, chunk)
            if self.pending:
                return
            if self.fin_pending:
                self.fin_pending = False
                self.close_write()
                return
        if self.writable:
            self.handler.on_stream_writable(self)

    def _on_fin(self) -> None:
        self._transition("recv_fin")
        self.handler.on_stream_fin(self)

    def _on_rst(self, reason: str) -> None:
        self._transition("recv_rst")
        self.handler.on_stream_reset(self, reason)

    def _abort(self, reason: str) -> None:
        """The whole session is gone: reset locally without a frame."""
        if self.done:
            return
        self._set_state(StreamState.RESET)
        self.handler.on_stream_reset(self, reason)


# =============================================================================
# Event loop and socket plumbing (Conn, EventLoop, Listener, Lingering, TLS and
# WebSocket channels, TLSHandshake, Dialer: every socket call lives here and in Pipe)
# =============================================================================


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Conn:
    """A non-blocking socket in the loop.  Subclasses override the ``on_*`` hooks.

    Interest is derived from state by ``update()``: read while ``wants_read()``,
    write only while output is buffered (or ``wants_write()`` says so).
    """

    def __init__(self, loop: "EventLoop", sock: Optional[socket.socket]) -> None:
        self.loop = loop
        self.sock: Any = sock                 # a socket, an ssl.SSLSocket or a TLSChannel;
        if sock is not None:                  # None until a Dialer hands one over (attach)
            sock.setblocking(False)
        self.tls = hasattr(sock, "pending")
        self.out = bytearray()
        self.closed = False
        self._mask = 0
        loop.conns.add(self)

    def wants_read(self) -> bool:
        return True

    def wants_write(self) -> bool:
        return bool(self.out)

    def update(self) -> None:
        if self.closed or self.sock is None:
            return
        mask = ((selectors.EVENT_READ if self.wants_read() else 0)
                | (selectors.EVENT_WRITE if self.wants_write() else 0))
        if mask == self._mask:
            return
        sel = self.loop.selector
        if not self._mask:
            sel.register(self.sock, mask, self)
        elif not mask:
            sel.unregister(self.sock)
        else:
            sel.modify(self.sock, mask, self)
        self._mask = mask

    def detach(self) -> socket.socket:
        """Leave the loop without closing the socket (it is handed to someone else)."""
        if not self.closed:
            self._leave()
        return self.sock

    def attach(self, sock: Any) -> None:
        """Take over a ready socket (from a Dialer); also: wrap the current one in a
        channel (TLSChannel, WSChannel) that stands for the same descriptor."""
        if self._mask:
            self.loop.selector.unregister(self.sock)
            self._mask = 0
        self.sock = sock
        sock.setblocking(False)
        self.tls = hasattr(sock, "pending")
        self.update()

    def close_socket(self) -> None:
        """The end of the connection: leave the loop and close the socket (once)."""
        if self.closed:
            return
        self._leave()
        if self.sock is not None:
            self.sock.close()

    def _leave(self) -> None:
        """The one teardown path (asyncio's _force_close): both ways out of the loop,
        closed or detached, come here once, and ``connection_lost`` runs once."""
        self.closed = True
        if self._mask:
            self.loop.selector.unregister(self.sock)
            self._mask = 0
        self.loop.conns.discard(self)
        self.connection_lost()

    def connection_lost(self) -> None:
        """Runs exactly once when the connection ends (its socket closed or handed
        on), after it left the selector: release what it holds here (a stream's
        credit, counts, timers), never in close_socket or detach."""

    def on_read(self) -> None:
        pass

    def on_write(self) -> None:
        pass

    def read_scratch(self) -> Optional[memoryview]:
        """One recv into the loop's scratch buffer: a view of what came (valid until the
        next read), or None when nothing was ready or the peer is gone (then closed)."""
        try:
            n = self.sock.recv_into(self.loop.scratch)
        except WOULD_BLOCK:
            return None
        except OSError:
            n = 0
        if not n:
            self.close_socket()
            return None
        return self.loop.scratch_view[:n]

    def read_pending(self) -> None:
        """TLS may hold decrypted bytes the selector cannot see: read them this turn."""
        if self.tls and not self.closed and self.sock.pending() and self.wants_read():
            self.loop.call_soon(self.on_read)

    def abort(self, reason: str) -> None:
        """Tear down after an error at this connection's boundary."""
        log.debug("closing %r: %s", self, reason)
        self.close_socket()


class EventLoop:
    """A ``selectors`` loop with timers, a wake-up socketpair and end-of-turn flushes."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.conns: set = set()
        self.scratch = bytearray(READ_SIZE)
        self.scratch_view = memoryview(self.scratch)
        self._timers: List[Tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._calls: Deque[Callable[[], None]] = collections.deque()
        self._flush: List[Any] = []
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.thread_id: Optional[int] = None
        self._internal = Throttle()             # a bug hit by every request: not a log flood

    # -- scheduling -------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` later in this loop turn (loop thread only)."""
        self._calls.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._calls.append(callback)
        self._wake()

    def schedule_flush(self, conn: Any) -> None:
        """``conn.flush()`` runs once at the end of this loop turn (coalescing writes)."""
        if not conn.flush_scheduled:
            conn.flush_scheduled = True
            self._flush.append(conn)

    def stop_when(self, done: Callable[[], bool], grace: float,
                  finish: Callable[[], None]) -> None:
        """Graceful stop: check ``done()`` every DRAIN_POLL seconds until it holds or
        ``grace`` has passed, then ``finish()`` and stop one poll later (to flush)."""
        deadline = time.monotonic() + grace

        def check() -> None:
            if done() or time.monotonic() >= deadline:
                finish()
                self.call_later(DRAIN_POLL, self.stop)
            else:
                self.call_later(DRAIN_POLL, check)
        check()

    def stop(self) -> None:
        """Thread- and signal-safe."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def run_in_loop(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (for tests and tools)."""
        if self.thread_id == threading.get_ident():
            return fn()
        done = threading.Event()
        box: List[Any] = []

        def call() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed back to the calling thread
                box.append((False, exc))
            done.set()
        self.call_soon_threadsafe(call)
        if not done.wait(timeout):
            raise TimeoutError("event loop did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # -- running ----------------------------------------------------------------
    def run(self) -> None:
        """Run until ``stop()``; a stop that came before ``run`` (from another thread
        that was quicker than this one) makes it return at once."""
        self.thread_id = threading.get_ident()
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._stopping = False

    def run_once(self, max_wait: Optional[float] = None) -> None:
        timeout = max_wait
        if self._calls or self._flush:
            timeout = 0
        elif self._timers:
            wait = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        for key, mask in self.selector.select(timeout):
            conn = key.data
            if conn is None:
                self._drain_wake()
                continue
            try:
                if mask & selectors.EVENT_READ and not conn.closed:
                    conn.on_read()
                if mask & selectors.EVENT_WRITE and not conn.closed:
                    conn.on_write()
            except Exception as exc:     # the error policy: ``failed`` (no bug is hidden)
                self.failed(conn, exc)
        self._run_timers()
        while self._calls:
            callback = self._calls.popleft()
            try:
                callback()
            except Exception as exc:
                self.failed(getattr(callback, "__self__", None), exc)
        self._run_flushes()

    def failed(self, owner: Any, exc: Exception) -> None:
        """The one error policy for selector events, callbacks and timers.  A
        TunnelError or OSError is the peer's or the network's doing: the connection it
        came from (``owner``, a Conn, when the callback was one's method) is torn down
        with that reason, else one line is logged.  Anything else is a bug: logged
        with its traceback (throttled: a bug hit by every request is not a flood), and
        its connection closed."""
        conn = owner if isinstance(owner, Conn) else None
        if isinstance(exc, (TunnelError, OSError)):
            if conn is not None:
                conn.abort(str(exc))
            else:
                log.warning("%s", exc)
            return
        self._internal.warn("internal error%s", " on %r; closing it" % (conn,) if conn
                            else "", level=logging.ERROR, exc_info=True)
        if conn is not None and not conn.closed:
            conn.abort("internal error")

    def _run_flushes(self) -> None:
        while self._flush:
            batch, self._flush = self._flush, []
            for conn in batch:
                conn.flush_scheduled = False
                if not conn.closed:
                    try:
                        conn.flush()
                    except Exception as exc:
                        self.failed(conn, exc)

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                continue
            try:
                timer.callback()
            except Exception as exc:
                self.failed(getattr(timer.callback, "__self__", None), exc)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close every connection still known and the loop's own sockets."""
        for conn in list(self.conns):
            conn.close_socket()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


class Listener(Conn):
    """A listening socket; ``factory(sock, addr)`` handles each accepted connection,
    ``addr`` unmapped once here (``unmap_peer``) for every later check and log line.

    Out of descriptors or kernel memory (ACCEPT_RESOURCE_ERRORS) the pending
    connection stays queued and the socket stays readable, so retrying at once would
    spin: instead it stops reading for ``pause`` seconds, with one warning a period."""

    def __init__(self, loop: EventLoop, sock: socket.socket,
                 factory: Callable[[socket.socket, Any], None],
                 pause: float = ACCEPT_PAUSE) -> None:
        super().__init__(loop, sock)
        self.factory = factory
        self.pause = pause
        self.paused = False
        self._failures = Throttle()
        self.update()

    def wants_read(self) -> bool:
        return not self.paused

    def on_read(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_RESOURCE_ERRORS:
                    self.paused = True
                    self.update()
                    self.loop.call_later(self.pause, self._resume)
                    self._failures.warn("accept failed: %s; not accepting for %.1fs",
                                        describe_oserror(exc), self.pause)
                else:   # this connection is gone (ECONNABORTED...); the next may be fine
                    self._failures.warn("accept failed: %s", describe_oserror(exc))
                return
            self.factory(sock, unmap_peer(addr))

    def _resume(self) -> None:
        self.paused = False
        self.update()       # a no-op once closed

    def abort(self, reason: str) -> None:
        log.warning("listener error: %s", reason)


class Lingering(Conn):
    """Send a last answer, half-close, and discard input until EOF or LINGER_TIMEOUT.

    Closing a socket that still has unread input makes the kernel send RST, which
    can destroy the answer before the peer reads it (the "lingering close" of
    RFC 9112 section 9.6)."""

    def __init__(self, loop: EventLoop, sock: socket.socket, data: bytes) -> None:
        super().__init__(loop, sock)
        self.out += data
        self._timer = loop.call_later(LINGER_TIMEOUT, self.close_socket)
        self.on_write()

    def on_write(self) -> None:
        try:
            sent = self.sock.send(self.out) if self.out else 0
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            self.close_socket()
            return
        del self.out[:sent]
        if not self.out:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close_socket()
                return
        self.update()

    def on_read(self) -> None:
        try:
            data = self.sock.recv_into(self.loop.scratch)
        except WOULD_BLOCK:
            return
        except OSError:
            data = 0
        if not data:
            self.close_socket()

    def connection_lost(self) -> None:
        self._timer.cancel()


class _Stacked:
    """What the socket-like channels (TLSChannel, WSChannel) share when one sits on
    another (TLS inside a WebSocket, TLS inside TLS to a proxy): the bytes held for the
    wire and the bytes sent count the channel under them too (``_inner``)."""

    sock: Any                   # what this one sits on: a socket or another channel
    _inner: Any = None          # the channel under this one, if any
    _unsent = b""               # bytes this one holds for the wire
    _wire_sent = 0              # bytes the one under it took, ever

    def __repr__(self) -> str:
        return "<%s fd=%d>" % (type(self).__name__, self.sock.fileno())

    def __getattr__(self, name: str) -> Any:      # setblocking, getpeername, setsockopt...
        return getattr(self.__dict__["sock"], name)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def unsent(self) -> bytes:
        """Bytes held for the wire: ours, and the channel's under us (sent first)."""
        inner = self._inner
        if inner is None:
            return self._unsent
        below = inner.unsent
        if not below:
            return self._unsent
        return self._unsent + below if self._unsent else below

    @property
    def wire_sent(self) -> int:
        inner = self._inner
        return self._wire_sent + (inner.wire_sent if inner is not None else 0)


class TLSChannel(_Stacked):
    """TLS over a non-blocking socket through two memory BIOs, for the control channel.

    ``ssl.SSLSocket`` hands out one 16 KiB record per ``recv_into`` (OpenSSL reads each
    with two system calls) and writes one system call per record; this makes one raw
    ``recv`` of up to TLS_READ_SIZE ciphertext per read and one raw ``send`` of all the
    ciphertext per write.  It looks like a socket to the loop and to Session:
    ``recv_into`` and ``send`` count plaintext and raise a WOULD_BLOCK error when there
    is nothing to do; ``pending()`` says decrypted input waits that the selector cannot
    see.  Ciphertext a short raw send left (``unsent``) goes out first on the next
    ``send`` or ``push``, and no new plaintext is taken while any is left: at most a
    TLS_WRITE_SIZE of it is held here, the rest waits in the caller's queue.  TLS
    errors come out as an OSError with the reason (``TLS: ...``).  Over a WSChannel
    (TLS inside a WebSocket), ``unsent``, ``wire_sent``, ``push()`` and ``pending()``
    count what that channel holds too, its bytes going out first."""

    def __init__(self, sock: Any, ctx: Any, server_side: bool,
                 server_hostname: Optional[str] = None) -> None:
        self.sock: Any = sock       # a socket, or a WSChannel or TLSChannel to stack on
        ssl = self._ssl = load_ssl()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        self._unsent = b""          # ciphertext the socket did not take yet
        self._wire_sent = 0         # ciphertext the socket took, ever (progress while
        #                             plaintext waits behind ``unsent``)
        self._more = False          # the last read stopped on a full buffer, not a dry BIO
        self._inner = sock if hasattr(sock, "push") else None   # a WSChannel under us
        self.first_bytes = b""      # the peer's first raw bytes (handshake only)

    def pending(self) -> bool:
        inner = self._inner
        return self._more or (inner is not None and inner.pending())

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._obj.getpeercert(binary_form)

    def _error(self, exc: Any) -> OSError:
        return OSError("TLS: %s" % (exc.reason or exc.__class__.__name__))

    def push(self) -> bool:
        """Send what ciphertext is left with one system call; True once none is left
        (nor in a channel under us, whose bytes go first)."""
        inner = self._inner
        if inner is not None and inner.unsent and not inner.push():
            return False
        if not self._unsent:        # (an empty write to a TLSChannel under us is an
            return True             # error in OpenSSL 3 before Python 3.10)
        try:
            sent = self.sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return False
        self._wire_sent += sent
        self._unsent = self._unsent[sent:] if sent < len(self._unsent) else b""
        return not self._unsent

    def _queue_output(self) -> None:
        """Ciphertext OpenSSL made outside ``send`` (handshake, alerts, key updates)."""
        if self._out.pending:
            self._unsent += self._out.read()

    def do_handshake(self) -> None:
        """One non-blocking step, like ``SSLSocket.do_handshake``: raises
        SSLWantReadError or SSLWantWriteError until the handshake is done."""
        ssl = self._ssl
        if self.unsent and not self.push():
            raise ssl.SSLWantWriteError()
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                self._queue_output()
                if self.unsent and not self.push():
                    raise ssl.SSLWantWriteError() from None
                try:
                    data = self.sock.recv(TLS_READ_SIZE)
                except BlockingIOError:
                    raise ssl.SSLWantReadError() from None
                if not data:
                    raise OSError("connection closed by the peer") from None
                if len(self.first_bytes) < TLS_FIRST_BYTES:
                    self.first_bytes += data[:TLS_FIRST_BYTES - len(self.first_bytes)]
                self._in.write(data)
                continue
            except ssl.SSLError:
                self._queue_output()    # the alert, for the peer's log: best effort
                if self.unsent:
                    self.push()
                raise
            self._queue_output()        # our last flight (Finished, tickets)
            if self.unsent:
                self.push()
            self._more = bool(self._in.pending or self._obj.pending())   # the peer's
            return                      # first records came along: read them at once

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        """Decrypted bytes into ``buf``: records already received first, else one raw
        recv and what it completes.  0 at the end (close_notify or a clean EOF)."""
        ssl = self._ssl
        size = nbytes or len(buf)
        obj = self._obj
        raw = not self._more
        while True:
            if raw:
                data = self.sock.recv(TLS_READ_SIZE)    # BlockingIOError: wait
                if not data:        # a record cut short gave nothing: OpenSSL keeps it
                    self._more = False
                    return 0
                self._in.write(data)
            got = 0
            try:
                got = obj.read(size, buf)
                if got and got < size:
                    with memoryview(buf) as view:
                        while got < size:
                            n = obj.read(size - got, view[got:])
                            if not n:       # close_notify: the 0 comes next time
                                self._more = True
                                return got
                            got += n
                if not got:                     # close_notify (read returns 0)
                    self._more = False
                    return 0
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:      # close_notify, some versions
                self._more = False
                return got
            except ssl.SSLError as exc:
                self._more = False
                raise self._error(exc) from None
            self._more = got == size
            if self._out.pending:               # a key update's answer, say
                self._queue_output()
            if got or raw:
                break
            raw = True                          # the buffer was full last time: read on
        if not got:
            raise ssl.SSLWantReadError()
        return got

    def send(self, data: Any) -> int:
        """Encrypt up to TLS_WRITE_SIZE of ``data`` and send it with one system call;
        returns the plaintext taken (0 while older ciphertext still waits)."""
        if (self._unsent or self._inner is not None) and not self.push():
            return 0
        n = len(data)
        if not n:
            return 0
        try:
            if n > TLS_WRITE_SIZE:
                n = TLS_WRITE_SIZE
                with memoryview(data) as view:
                    self._obj.write(view[:n])
            else:
                self._obj.write(data)
        except self._ssl.SSLError as exc:
            raise self._error(exc) from None
        self._unsent = self._out.read()
        self.push()
        return n

    def recv(self, size: int) -> bytes:
        """Decrypted bytes, for a channel stacked on this one (TLS to the relay inside
        TLS to an https:// proxy); raises SSLWantReadError when there are none."""
        buf = bytearray(size)
        n = self.recv_into(buf)
        del buf[n:]
        return bytes(buf)

    def close(self) -> None:
        """Send close_notify (and any ciphertext left) if the socket takes it; close."""
        if self.sock.fileno() < 0:
            return
        try:
            self._obj.unwrap()
        except (self._ssl.SSLError, ValueError):
            pass        # SSLWantReadError: the peer's close_notify is not awaited
        self._queue_output()
        if self.unsent:
            try:
                self.push()
            except OSError:
                pass
        self.sock.close()


class WSChannel(_Stacked):
    """The tunnel's byte stream inside WebSocket binary frames, over a socket, an
    ssl.SSLSocket (the relay's HTTPS port) or a TLSChannel (a client's outer TLS).
    It looks like a socket to the loop, to Session and to a TLSChannel on top (TLS
    inside the WebSocket), as TLSChannel does: ``recv_into``/``recv`` return payload
    bytes and raise BlockingIOError when a read brought none (only control frames, or
    nothing); ``pending()`` says decoded bytes (or the inner's) wait that the selector
    cannot see.  ``send`` frames up to WS_WRITE_SIZE of the data as one BINARY frame
    (masked on the client side) with one send on the inner socket; frame bytes the
    inner did not take (``unsent``) go out first on the next ``send`` or ``push``, and
    no new data is taken while any is left.  PING is answered with PONG; CLOSE with
    CLOSE, then the end of the stream (0).  A peer that breaks RFC 6455 gets CLOSE 1002
    and an OSError (``WebSocket: ...``).  ``initial``: bytes already read past the
    HTTP head (the first frames)."""

    def __init__(self, sock: Any, server_side: bool, initial: bytes = b"") -> None:
        self.sock = sock
        self.server_side = server_side
        self._mask = not server_side            # a client masks what it sends
        self.sealed = False                     # what it sends is TLS ciphertext (ws_frame)
        self._decoder = WSDecoder(server_side)
        self._inner = sock if hasattr(sock, "push") else None   # a channel under us
        self._inner_pending = getattr(sock, "pending", None)    # ... or an SSLSocket
        self._unsent = b""                      # frame bytes the inner did not take yet
        self._wire_sent = 0                     # frame bytes the inner took, ever
        self._input = bytearray()               # payload decoded but not yet returned
        self._initial = bytes(initial)          # raw bytes read before we existed
        self._scratch: Optional[bytearray] = None   # raw reads from a channel under us
        self._eof = False                       # the peer's CLOSE or end of stream seen
        self._eof_told = False                  # ... and the 0 returned
        self._close_sent = False

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.sock.getpeercert(binary_form)

    def pending(self) -> bool:
        if self._input or self._initial or (self._eof and not self._eof_told):
            return True
        return bool(self._inner_pending is not None and self._inner_pending())

    def limit_frames(self, frames: Optional[int]) -> None:
        """Allow only this many more frames from the peer (None: no limit); past it,
        the channel fails as on a protocol error."""
        self._decoder.frames_left = frames

    def write_raw(self, data: bytes) -> None:
        """Queue bytes outside any frame, before the next frame (the relay's 101)."""
        self._unsent += data

    def push(self) -> bool:
        """Send what frame bytes are left with one send; True once none is left here
        (nor in a channel under us)."""
        inner = self._inner
        if inner is not None and inner.unsent and not inner.push():
            return False
        if not self._unsent:
            return True
        try:
            sent = self.sock.send(self._unsent)
        except WOULD_BLOCK:
            return False
        self._wire_sent += sent
        self._unsent = self._unsent[sent:] if sent < len(self._unsent) else b""
        return not self._unsent

    def _control(self, opcode: int, payload: bytes) -> None:
        """Queue a control frame behind what is held (frames never interleave) and
        try to send it now."""
        self._unsent += ws_frame(opcode, payload, self._mask)
        try:
            self.push()
        except OSError:
            pass        # the next read or write reports the broken connection

    def recv(self, size: int) -> bytes:
        """Up to ``size`` payload bytes: decoded ones first, else one read of the inner
        socket and what it completes; b"" at the end of the stream."""
        pieces: List[bytes] = []
        got = self._input
        if got:                 # decoded before: no read unless the inner holds more
            if len(got) >= size:
                data = bytes(got[:size])
                del got[:size]
                return data
            pieces.append(bytes(got))
            have = len(got)
            got.clear()
        elif self._eof:
            self._eof_told = True
            return b""
        else:
            have = self._read_frames(size, pieces)      # WOULD_BLOCK: wait
        pending = self._inner_pending
        # An ssl.SSLSocket hands out one record per read and the selector cannot see the
        # ones it holds: a read of control frames alone (or of half an inner TLS record)
        # must not end here while the rest already waits inside it.
        while pending is not None and have < size and not self._eof and pending():
            try:
                have += self._read_frames(size - have, pieces)
            except WOULD_BLOCK:
                break
        if not pieces:
            if self._eof:
                self._eof_told = True
                return b""
            raise BlockingIOError(errno.EAGAIN, "only WebSocket control frames")
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(data) > size:
            self._input += memoryview(data)[size:]
            data = data[:size]
        return data

    def _read_frames(self, size: int, pieces: List[bytes]) -> int:
        """One read of the inner socket (or the initial bytes), decoded: payload appended
        to ``pieces``, PING answered, CLOSE answered and the end noted; returns the
        payload bytes it gave."""
        if self._initial:
            raw: Any = self._initial
            self._initial = b""
        elif self._inner is not None:       # a TLSChannel: read through it, never past it
            want = size if size > WS_MIN_READ else WS_MIN_READ
            scratch = self._scratch
            if scratch is None or len(scratch) < want:
                scratch = self._scratch = bytearray(want)
            n = self.sock.recv_into(scratch, want)
            raw = memoryview(scratch)[:n]
        else:       # payload <= raw bytes: a large read never leaves decoded bytes over
            raw = self.sock.recv(size if size > WS_MIN_READ else WS_MIN_READ)
        if not raw:
            self._eof = True
            return 0
        try:
            events = self._decoder.feed(raw)
        except ProtocolError as exc:
            if not self._close_sent:
                self._close_sent = True
                self._control(WSOpcode.CLOSE, ws_close_payload(WS_CLOSE_PROTOCOL, str(exc)))
            raise OSError("WebSocket: %s" % exc) from None
        have = 0
        for event in events:
            kind = event[0]
            if kind is WS_EV_DATA:
                pieces.append(event[1])
                have += len(event[1])
            elif kind is WS_EV_PING:
                if not self._close_sent and len(self._unsent) < WS_PONG_LIMIT:
                    self._control(WSOpcode.PONG, event[1])      # (nothing after our CLOSE)
            elif kind is WS_EV_CLOSE:
                self._eof = True
                log.debug("WebSocket closed by the peer: %d %s", event[1],
                          escape_unprintable(event[2]))
                if not self._close_sent:
                    self._close_sent = True
                    self._control(WSOpcode.CLOSE, ws_close_payload(WS_CLOSE_NORMAL))
        return have

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        data = self.recv(nbytes or len(buf))
        n = len(data)
        buf[:n] = data
        return n

    def send(self, data: Any) -> int:
        """Frame up to WS_WRITE_SIZE of ``data`` and send it with one send; returns the
        payload taken (0 while older frame bytes still wait)."""
        if (self._unsent or self._inner is not None) and not self.push():
            return 0
        n = len(data)
        if not n:
            return 0
        if n > WS_WRITE_SIZE:
            n = WS_WRITE_SIZE
            with memoryview(data) as view:
                self._unsent = ws_frame(WSOpcode.BINARY, view[:n], self._mask,
                                        sealed=self.sealed)
        else:
            self._unsent = ws_frame(WSOpcode.BINARY, data, self._mask, sealed=self.sealed)
        self.push()
        return n

    def close(self) -> None:
        """Send CLOSE 1000 (and any frame bytes left) if the inner takes them; close."""
        if self.sock.fileno() < 0:
            return
        if not self._close_sent:
            self._close_sent = True
            self._control(WSOpcode.CLOSE, ws_close_payload(WS_CLOSE_NORMAL))
        self.sock.close()


def tls_handshake_step(sock: Any) -> Optional[bool]:
    """One non-blocking step of ``sock.do_handshake()`` (an SSLSocket or TLSChannel):
    None once it is done, else whether it waits to write (True) or to read; raises
    TunnelError("TLS handshake failed: REASON[: the verification's message]")."""
    ssl = load_ssl()
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return False
    except ssl.SSLWantWriteError:
        return True
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or describe_oserror(exc)
        detail = getattr(exc, "verify_message", None)   # SSLCertVerificationError
        raise TunnelError("TLS handshake failed: %s" % ("%s: %s" % (why, detail) if detail
                                                        else why)) from None
    return None


class TLSHandshake(Conn):
    """A non-blocking TLS handshake in the loop; a stalled one blocks nobody.

    ``done(sslsock)`` gets the socket when the handshake completes; ``failed(why)``
    is called on an error or after ``timeout``."""

    def __init__(self, loop: EventLoop, sock: Any, timeout: float,
                 done: Callable[[Any], None], failed: Callable[[str], None]) -> None:
        super().__init__(loop, sock)
        self.done_cb = done
        self.failed_cb = failed
        self.want_write = False
        self._timer = loop.call_later(timeout, lambda: self._fail("TLS handshake timed out"))

    def start(self) -> "TLSHandshake":
        """First step; may finish (and call ``done``) at once if the peer was quick."""
        self.step()
        return self

    def wants_write(self) -> bool:
        return self.want_write

    def step(self) -> None:
        try:
            want = tls_handshake_step(self.sock)
        except TunnelError as exc:
            self._fail(str(exc))
            return
        if want is None:
            self.done_cb(self.detach())
            return
        self.want_write = want
        self.update()

    on_read = step
    on_write = step

    def connection_lost(self) -> None:
        self._timer.cancel()

    def _fail(self, why: str) -> None:
        if self.closed:
            return
        self.close_socket()
        self.failed_cb(why)

    def abort(self, reason: str) -> None:
        self._fail(reason)


def make_listener(host: str, port: int) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (IPv4 or IPv6 by ``host``)."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def resolve(host: str, port: int) -> List[Any]:
    """Every TCP address for host:port (``localhost`` is often ::1 and 127.0.0.1)."""
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


def dial(infos: List[Any], retry_on: Optional[Collection[int]] = None
         ) -> Tuple[Optional[socket.socket], Optional[OSError]]:
    """Start a non-blocking connect to the first address that does not fail at once;
    ``infos`` is consumed as addresses are tried.  ``retry_on``: the errnos after which
    the next address is tried (None: any); another error ends the list."""
    error: Optional[OSError] = None
    while infos:
        family, stype, proto, _, addr = infos.pop(0)
        try:
            sock = socket.socket(family, stype, proto)
        except OSError as exc:      # no IPv6 here (::1 of a bare PORT): the next address
            if exc.errno != errno.EAFNOSUPPORT:
                raise
            error = exc
            continue
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            return sock, None
        sock.close()
        error = OSError(err, os.strerror(err))
        if retry_on is not None and err not in retry_on:
            break
    return None, error or OSError(errno.EADDRNOTAVAIL, "no address to connect to")


class DialStage(collections.namedtuple("DialStage", "kind arg1 arg2 arg3 where")):
    """One step of a Dialer after the TCP connect (see DIAL_STAGES):

    ``(DIAL_TLS, ctx, server_hostname, is_channel)``: is_channel marks the TLS whose
    certificate the handshake binds (the relay's), not a proxy's;
    ``(DIAL_CONNECT, proxy, host, port)`` and ``(DIAL_SOCKS, proxy, host, port)``;
    ``(DIAL_WEBSOCKET, host_header, protocol, url)``.  ``where`` names the far end of
    the stage in error messages (``relay.example.com:443``)."""

    def __new__(cls, kind: str, arg1: Any = None, arg2: Any = None,
                arg3: Any = None, where: str = "") -> "DialStage":
        return super().__new__(cls, kind, arg1, arg2, arg3, where)


class Dialer(Conn):
    """One outgoing connection, non-blocking, through its stages: TCP to each address of
    ``host:port`` in turn, then each DialStage in order (proxy CONNECT or SOCKS5, TLS,
    WebSocket upgrade), every stage within ``timeout`` of its start.  The client uses it
    for the relay and for every stream's target (no stages).

    ``done(sock)`` gets the ready socket (or channel: TLSChannel, WSChannel) and owns it
    from then on; ``failed(why, kind)`` gets a one-line reason and a DIAL_* kind, at most
    once, never from inside the constructor (so the caller's own state is set first).
    ``addrs``: the addresses to try, already resolved (a list of the caller's own, copied;
    a bare PORT's loopback pair), instead of resolving ``host``; ``retry_on``: the errnos
    after which the next address is tried (None: any; a bare PORT's pair: refused only,
    so that a timeout of 127.0.0.1 never sends the request to whoever holds ::1)."""

    def __init__(self, loop: EventLoop, host: str, port: int, stages: List[DialStage],
                 timeout: float, done: Callable[[Any], None],
                 failed: Callable[[str, str], None], where: str = "",
                 addrs: Optional[List[Any]] = None,
                 retry_on: Optional[Collection[int]] = None) -> None:
        super().__init__(loop, None)
        self.where = where or format_hostport(host, port)
        self.stages = list(stages)
        self.stage = DIAL_TCP
        self.timeout = timeout
        self.done_cb = done
        self.failed_cb = failed
        self.peer_der = b""             # certificate of the channel's TLS stage
        self.rest = b""                 # bytes a stage read past its reply (after a 101)
        self._want_write = True
        self._finished = False          # failed_cb called (at most once)
        self._binds = False             # the current TLS stage is the channel's
        self._reader: Any = None        # ConnectReply, Socks5Handshake or the 101 head
        self._key = ""                  # Sec-WebSocket-Key of the upgrade
        self._timer = loop.call_later(timeout, self._timeout)
        self._retry_on = retry_on
        try:
            self._addrs = list(addrs) if addrs is not None else resolve(host, port)
        except socket.gaierror as exc:      # "cannot resolve HOST: <the resolver's words>"
            why = "cannot resolve %s: %s" % (escape_unprintable(host), describe_oserror(exc))
            loop.call_soon(lambda: self._fail(why, DIAL_UNREACHABLE, bare=not where))
            return      # (a proxy's: "proxy HOST:PORT: cannot resolve HOST: ...")
        except (OSError, UnicodeError) as exc:   # UnicodeError: a label over 63 bytes
            why = describe_oserror(exc) if isinstance(exc, OSError) else "invalid host name"
            loop.call_soon(lambda: self._fail(why, DIAL_UNREACHABLE))
            return
        sock, error = dial(self._addrs, retry_on)
        if sock is None:
            loop.call_soon(lambda: self._fail(describe_oserror(error or OSError()),
                                              DIAL_UNREACHABLE))
            return
        self.attach(sock)

    def __repr__(self) -> str:
        return "<Dialer %s %s>" % (self.where, self.stage)

    def wants_read(self) -> bool:
        return self.stage != DIAL_TCP and not self._want_write

    def wants_write(self) -> bool:
        return self._want_write or bool(self.out) or bool(getattr(self.sock, "unsent", b""))

    def on_write(self) -> None:
        if self.stage == DIAL_TCP:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                retry = self._addrs and (self._retry_on is None or err in self._retry_on)
                sock, _ = dial(self._addrs, self._retry_on) if retry else (None, None)
                if sock is None:
                    self._fail(os.strerror(err).lower(), DIAL_UNREACHABLE
                               if err == errno.ECONNREFUSED else DIAL_RETRY)
                    return
                self.sock.close()
                self.attach(sock)       # the next address (::1 refused, 127.0.0.1 next)
                return
            self._next_stage()
        elif self.stage == DIAL_TLS:
            self._tls_step()
        else:
            self._send_out()

    def on_read(self) -> None:
        if self.stage == DIAL_TLS:
            self._tls_step()
            return
        try:
            n = self.sock.recv_into(self.loop.scratch)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self._fail("%s during %s" % (describe_oserror(exc), DIAL_STAGES[self.stage]))
            return
        if not n:
            self._fail("connection closed during %s" % DIAL_STAGES[self.stage])
            return
        data = bytes(self.loop.scratch_view[:n])
        try:
            if self.stage == DIAL_CONNECT:
                self._connect_reply(data)
            elif self.stage == DIAL_SOCKS:
                self.out += self._reader.feed(data)
                if self._reader.done:
                    self._after_reply(self._reader.rest)
                else:
                    self._send_out()
            else:
                self._upgrade_reply(data)
        except ProxyError as exc:
            self._fail(str(exc), DIAL_FATAL if exc.fatal else DIAL_RETRY, bare=True)
        except ProtocolError as exc:
            self._fail(str(exc))

    # -- stages -------------------------------------------------------------------------
    def _next_stage(self) -> None:
        """Start the next stage, or hand the socket over when none is left."""
        self._timer.cancel()
        if not self.stages:
            self._finished = True
            self.done_cb(self.detach())
            return
        try:
            self._start_next()
        except ValueError as exc:     # a name no request can carry (CR, LF, 256 bytes)
            self._fail(str(exc), DIAL_FATAL)

    def _start_next(self) -> None:
        self._timer = self.loop.call_later(self.timeout, self._timeout)
        stage = self.stages.pop(0)
        self.stage = stage.kind
        self.where = stage.where or self.where
        self._want_write = False
        if stage.kind == DIAL_TLS:
            ctx, name, self._binds = stage.arg1, stage.arg2, stage.arg3
            # The name checked (an IP literal too), else sent as SNI (names only).
            hostname = name if ctx.check_hostname or not _is_ip_literal(name) else None
            try:
                channel = TLSChannel(self.sock, ctx, server_side=False,
                                     server_hostname=hostname)
            except (OSError, ValueError) as exc:
                self._fail("TLS: %s" % exc, DIAL_TLS_FAILED)
                return
            self.attach(channel)
            self._tls_step()
        elif stage.kind == DIAL_CONNECT:
            proxy, host, port = stage.arg1, stage.arg2, stage.arg3
            self._proxy, self._target = proxy, format_hostport(host, port)
            self._reader = ConnectReply()
            self.out += connect_request(host, port, proxy)
            self._send_out()
        elif stage.kind == DIAL_SOCKS:
            proxy, host, port = stage.arg1, stage.arg2, stage.arg3
            if proxy.scheme == "socks5":            # names resolved here, not by the proxy
                try:
                    host = resolve(host, port)[0][4][0]
                except (OSError, IndexError, UnicodeError) as exc:
                    self._fail("cannot resolve %s: %s; use socks5h:// to let the proxy "
                               "resolve it" % (host, describe_oserror(exc)
                                               if isinstance(exc, OSError) else "no address"),
                               DIAL_UNREACHABLE, bare=True)
                    return
            self._reader = Socks5Handshake(host, port, proxy.user, proxy.password,
                                           proxy_name=proxy.where)
            self.out += self._reader.start()
            self._send_out()
        else:
            host_header, protocol, self._url = stage.arg1, stage.arg2, stage.arg3
            self._key = ws_key()
            self._protocol = protocol
            self._reader = bytearray()
            self.out += ws_upgrade_request(host_header, WS_PATH, self._key, protocol)
            self._send_out()

    def _send_out(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self._fail("%s during %s" % (describe_oserror(exc), DIAL_STAGES[self.stage]))
                return
            del self.out[:sent]
        elif getattr(self.sock, "unsent", b""):
            self.sock.push()
        self.update()

    def _tls_step(self) -> None:
        try:
            want = tls_handshake_step(self.sock)
        except TunnelError as exc:
            why = str(exc)
            first = getattr(self.sock, "first_bytes", b"")
            if TLS_NOT_SPOKEN in why and first.startswith(b"HTTP/1."):
                why = "%s: %s" % (TLS_GOT_HTTP, _http_answer_text(first))
            self._fail(why, DIAL_FATAL if "CERTIFICATE_VERIFY_FAILED" in why
                       or "certificate verify failed" in why else DIAL_TLS_FAILED)
            return
        if want is None:
            self._want_write = False
            if self._binds:
                self.peer_der = self.sock.getpeercert(binary_form=True) or b""
            self._next_stage()
            return
        self._want_write = want
        self.update()

    def _connect_reply(self, data: bytes) -> None:
        reply = self._reader
        if not reply.feed(data):
            return
        if not 200 <= reply.status < 300:
            raise connect_error(reply, self._proxy, self._target)
        self._after_reply(reply.rest)

    def _after_reply(self, rest: bytes) -> None:
        if rest:        # the relay speaks second: nothing may come before our first bytes
            raise ProtocolError("the proxy sent %d bytes after its reply" % len(rest))
        self._next_stage()

    def _upgrade_reply(self, data: bytes) -> None:
        buf = self._reader
        buf += data
        end = ws_response_head_end(buf)
        if end < 0:
            return
        m = _STATUS_LINE_RE.match(buf)
        if m is not None and m.group(3) != b"101":
            self._upgrade_refused(bytes(buf[:end]), int(m.group(3)), bytes(buf[end:]))
            return
        try:
            ws_check_response(bytes(buf[:end]), self._key, self._protocol)
        except ProtocolError as exc:        # the URL names the place: not ``where`` too
            self._fail("%s: %s" % (self._url, exc), bare=True)
            return
        channel = WSChannel(self.sock, server_side=False, initial=bytes(buf[end:]))
        # TLS inside (tunnel.py.2.tls): the frames carry ciphertext to the relay, masked
        # the quick way (ws_frame's ``sealed``).  Not with TLS outside: whatever ends that
        # TLS (a load balancer, a declared inspecting proxy) passes plain frames on.
        channel.sealed = self._protocol == WS_PROTOCOL_TLS
        self.attach(channel)
        self._next_stage()

    def _upgrade_refused(self, head: bytes, status: int, body: bytes) -> None:
        """Not 101: the status, the start of the body (where a relay explains itself,
        only what came with the head), a redirect's Location; DIAL_REFUSED for a 3xx or
        a 4xx but 408/429 (the caller decides whether that ends it), else a retry."""
        line, block = _split_start_line(head[:-4])
        reason = line.split(" ", 2)[2] if line.count(" ") >= 2 else ""
        try:
            headers = _parse_fields(block)
        except HTTPError:
            headers = Headers([])
        why = "%s: the relay answered %d%s, not 101" % (
            self._url, status, " " + escape_unprintable(reason[:UPGRADE_BODY_SHOWN])
            if reason else "")
        location = headers.get("location")
        if status in UPGRADE_REDIRECTS and location:
            target = location.strip()
            shown = escape_unprintable(target[:UPGRADE_BODY_SHOWN])
            why = "%s: the answer redirects to %s" % (self._url, shown)
            scheme, sep, rest = target.partition("://")
            if sep and scheme.lower() in ("https", "http"):
                host = _authority(rest)[0].rpartition("@")[2]
                why += ": use --relay %s://%s" % (scheme.lower(), escape_unprintable(
                    host[:MAX_HOST_NAME]) or "HOST")
        else:
            try:
                length = _length_from(headers.get_all("content-length"))
            except HTTPError:
                length = None
            text = body[:min(UPGRADE_BODY_SHOWN, len(body) if length is None else length)]
            first = text.decode("utf-8", "replace").strip().split("\n", 1)[0].strip()
            if first:
                why += ": " + escape_unprintable(first)
        refused = 300 <= status < 500 and status not in UPGRADE_RETRY_STATUSES
        self._fail(why, DIAL_REFUSED if refused else DIAL_RETRY, bare=True)

    # -- failure --------------------------------------------------------------------------
    def _timeout(self) -> None:
        if not self._finished:
            self._fail("timed out" if self.stage == DIAL_TCP
                       else "timed out in %s" % DIAL_STAGES[self.stage])

    def _fail(self, why: str, kind: str = DIAL_RETRY, bare: bool = False) -> None:
        """``bare``: the message names its own place (a proxy's refusal)."""
        if self._finished:
            return
        self._finished = True
        self.close_socket()
        self.failed_cb(why if bare else "%s: %s" % (self.where, why), kind)

    def abort(self, reason: str) -> None:
        self._fail(reason)

    def abort_quietly(self) -> None:
        """The caller gave up (its stream went away): close, report nothing."""
        self._finished = True
        self.close_socket()

    def connection_lost(self) -> None:
        self._timer.cancel()        # (a stage's timer: each stage starts its own)


def _http_answer_text(data: bytes) -> str:
    """An HTTP answer's status and the first line of its body, printable and short
    (``400 Bad Request: This port speaks plain HTTP, ...``)."""
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ", 1)[1:]
    text = body.decode("utf-8", "replace").strip().split("\n", 1)[0].strip()
    shown = (status[0].decode("latin-1") if status else "") + (": " + text if text else "")
    return escape_unprintable(shown[:UPGRADE_BODY_SHOWN])


def _is_ip_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def unmap_peer(addr: Any) -> Any:
    """An accepted peer address, with an IPv4-mapped IPv6 host (``::ffff:a.b.c.d``, how
    a dual-stack socket reports an IPv4 peer) as plain IPv4 ``(a.b.c.d, port)``, so
    that allow/deny rules, penalties, caps, logs and X-Forwarded-For see one form."""
    if isinstance(addr, tuple) and len(addr) >= 2 and ":" in addr[0]:
        try:
            packed = socket.inet_pton(socket.AF_INET6, addr[0])
        except OSError:         # a scope id (fe80::1%eth0): not a mapped address
            return addr
        if packed[:len(IPV4_MAPPED_PREFIX)] == IPV4_MAPPED_PREFIX:
            return (socket.inet_ntop(socket.AF_INET, packed[len(IPV4_MAPPED_PREFIX):]),
                    addr[1])
    return addr


def source_key(ip: str) -> str:
    """What per-source limits count by: an IPv4 address itself, an IPv6 address's /64
    (a subscriber is routed a whole /64, so its single addresses are no limit)."""
    if ":" not in ip:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except OSError:
        return ip
    prefix = packed[:IPV6_SOURCE_PREFIX] + bytes(16 - IPV6_SOURCE_PREFIX)
    return "%s/%d" % (socket.inet_ntop(socket.AF_INET6, prefix), IPV6_SOURCE_PREFIX * 8)


def peer_text(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_hostport(addr[0], addr[1])
    return str(addr) or "local"


# =============================================================================
# Session (one control connection: handshake, frames, streams, heartbeats)
# =============================================================================


class SessionDelegate:
    """What a session tells the relay or the client."""

    def on_session_up(self, session: "Session") -> None: ...

    def on_session_closed(self, session: "Session", reason: str,
                          error: Optional[BaseException]) -> None: ...

    def on_stream_open(self, session: "Session", stream: Stream, info: Dict[str, Any]) -> None:
        stream.reset("streams are not accepted here")

    def on_goaway(self, session: "Session", reason: str) -> None: ...

    def on_handshake_refused(self, session: "Session", handshake: Any) -> float:
        """Relay side: a refusal is about to go out; return seconds to delay it."""
        return 0.0

    def on_access_log(self, session: "Session", record: Dict[str, Any]) -> None: ...

    def on_access_batch(self, session: "Session", records: List[Tuple[int, int, int, int]],
                        payload: bytes, at: int) -> None:
        """A FLAG_LOG_BATCH frame's records as (status, us, bytes, text length), their
        texts ("METHOD target") one after another in ``payload`` from ``at``: each as
        on_access_log has it, unless the delegate has a cheaper way."""
        for status, micros, nbytes, n in records:
            method, _, target = payload[at:at + n].decode("utf-8", "replace").partition(" ")
            at += n
            self.on_access_log(session, {"method": method, "target": target,
                                         "status": status, "duration": micros / 1e6,
                                         "bytes": nbytes})


class Side(SessionDelegate):
    """What the relay and the client share: one EventLoop they run until stopped, and a
    graceful shutdown (go-away, let work finish within the grace period, stop)."""

    loop: "EventLoop"
    config: Any
    stopping: bool
    exit_code: int = 0

    def run(self) -> int:
        """Run the loop (on this thread) until stopped; return the exit status."""
        self._starting()
        try:
            self.loop.run()
        finally:
            self._stopped()
            self.loop.close()
        return self.exit_code

    def stop(self) -> None:
        """Stop now (thread-safe)."""
        self.loop.stop()

    def shutdown(self, grace: Optional[float] = None) -> None:
        """Graceful stop (on the loop thread); a second call stops at once."""
        if self.stopping:
            self.loop.stop()
            return
        self.stopping = True
        self._drain(self.config.grace if grace is None else grace)

    # -- what each side fills in ----------------------------------------------------
    def _starting(self) -> None:
        """On the loop's thread, just before it runs."""

    def _stopped(self) -> None:
        """After the loop ran, before it closes."""

    def _drain(self, grace: float) -> None:
        """Begin the graceful stop: at the end, ``loop.stop()`` (``stop_when``)."""
        self.loop.stop()


class SessionConfig(Settings):
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    window_budget: int = SESSION_BUDGET     # receive windows of all streams together


class Session(Conn):
    """The control socket of one client, on either side.

    The relay side opens streams (``open_stream``); the client side accepts
    them (``SessionDelegate.on_stream_open``).  Output frames are queued in
    ``out`` and written once per loop turn.
    """

    _ids = itertools.count(1)

    def __init__(self, loop: EventLoop, sock: socket.socket, peer: str,
                 handshake: Any, delegate: SessionDelegate, is_relay: bool,
                 config: Optional[SessionConfig] = None, peer_ip: str = "",
                 quickack: bool = False) -> None:
        super().__init__(loop, sock)
        set_nodelay(sock)
        # Through a proxy or load balancer that does not set TCP_NODELAY, its next small
        # write waits for our ACK of the last (Nagle), which the kernel delays up to
        # 40 ms when we have nothing to send back: ACK every read at once on such paths.
        self.quickack = quickack
        self.sid = next(Session._ids)
        self.peer = peer
        self.peer_ip = peer_ip           # for per-address penalties (relay side)
        self.handshake = handshake
        self.delegate = delegate
        self.is_relay = is_relay
        self.config = config or SessionConfig()
        self.decoder = FrameDecoder(expect_preamble=is_relay, max_payload=MAX_HANDSHAKE_PAYLOAD)
        self.established = False
        self.streams: Dict[int, Stream] = {}
        self.highest_id = 0              # largest stream id opened so far
        self.rtt = 0.0                   # smallest of the recent PING round trips
        self.window_held = 0             # receive windows granted (see Stream.held)
        self._rtts: Deque[float] = collections.deque(maxlen=RTT_SAMPLES)
        self.name = ""                   # tunnel name, set by the relay/client
        self.goaway_sent = False
        self.goaway_received = False
        self.flush_scheduled = False
        self.close_reason: Optional[str] = None
        self._close_error: Optional[BaseException] = None   # what close() was given
        self.log_batch = False          # relay: LOG records go in FLAG_LOG_BATCH frames
        self._logs = bytearray()        # ... this loop turn's records, sent with the next
        self._log_texts = bytearray()   # flush, and their texts
        self._log_count = 0
        self._close_when_flushed: Optional[str] = None
        self._hold = False               # output held back (a delayed refusal)
        self._congested = False
        self._paused = False             # input not read: the peer does not read our output
        self._queued_at_beat = 0         # len(out) at the last heartbeat
        self.sent_total = 0              # bytes of output the socket took, ever
        self._sent_at_beat = 0           # ... at the last heartbeat
        self._stuck_for = 0.0            # output queued and nothing taken, this long (s)
        self._ping_sent: Dict[bytes, float] = {}   # random payload -> when it was sent
        self.last_rx = time.monotonic()
        self._active: set = set()        # streams that moved data since _active_since
        self._active_before = 0          # ... and how many did in the window before
        self._active_since = self.last_rx
        self._timers: List[Timer] = [loop.call_later(self.config.handshake_timeout,
                                                     self._handshake_timeout)]
        if self.tls:                     # a TLSChannel may hold ciphertext after out empties
            self.wants_write = self._tls_wants_write    # type: ignore[assignment]
            self.on_write = self._tls_on_write          # type: ignore[assignment]
        if not is_relay:
            self._send(handshake.start())
        self.update()
        self.read_pending()              # records that came with the TLS handshake's last

    def __repr__(self) -> str:
        return "<Session %d %s %s>" % (self.sid, self.name or "-", self.peer)

    def _tls_wants_write(self) -> bool:
        return bool(self.out or self.sock.unsent)

    def _tls_on_write(self) -> None:
        if self.out:
            self.flush()
            return
        try:
            self.sock.push()
        except OSError as exc:
            self.close("connection error: %s" % describe_oserror(exc))
            return
        self._after_output()

    @property
    def label(self) -> str:
        return "session %d (%s%s)" % (self.sid, self.name + " from " if self.name else "",
                                      self.peer)

    # -- output -----------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        self.out += data
        if not self._congested and len(self.out) >= SESSION_HIGH_WATER:
            self._congested = True
        self.loop.schedule_flush(self)

    def _send_data(self, stream_id: int, data: Any) -> None:
        if self.closed:
            return
        self._active.add(stream_id)
        out = self.out
        size = len(data)
        if size <= MAX_FRAME_PAYLOAD:
            out += FRAME_HEADER.pack(FrameType.DATA, 0, stream_id, size)
            out += data
        else:
            with memoryview(data) as view:
                for start in range(0, size, MAX_FRAME_PAYLOAD):
                    chunk = view[start:start + MAX_FRAME_PAYLOAD]
                    out += FRAME_HEADER.pack(FrameType.DATA, 0, stream_id, len(chunk))
                    out += chunk
        if not self._congested and len(out) >= SESSION_HIGH_WATER:
            self._congested = True
        self.loop.schedule_flush(self)

    def _release(self) -> None:
        self._hold = False
        self.flush()

    def _emit_logs(self) -> None:
        """This turn's LOG records as one FLAG_LOG_BATCH frame, after its DATA."""
        logs, texts, out = self._logs, self._log_texts, self.out   # (a flush is scheduled:
        out += FRAME_HEADER.pack(LOG_TYPE, FLAG_LOG_BATCH, 0,        # the first record's)
                                 LOG_BATCH_COUNT.size + len(logs) + len(texts))
        out += LOG_BATCH_COUNT.pack(self._log_count)
        out += logs
        out += texts
        logs.clear()
        texts.clear()
        self._log_count = 0
        if not self._congested and len(out) >= SESSION_HIGH_WATER:
            self._congested = True

    def flush(self) -> None:
        if self._logs and not self.closed:
            self._emit_logs()
        if self.closed or not self.out or self._hold:
            return
        try:
            sent = self.sock.send(self.out)
        except WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.close("connection error: %s" % describe_oserror(exc))
            return
        self.sent_total += sent
        if sent == len(self.out):
            self.out.clear()
        elif sent:
            del self.out[:sent]
        self._after_output()

    def on_write(self) -> None:
        self.flush()

    def _after_output(self) -> None:
        if self._congested and len(self.out) <= SESSION_LOW_WATER:
            self._congested = False
            for stream in list(self.streams.values()):
                if stream.pending:
                    stream._on_window(0)    # what waited for the queue to drain
                elif stream.writable:
                    stream.handler.on_stream_writable(stream)
        if (not self.out and self._close_when_flushed is not None
                and not (self.tls and self.sock.unsent)):
            self.close(self._close_when_flushed)
            return
        if self._paused and len(self.out) <= SESSION_READ_RESUME:
            self._paused = False
            self.update()
            self.read_pending()     # TLS may hold decrypted frames the selector cannot see
            return
        self.update()

    # -- input ------------------------------------------------------------------
    # Reading pauses while our output queue is above SESSION_READ_PAUSE: whatever a peer
    # can make us answer (PING ACKs, RSTs for refused streams, grants, access-log lines)
    # is generated by reading its frames, so a peer that sends and never reads holds at
    # most the mark plus one read's answers, and is dropped by the heartbeat (nothing
    # read for heartbeat_timeout).  Two honest peers cannot deadlock on this (each
    # waiting for the other to read): DATA never takes the queue past SESSION_HIGH_WATER
    # (Stream.write, Stream._on_window and Pipe.on_read stop at it), and the control
    # frames an honest side queues on top of that are a few dozen bytes per stream
    # (OPEN, WINDOW, FIN, RST; MAX_STREAMS of them are well under a MiB) plus PINGs, so
    # an honest client's queue never reaches the mark and it always reads.  The relay's
    # queue can (access-log lines for many tiny pipelined responses), but then only the
    # relay pauses, the client goes on reading, and the relay resumes below
    # SESSION_READ_RESUME.
    def wants_read(self) -> bool:
        return not self._paused

    def on_read(self) -> None:
        if self._paused:            # selected in the same turn as the pause
            return
        try:
            n = self.sock.recv_into(self.loop.scratch)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.close("connection error: %s" % describe_oserror(exc))
            return
        if not n:
            self.close("connection closed by the peer")
            return
        if self.quickack:
            quickack(self.sock)
        self.last_rx = time.monotonic()
        try:
            for frame in self.decoder.feed(self.loop.scratch_view[:n]):
                self._dispatch(frame)
                if self.closed or self._close_when_flushed is not None:
                    return
        except ProtocolError as exc:
            if (self.is_relay and not self.established and not self.sent_total
                    and _HTTP_REQUEST_START.match(self.loop.scratch_view[:n])):
                # A client that asked for a URL here: say which port is which, in HTTP.
                self.out += http_response(400, "This is the relay's control port: tunnel "
                                          "clients use --relay HOST:PORT here; a WebSocket "
                                          "(--relay https://HOST) goes to the visitor port.")
                self.close_after_flush("protocol error: an HTTP request on the control port")
                return
            self.close("protocol error: %s" % exc, exc)
            return
        except (AuthError, RefusedError) as exc:
            self.close(str(exc), exc)
            return
        if len(self.out) >= SESSION_READ_PAUSE:
            self._paused = True
            log.debug("%s: peer is not reading; input paused with %d bytes queued",
                      self.label, len(self.out))
            self.update()
            return
        self.read_pending()

    def _dispatch(self, frame: Any) -> None:
        if not self.established:
            self._handshake_step(frame)
            return
        reader = self._READERS.get(frame.type)
        if reader is None:
            raise ProtocolError("unexpected %s" % _frame_name(frame))
        reader(self, frame)

    # -- one reader per frame type once established (_READERS) ------------------------
    def _read_data(self, frame: Frame) -> None:
        stream = self._stream_for(frame.stream_id)
        if stream is not None:
            self._active.add(stream.id)
            stream._on_data(frame.payload)

    def _read_log(self, frame: Frame) -> None:
        if self.is_relay:                       # only the relay sends them
            raise ProtocolError("unexpected %s" % _frame_name(frame))
        self._on_log(frame)

    def _read_window(self, frame: Frame) -> None:
        if len(frame.payload) != U32.size:
            raise ProtocolError("WINDOW payload of %d bytes" % len(frame.payload))
        stream = self._stream_for(frame.stream_id)
        if stream is not None:
            stream._on_window(U32.unpack(frame.payload)[0])

    def _read_fin(self, frame: Frame) -> None:
        stream = self._stream_for(frame.stream_id)
        if stream is not None:
            stream._on_fin()

    def _read_rst(self, frame: Frame) -> None:
        stream = self._stream_for(frame.stream_id)
        if stream is not None:
            stream._on_rst(frame.payload.decode("utf-8", "replace"))

    def _read_goaway(self, frame: Frame) -> None:
        if self.goaway_received:        # once is news; a stream of them is noise
            return
        self.goaway_received = True
        reason = escape_unprintable(frame.payload[U32.size:].decode(
            "utf-8", "replace"))[:MAX_REFUSAL_TEXT]     # the peer's words: one line
        log.info("%s: peer is going away%s", self.label, ": " + reason if reason else "")
        self.delegate.on_goaway(self, reason)

    def shared(self, now: float) -> bool:
        """Has more than one stream moved data within about ACTIVITY_WINDOW?"""
        elapsed = now - self._active_since
        if elapsed >= ACTIVITY_WINDOW:     # a new window; the last one counts if it was
            self._active_before = len(self._active) if elapsed < 2 * ACTIVITY_WINDOW else 0
            self._active.clear()
            self._active_since = now
        return len(self._active) > 1 or self._active_before > 1

    def _stream_for(self, stream_id: int) -> Optional[Stream]:
        stream = self.streams.get(stream_id)
        if stream is None and (stream_id == 0 or stream_id > self.highest_id):
            raise ProtocolError("frame for unknown stream %d" % stream_id)
        return stream

    def _on_open(self, frame: Frame) -> None:
        if self.is_relay:
            raise ProtocolError("clients may not open streams")
        if frame.stream_id <= self.highest_id:
            raise ProtocolError("stream id %d reused or out of order" % frame.stream_id)
        info = _json_payload(frame.payload, "OPEN")
        window = info.pop("window", None)   # what the relay lets us send on this stream
        if type(window) is not int or not 0 < window <= INITIAL_WINDOW:
            raise ProtocolError("OPEN window %.40r is not an integer in 1..%d"
                                % (window, INITIAL_WINDOW))
        self.highest_id = frame.stream_id
        if len(self.streams) >= MAX_STREAMS:    # each one would be a socket to the target
            self._send(encode_frame(FrameType.RST, frame.stream_id, b"too many streams"))
            return
        stream = Stream(self, frame.stream_id, send_window=window)
        self.streams[stream.id] = stream
        self.delegate.on_stream_open(self, stream, info)

    def _on_ping(self, frame: Frame) -> None:
        if len(frame.payload) != PING_PAYLOAD.size:
            raise ProtocolError("PING payload of %d bytes" % len(frame.payload))
        if frame.flags & FLAG_ACK:
            # Only an answer to a PING we sent counts (its payload is random, so a peer
            # cannot answer one it has not received yet), timed on our own clock.
            sent = self._ping_sent.pop(frame.payload, None)
            if sent is not None:
                # The minimum: a PING queued behind bulk data measures the queue, and
                # windows grown from that would only make the queue longer.  At most
                # MAX_RTT: a peer sitting on its answers does not get huge windows.
                self._rtts.append(time.monotonic() - sent)
                self.rtt = min(min(self._rtts), MAX_RTT)
        else:
            self._send(encode_frame(FrameType.PING, 0, frame.payload, FLAG_ACK))

    def _on_log(self, frame: Frame) -> None:
        payload = frame.payload
        if frame.flags & FLAG_LOG_BATCH:
            self._on_log_batch(payload)
            return
        upgraded = frame.flags & FLAG_LOG_UPGRADED
        at = LOG_RECORD.size + (U64.size if upgraded else 0)
        if len(payload) < at:
            raise ProtocolError("LOG payload of %d bytes" % len(payload))
        status, micros, nbytes = LOG_RECORD.unpack_from(payload)
        method, _, target = payload[at:].decode("utf-8", "replace").partition(" ")
        record = {"method": method, "target": target, "status": status,
                  "duration": micros / 1e6, "bytes": nbytes}
        if upgraded:        # the end of an upgraded connection: "bytes" went to the visitor
            record.update(upgraded=True, websocket=bool(frame.flags & FLAG_LOG_WEBSOCKET),
                          bytes_in=U64.unpack_from(payload, LOG_RECORD.size)[0])
        self.delegate.on_access_log(self, record)

    def _on_log_batch(self, payload: bytes) -> None:
        """A FLAG_LOG_BATCH frame's records, in order."""
        if len(payload) < LOG_BATCH_COUNT.size:
            raise ProtocolError("LOG batch without its count")
        count = LOG_BATCH_COUNT.unpack_from(payload)[0]
        heads = LOG_BATCH_COUNT.size + count * LOG_BATCH_RECORD.size
        if heads > len(payload):
            raise ProtocolError("LOG batch of %d records in %d bytes" % (count, len(payload)))
        with memoryview(payload) as view:
            records = list(LOG_BATCH_RECORD.iter_unpack(view[LOG_BATCH_COUNT.size:heads]))
        if sum(map(_FOURTH, records)) != len(payload) - heads:
            raise ProtocolError("LOG batch texts of the wrong length")
        self.delegate.on_access_batch(self, records, payload, heads)

    def _handshake_step(self, frame: Any) -> None:
        reply = self.handshake.receive(frame)
        if reply:
            self._send(reply)
        if self.handshake.failed:
            self._close_when_flushed = "handshake refused: %s" % self.handshake.failed
            delay = self.delegate.on_handshake_refused(self, self.handshake)
            if delay > 0:   # slow down guessing: hold the refusal back
                self._hold = True
                self._timers.append(self.loop.call_later(delay, self._release))
            else:
                self.flush()
            return
        if self.handshake.done:
            self.established = True
            self.decoder.max_payload = MAX_FRAME_PAYLOAD
            for timer in self._timers:
                timer.cancel()
            self._timers = []
            self.delegate.on_session_up(self)
            if not self.closed:
                self.ping()
                self._timers.append(self.loop.call_later(self.config.heartbeat_interval,
                                                         self._heartbeat))

    def _handshake_timeout(self) -> None:
        if not self.established:
            self.close("handshake timed out after %.0fs" % self.config.handshake_timeout)

    def _heartbeat(self) -> None:
        if self.closed:
            return
        silent = time.monotonic() - self.last_rx
        # Over TLS, ciphertext the socket did not take yet waits in the channel, and the
        # socket taking it is progress too (plaintext waits behind it meanwhile).
        queued = len(self.out) + len(getattr(self.sock, "unsent", b""))
        progress = self.sent_total + getattr(self.sock, "wire_sent", 0)
        before = self._queued_at_beat
        self._queued_at_beat = queued
        if silent > self.config.heartbeat_timeout:
            if not self._paused:
                self.close("heartbeat timeout: nothing received for %.1fs" % silent)
                return
            if queued >= before:        # paused, and the peer reads nothing either
                self.close("the peer has not read its output for %.1fs (%d bytes queued)"
                           % (silent, queued))
                return
        # A peer that keeps sending (PINGs, say) but never reads is as dead as a silent
        # one, and holds everything queued for it: output waiting, none of it taken.
        if queued and progress == self._sent_at_beat:
            self._stuck_for += self.config.heartbeat_interval
            if self._stuck_for > self.config.heartbeat_timeout:
                self.close("the peer has read nothing for %.1fs (%d bytes queued)"
                           % (self._stuck_for, queued))
                return
        else:
            self._stuck_for = 0.0
        self._sent_at_beat = progress
        self.ping()
        self._timers = [self.loop.call_later(self.config.heartbeat_interval, self._heartbeat)]

    # -- public -----------------------------------------------------------------
    def ping(self) -> None:
        if len(self._ping_sent) >= PINGS_OUTSTANDING:  # answers that never came
            self._ping_sent.clear()
        payload = os.urandom(PING_PAYLOAD.size)
        self._ping_sent[payload] = time.monotonic()
        self._send(encode_frame(FrameType.PING, 0, payload))

    def open_stream(self, info: Dict[str, Any]) -> Stream:
        """Relay side: a new stream towards the client.  Its initial receive window comes
        out of the session's budget (OPEN tells the client): INITIAL_WINDOW while there is
        room, less as it fills, MIN_INITIAL_WINDOW once it is spent, so stalled streams
        hold at most the budget plus that floor each."""
        self.highest_id += 1
        window = self.config.window_budget - self.window_held
        if window >= INITIAL_WINDOW:
            window = INITIAL_WINDOW
        elif window < MIN_INITIAL_WINDOW:
            window = MIN_INITIAL_WINDOW
        stream = Stream(self, self.highest_id, recv_window=window)
        self.streams[stream.id] = stream
        self._send(encode_frame(FrameType.OPEN, stream.id, _json_bytes(dict(info, window=window))))
        return stream

    def send_log(self, stream_id: int, status: int, duration: float, nbytes: int,
                 method: str, target: str, bytes_in: Optional[int] = None,
                 websocket: bool = False) -> None:
        """One access-log record; ``bytes_in`` (bytes from the visitor) marks the end of
        an upgraded connection (FLAG_LOG_UPGRADED: only to clients that asked)."""
        text = (method + " " + target).encode("utf-8", "replace")
        if len(text) > MAX_CHUNK_LINE:
            text = text[:MAX_CHUNK_LINE]
        micros = int(duration * 1e6)
        if micros > 2 ** 32 - 1:
            micros = 2 ** 32 - 1
        if bytes_in is None and self.log_batch:      # the client takes batches
            logs, texts = self._logs, self._log_texts
            if not logs:
                self.loop.schedule_flush(self)      # flush() puts them in one frame
            logs += LOG_BATCH_RECORD.pack(status, micros, nbytes if nbytes < 2 ** 64
                                          else 2 ** 64 - 1, len(text))
            texts += text
            self._log_count += 1
            if len(logs) + len(texts) >= LOG_BATCH_LIMIT or self._log_count == LOG_BATCH_MAX:
                self._emit_logs()
            return
        if bytes_in is None:            # a request (once each: no min(), no extra pack)
            self._send(LOG_FRAME.pack(LOG_TYPE, 0, stream_id, LOG_RECORD_SIZE + len(text),
                                      status, micros, nbytes if nbytes < 2 ** 64
                                      else 2 ** 64 - 1) + text)
            return
        record = (LOG_RECORD.pack(status, micros, min(nbytes, 2 ** 64 - 1))
                  + U64.pack(min(bytes_in, 2 ** 64 - 1)))
        flags = FLAG_LOG_UPGRADED | (FLAG_LOG_WEBSOCKET if websocket else 0)
        self._send(FRAME_HEADER.pack(LOG_TYPE, flags, stream_id, len(record) + len(text))
                   + record + text)

    def go_away(self, reason: str = "") -> None:
        if self.goaway_sent or self.closed or not self.established:
            return
        self.goaway_sent = True
        self._send(encode_frame(FrameType.GOAWAY, 0,
                                U32.pack(GOAWAY_NORMAL) + reason.encode("utf-8")[:200]))

    def close_after_flush(self, reason: str) -> None:
        self._close_when_flushed = reason
        self.loop.schedule_flush(self)
        if not self.out and not (self.tls and self.sock.unsent):
            self.close(reason)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._active.discard(stream.id)     # only open streams compete

    def close(self, reason: str, error: Optional[BaseException] = None) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self._close_error = error
        self.close_socket()             # -> connection_lost

    def connection_lost(self) -> None:
        """The session's end, however it came (close, or the loop closing): timers
        cancelled, its streams reset, the delegate told, once."""
        reason = self.close_reason or "the event loop closed"
        error, self._close_error = self._close_error, None
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        streams = list(self.streams.values())
        self.streams.clear()
        if self.established or error is not None:
            log.info("%s closed: %s", self.label, reason)
        else:
            log.info("control connection from %s closed: %s", self.peer, reason)
        for stream in streams:
            stream._abort(reason)
        self.delegate.on_session_closed(self, reason, error)

    def abort(self, reason: str) -> None:
        self.close(reason)

    # Frames after the handshake, by type (HELLO..REFUSE there are handshake errors).
    _READERS: Dict[int, Callable[["Session", Frame], None]] = {
        int(FrameType.DATA): _read_data, LOG_TYPE: _read_log,
        int(FrameType.WINDOW): _read_window, int(FrameType.FIN): _read_fin,
        int(FrameType.RST): _read_rst, int(FrameType.OPEN): _on_open,
        int(FrameType.PING): _on_ping, int(FrameType.GOAWAY): _read_goaway}


# =============================================================================
# HTTP head parser (pure: bytes in, events out)
# =============================================================================

EV_HEAD = "head"     # value: Request or Response
EV_BODY = "body"     # value: memoryview of raw body bytes (framing included)
EV_END = "end"       # value: bytes the whole message took
EV_ERROR = "error"   # value: HTTPError; the parser is dead afterwards

# Heads are decoded as latin-1 once and matched as str; a field is
# token ":" OWS value OWS CRLF, with no control bytes but HT in the value.  The
# patterns avoid lazy repeats (slow in ``re``): one checks the line structure and
# control bytes, one extracts the fields with the value's OWS trimmed.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE_RE = re.compile(r"(" + _TOKEN + r") ([\x21-\x7e]+) HTTP/(\d)\.(\d)\Z")
_STATUS_LINE_RE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?"
                             rb"(?:\r\n|\Z)")
_FIELD_RE = re.compile(r"(" + _TOKEN + r"):[ \t]*((?:[^\r\n]*[^\r\n \t])?)[ \t]*\r\n")
_FIELDS_RE = re.compile(r"(?:" + _TOKEN + r":[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")   # HT allowed
_TRAILER_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\Z")
_FRAMING_RE = re.compile(rb"\r\n(transfer-encoding|content-length)[ \t]*:([^\r\n]*)")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z")
# A request's chunk-size line, strictly (RFC 9112 section 7.1.1 without its BWS): the
# size, then any number of ";" name [ "=" ( token / quoted-string ) ]; no whitespace
# outside a quoted string.  Each piece starts with a byte the one before cannot hold,
# so the match is linear.  (Responses use the lenient _CHUNK_SIZE_RE: see
# HTTPParser._read_chunk_size.)
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_REQUEST_CHUNK_LINE = (rb"([0-9A-Fa-f]{1,%d})(?:;%s(?:=(?:%s|%s))?)*"
                       % (MAX_CHUNK_SIZE_DIGITS, _TOKEN.encode(), _TOKEN.encode(), _QUOTED))
_REQUEST_CHUNK_SIZE_RE = re.compile(_REQUEST_CHUNK_LINE + rb"\Z")
_REQUEST_CHUNK_RE = re.compile(_REQUEST_CHUNK_LINE + rb"\r\n")    # the whole-chunk path's
_LONG_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{%d}" % (MAX_CHUNK_SIZE_DIGITS + 1))
_CODINGS_RE = re.compile(r"[ \t]*" + _TOKEN + r"[ \t]*(?:,[ \t]*" + _TOKEN + r"[ \t]*)*\Z")
_DIGITS_RE = re.compile(r"[0-9]{1,18}\Z")
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]*))?\Z")
_ABSOLUTE_RE = re.compile(r"(?i:https?)://([^/?#]*)([^#]*)")

_HTTP_VERSIONS = {("1", "0"): (1, 0), ("1", "1"): (1, 1)}   # the versions a request may use

# Parser states: what the next bytes of the direction are.  HTTPParser._READERS holds
# the reader of each (h11's readers): it takes the bytes its state can use.
_S_HEAD = 0          # a message head through its empty line (a request's: empty lines first)
_S_LENGTH = 1        # the rest of a Content-Length body: _remaining bytes
_S_CHUNK_SIZE = 2    # a chunk-size line
_S_CHUNK_DATA = 3    # the rest of a chunk's data: _remaining bytes
_S_CHUNK_END = 4     # the CRLF after a chunk's data
_S_TRAILER = 5       # a trailer line, or the empty line that ends a chunked body
_S_UNTIL_CLOSE = 6   # a body that ends with the connection (a response without framing)
_S_UPGRADE_WAIT = 7  # bytes after an upgrade request, held until the origin answers it
_S_TUNNEL = 8        # after a 101 (or upgrade_done): not HTTP any more, nothing parsed
_S_DEAD = 9          # after an error or the end of input: nothing parsed


_NO_VALUES: List[str] = []
_NO_FIELDS: FrozenSet[str] = frozenset()


class Headers:
    """A multi-map of fields that keeps every duplicate: ``index`` maps each
    lower-cased name to all its values in order, built once.  (The fields
    themselves are forwarded as received, from the raw head.)
    """

    __slots__ = ("index",)

    def __init__(self, items: List[Tuple[str, str]]) -> None:
        index: Dict[str, List[str]] = {}
        for name, value in items:
            lower = name.lower()
            if lower in index:
                index[lower].append(value)
            else:
                index[lower] = [value]
        self.index = index

    def get_all(self, name: str) -> List[str]:
        """Every value of ``name`` (lower-case), in order; do not modify the list."""
        return self.index.get(name, _NO_VALUES)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self.get_all(name)
        return values[0] if values else default

    def tokens(self, name: str) -> List[str]:
        """Comma-separated list values of every ``name`` field, lower-cased."""
        return _list_tokens(self.index.get(name, _NO_VALUES))


class Request:
    __slots__ = ("method", "target", "version", "headers", "host", "host_header", "connection",
                 "keep_alive", "upgrade", "body", "raw", "target_changed", "strip", "extra")

    def __init__(self, method: str, target: str, version: Tuple[int, int],
                 headers: Headers, raw: bytes = b"") -> None:
        self.raw = raw                # the head as received, without the last CRLF CRLF
        self.target_changed = False   # absolute-form rewritten to origin-form
        self.strip: FrozenSet[str] = _NO_FIELDS   # lower-case fields to drop (our credentials)
        self.extra: Tuple[Tuple[str, str], ...] = ()   # fields to add (a trimmed Cookie)
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = ""            # lower-case, port stripped
        self.host_header = ""     # as sent
        self.connection = _NO_VALUES   # the Connection tokens, lower-case (do not modify)
        self.keep_alive = True
        self.upgrade: Optional[str] = None
        self.body = "none"        # none | length | chunked


class Response:
    """A response head: only its status (the head itself is forwarded verbatim, and
    whether the connection stays open is the origin's to end)."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


def _parse_fields(block: str) -> Headers:
    """Fields of a head: ``block`` is every line after the start line, each ending in CRLF.
    One regex checks the whole block (line structure, no control bytes but HT) and one
    extracts the fields, both in C; only a bad block is looked at line by line, for the
    reason."""
    if _FIELDS_RE.fullmatch(block) is None:
        for line in block.split("\r\n"):
            if line[:1] in (" ", "\t"):
                raise HTTPError(400, "obsolete line folding in the header")
            if "\r" in line or "\n" in line:
                raise HTTPError(400, "bare CR or LF in the head")
        raise HTTPError(400, "malformed header field")
    items = _FIELD_RE.findall(block)
    if len(items) > MAX_HEADER_COUNT:
        raise HTTPError(431, "too many header fields (limit %d)" % MAX_HEADER_COUNT)
    return Headers(items)


def _split_start_line(head: bytes) -> Tuple[str, str]:
    """(start line, field block) of a head given without its final empty line."""
    text = head.decode("latin-1")
    start, sep, rest = text.partition("\r\n")
    return start, (rest + "\r\n") if sep else ""


def _length_from(values: List[str]) -> Optional[int]:
    """The Content-Length given by every value of the field, or None without one."""
    if not values:
        return None
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and value.isascii() and len(value) <= 18:
            return int(value)     # the common case: one plain number
    found = {part.strip() for v in values for part in v.split(",")}
    if len(found) != 1:
        raise HTTPError(400, "conflicting Content-Length values")
    value = found.pop()
    if not _DIGITS_RE.match(value):
        raise HTTPError(400, "invalid Content-Length")
    return int(value)


def _list_tokens(values: List[str]) -> List[str]:
    """Comma-separated list values, lower-cased, empty elements dropped."""
    if not values:       # the common case: the field is absent
        return []
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _framing_fields(fields: List[Tuple[bytes, bytes]]) -> Tuple[List[str], List[str]]:
    """The values of Transfer-Encoding and of Content-Length among ``fields``, what
    ``_FRAMING_RE.findall`` found in a lower-cased head without parsing the other
    fields: a response head is forwarded verbatim and only its framing matters."""
    found: Tuple[List[str], List[str]] = ([], [])
    for name, value in fields:
        found[name == b"content-length"].append(value.strip(b" \t").decode("latin-1"))
    return found


def whole_response(data: Any) -> bool:
    """Is ``data`` exactly one complete response whose body is framed by Content-Length?
    A cheap test, not a parse: False whenever in doubt (1xx, HEAD, chunked, pipelined,
    a head in pieces), which only costs an early ACK."""
    if len(data) > WHOLE_RESPONSE_PROBE or data[:5] != b"HTTP/":
        return False
    return _whole_by_length(bytes(data)) > 0


def _whole_by_length(data: bytes) -> int:
    """The length of the head (through its empty line) if ``data`` is exactly one
    message with a head within HEAD_PROBE and a body framed by one plain
    Content-Length; otherwise 0.  (Not the whole story for a response: 1xx, 204, 304
    and answers to HEAD are framed otherwise, whatever their Content-Length says.)"""
    end = data.find(b"\r\n\r\n", 0, HEAD_PROBE)
    if end < 0:
        return 0
    length = _plain_length(_FRAMING_RE.findall(data[:end + 2].lower()))
    return end + 4 if length is not None and end + 4 + length == len(data) else 0


def _plain_length(fields: List[Tuple[bytes, bytes]]) -> Optional[int]:
    """The length if the framing ``fields`` (``_FRAMING_RE.findall`` of a lower-cased
    head) are one Content-Length of plain ASCII digits and nothing else; None for every
    other case, which the general rules decide."""
    if len(fields) != 1 or fields[0][0] != b"content-length":
        return None
    value = fields[0][1].strip(b" \t")
    return int(value) if value.isdigit() and len(value) <= 18 else None   # ASCII only


def _check_codings(values: List[str]) -> None:
    """A request's Transfer-Encoding (every field, in order) must be exactly one chunked:
    a list that is not tokens separated by commas (empty elements, obs-text, parameters,
    quotes) is 400, chunked not last or twice is 400 (RFC 9112 section 6.3), any other
    coding is 501 (section 6.1).  Whatever the spelling, the origin gets one plain field."""
    joined = values[0] if len(values) == 1 else ",".join(values)
    if _CODINGS_RE.match(joined) is None:
        raise HTTPError(400, "malformed Transfer-Encoding list")
    if joined.strip(" \t").lower() == "chunked":
        return                      # the common case
    codings = [c.strip(" \t").lower() for c in joined.split(",")]
    if codings[-1] != "chunked":
        raise HTTPError(400, "Transfer-Encoding must end with chunked")
    if codings.count("chunked") > 1:
        raise HTTPError(400, "Transfer-Encoding names chunked more than once")
    raise HTTPError(501, "transfer coding %s is not supported (only chunked)"
                    % ", ".join(c for c in codings if c != "chunked"))


def _split_host(value: str) -> Tuple[str, str]:
    m = _HOST_RE.match(value)
    if m is None:
        raise HTTPError(400, "invalid Host header")
    return m.group(1).lower(), m.group(2) or ""


class HTTPParser:
    """Incremental HTTP/1.x message framing for one direction of a connection.

    ``feed(data) -> [(event, value), ...]`` with events ``EV_HEAD``, ``EV_BODY``
    (raw body bytes including chunk framing, to be forwarded verbatim),
    ``EV_END`` and finally ``EV_ERROR`` carrying an ``HTTPError``.  A request
    parser checks RFC 9112 framing strictly (request smuggling); a response
    parser needs the request methods in order (``expect(method)``) so it knows
    which responses have no body.  Heads are limited to ``max_head`` bytes
    before anything is buffered past it.

    The state (``_S_*``) names what the next bytes are; ``feed`` hands the bytes to the
    state's reader (``_READERS``), which takes what it can use, changes the state when
    its part of the message is complete and returns where it stopped; a reader that
    must wait for more bytes has taken (buffered) all of them.  Errors are 4xx for a
    request (``_bad``: 400, ``_too_large``: 431) and 502 for a response.

    Fast paths skip the general machinery for the common cases: a head found in the
    first HEAD_PROBE bytes is not buffered, a request's whole chunks in one piece are
    taken a regex match each (``_skip_whole_chunks``), and a response parser handed one
    whole Content-Length response at a message boundary as ``bytes`` frames it in one
    step (``_feed_whole_response``).  The invariant: a fast path frames exactly as the
    general path (the same events, bodies joined, and the same state after), which
    ParserPathsTest in test_tunnel.py checks over seeded corpora, fed whole, per
    message, as a bytearray or memoryview (never the whole-response path), cut at
    random and one byte at a time.
    """

    def __init__(self, is_request: bool, max_head: int = MAX_HEAD_SIZE,
                 emit_body: bool = True) -> None:
        self.is_request = is_request
        self.max_head = max_head
        self.emit_body = emit_body
        self.methods: Deque[str] = collections.deque()
        self._buf = bytearray()
        self._state = _S_HEAD
        self._remaining = 0
        self._trailer_size = 0
        # The last Host value and its checked host part (None: no value checked yet).
        self._host: Tuple[Optional[str], str] = (None, "")
        self._after_end = _S_HEAD
        self.message_bytes = 0          # bytes of the current message so far
        self.upgrade_tail = 0           # bytes after a 101's head in the feed that ended it
        self._bad = 400 if is_request else 502          # malformed input
        self._too_large = 431 if is_request else 502    # a head or trailer past its limit
        self._body_to = -1      # where the last EV_BODY of this feed ends in its memoryview

    # -- public -----------------------------------------------------------------
    @property
    def awaiting_upgrade(self) -> bool:
        return self._state == _S_UPGRADE_WAIT

    @property
    def idle(self) -> bool:
        """At a message boundary with nothing buffered."""
        return self._state == _S_HEAD and not self._buf

    @property
    def tunnel(self) -> bool:
        return self._state == _S_TUNNEL

    def expect(self, method: str) -> None:
        self.methods.append(method)

    def feed(self, data: Any) -> List[Tuple[str, Any]]:
        events: List[Tuple[str, Any]] = []
        if self._state in (_S_DEAD, _S_TUNNEL):
            return events
        if (not self.is_request and self._state == _S_HEAD and not self._buf
                and type(data) is bytes and self._feed_whole_response(data, events)):
            return events
        mv = memoryview(data)
        pos, end = 0, len(mv)
        readers = self._READERS
        try:
            while pos < end:
                pos = readers[self._state](self, mv, pos, end, events)
        except HTTPError as exc:
            self._state = _S_DEAD
            events.append((EV_ERROR, exc))
        return events

    def _feed_whole_response(self, data: bytes, events: List[Tuple[str, Any]]) -> bool:
        """The relay's common case in one step: ``data`` is one whole response,
        framed by its Content-Length, to a request other than HEAD.  False, with
        nothing changed, for anything else: the general path then takes it."""
        head_size = _whole_by_length(data)
        if not head_size or head_size - 4 > self.max_head:
            return False
        m = _STATUS_LINE_RE.match(data, 0, head_size - 2)
        if m is None:
            return False
        status = int(m.group(3))
        if status < 200 or status in (204, 304) or (self.methods and self.methods[0] == "HEAD"):
            return False
        if self.methods:
            self.methods.popleft()
        events.append((EV_HEAD, Response(status)))
        if self.emit_body and head_size < len(data):
            events.append((EV_BODY, memoryview(data)[head_size:]))
        events.append((EV_END, len(data)))
        return True

    def feed_eof(self) -> List[Tuple[str, Any]]:
        """The peer closed its side: finish a read-until-close body or fail."""
        st = self._state
        if st == _S_UNTIL_CLOSE:
            self._state = _S_DEAD
            return [(EV_END, self.message_bytes)]
        if st == _S_HEAD and not self._buf.strip(b"\r\n") or st in (_S_DEAD, _S_TUNNEL):
            self._state = _S_DEAD
            return []
        self._state = _S_DEAD
        return [(EV_ERROR, HTTPError(self._bad, "connection closed in the middle of a message"))]

    def upgrade_done(self) -> bytes:
        """The origin answered 101: return what was buffered and stop parsing."""
        self._state = _S_TUNNEL
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def upgrade_refused(self) -> List[Tuple[str, Any]]:
        """The origin answered the upgrade request normally: keep parsing HTTP."""
        if self._state != _S_UPGRADE_WAIT:
            return []
        self._state = _S_HEAD
        rest = bytes(self._buf)
        self._buf.clear()
        return self.feed(rest)

    # -- machinery ----------------------------------------------------------------
    def _take_until(self, mv: memoryview, pos: int, sep: bytes, limit: int,
                    status: int, what: str) -> Tuple[Optional[bytes], int]:
        """Collect bytes up to ``sep``; return (block without sep, new pos) or (None, pos)."""
        buf = self._buf
        old = len(buf)
        room = limit + len(sep) - old
        piece = mv[pos:pos + room]
        buf += piece
        i = buf.find(sep, max(0, old - len(sep) + 1))
        if i < 0:
            if len(buf) >= limit + len(sep):
                raise HTTPError(status, "%s larger than %d bytes" % (what, limit))
            return None, pos + len(piece)
        block = bytes(buf[:i])
        used = i + len(sep) - old
        buf.clear()
        return block, pos + used

    def _emit_body(self, events: List[Tuple[str, Any]], mv: memoryview, start: int,
                   stop: int) -> None:
        """Emit body bytes ``mv[start:stop]`` as one view per feed() (chunk lines, data
        and CRLFs of one read, however small the chunks, become one slice of ``mv``,
        without a copy): a piece that starts where the last EV_BODY of this feed ends
        widens that event.  (Every EV_BODY of a feed's list comes from here, so a last
        event that is an EV_BODY is this feed's and ``_body_to`` its end.)"""
        if start == self._body_to and events and events[-1][0] is EV_BODY:
            events[-1] = (EV_BODY, mv[start - len(events[-1][1]):stop])
        else:
            events.append((EV_BODY, mv[start:stop]))
        self._body_to = stop

    # -- readers: one per state (_READER_OF); each takes bytes of mv[pos:end] and
    # -- returns where it stopped: end when it must wait for more -------------------
    def _read_head(self, mv: memoryview, pos: int, end: int,
                   events: List[Tuple[str, Any]]) -> int:
        if self.is_request and not self._buf:
            while mv[pos] in (13, 10):        # empty lines before a request
                pos += 1
                if pos >= end:
                    return pos
        start = pos
        head = None
        if not self._buf:    # fast path: the whole head is in this piece
            probe = bytes(mv[pos:pos + HEAD_PROBE])
            i = probe.find(b"\r\n\r\n")
            if 0 <= i <= self.max_head:
                head, pos = probe[:i], pos + i + 4
        if head is None:
            head, pos = self._take_until(mv, pos, b"\r\n\r\n", self.max_head, self._too_large,
                                         "message head")
        self.message_bytes += pos - start
        if head is None:
            if (self.is_request and len(self._buf) > MAX_REQUEST_LINE
                    and self._buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0):
                raise HTTPError(414, "request line longer than %d bytes" % MAX_REQUEST_LINE)
        elif self.is_request:
            self._on_request_head(head, events)
        else:
            self._on_response_head(head, events)
        return pos

    def _read_counted(self, mv: memoryview, pos: int, end: int,
                      events: List[Tuple[str, Any]]) -> int:
        """_S_LENGTH and _S_CHUNK_DATA: up to ``_remaining`` body bytes; then the end of
        the message (a Content-Length body) or the chunk's CRLF (a chunk's data)."""
        stop = pos + self._remaining
        if stop > end:
            stop = end
        self.message_bytes += stop - pos
        if self.emit_body:
            self._emit_body(events, mv, pos, stop)
        self._remaining -= stop - pos
        if not self._remaining:
            if self._state == _S_LENGTH:
                self._end(events)
            else:
                self._state = _S_CHUNK_END
        return stop

    def _read_chunk_size(self, mv: memoryview, pos: int, end: int,
                         events: List[Tuple[str, Any]]) -> int:
        if self.is_request and not self._buf:
            stop = self._skip_whole_chunks(mv, pos, end)
            if stop > pos:
                self.message_bytes += stop - pos
                if self.emit_body:
                    self._emit_body(events, mv, pos, stop)
                if stop >= end:
                    return stop
                pos = stop
        line, pos = self._chunk_line(mv, pos, events)
        if line is None:
            return pos
        # A request's chunk line is checked strictly: the origin may read any looseness
        # differently.  An origin's chunk lines only frame the relay's own bookkeeping
        # (the order of responses, the log, a 101, which needs an upgrade request the
        # relay checked): the visitor reads those bytes itself, and each visitor
        # connection has its own origin connection, so whitespace and loose extensions
        # pass there (old servers send them); control bytes and 17+ digits do not.
        m = (_REQUEST_CHUNK_SIZE_RE if self.is_request else _CHUNK_SIZE_RE).match(line)
        if m is None:
            if self.is_request and _LONG_CHUNK_SIZE_RE.match(line):
                raise HTTPError(400, "chunk size longer than %d hex digits"
                                % MAX_CHUNK_SIZE_DIGITS)
            raise HTTPError(self._bad, "invalid chunk size line")
        size = int(m.group(1), 16)
        if size:
            self._remaining = size
            self._state = _S_CHUNK_DATA
        else:
            self._trailer_size = 0
            self._state = _S_TRAILER
        return pos

    def _read_chunk_end(self, mv: memoryview, pos: int, end: int,
                        events: List[Tuple[str, Any]]) -> int:
        line, pos = self._chunk_line(mv, pos, events)
        if line is not None:
            if line:
                raise HTTPError(self._bad, "chunk data longer than its size")
            self._state = _S_CHUNK_SIZE
        return pos

    def _read_trailer(self, mv: memoryview, pos: int, end: int,
                      events: List[Tuple[str, Any]]) -> int:
        line, pos = self._chunk_line(mv, pos, events)
        if line is None:
            return pos
        if not line:
            self._end(events)
            return pos
        self._trailer_size += len(line) + 2
        if self._trailer_size > MAX_TRAILER_SIZE:
            raise HTTPError(self._too_large, "trailer section too large")
        if _TRAILER_RE.match(line) is None:
            raise HTTPError(self._bad, "malformed trailer field")
        return pos

    def _read_until_close(self, mv: memoryview, pos: int, end: int,
                          events: List[Tuple[str, Any]]) -> int:
        self.message_bytes += end - pos
        if self.emit_body:
            self._emit_body(events, mv, pos, end)
        return end

    def _read_upgrade_wait(self, mv: memoryview, pos: int, end: int,
                           events: List[Tuple[str, Any]]) -> int:
        if len(self._buf) + end - pos > self.max_head:
            raise HTTPError(400, "data sent before the upgrade was answered")
        self._buf += mv[pos:end]
        return end

    def _read_nothing(self, mv: memoryview, pos: int, end: int,
                      events: List[Tuple[str, Any]]) -> int:
        return end              # dead: nothing to parse

    def _read_tunnel(self, mv: memoryview, pos: int, end: int,
                     events: List[Tuple[str, Any]]) -> int:
        self.upgrade_tail = end - pos   # just after a 101: the bytes that came with its head
        return end

    # The reader of each state; feed() indexes the tuple by the state (a state without
    # a reader: KeyError when the class is made).
    _READER_OF = {_S_HEAD: _read_head, _S_LENGTH: _read_counted,
                  _S_CHUNK_SIZE: _read_chunk_size, _S_CHUNK_DATA: _read_counted,
                  _S_CHUNK_END: _read_chunk_end, _S_TRAILER: _read_trailer,
                  _S_UNTIL_CLOSE: _read_until_close, _S_UPGRADE_WAIT: _read_upgrade_wait,
                  _S_TUNNEL: _read_tunnel, _S_DEAD: _read_nothing}
    _READERS = tuple(map(_READER_OF.__getitem__, range(len(_READER_OF))))

    # -- reader helpers -------------------------------------------------------------
    def _chunk_line(self, mv: memoryview, pos: int,
                    events: List[Tuple[str, Any]]) -> Tuple[Optional[bytes], int]:
        """A chunk-size, chunk-end or trailer line without its CRLF (None while it is
        incomplete), and where it ends; its bytes are body bytes."""
        line, stop = self._take_until(mv, pos, b"\r\n", MAX_CHUNK_LINE, self._bad,
                                      "chunk line")
        if stop > pos:
            self.message_bytes += stop - pos
            if self.emit_body:
                self._emit_body(events, mv, pos, stop)
        return line, stop

    @staticmethod
    def _skip_whole_chunks(mv: memoryview, pos: int, end: int) -> int:
        """Where the whole chunks of a request (size line, data, CRLF) from ``pos`` in
        this piece end: one match each, nothing copied.  The rest (a chunk cut by the
        piece's end, the last chunk, anything refused) takes the general path, which
        also names the reason."""
        match = _REQUEST_CHUNK_RE.match
        while True:
            m = match(mv, pos, pos + MAX_CHUNK_LINE + 2)
            if m is None:
                return pos
            data_at = m.end()
            stop = data_at + int(m.group(1), 16)
            if stop == data_at or stop + 2 > end or mv[stop:stop + 2] != b"\r\n":
                return pos
            pos = stop + 2

    def _end(self, events: List[Tuple[str, Any]]) -> None:
        events.append((EV_END, self.message_bytes))
        self.message_bytes = 0
        self._state = self._after_end
        self._after_end = _S_HEAD

    def _on_request_head(self, head: bytes, events: List[Tuple[str, Any]]) -> None:
        line, block = _split_start_line(head)
        if len(line) > MAX_REQUEST_LINE:
            raise HTTPError(414, "request line longer than %d bytes" % MAX_REQUEST_LINE)
        m = _REQUEST_LINE_RE.match(line)
        if m is None:
            if not line.isascii():
                raise HTTPError(400, "raw non-ASCII byte in the request line (percent-encode "
                                "it)")
            raise HTTPError(400, "malformed request line")
        method, target, major, minor = m.groups()
        version = _HTTP_VERSIONS.get((major, minor))
        if version is None:
            raise HTTPError(505, "HTTP/%s.%s is not supported" % (major, minor))
        headers = _parse_fields(block)
        req = Request(method, target, version, headers, head)
        if method == "CONNECT":
            raise HTTPError(405, "CONNECT is not supported by this relay")
        # Host (RFC 9112 section 3.2)
        index = headers.index
        hosts = index.get("host", _NO_VALUES)
        if len(hosts) > 1:
            raise HTTPError(400, "more than one Host header")
        if not hosts and version == (1, 1):
            raise HTTPError(400, "missing Host header")
        if hosts:
            req.host_header = hosts[0]
            if req.host_header != self._host[0]:   # a connection's Host rarely changes
                self._host = (req.host_header, _split_host(req.host_header)[0])
            req.host = self._host[1]
        absolute = None if target[:1] == "/" else _ABSOLUTE_RE.match(target)
        if absolute:
            authority = _split_host(absolute.group(1))[0]
            if hosts and authority != req.host:
                raise HTTPError(400, "request target names a different host than Host")
            if not hosts:
                req.host, req.host_header = authority, absolute.group(1)
            req.target = absolute.group(2) or "/"
            req.target_changed = True
        elif not (target.startswith("/") or (target == "*" and method == "OPTIONS")):
            raise HTTPError(400, "invalid request target")
        # Body framing (RFC 9112 section 6.3): ambiguity is an error, never a guess.
        length = _length_from(index["content-length"]) if "content-length" in index else None
        if "transfer-encoding" in index:
            if length is not None:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding")
            if version == (1, 0):
                raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
            _check_codings(index["transfer-encoding"])
            req.body = "chunked"    # forwarded as one plain "Transfer-Encoding: chunked"
        elif length:
            req.body = "length"
        if "connection" in index:
            connection = req.connection = _list_tokens(index["connection"])
            if version == (1, 1):
                req.keep_alive = "close" not in connection
            else:
                req.keep_alive = "keep-alive" in connection and "close" not in connection
            upgrade = headers.get("upgrade")
            if "upgrade" in connection and upgrade and version == (1, 1):
                req.upgrade = upgrade
        else:
            req.keep_alive = version == (1, 1)
        events.append((EV_HEAD, req))
        self._after_end = _S_UPGRADE_WAIT if req.upgrade else _S_HEAD
        self._start_body(req.body, length, events)

    def _on_response_head(self, head: bytes, events: List[Tuple[str, Any]]) -> None:
        m = _STATUS_LINE_RE.match(head)
        if m is None:
            raise HTTPError(502, "malformed status line from the origin")
        status = int(m.group(3))
        events.append((EV_HEAD, Response(status)))
        if 100 <= status < 200 and status != 101:
            self.message_bytes = 0   # interim response; the final one follows
            return
        method = self.methods.popleft() if self.methods else "GET"
        if status == 101:
            self._after_end = _S_TUNNEL
            self._end(events)
            return
        if method == "HEAD" or status in (204, 304):
            self._end(events)
            return
        # The response is forwarded verbatim; the relay only needs its framing, found
        # in one search of the lower-cased head (no per-field parsing).
        fields = _FRAMING_RE.findall(head.lower())
        size = _plain_length(fields)
        if size is not None:                    # the common case
            self._start_body("length" if size else "none", size, events)
            return
        codings_values, length_values = _framing_fields(fields)
        codings = _list_tokens(codings_values)
        if codings:
            self._start_body("chunked" if codings[-1] == "chunked" else "close", None, events)
            return
        try:
            length = _length_from(length_values)
        except HTTPError as exc:
            raise HTTPError(502, "origin response: %s" % exc) from None
        if length is None:
            self._start_body("close", None, events)
        else:
            self._start_body("length" if length else "none", length, events)

    def _start_body(self, kind: str, length: Optional[int], events: List[Tuple[str, Any]]) -> None:
        if kind == "length":
            self._remaining = length or 0
            self._state = _S_LENGTH
        elif kind == "chunked":
            self._state = _S_CHUNK_SIZE
        elif kind == "close":
            self._state = _S_UNTIL_CLOSE
        else:
            self._end(events)


# Hop-by-hop and forwarding fields the relay never passes on as received.  Forwarding
# fields are what some origin, framework or proxy reads as the client's address, scheme
# or host; every X-Forwarded-* (FORWARDING_PREFIX) counts too.  Matched in any case and
# with "_" read as "-" (CGI, WSGI and others turn both into the same variable).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "upgrade"})
FORWARDING = frozenset({"forwarded", "x-forwarded", "x-forwarded-for", "x-forwarded-host",
                        "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "x-client-ip",
                        "true-client-ip", "client-ip", "x-cluster-client-ip",
                        "cf-connecting-ip", "fastly-client-ip", "x-originating-ip",
                        "x-original-forwarded-for", "front-end-https", "x-url-scheme"})
FORWARDING_PREFIX = "x-forwarded-"
HOP_OR_FORWARDING = HOP_BY_HOP | FORWARDING
# Named in Connection, these would change message framing if dropped: never drop.
PROTECTED = frozenset({"host", "content-length", "transfer-encoding"})


def _names_trie(words: Any) -> str:
    """A pattern for exactly ``words`` (lower-case, for re.IGNORECASE; "-" matches "_"
    too; "*" is any token), as a trie: a line that is none of them fails after one or
    two letters instead of once per name."""
    heads: Dict[str, List[str]] = {}
    alts = []
    for word in words:
        if word in ("", "*"):
            alts.append(_TOKEN if word else "")
        else:
            heads.setdefault(word[0], []).append(word[1:])
    alts[:0] = [("[-_]" if c == "-" else c) + _names_trie(rest)
                for c, rest in sorted(heads.items())]
    return alts[0] if len(alts) == 1 else "(?:%s)" % "|".join(alts)


# One pass in C over the raw head removes all of them (sub returns the head itself when
# nothing matched: a plain request costs one scan, about 0.3 us for a short head).
_HOP_FIELD_RE = re.compile(("\r\n%s:[^\r\n]*" % _names_trie(
    [n for n in HOP_OR_FORWARDING if not n.startswith(FORWARDING_PREFIX)]
    + [FORWARDING_PREFIX + "*"])).encode("ascii"), re.IGNORECASE)
_TE_FIELD_RE = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*", re.IGNORECASE)


def rewrite_request_head(req: Request, peer_ip: str, proto: str = "http") -> bytes:
    """The request head as the origin sees it: hop-by-hop fields handled per
    RFC 9110 section 7.6.1, forwarding fields replaced, not trusted, a chunked body's
    Transfer-Encoding as one plain field.  The fields kept are forwarded byte for byte:
    lines are removed from the head as received."""
    index = req.headers.index
    head = req.raw
    if req.target_changed:      # absolute-form: the origin gets origin-form
        eol = head.find(b"\r\n")
        head = (("%s %s HTTP/%d.%d" % (req.method, req.target, req.version[0], req.version[1]))
                .encode("latin-1") + (head[eol:] if eol >= 0 else b""))
    head = _HOP_FIELD_RE.sub(b"", head)
    chunked = req.body == "chunked"
    if chunked:                 # every received Transfer-Encoding line; one plain one added
        head = _TE_FIELD_RE.sub(b"", head)
    if req.connection or req.strip:
        named = set(req.connection) - PROTECTED
        named |= req.strip
        named -= HOP_OR_FORWARDING          # already gone
        if named and not named.isdisjoint(index):
            parts = head.split(b"\r\n")
            head = b"\r\n".join([parts[0]] + [part for part in parts[1:] if part.partition(
                b":")[0].decode("latin-1").lower() not in named])
    forwarding = forwarding_fields(peer_ip, req.host_header, proto)
    if req.version == (1, 1) and req.keep_alive and not (req.extra or req.upgrade or chunked):
        return head + forwarding         # the common case: nothing else to add
    lines = ["%s: %s" % kv for kv in req.extra]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if req.upgrade:
        lines.append("Connection: Upgrade")
        lines.append("Upgrade: %s" % req.upgrade)
    elif not req.keep_alive:
        lines.append("Connection: close")
    elif req.version == (1, 0):
        lines.append("Connection: keep-alive")
    return head + "".join(["\r\n" + line for line in lines]).encode("latin-1") + forwarding


@functools.lru_cache(maxsize=FORWARDING_CACHE)
def forwarding_fields(peer_ip: str, host: str, proto: str) -> bytes:
    """The fields the relay adds to every request, and the head's final empty line
    (the same for every request of a connection, so cached)."""
    for_ip = '"[%s]"' % peer_ip if ":" in peer_ip else peer_ip
    return ('\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n'
            'Forwarded: for=%s;host="%s";proto=%s\r\n\r\n'
            % (peer_ip, proto, host, for_ip, host.replace('"', ""), proto)).encode("latin-1")


# =============================================================================
# Proxies (HTTP CONNECT, SOCKS5; pure: bytes in, bytes out)
# =============================================================================

# Which environment variables name the proxy for a relay URL's scheme (curl's rules:
# the lower-case spelling wins, then ALL_PROXY for every scheme, the raw port included).
PROXY_VARIABLES: Dict[str, Tuple[str, ...]] = {
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
    "tcp": ("all_proxy", "ALL_PROXY"),
}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
ROUTE_DIRECT = "direct"
ROUTE_NO_PROXY = "direct (NO_PROXY)"
ROUTE_DISABLED = "direct (--no-proxy)"
ROUTE_PROXY = "via proxy %s"
# A proxy variable set for the other relay forms only (curl's rules: HTTPS_PROXY is for
# https://, HTTP_PROXY for http://, only ALL_PROXY for the raw control port).
UNUSED_PROXY_VARIABLE = ("%s applies to %s:// relays: use --relay %s://HOST, or ALL_PROXY / "
                         "--proxy for the control port")

_PROXY_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?\.?\Z")
_URL_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*\Z")
_RELAY_USERINFO_RE = re.compile(r"\A((?:[A-Za-z][A-Za-z0-9+.-]*://)?).*@", re.S)   # user:pass@
_NO_PROXY_SPLIT_RE = re.compile(r"[,\s]+")
_CONNECT_STATUS_RE = re.compile(r"HTTP/1\.[01] ([1-9][0-9][0-9])(?: ([^\r\n]*))?\Z")
_PROXY_FIELD_NAME_RE = re.compile(_TOKEN + r"\Z")
_CHALLENGE_RE = re.compile(r"[ \t]*(" + _TOKEN + r")(?:[ \t]+[^=\s]|[ \t]*\Z)")
_TARGET_HOST_RE = re.compile(r"[A-Za-z0-9._~%:-]+\Z")   # what a CONNECT target may hold
_QUOTED_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_FIELD_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")   # control bytes but HT


class ProxyURL(collections.namedtuple("ProxyURL", "scheme host port user password")):
    """A parsed proxy URL; ``user`` and ``password`` are None without credentials.
    ``display`` (and ``repr``) never show the password."""

    __slots__ = ()

    @property
    def display(self) -> str:
        """``http://proxy.corp:3128``: for log lines, without the credentials."""
        return "%s://%s" % (self.scheme, format_hostport(self.host, self.port))

    @property
    def where(self) -> str:
        """``proxy.corp:3128``: the proxy as error messages name it."""
        return format_hostport(self.host, self.port)

    def __repr__(self) -> str:
        return "ProxyURL(%r, user=%r)" % (self.display, self.user)


def proxy_text(proxy: ProxyURL) -> str:
    """``http://proxy.corp:3128`` (never the credentials)."""
    return proxy.display


def _ip_literal(text: str) -> Any:
    """``text`` as an ipaddress object, or None if it is not an IP literal."""
    import ipaddress
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _authority(rest: str) -> Tuple[str, str]:
    """A URL after its ``scheme://``: the authority, and what follows (path, query...)."""
    end = len(rest)
    for mark in "/?#":
        i = rest.find(mark, 0, end)
        if i >= 0:
            end = i
    return rest[:end], rest[end:]


def parse_proxy_url(text: str) -> ProxyURL:
    """``[SCHEME://][USER[:PASS]@]HOST[:PORT][/]`` with SCHEME one of PROXY_SCHEMES
    (none: http, as curl does); USER and PASS are percent-decoded, an IPv6 HOST is in
    brackets, PORT defaults to 1080 (443 for https).  ValueError with a one-line
    reason (which never repeats the credentials) for anything else."""
    import urllib.parse
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    scheme = scheme.lower()
    if scheme not in PROXY_SCHEMES:
        shown = " %r" % scheme if _URL_SCHEME_RE.match(scheme) else ""
        raise ValueError("unsupported proxy scheme%s (tunnel.py speaks %s)"
                         % (shown, ", ".join(PROXY_SCHEMES)))
    authority, path = _authority(rest)
    if path not in ("", "/"):      # not shown: it may hold the rest of a password
        raise ValueError("a proxy URL has no path, query or fragment (percent-encode "
                         "'/', '?', '#' and '@' in a user name or password)")
    userinfo, at, hostport = authority.rpartition("@")
    user = password = None
    if at and userinfo:
        raw_user, _, raw_password = userinfo.partition(":")
        user = urllib.parse.unquote(raw_user)
        password = urllib.parse.unquote(raw_password)
    port_text = ""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in the proxy address")
        host, after = hostport[1:end], hostport[end + 1:]
        if after and not after.startswith(":"):
            raise ValueError("expected ':PORT' after ']' in the proxy address")
        port_text = after[1:]
        ip = _ip_literal(host)
        if ip is None or ip.version != 6:
            raise ValueError("'%s' in brackets is not an IPv6 address" % escape_unprintable(host))
    else:
        if hostport.count(":") > 1:
            raise ValueError("an IPv6 proxy address goes in brackets: [%s]"
                             % escape_unprintable(hostport))
        host, _, port_text = hostport.partition(":")
        if not host:
            raise ValueError("no host in the proxy URL")
        if _PROXY_HOST_RE.match(host) is None:
            raise ValueError("invalid proxy host '%s'" % escape_unprintable(host))
    if port_text:
        if not (port_text.isdigit() and port_text.isascii() and 0 < int(port_text) < 65536):
            raise ValueError("invalid proxy port '%s'" % escape_unprintable(port_text))
        port = int(port_text)
    else:
        port = DEFAULT_HTTPS_PROXY_PORT if scheme == "https" else DEFAULT_PROXY_PORT
    if user is not None and not scheme.startswith("socks") and ":" in user:
        raise ValueError("a proxy user name for Basic cannot contain ':'")
    if user is not None and scheme.startswith("socks"):
        if not 0 < len(user.encode("utf-8")) <= SOCKS_MAX_FIELD:
            raise ValueError("a SOCKS user name is 1-%d bytes" % SOCKS_MAX_FIELD)
        if len((password or "").encode("utf-8")) > SOCKS_MAX_FIELD:
            raise ValueError("a SOCKS password is at most %d bytes" % SOCKS_MAX_FIELD)
    return ProxyURL(scheme, host, port, user, password)


def _no_proxy_entry(entry: str) -> Tuple[str, Optional[int]]:
    """(host part, port or None) of one NO_PROXY entry, lower-case, brackets off."""
    if entry.startswith("["):
        end = entry.find("]")
        if end > 0:
            host, after = entry[1:end], entry[end + 1:]
            if after.startswith("/"):             # [fd00::]/8
                return host + after, None
            if after.startswith(":") and after[1:].isdigit():
                return host, int(after[1:])
            return host, None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def no_proxy_match(host: str, port: int, no_proxy: str) -> bool:
    """Does ``NO_PROXY``-style list ``no_proxy`` cover ``host`` (a name or an IP
    literal, brackets allowed) on ``port``?  curl's rules: entries separated by commas
    or whitespace; ``*`` alone matches everything; a name matches itself and its
    subdomains, with or without a leading dot (``*.`` too); case and a trailing dot do
    not matter; an IP literal matches exactly, a CIDR block every address in it (never a
    name: there is no DNS here); ``ENTRY:PORT`` matches only that port."""
    import ipaddress
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    name = name.lower().rstrip(".")
    ip = _ip_literal(name.split("%", 1)[0])
    if no_proxy.strip() == "*":     # only as the whole value (curl, urllib): in a list,
        return True                 # a "*" is a typo, not "bypass everything"
    for entry in _NO_PROXY_SPLIT_RE.split(no_proxy.strip()):
        if not entry or entry == "*":
            continue
        pattern, entry_port = _no_proxy_entry(entry.lower())
        if entry_port is not None and entry_port != port:
            continue
        if "/" in pattern:
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                continue
            if ip is not None and ip.version == network.version and ip in network:
                return True
            continue
        entry_ip = _ip_literal(pattern)
        if entry_ip is not None or ip is not None:
            if entry_ip is not None and entry_ip == ip:
                return True
            continue
        if pattern.startswith("*."):
            pattern = pattern[1:]
        pattern = pattern.strip(".")
        if pattern and (name == pattern or name.endswith("." + pattern)):
            return True
    return False


def _first_set(environ: Mapping[str, str], names: Tuple[str, ...]) -> Tuple[str, str]:
    """(name, value) of the first of ``names`` set to something but blanks, or ("", "")."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return "", ""


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str],
              override: Optional[str] = None,
              disabled: bool = False) -> Tuple[Optional[ProxyURL], str]:
    """The proxy to reach ``host``:``port`` through (or None) and the route text for the
    log.  ``scheme`` is the relay URL's: ``https``, ``http`` or ``tcp`` (the raw control
    port).  curl's conventions: ``override`` (``--proxy``) replaces the environment
    (an empty one means no proxy), ``disabled`` (``--no-proxy``) means direct; else
    https_proxy/HTTPS_PROXY for https, http_proxy/HTTP_PROXY for http, then
    all_proxy/ALL_PROXY, lower case first; NO_PROXY applies to both.  A malformed
    proxy URL raises ValueError naming where it came from (``HTTPS_PROXY: ...``)."""
    if scheme not in PROXY_VARIABLES:
        raise ValueError("unknown relay scheme %r" % scheme)
    if disabled or (override is not None and not override.strip()):
        return None, ROUTE_DISABLED
    if override is not None:
        source, text = "--proxy", override.strip()
    else:
        source, text = _first_set(environ, PROXY_VARIABLES[scheme])
        if not text:
            return None, ROUTE_DIRECT
    try:
        proxy = parse_proxy_url(text)
    except ValueError as exc:
        raise ValueError("%s: %s" % (source, exc)) from None
    if no_proxy_match(host, port, _first_set(environ, NO_PROXY_VARIABLES)[1]):
        return None, ROUTE_NO_PROXY
    return proxy, ROUTE_PROXY % proxy.display


def unused_proxy_variable(scheme: str, environ: Mapping[str, str],
                          override: Optional[str] = None, disabled: bool = False) -> str:
    """The notice for a proxy variable that ``proxy_for`` passed over for the raw
    control port (``scheme`` "tcp") although a URL relay would use it, or ""."""
    if scheme != "tcp" or disabled or override is not None:
        return ""
    if _first_set(environ, PROXY_VARIABLES["tcp"])[1]:
        return ""
    for kind in ("https", "http"):
        name = _first_set(environ, PROXY_VARIABLES[kind][:2])[0]
        if name:
            return UNUSED_PROXY_VARIABLE % (name, kind, kind)
    return ""


# -- HTTP CONNECT --------------------------------------------------------------

def connect_request(host: str, port: int, proxy: ProxyURL) -> bytes:
    """The ``CONNECT host:port`` request for ``proxy`` (Basic credentials if it has a
    user).  ValueError for a host that could break the request line, or a user name
    with a colon (Basic cannot carry one)."""
    if _TARGET_HOST_RE.match(host) is None:
        raise ValueError("invalid host '%s' for CONNECT" % escape_unprintable(host))
    target = format_hostport(host, port)
    head = "CONNECT %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: tunnel.py/%s\r\n" % (
        target, target, __version__)
    if proxy.user is not None:
        if ":" in proxy.user:
            raise ValueError("a proxy user name for Basic cannot contain ':'")
        credentials = ("%s:%s" % (proxy.user, proxy.password or "")).encode("utf-8")
        head += "Proxy-Authorization: Basic %s\r\n" % _b64(credentials)
    return (head + "\r\n").encode("latin-1")


class ConnectReply:
    """The proxy's answer to CONNECT, fed incrementally: ``feed(data)`` is True once
    the head is complete; then ``status``, ``reason`` (escaped for printing),
    ``fields`` ((name, value) pairs in order, duplicates kept) and ``rest`` (the bytes
    after the head: the start of the tunnel, or of an error body).  ProtocolError for a
    head over MAX_PROXY_REPLY or a malformed one."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False
        self.status = 0
        self.reason = ""
        self.fields: List[Tuple[str, str]] = []
        self.rest = b""

    def feed(self, data: bytes) -> bool:
        if self.done:
            raise ValueError("the CONNECT reply is complete: read .rest")
        buf, old = self._buf, len(self._buf)
        mv = memoryview(data)
        room = MAX_PROXY_REPLY - old
        buf += mv[:room]                       # never more than the limit buffered
        if buf[:5] != b"HTTP/"[:len(buf)]:
            raise ProtocolError("the proxy did not answer CONNECT with HTTP (%s)"
                                % escape_unprintable(bytes(buf[:16]).decode("latin-1")))
        end = buf.find(b"\r\n\r\n", max(0, old - 3))
        if end < 0:
            if len(buf) >= MAX_PROXY_REPLY:
                raise ProtocolError("the proxy's reply head is over %d bytes" % MAX_PROXY_REPLY)
            return False
        self.rest = bytes(buf[end + 4:]) + bytes(mv[room:]) if room < len(mv) \
            else bytes(buf[end + 4:])
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        self._buf = bytearray()
        m = _CONNECT_STATUS_RE.match(lines[0])
        if m is None:
            raise ProtocolError("malformed status line from the proxy: %s"
                                % escape_unprintable(lines[0][:80]))
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or _PROXY_FIELD_NAME_RE.match(name) is None \
                    or _FIELD_VALUE_BAD_RE.search(value) is not None:
                raise ProtocolError("malformed field in the proxy's reply: %s"
                                    % escape_unprintable(line[:80]))
            self.fields.append((name, value.strip(" \t")))
        self.status = int(m.group(1))
        self.reason = escape_unprintable(m.group(2) or "")
        self.done = True
        return True

    def get_all(self, name: str) -> List[str]:
        """Every value of field ``name`` (any case), in order."""
        lower = name.lower()
        return [v for n, v in self.fields if n.lower() == lower]


def auth_schemes(values: List[str]) -> List[str]:
    """The auth schemes a list of Proxy-Authenticate values offers, in order,
    duplicates kept (``Basic realm="x", NTLM`` offers Basic and NTLM)."""
    found = []
    for value in values:
        for part in _QUOTED_STRING_RE.sub('""', value).split(","):
            m = _CHALLENGE_RE.match(part)
            if m is not None:
                found.append(m.group(1))
    return found


def connect_error(reply: ConnectReply, proxy: ProxyURL, target: str) -> ProxyError:
    """The error for a CONNECT answered with ``reply`` (not 2xx): a 407 is fatal and
    says what the proxy wants; any other status is retried."""
    where = proxy.where
    if reply.status != PROXY_AUTH_REQUIRED:
        status = ("%d %s" % (reply.status, reply.reason)).rstrip()
        if reply.status in PROXY_UNREACHABLE:
            return ProxyError("proxy %s could not reach %s: %s" % (where, target, status))
        hint = ""
        if reply.status in PROXY_FORBIDDEN and not target.endswith(":%d" % PROXY_OPEN_PORT):
            hint = ("; many proxies allow CONNECT only to port %d: use --relay https://HOST"
                    " (on port %d)" % (PROXY_OPEN_PORT, PROXY_OPEN_PORT))
        return ProxyError("proxy %s refused CONNECT %s: %s%s" % (where, target, status, hint))
    schemes = auth_schemes(reply.get_all("proxy-authenticate"))
    if schemes and not any(s.lower() == "basic" for s in schemes):
        return ProxyError("proxy %s wants %s, which tunnel.py does not speak; use a proxy "
                          "account with Basic, or a SOCKS proxy"
                          % (where, escape_unprintable(" or ".join(
                              dict.fromkeys(schemes)))), fatal=True)
    if proxy.user is not None:
        return ProxyError("proxy %s refused the credentials for %s (407)"
                          % (where, escape_unprintable(proxy.user)), fatal=True)
    return ProxyError("proxy %s wants a user name and password (Basic): put them in the "
                      "proxy URL, %s://USER:PASS@%s" % (where, proxy.scheme, where), fatal=True)


# -- SOCKS5 (RFC 1928, RFC 1929) -------------------------------------------------

# Handshake states: what the next bytes from the proxy are.
_SOCKS_METHOD = "method"          # VER METHOD (2 bytes)
_SOCKS_AUTH = "auth"              # RFC 1929: VER STATUS (2 bytes)
_SOCKS_REPLY = "reply"            # VER REP RSV ATYP (4 bytes)
_SOCKS_NAME_LENGTH = "name length"   # ATYP 3: the bound name's length (1 byte)
_SOCKS_BOUND = "bound address"    # BND.ADDR BND.PORT (4 + 2, 16 + 2 or length + 2)
_SOCKS_DONE = "done"              # the tunnel is open; everything else is ``rest``
_SOCKS_FAILED = "failed"          # an error was raised; feed raises again
SOCKS_STATES: Dict[str, int] = {  # state -> bytes it waits for (0: variable, or none)
    _SOCKS_METHOD: 2, _SOCKS_AUTH: 2, _SOCKS_REPLY: 4, _SOCKS_NAME_LENGTH: 1,
    _SOCKS_BOUND: 0, _SOCKS_DONE: 0, _SOCKS_FAILED: 0,
}


class Socks5Handshake:
    """The client side of a SOCKS5 CONNECT: ``start()`` is the greeting, ``feed(data)``
    returns what to send next (b"" for nothing); ``done`` once the proxy reports
    success, with ``rest`` the bytes after its reply.  ``host`` is an IP literal
    (socks5: resolved here) or a name (socks5h: resolved by the proxy).  ``proxy_name``
    (``proxy.corp:1080``) is named in the errors.  ProxyError (``fatal`` for
    credentials) when the proxy refuses, ProtocolError when it breaks the protocol."""

    def __init__(self, host: str, port: int, user: Optional[str] = None,
                 password: Optional[str] = None, proxy_name: str = "") -> None:
        if not 0 < port < 65536:
            raise ValueError("invalid port %r" % port)
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        ip = _ip_literal(literal)
        if ip is not None:
            atyp = SOCKS_ATYP_IPV4 if ip.version == 4 else SOCKS_ATYP_IPV6
            address = bytes([atyp]) + ip.packed
        else:
            name = host.encode("ascii") if host.isascii() else host.encode("idna")
            if not 0 < len(name) <= SOCKS_MAX_FIELD:
                raise ValueError("a SOCKS host name is 1-%d bytes" % SOCKS_MAX_FIELD)
            if _PROXY_HOST_RE.match(name.decode("ascii")) is None:
                raise ValueError("invalid host name '%s'" % escape_unprintable(host))
            address = bytes([SOCKS_ATYP_DOMAIN, len(name)]) + name
        self._request = bytes([SOCKS_VERSION, SOCKS_CMD_CONNECT, 0]) + address + \
            SOCKS_PORT.pack(port)
        self._auth = b""
        if user is not None:
            u, p = user.encode("utf-8"), (password or "").encode("utf-8")
            if not 0 < len(u) <= SOCKS_MAX_FIELD or len(p) > SOCKS_MAX_FIELD:
                raise ValueError("a SOCKS user name is 1-%d bytes, a password at most %d"
                                 % (SOCKS_MAX_FIELD, SOCKS_MAX_FIELD))
            self._auth = bytes([SOCKS_AUTH_VERSION, len(u)]) + u + bytes([len(p)]) + p
        self.user = user
        self.target = format_hostport(literal if ip is not None else host, port)
        self.who = "SOCKS proxy " + proxy_name if proxy_name else "the SOCKS proxy"
        self.state = _SOCKS_METHOD
        self._need = SOCKS_STATES[_SOCKS_METHOD]
        self._buf = bytearray()
        self.done = False
        self.rest = b""

    def start(self) -> bytes:
        """The greeting: no authentication, and username/password when we have a user."""
        methods = [SOCKS_NO_AUTH] + ([SOCKS_PASSWORD_AUTH] if self._auth else [])
        return bytes([SOCKS_VERSION, len(methods)] + methods)

    def feed(self, data: bytes) -> bytes:
        if self.state == _SOCKS_DONE:
            raise ValueError("the SOCKS handshake is complete: read .rest")
        if self.state == _SOCKS_FAILED:
            raise ProtocolError("the SOCKS handshake already failed")
        buf = self._buf
        buf += data
        out = b""
        try:
            while self.state != _SOCKS_DONE and len(buf) >= self._need:
                piece = bytes(buf[:self._need])
                del buf[:self._need]
                out += self._step(piece)
        except TunnelError:
            self.state = _SOCKS_FAILED
            raise
        if self.state == _SOCKS_DONE:
            self.rest = bytes(buf)
            self._buf = bytearray()
        return out

    def _enter(self, state: str, need: int = 0) -> None:
        self.state = state
        self._need = need or SOCKS_STATES[state]

    def _step(self, piece: bytes) -> bytes:
        """One complete message part in ``piece``; returns what to send."""
        state = self.state
        if state == _SOCKS_METHOD:
            self._check_version(piece[0])
            method = piece[1]
            if method == SOCKS_NO_METHOD:
                if self._auth:
                    raise ProxyError("%s refused every method we offer (%s, %s)" % (
                        self.who, SOCKS_METHODS[SOCKS_NO_AUTH],
                        SOCKS_METHODS[SOCKS_PASSWORD_AUTH]), fatal=True)
                raise ProxyError("%s wants a user name and password: put them in the proxy "
                                 "URL" % self.who, fatal=True)
            if method == SOCKS_NO_AUTH:
                self._enter(_SOCKS_REPLY)
                return self._request
            if method == SOCKS_PASSWORD_AUTH and self._auth:
                self._enter(_SOCKS_AUTH)
                return self._auth
            raise ProtocolError("%s chose method 0x%02x, which we did not offer"
                                % (self.who, method))
        if state == _SOCKS_AUTH:
            if piece[0] != SOCKS_AUTH_VERSION:
                raise ProtocolError("%s answered the credentials with version 0x%02x"
                                    % (self.who, piece[0]))
            if piece[1] != SOCKS_AUTH_OK:
                raise ProxyError("%s refused the credentials for %s"
                                 % (self.who, escape_unprintable(self.user or "")), fatal=True)
            self._enter(_SOCKS_REPLY)
            return self._request
        if state == _SOCKS_REPLY:
            self._check_version(piece[0])
            code, reserved, atyp = piece[1], piece[2], piece[3]
            if code != SOCKS_REPLY_OK:
                meaning = SOCKS5_REPLIES.get(code, "unknown reply code 0x%02x" % code)
                raise ProxyError("%s could not connect to %s: %s"
                                 % (self.who, self.target, meaning))
            if reserved != 0:
                raise ProtocolError("%s sent a reply with reserved byte 0x%02x"
                                    % (self.who, reserved))
            if atyp == SOCKS_ATYP_DOMAIN:
                self._enter(_SOCKS_NAME_LENGTH)
            elif atyp in SOCKS_ADDRESS_SIZES:
                self._enter(_SOCKS_BOUND, SOCKS_ADDRESS_SIZES[atyp] + SOCKS_PORT.size)
            else:
                raise ProtocolError("%s sent address type 0x%02x" % (self.who, atyp))
            return b""
        if state == _SOCKS_NAME_LENGTH:
            self._enter(_SOCKS_BOUND, piece[0] + SOCKS_PORT.size)
            return b""
        self.state, self.done = _SOCKS_DONE, True   # _SOCKS_BOUND: the address is not used
        return b""

    def _check_version(self, version: int) -> None:
        if version != SOCKS_VERSION:
            raise ProtocolError("%s is not a SOCKS5 proxy (version byte 0x%02x)"
                                % (self.who, version))


# =============================================================================
# Visitor access control (pure: a request and a peer in, a verdict out)
# =============================================================================

PBKDF2_PREFIX = "pbkdf2_sha256"         # hash format: prefix$iterations$salt$hash
PBKDF2_ITERATIONS = 100000              # for hash-password and --basic-auth USER:PASS
PBKDF2_MIN_ITERATIONS = 1000            # a hash asking for fewer is refused (no cost at all)
PBKDF2_MAX_ITERATIONS = 600000          # ... or for more: the relay pays it (~0.14 s each)
COOKIE_NAME = "tunnel_auth"             # signed visitor-token cookie
COOKIE_TTL = 12 * 3600                  # seconds a visitor cookie stays valid
TOKEN_PARAM = "tunnel_token"            # ?tunnel_token=... sets the cookie once
TOKEN_HEADER = "x-tunnel-token"         # or send the token in this header
AUTH_CACHE_SIZE = 16                    # verified basic-auth credentials remembered per tunnel
VERIFY_THREADS = 2                      # worker threads that run password hashes
MAX_VERIFICATIONS = 64                  # password checks queued or running, relay-wide (503)
MAX_VERIFICATIONS_PER_SOURCE = 4        # ... from one address (429)
VERIFICATION_SHARE = 4                  # one tunnel's checks: at most 1/this of the queue (503)
PENALTY_WINDOW = 300.0                  # failures older than this are forgotten (s)
PENALTY_BAN_AFTER = 10                  # failures in the window before a ban
PENALTY_BAN_TIME = 300.0                # ban length (s)
PENALTY_DELAY = 0.25                    # first refusal delay; doubles per failure
PENALTY_MAX_DELAY = 4.0                 # refusal delay cap (s)
PENALTY_MAX_KEYS = 100000               # failure counts and bans kept (oldest go first)


def _b64(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    import base64
    import binascii
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return b""


def hash_password(password: str, salt: Optional[bytes] = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """A PBKDF2-SHA256 hash, ``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "%s$%d$%s$%s" % (PBKDF2_PREFIX, iterations, _b64(salt), _b64(digest))


def is_password_hash(text: str) -> bool:
    """A well-formed hash whose cost is within PBKDF2_MIN/MAX_ITERATIONS."""
    parts = text.split("$")
    return (len(parts) == 4 and parts[0] == PBKDF2_PREFIX
            and _DIGITS_RE.match(parts[1]) is not None   # ASCII digits only
            and PBKDF2_MIN_ITERATIONS <= int(parts[1]) <= PBKDF2_MAX_ITERATIONS
            and bool(_unb64(parts[2])) and len(_unb64(parts[3])) == 32)


def _pbkdf2_ok(password: bytes, stored: str) -> bool:
    """Run the hash (GIL released) and compare: ``stored`` passed is_password_hash."""
    _, iterations, salt, digest = stored.split("$")
    got = hashlib.pbkdf2_hmac("sha256", password, _unb64(salt), int(iterations))
    return hmac.compare_digest(got, _unb64(digest))


def verify_password(password: str, stored: str) -> bool:
    if not is_password_hash(stored):
        return False
    return _pbkdf2_ok(password.encode("utf-8"), stored)


class Penalties:
    """Failures per key: a growing delay, then a temporary ban.  A key is any hashable
    value: (source address, tunnel) for visitors, so that one key's success clears only
    that key."""

    def __init__(self, ban_after: int = PENALTY_BAN_AFTER,
                 ban_time: float = PENALTY_BAN_TIME) -> None:
        self.ban_after = ban_after
        self.ban_time = ban_time
        self._failures: Dict[Any, Tuple[int, float]] = {}   # key -> count, last failure
        self._banned: Dict[Any, float] = {}                 # key -> until

    def banned(self, ip: Any, now: Optional[float] = None) -> bool:
        if not self._banned:
            return False
        now = time.monotonic() if now is None else now
        until = self._banned.get(ip)
        if until is None:
            return False
        if until <= now:
            del self._banned[ip]
            return False
        return True

    def fail(self, ip: Any, now: Optional[float] = None) -> float:
        """Record a failure; return how long to delay the refusal."""
        now = time.monotonic() if now is None else now
        _forget_oldest(self._failures, now)   # bounded memory under a wide attack
        count, last = self._failures.get(ip, (0, now))
        if now - last > PENALTY_WINDOW:
            count = 0
        count += 1
        self._failures[ip] = (count, now)
        if self.ban_after and count >= self.ban_after:
            _forget_oldest(self._banned, now, expired=lambda until: until <= now)
            self._banned[ip] = now + self.ban_time
            del self._failures[ip]
        return min(PENALTY_MAX_DELAY, PENALTY_DELAY * 2 ** (count - 1))

    def succeed(self, ip: Any) -> None:
        self._failures.pop(ip, None)

    def active(self, now: Optional[float] = None) -> List[Tuple[Any, float]]:
        """The bans in force: (key, seconds left), oldest first (for /status)."""
        now = time.monotonic() if now is None else now
        return [(key, until - now) for key, until in self._banned.items() if until > now]


def _forget_oldest(table: Dict[Any, Any], now: float,
                   expired: Optional[Callable[[Any], bool]] = None) -> None:
    """Keep ``table`` under PENALTY_MAX_KEYS: drop expired entries, then the oldest
    tenth (insertion order), never everything at once (that would wipe the counts
    of every other key, which a wide attack could use to reset its own)."""
    if len(table) < PENALTY_MAX_KEYS:
        return
    if expired is not None:
        for key in [k for k, v in table.items() if expired(v)]:
            del table[key]
    excess = len(table) - PENALTY_MAX_KEYS + PENALTY_MAX_KEYS // 10
    for key in list(itertools.islice(table, max(0, excess))):
        del table[key]


def _parse_networks(values: Any, what: str) -> List[Any]:
    import ipaddress
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RefusedError(REFUSED_INVALID_ACCESS, "%s must be a list of CIDR strings" % what)
    try:
        return [ipaddress.ip_network(v, strict=False) for v in values]
    except ValueError as exc:
        raise RefusedError(REFUSED_INVALID_ACCESS, "%s: %s" % (what, exc)) from None


_QUERY_SEPARATOR_RE = re.compile(r"[&;]")
PREFLIGHT = "preflight"                 # AccessPolicy.check: an unauthenticated preflight


def split_token_param(query: str) -> Tuple[str, List[str]]:
    """(``query`` without any ``tunnel_token`` parameter, the values it had).  Names are
    compared percent-decoded (``tunnel%5Ftoken`` is one too); ``;`` separates as ``&``
    does for some apps; the other parameters are kept as received."""
    import urllib.parse
    kept: List[str] = []
    values: List[str] = []
    for part in _QUERY_SEPARATOR_RE.split(query):
        name, _, value = part.partition("=")
        if urllib.parse.unquote_plus(name) == TOKEN_PARAM:
            values.append(urllib.parse.unquote_plus(value))
        elif part:
            kept.append(part)
    return "&".join(kept), values


def local_location(path: str) -> str:
    """A Location on this tunnel for ``path``: one leading slash, never ``//host`` or
    ``/\\host`` (browsers read a backslash as a slash)."""
    return "/" + path.lstrip("/\\")


class AccessPolicy:
    """Who may reach one tunnel; built from the client's handshake request.

    ``check(req, now)`` raises ``HTTPError`` (401, 403) or ``HTTPResponse`` (a 303
    that sets the visitor cookie) or returns, after marking in ``req`` what
    credential fields to strip
    before the request is forwarded.  With ``defer=True`` a basic-auth credential not
    verified before is returned instead of hashed: the caller runs ``verify`` on it
    off the event loop, ``remember``s it if it is good and calls ``check`` again.
    """

    def __init__(self, spec: Dict[str, Any], secret: bytes, name: str,
                 secure: bool = False) -> None:
        basic = spec.get("basic_auth")
        self.basic_user = self.basic_hash = ""
        if basic is not None:
            if (not isinstance(basic, dict) or not isinstance(basic.get("user"), str)
                    or not is_password_hash(str(basic.get("hash", "")))):
                raise RefusedError(REFUSED_INVALID_ACCESS, "basic_auth needs a user and a "
                                   "pbkdf2_sha256 hash of %d to %d iterations"
                                   % (PBKDF2_MIN_ITERATIONS, PBKDF2_MAX_ITERATIONS))
            self.basic_user, self.basic_hash = basic["user"], basic["hash"]
        token = spec.get("visitor_token_sha256")
        if token is not None and not (isinstance(token, str)
                                      and re.fullmatch(r"[0-9a-f]{64}", token)):
            raise RefusedError(REFUSED_INVALID_ACCESS, "visitor_token_sha256 must be 64 hex digits")
        self.token_hash = token or ""
        self.allow = _parse_networks(spec.get("allow"), "allow")
        self.deny = _parse_networks(spec.get("deny"), "deny")
        self.name = name
        self.secure = secure
        self.cookie_key = hmac.new(secret, b"cookie\0" + name.encode() + b"\0" +
                                   self.token_hash.encode(), hashlib.sha256).digest()
        self._user = self.basic_user.encode("utf-8", "replace")
        self._cache_key = secrets.token_bytes(32)   # keys the digests of good credentials
        self._verified: List[bytes] = []             # ... remembered (AUTH_CACHE_SIZE)

    @property
    def needs_credentials(self) -> bool:
        return bool(self.basic_hash or self.token_hash)

    def peer_allowed(self, peer_ip: str) -> bool:
        if not self.allow and not self.deny:
            return True
        import ipaddress
        try:
            ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if any(ip in net for net in self.deny):
            return False
        return not self.allow or any(ip in net for net in self.allow)

    # -- credentials -------------------------------------------------------------
    def _token_ok(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()
        return hmac.compare_digest(digest, self.token_hash)

    def make_cookie(self, now: float) -> str:
        expiry = int(now) + COOKIE_TTL
        mac = hmac.new(self.cookie_key, b"%d" % expiry, hashlib.sha256).hexdigest()
        return "%d.%s" % (expiry, mac)

    def cookie_ok(self, value: str, now: float) -> bool:
        expiry, _, mac = value.partition(".")
        if _DIGITS_RE.match(expiry) is None or int(expiry) <= now:   # ASCII digits only
            return False
        good = hmac.new(self.cookie_key, expiry.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(mac.encode("utf-8", "replace"), good.encode())

    def _digest(self, credential: bytes) -> bytes:
        return hmac.new(self._cache_key, credential, hashlib.sha256).digest()

    def verify(self, credential: bytes) -> bool:
        """Is ``credential`` (``user:password``, as sent) ours?  Always runs the hash, so
        a wrong user name costs what a wrong password does.  Thread-safe, no state."""
        user, sep, password = credential.partition(b":")
        user_ok = hmac.compare_digest(user, self._user)
        return _pbkdf2_ok(password, self.basic_hash) and user_ok and bool(sep)

    def remember(self, credential: bytes) -> None:
        """``credential`` verified: later requests with it cost one HMAC."""
        if len(self._verified) >= AUTH_CACHE_SIZE:
            del self._verified[0]
        self._verified.append(self._digest(credential))

    def _known(self, credential: bytes) -> bool:
        digest = self._digest(credential)
        found = False
        for known in self._verified:
            found = hmac.compare_digest(known, digest) or found
        return found

    def _basic(self, value: str, defer: bool) -> Any:
        """True or False for an Authorization value, or the credential (bytes) still
        to be verified when ``defer``."""
        scheme, _, encoded = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        credential = _unb64(encoded.strip())
        if not credential:
            return False
        if self._known(credential):
            return True
        if defer:
            return credential
        if self.verify(credential):
            self.remember(credential)
            return True
        return False

    @staticmethod
    def is_preflight(req: Request) -> bool:
        """A CORS preflight as browsers send it: no body, no upgrade, no credentials."""
        index = req.headers.index
        return (req.method == "OPTIONS" and "access-control-request-method" in index
                and req.body == "none" and "upgrade" not in index
                and "transfer-encoding" not in index and "authorization" not in index
                and TOKEN_HEADER not in index and "cookie" not in index)

    def check(self, req: Request, now: float, defer: bool = False) -> Any:
        """None when ``req`` may pass (see the class), PREFLIGHT for a CORS preflight
        that passes without credentials (its answer must be filtered), or with ``defer``
        a credential to verify first; raises HTTPError otherwise."""
        if not self.needs_credentials:
            return None
        index = req.headers.index
        if req.method == "OPTIONS" and self.is_preflight(req):
            if self.token_hash:
                self._drop_token_param(req)
            return PREFLIGHT
        if self.token_hash:
            path, carried = self._drop_token_param(req)
            presented = index.get(TOKEN_HEADER, [])
            valid = False
            if presented:
                req.strip |= {TOKEN_HEADER}
                valid = any(self._token_ok(v) for v in presented)
            if self._strip_cookie(req, now) or valid:
                return None
            if carried is not None:
                self._token_from_query(path, carried, now)
        if self.basic_hash:
            for value in index.get("authorization", []):
                verdict = self._basic(value, defer)
                if verdict is True:
                    req.strip |= {"authorization"}   # it carried our credential
                    return None
                if verdict is not False:
                    return verdict
        raise self.refusal()

    @staticmethod
    def _drop_token_param(req: Request) -> Tuple[str, Optional[Tuple[str, List[str]]]]:
        """Take ``?tunnel_token=`` out of the target to be forwarded; return the path and
        (the rest of the query, the token values), or None without one."""
        path, sep, query = req.target.partition("?")
        if not sep or (TOKEN_PARAM not in query and "%" not in query):
            return path, None
        carried = split_token_param(query)
        if not carried[1]:
            return path, None
        req.target = path + ("?" + carried[0] if carried[0] else "")
        req.target_changed = True     # never forwarded, even with valid credentials
        return path, carried

    def refusal(self) -> HTTPError:
        """The 401 for missing or wrong credentials."""
        headers: Tuple[Tuple[str, str], ...] = ()
        if self.basic_hash:
            headers = (("WWW-Authenticate", 'Basic realm="%s", charset="UTF-8"' % self.name),)
        how = []
        if self.basic_hash:
            how.append("HTTP Basic credentials")
        if self.token_hash:
            how.append("a visitor token (X-Tunnel-Token header or ?%s=)" % TOKEN_PARAM)
        return HTTPError(401, "This tunnel needs %s." % " or ".join(how), headers)

    def _strip_cookie(self, req: Request, now: float) -> bool:
        """Remove our cookie from Cookie; True if it was valid."""
        values = req.headers.index.get("cookie")
        if not values:
            return False
        valid = False
        kept = []
        found = False
        for value in values:
            for part in value.split(";"):
                name, _, cookie = part.strip().partition("=")
                if name == COOKIE_NAME:
                    found = True
                    valid = valid or self.cookie_ok(cookie.strip(), now)
                elif part.strip():
                    kept.append(part.strip())
        if found:
            req.strip |= {"cookie"}
            if kept:
                req.extra += (("Cookie", "; ".join(kept)),)
        return valid

    def _token_from_query(self, path: str, carried: Tuple[str, List[str]],
                          now: float) -> None:
        rest, tokens = carried
        if not any(self._token_ok(v) for v in tokens):
            raise HTTPError(401, "The visitor token in ?%s= is not valid." % TOKEN_PARAM)
        location = local_location(path) + ("?" + rest if rest else "")
        cookie = "%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax%s" % (
            COOKIE_NAME, self.make_cookie(now), COOKIE_TTL, "; Secure" if self.secure else "")
        raise HTTPResponse(303, "Signed in; continue at %s" % location,
                        (("Location", location), ("Set-Cookie", cookie)))


class VerifyPool:
    """A few worker threads that run password hashes off the event loop.

    ``submit(source, job, done)`` queues ``job()`` (a pure, thread-safe callable) and
    calls ``done(result)`` on the loop thread when it has run; it raises HTTPError 503
    when ``max_queued`` checks are queued or running relay-wide, 429 when
    ``max_per_source`` are from ``source``.  Threads start on first use; ``stop()``
    joins them.
    """

    def __init__(self, loop: EventLoop, threads: int = VERIFY_THREADS,
                 max_queued: int = MAX_VERIFICATIONS,
                 max_per_source: int = MAX_VERIFICATIONS_PER_SOURCE) -> None:
        self.loop = loop
        self.threads = max(1, threads)
        self.max_queued = max_queued
        self.max_per_source = max_per_source
        self.pending = 0                          # queued or running (loop thread only)
        self.per_source: Dict[Any, int] = {}      # source -> pending from it
        self._jobs: Deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._workers: List[threading.Thread] = []
        self._stopped = False

    def submit(self, source: Any, job: Callable[[], Any],
               done: Callable[[Any], None], group: Any = None) -> None:
        if self.pending >= self.max_queued:
            raise HTTPError(503, "Too many password checks in progress; try again soon.")
        if self.per_source.get(source, 0) >= self.max_per_source:
            raise HTTPError(429, "Too many password checks from your address; try again "
                            "soon.")
        # One tunnel (``group``), whose owner picked the hash's cost, may take only a
        # share of the queue: the others' logins still get through.
        if group is not None and self.per_source.get(group, 0) >= max(
                1, self.max_queued // VERIFICATION_SHARE):
            raise HTTPError(503, "Too many password checks for this tunnel in progress; "
                            "try again soon.")
        with self._cond:
            if self._stopped:
                raise HTTPError(503, "The relay is stopping.")
            if len(self._workers) < self.threads:
                worker = threading.Thread(target=self._work, name="tunnel-verify",
                                          daemon=True)
                self._workers.append(worker)
                worker.start()
            self._jobs.append(((source, group), job, done))
            self._cond.notify()
        self.pending += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        self.per_source[group] = self.per_source.get(group, 0) + 1

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                source, job, done = self._jobs.popleft()
            result = job()
            self.loop.call_soon_threadsafe(functools.partial(self._finish, source, done,
                                                             result))

    def _finish(self, keys: Any, done: Callable[[Any], None], result: Any) -> None:
        self.pending -= 1
        for key in keys:
            left = self.per_source.pop(key, 1) - 1
            if left:
                self.per_source[key] = left
        done(result)

    def stop(self) -> None:
        """Drop queued checks and join the threads (a running hash finishes first)."""
        with self._cond:
            self._stopped = True
            self._jobs.clear()
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers = []


# =============================================================================
# Pipes: a socket joined to a stream (the shared data path of both sides)
# =============================================================================


class Pipe(Conn, StreamHandler):
    """Copies bytes between a socket and a stream, honouring flow control.

    Bytes from the stream go to the socket; the stream is credited as the
    kernel accepts them (``Stream.consumed``).  Bytes from the socket go to the
    stream while ``stream.writable``; otherwise reading pauses.
    """

    def __init__(self, loop: EventLoop, sock: Optional[socket.socket]) -> None:
        super().__init__(loop, sock)
        if sock is not None:
            set_nodelay(sock)
        self.stream: Optional[Stream] = None
        self.read_eof = False       # the socket's peer sent FIN
        self.write_eof = False      # we shut down our writing side
        self.shutdown_pending = False
        self.close_pending = False
        self.counted = 0            # bytes in ``out`` owed to the stream's credit
        self.out_sent = 0           # bytes of ``out`` the socket took, ever

    def wants_read(self) -> bool:
        return (not self.read_eof and not self.close_pending
                and (self.stream is None or self.stream.writable))

    # -- socket -> stream ---------------------------------------------------------
    def on_read(self) -> None:
        stream = self.stream
        limit = READ_SIZE
        if stream is not None:
            # Within the credit and the room left under the session's high-water mark:
            # several streams readable in one turn cannot push its queue past the mark.
            if stream.send_window < limit:
                limit = stream.send_window
            room = SESSION_HIGH_WATER - len(stream.session.out)
            if room < limit:
                limit = room
            if limit <= 0:              # selected in the turn the stream stopped
                self.update()
                return
        try:
            n = self.sock.recv_into(self.loop.scratch, limit)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.on_socket_error(exc)
            return
        if not n:
            self.read_eof = True
            self.on_socket_eof()
        else:
            data = self.loop.scratch_view[:n]
            self.on_socket_data(data)
            # A short read mid-message: the peer may hold its next small write until
            # this one is ACKed (Nagle), so ACK now rather than after 40 ms.
            if n < limit and not self.closed and self.mid_message(data):
                quickack(self.sock)
        self.update()
        self.read_pending()

    def mid_message(self, data: memoryview) -> bool:
        """After reading ``data``: will the peer send more before it hears from us?
        (Unknown: assume so.)"""
        return True

    def on_socket_data(self, data: memoryview) -> None:
        if self.stream is not None:
            self.stream.write(data)

    def on_socket_eof(self) -> None:
        if self.stream is not None:
            self.stream.close_write()
        self._maybe_done()

    def on_socket_error(self, exc: OSError) -> None:
        if self.stream is not None:
            self.stream.reset(describe_oserror(exc))
        self.close_socket()

    # -- stream -> socket ---------------------------------------------------------
    def send_bytes(self, data: Any, credited: bool) -> None:
        """Write to the socket now if possible, buffer the rest."""
        if self.closed or self.write_eof:
            if credited and self.stream is not None:
                self.stream.consumed(len(data))
            return
        if self.out:
            self.out += data
            if credited:
                self.counted += len(data)
            return
        try:
            sent = self.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.on_socket_error(exc)
            return
        self.out_sent += sent
        if credited and sent and self.stream is not None:
            self.stream.consumed(sent)
        if sent < len(data):
            self.out += data[sent:]
            if credited:
                self.counted += len(data) - sent
            self.update()

    def on_write(self) -> None:
        if not self.out:
            self.update()
            return
        try:
            sent = self.sock.send(self.out)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.on_socket_error(exc)
            return
        self.out_sent += sent
        credit = min(sent, self.counted)
        self.counted -= credit
        if sent == len(self.out):
            self.out.clear()
        else:
            del self.out[:sent]
        if credit and self.stream is not None:
            self.stream.consumed(credit)
        if not self.out:
            self._drained()
        self.update()

    def _drained(self) -> None:
        if self.close_pending:
            self.finish()
        elif self.shutdown_pending:
            self.shutdown_pending = False
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        if self.write_eof or self.closed:
            return
        if self.tls:   # TLS has no half-close (shutdown would drop to raw bytes): close
            self.finish()
            return
        self.write_eof = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._maybe_done()

    def shutdown_after_flush(self) -> None:
        if self.out:
            self.shutdown_pending = True
        else:
            self._shutdown_write()

    def close_after_flush(self) -> None:
        self.close_pending = True
        if not self.out:
            self.finish()
        else:
            self.update()

    def _maybe_done(self) -> None:
        stream = self.stream
        if self.read_eof and self.write_eof and (stream is None or stream.done):
            self.finish()

    def connection_lost(self) -> None:
        if self.stream is not None:
            self.stream.discard()       # what ``out`` held for it is gone

    def finish(self) -> None:
        """Close the socket; reset the stream if it is still open."""
        if self.stream is not None and not self.stream.done:
            if self.stream.state == StreamState.REMOTE_CLOSED and not self.stream.pending:
                self.stream.close_write()
            else:
                self.stream.reset("connection closed")
        self.close_socket()

    # -- stream events ------------------------------------------------------------
    def on_stream_data(self, stream: Stream, data: bytes) -> None:
        self.send_bytes(data, True)

    def on_stream_fin(self, stream: Stream) -> None:
        self.shutdown_after_flush()

    def on_stream_reset(self, stream: Stream, reason: str) -> None:
        self.close_socket()

    def on_stream_writable(self, stream: Stream) -> None:
        self.update()

    def abort(self, reason: str) -> None:
        if self.stream is not None:
            self.stream.reset(reason)
        self.close_socket()


# =============================================================================
# Relay
# =============================================================================


def _check_common(cfg: Any) -> None:
    """The checks serve and expose share (a UsageError that names the flag): every
    ``int`` field an integer, every duration (a ``float`` field) a number of seconds
    from 0 to MAX_SECONDS, and the heartbeat's pair."""
    for name in cfg.fields():
        kind = type(cfg).__annotations__[name]
        if kind in ("int", "Optional[int]"):
            value = getattr(cfg, name)
            if not (isinstance(value, int) and not isinstance(value, bool)
                    or value is None and kind != "int"):
                raise UsageError("%s must be an integer, not %r" % (cfg.flag(name), value))
        if kind == "float":
            value = getattr(cfg, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 <= value <= MAX_SECONDS):      # also refuses nan and inf
                raise UsageError("%s must be a number of seconds from 0 to %d, not %r"
                                 % (cfg.flag(name), MAX_SECONDS, value))
    if not cfg.heartbeat_interval >= MIN_HEARTBEAT_INTERVAL:
        raise UsageError("--heartbeat-interval must be at least %g seconds"
                         % MIN_HEARTBEAT_INTERVAL)
    if not cfg.heartbeat_timeout > cfg.heartbeat_interval:
        raise UsageError("--heartbeat-timeout must be longer than --heartbeat-interval")


def _check_ca_file(flag: str, cafile: Optional[str]) -> None:
    """A CA file that ssl reads, or a UsageError that says why not."""
    if not cafile:
        return
    ssl = load_ssl()
    try:
        ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise UsageError("%s %s: not a PEM file of CA certificates (%s)"
                         % (flag, cafile, exc.reason or exc)) from None
    except (OSError, ValueError) as exc:
        raise UsageError("%s %s: %s" % (flag, cafile, describe_oserror(exc)
                                        if isinstance(exc, OSError) else exc)) from None


class RelayConfig(Settings):
    FLAG_NAMES = {"trusted_proxies": "--trusted-proxy", "redirect_port": "--http-redirect-port",
                  "tokens_file": "--tokens", "tls_proxy_fingerprints": "--tls-proxy-fingerprint"}
    NO_FLAG = frozenset({"reservation", "accept_pause"})

    bind: str = DEFAULT_BIND
    http_port: int = DEFAULT_HTTP_PORT
    control_port: Optional[int] = DEFAULT_CONTROL_PORT   # None: off (WebSocket only)
    domain: str = DEFAULT_DOMAIN
    token: str = ""
    public_port: Optional[int] = None       # port printed in URLs (default: http_port)
    public_scheme: Optional[str] = None     # http or https in URLs (default: by tls_cert)
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    reservation: float = NAME_RESERVATION
    grace: float = GRACE_PERIOD
    head_timeout: float = HEAD_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_visitors: int = MAX_VISITORS
    max_visitors_per_tunnel: int = MAX_VISITORS_PER_TUNNEL
    max_streams: int = MAX_STREAMS
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    session_budget: int = SESSION_BUDGET    # receive windows of one client's streams together
    max_unauthenticated_per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE
    trusted_proxies: Tuple[str, ...] = ()   # CIDRs of proxies whose X-Forwarded-For names
    #                                         a WebSocket client's source (caps, bans, logs)
    max_visitors_per_source: int = MAX_VISITORS_PER_SOURCE
    max_visitors_per_source_per_tunnel: int = MAX_VISITORS_PER_SOURCE_PER_TUNNEL
    body_timeout: float = BODY_TIMEOUT       # a request body stalled this long: 408
    send_timeout: float = SEND_TIMEOUT       # a visitor that takes nothing this long: closed
    accept_pause: float = ACCEPT_PAUSE       # out of descriptors: stop accepting this long
    max_head_size: int = MAX_HEAD_SIZE       # request heads larger than this: 431
    tls_cert: Optional[str] = None          # visitors over HTTPS (and control, by default)
    tls_key: Optional[str] = None
    control_tls_cert: Optional[str] = None  # a separate certificate for the control port
    control_tls_key: Optional[str] = None
    redirect_port: Optional[int] = None     # plain HTTP port that redirects to HTTPS
    tokens_file: Optional[str] = None       # per-user tokens (JSON); replaces token
    auth_ban_after: int = PENALTY_BAN_AFTER  # failed attempts per address before a ban
    auth_ban_time: float = PENALTY_BAN_TIME
    plaintext: bool = False                 # control port without TLS (warned about)
    state_dir: Optional[str] = None         # keeps the generated key (default_state_dir())
    tls_proxy_fingerprints: Tuple[str, ...] = ()   # certificates of TLS proxies in front
    verify_threads: int = VERIFY_THREADS    # threads that check visitors' passwords
    max_verifications: int = MAX_VERIFICATIONS   # password checks queued, relay-wide (503)
    max_verifications_per_source: int = MAX_VERIFICATIONS_PER_SOURCE   # ... per address (429)
    admin: Optional[str] = None             # [HOST:]PORT of /status and /metrics (None: off)
    admin_token: str = ""                   # Bearer token they need (required off loopback)
    access_log: Optional[str] = None        # FILE or "-" (stdout): a line per request
    log_format: str = LOG_FORMAT_COMBINED   # ... in Combined Log Format, or "json"

    def validate(self) -> "RelayConfig":
        """Check every setting together (yamux's VerifyConfig), the same for the command
        line and ``tunnel.serve``; fills in ``bind`` (loopback for the default domain)
        and the domain's canonical form; raises UsageError naming the flag."""
        if self.tokens_file and self.token:
            raise UsageError("--tokens and --token exclude each other")
        self.trusted_proxies = tuple(self.trusted_proxies or ())
        self.tls_proxy_fingerprints = tuple(self.tls_proxy_fingerprints or ())
        if self.token and len(self.token) < MIN_TOKEN_LENGTH and not self.tokens_file:
            # A man in the middle sees one MAC under the token: a short one can be
            # guessed offline.  Generated tokens have 256 bits.
            raise UsageError("the token must have at least %d characters (python3 "
                             "tunnel.py token makes a strong one)" % MIN_TOKEN_LENGTH)
        for flag, port in (("--http-port", self.http_port),
                           ("--control-port", self.control_port),
                           ("--public-port", self.public_port),
                           ("--http-redirect-port", self.redirect_port)):
            if port is not None and not 0 <= port < 65536:
                raise UsageError("invalid port %d (%s)" % (port, flag))
        domain = self.domain.strip().lower().rstrip(".")
        if not domain or not all(valid_name(p) for p in domain.split(".")):
            raise UsageError("invalid --domain %r" % self.domain)
        self.domain = domain
        if not (self.bind or "").strip():     # --bind "": unset, not every address
            self.bind = LOOPBACK_BIND if domain == DEFAULT_DOMAIN else DEFAULT_BIND
        _check_common(self)
        if not 1024 <= self.max_head_size <= 16 * 1024 * 1024:
            raise UsageError("--max-head-size must be between 1024 and 16777216")
        if not INITIAL_WINDOW <= self.session_budget <= MAX_CREDIT:
            raise UsageError("--session-budget must be between %d and %d"
                             % (INITIAL_WINDOW, MAX_CREDIT))
        for name in ("max_visitors", "max_visitors_per_tunnel", "max_streams",
                     "max_unauthenticated", "max_unauthenticated_per_source",
                     "max_visitors_per_source", "max_visitors_per_source_per_tunnel",
                     "verify_threads", "max_verifications", "max_verifications_per_source"):
            if getattr(self, name) < 1:
                raise UsageError("%s must be at least 1" % self.flag(name))
        if self.auth_ban_after < 0:
            raise UsageError("--auth-ban-after must not be negative (0 disables bans)")
        for name in ("handshake_timeout", "head_timeout", "idle_timeout", "body_timeout",
                     "send_timeout", "auth_ban_time"):
            if not getattr(self, name) > 0:      # also refuses nan
                raise UsageError("%s must be positive" % self.flag(name))
        if self.redirect_port is not None and not self.tls_cert:
            raise UsageError("--http-redirect-port needs --tls-cert")
        if (self.tls_key and not self.tls_cert
                or self.control_tls_key and not self.control_tls_cert):
            raise UsageError("a TLS key needs its certificate (--tls-cert/--control-tls-cert)")
        if self.plaintext and self.control_tls_cert:
            raise UsageError("--plaintext and --control-tls-cert exclude each other")
        if self.public_scheme not in (None, "http", "https"):
            raise UsageError("--public-scheme must be http or https")
        if self.public_scheme == "http" and self.tls_cert:
            raise UsageError("--public-scheme http with --tls-cert: visitors would be "
                             "sent to plain HTTP (and cookies lose Secure)")
        for fp in self.tls_proxy_fingerprints:
            try:
                normalize_fingerprint(fp)
            except ValueError as exc:
                raise UsageError("--tls-proxy-fingerprint: %s" % exc) from None
        try:
            trusted = _parse_networks(list(self.trusted_proxies), "--trusted-proxy")
        except RefusedError as exc:
            raise UsageError(str(exc)) from None
        for net in trusted:
            if net.prefixlen == 0:      # then any client names its own source
                raise UsageError("--trusted-proxy %s trusts every address: name the load "
                                 "balancer's address or network" % net)
        self._validate_admin()
        return self

    def _validate_admin(self) -> None:
        """--admin, --admin-token, --access-log and --log-format."""
        self.admin_token = self.admin_token or ""
        if self.admin is not None:
            host, _ = parse_admin_address(self.admin)
            if not is_loopback(host) and not self.admin_token:
                raise UsageError("--admin %s is not a loopback address: it needs "
                                 "--admin-token TOKEN (or $%s)" % (self.admin, ADMIN_TOKEN_ENV))
        elif self.admin_token:
            raise UsageError("--admin-token needs --admin")
        if self.admin_token and (len(self.admin_token) < MIN_TOKEN_LENGTH
                                 or not _ADMIN_TOKEN_RE.fullmatch(self.admin_token)):
            raise UsageError("--admin-token must have at least %d characters, printable "
                             "ASCII without spaces (python3 tunnel.py token makes one)"
                             % MIN_TOKEN_LENGTH)
        if self.log_format not in LOG_FORMATS:
            raise UsageError("--log-format must be one of %s" % ", ".join(LOG_FORMATS))
        if self.log_format != LOG_FORMAT_COMBINED and not self.access_log:
            raise UsageError("--log-format needs --access-log")
        if self.access_log is not None and not self.access_log:
            raise UsageError("--access-log needs a FILE, or - for standard output")


class User:
    """One entry of the tokens file."""

    def __init__(self, name: str, token: str, patterns: Optional[List[str]],
                 max_tunnels: Optional[int]) -> None:
        self.name = name
        self.token = token
        self.digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        self.patterns = patterns        # None: any name
        self.max_tunnels = max_tunnels

    def may_use(self, name: str) -> bool:
        import fnmatch
        return self.patterns is None or any(fnmatch.fnmatchcase(name, p)
                                            for p in self.patterns)

    def candidates(self) -> Any:
        """Free-name candidates that fit the patterns: exact names, then PREFIX-random."""
        for pattern in self.patterns or ():
            if "*" not in pattern and "?" not in pattern and valid_name(pattern):
                yield pattern
        for _ in range(100):
            for pattern in self.patterns or ():
                if pattern.count("*") == 1 and "?" not in pattern:
                    name = pattern.replace("*", random_name())
                    if valid_name(name):
                        yield name


def load_users(path: str) -> Dict[str, User]:
    """Parse ``{"users": {"alice": {"token": ..., "subdomains": [...], "max_tunnels": 3}}}``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise TunnelError("cannot read tokens file %s: %s" % (path, exc)) from None
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise TunnelError("tokens file %s: expected {\"users\": {NAME: {...}}}" % path)
    out = {}
    for name, entry in users.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str) \
                or len(entry["token"]) < 16:
            raise TunnelError("tokens file %s: user %r needs a token of 16+ characters"
                              % (path, name))
        patterns = entry.get("subdomains")
        if patterns is not None and (not isinstance(patterns, list) or
                                     not all(isinstance(p, str) for p in patterns)):
            raise TunnelError("tokens file %s: subdomains of %r must be a list of patterns"
                              % (path, name))
        cap = entry.get("max_tunnels")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
            raise TunnelError("tokens file %s: max_tunnels of %r must be a whole number"
                              % (path, name))
        out[name] = User(name, entry["token"], patterns, cap)
    return out


class Reservation(collections.namedtuple("Reservation", "owner client_key until")):
    """A name kept after its client dropped: for that client (``client_key``, the
    SHA-256 of the secret it sent sealed) or, on a relay with per-user tokens, for
    its user, until ``until`` (monotonic seconds)."""

    __slots__ = ()


def may_take(holder: Any, owner: str, client_key: bytes) -> bool:
    """May a client (``owner``, ``client_key``) take over a name ``holder`` (a Route or
    a Reservation) has?  Only the same client, or the same user of a --tokens relay
    (a shared token is not an identity: every client has it)."""
    return hmac.compare_digest(holder.client_key, client_key) or bool(
        owner and holder.owner == owner)


_HOST_VALUE_RE = re.compile(r"[A-Za-z0-9._~-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
_ORIGIN_VALUE_RE = re.compile(r"https?://(?:%s)" % _HOST_VALUE_RE.pattern)


def _host_options(request: Dict[str, Any]) -> Tuple[str, str]:
    """The handshake's ``host_header`` (the Host the origin gets) and ``target_origin``
    (what a visitor's Origin naming the tunnel becomes), checked; RefusedError else."""
    host, origin = request.get("host_header") or "", request.get("target_origin") or ""
    if not isinstance(host, str) or (host and not _HOST_VALUE_RE.fullmatch(host)) \
            or len(host) > MAX_HOST_NAME:
        raise RefusedError(REFUSED_INVALID_HOST_HEADER, "host_header %.60r is not a HOST[:PORT]"
                           % (host,))
    if not isinstance(origin, str) or (origin and not (host and _ORIGIN_VALUE_RE.fullmatch(
            origin))) or len(origin) > MAX_HOST_NAME + 16:
        raise RefusedError(REFUSED_INVALID_HOST_HEADER, "target_origin %.60r is not a "
                           "http(s)://HOST[:PORT]" % (origin,))
    return host, origin


class Route:
    """A live name on the relay: the tunnel a visitor's Host leads to."""

    __slots__ = ("name", "session", "owner", "client_key", "url", "wants_log", "visitors",
                 "policy", "token_digest", "host_header", "target_origin", "logs_upgrades",
                 "since", "codes", "last", "bytes_in", "bytes_out")

    def __init__(self, name: str, session: Session, owner: str, client_key: bytes,
                 url: str, wants_log: bool = True) -> None:
        self.wants_log = wants_log   # the client prints an access log: send LOG frames
        self.logs_upgrades = False   # ... and an upgraded connection's at its end, not its 101
        self.visitors = 0            # visitor connections bound to this tunnel
        self.policy: Optional[AccessPolicy] = None   # who may reach it
        self.token_digest = ""       # of the owner's token, to notice a change on reload
        self.host_header = ""        # Host the origin gets instead of the visitor's
        self.target_origin = ""      # ... and the origin's own, for Origin and Referer
        self.name = name
        self.session = session
        self.owner = owner
        self.client_key = client_key   # SHA-256 of the client's sealed secret
        self.url = url
        # For /status and /metrics: counted where the relay looks at each response anyway.
        self.since = time.time()     # when it came online
        self.codes = [0] * STATUS_CODES   # responses to its visitors, by status
        self.last: Optional[Exchange] = None   # the last request answered
        self.bytes_in = 0            # stream bytes of its visitors that closed: from them
        self.bytes_out = 0           # ... and to them (open ones: added when asked)


class Exchange:
    """One request on a visitor connection, waiting for or receiving its response."""

    __slots__ = ("method", "target", "started", "status", "upgrade", "details")
    details: Any        # set only with --access-log: (version, User-Agent, Referer)

    def __init__(self, method: str, target: str, upgrade: Optional[str]) -> None:
        self.method = method
        self.target = target
        self.started = time.monotonic()
        self.status = 0
        self.upgrade = upgrade      # the request's Upgrade ("websocket"), or None


def _rewrite_host(req: Request, tunnel: "Route", scheme: str = "http") -> None:
    """expose --host-header: the origin gets the tunnel's Host instead of the visitor's
    (which stays in X-Forwarded-Host); in rewrite mode (``target_origin``) an Origin
    or Referer naming the tunnel's public origin names the target's instead, so an app
    comparing them with Host sees a same-origin request.  The public origin is the
    tunnel's URL, or ``scheme``://the Host this visitor sent (a relay behind a port
    forward, a trailing dot: a page on another site cannot send that Origin).  Any
    other Origin is left for the app's own checks."""
    strip = {"host"}
    extra = [("Host", tunnel.host_header)]
    target = tunnel.target_origin
    if target:
        publics = (tunnel.url.lower(), ("%s://%s" % (scheme, req.host_header)).lower())
        for name, field in (("origin", "Origin"), ("referer", "Referer")):
            values = req.headers.get_all(name)
            if len(values) != 1:
                continue
            value = values[0].strip()
            lowered = value.lower()
            for public in publics:
                if lowered == public or (name == "referer"
                                         and lowered.startswith(public + "/")):
                    strip.add(name)
                    extra.append((field, target + value[len(public):]))
                    break
    req.strip = req.strip | strip
    req.extra = req.extra + tuple(extra)


_HTTP_REQUEST_START = re.compile(rb"[A-Z]{3,10} ")   # "GET ", "OPTIONS ", ...


def _wrong_port(data: Any, tls: bool, control_port: Optional[int] = None) -> str:
    """A visitor connection's first bytes from a tunnel client at the wrong port: what
    to tell it ('' for anything else).  The tunnel preamble, or TLS on the plain port
    (a client given this port as HOST:PORT: its control port, if any, is named)."""
    if data[:len(MAGIC)] == MAGIC:
        return ("This is the relay's visitor port: tunnel clients reach it with --relay "
                "http://HOST:PORT or https://HOST:PORT (a WebSocket), or use the control "
                "port.")
    if not tls and data[:len(TLS_HANDSHAKE_RECORD)] == TLS_HANDSHAKE_RECORD:
        return ("This port speaks plain HTTP, not TLS: tunnel clients use --relay "
                "http://HOST:PORT here%s." % (", or HOST:%d, the relay's control port"
                                              % control_port if control_port else ""))
    return ""


class VisitorConn(Pipe):
    """A public HTTP connection: parses requests, routes them, relays responses."""

    def __init__(self, relay: "Relay", sock: socket.socket, peer: Tuple[str, int],
                 redirect: bool = False) -> None:
        super().__init__(relay.loop, sock)
        self.relay = relay
        self.redirect = redirect      # the plain-HTTP port of an HTTPS relay
        self.peer_ok: Optional[bool] = None   # allow/deny verdict for this address
        self.addr = peer
        self.peer_ip = peer[0]
        self.peer = peer_text(peer)
        self.source = source_key(self.peer_ip)   # what per-source caps count by
        self.requests = HTTPParser(is_request=True, max_head=relay.config.max_head_size)
        self.responses = HTTPParser(is_request=False, emit_body=False)
        self.tunnel: Optional[Route] = None
        self.bound_host = ""          # the Host that bound this connection to its tunnel
        self.inflight: Deque[Exchange] = collections.deque()
        self.deferred: Optional[HTTPResponse] = None   # answer once in-flight ones finish
        self.upgraded = False
        self.upgrade_log: Optional[Exchange] = None   # the 101, logged when the connection
        #                               ends (stream bytes each way at the 101: in, out)
        self.upgrade_marks = (0, 0)
        self.in_body = False          # between a forwarded head and its end
        self.close_after = False      # the request being read asked to close
        self.last_request = False     # ... and it has been read whole
        self.fresh = True             # nothing received yet
        self.held: Optional[List[Tuple[str, Any]]] = None   # events after a request whose
        #                               password is being checked (reading stops meanwhile)
        self.preflight: Optional[bytearray] = None   # an unauthenticated preflight's answer
        self.head_started = self.last_active = time.monotonic()
        self.body_read = 0            # bytes read while in a request body (all requests)
        self.body_seen = 0            # ... when the sweeper last saw it advance enough
        self.body_mark = -1.0         # ... and when (-1: not timing a body)
        self.send_seen = 0            # out_sent when the sweeper last saw it move
        self.send_mark = -1.0         # ... and when (-1: nothing waiting for the visitor)
        self.access_log = relay.access_log   # serve --access-log (None: off)
        self.refused: Optional[Request] = None   # the request a relay-made answer is for
        self.update()
        relay.visitor_came(self.source)

    def __repr__(self) -> str:
        return "<Visitor %s %s>" % (self.peer, self.tunnel.name if self.tunnel else "-")

    def wants_read(self) -> bool:
        if not self.upgraded and (self.deferred is not None or self.last_request
                                  or self.requests.awaiting_upgrade or self.held is not None
                                  or len(self.inflight) >= MAX_PIPELINED):
            return False
        return super().wants_read()

    # -- visitor -> origin ---------------------------------------------------------
    def mid_message(self, data: memoryview) -> bool:
        return self.upgraded or not self.requests.idle

    def on_socket_data(self, data: memoryview) -> None:
        if self.upgraded:
            assert self.stream is not None
            self.stream.write(data)
            return
        if self.fresh:
            self.fresh = False          # the head clock started at accept
            wrong = _wrong_port(data, self.tls, self.relay.control_port)
            if wrong:
                self.fail(HTTPError(400, wrong))
                return
        elif self.requests.idle:
            self.head_started = time.monotonic()
        elif self.in_body:
            self.body_read += len(data)
        self._handle_requests(self.requests.feed(data))

    def check_deadlines(self, head_by: float, idle_by: float, body_by: float = 0.0,
                        now: float = 0.0, send_by: float = 0.0) -> None:
        """Called by the relay's sweeper with the oldest acceptable start times.

        A visitor with bytes waiting for it must take some every send timeout (one that
        stops reading would hold its connection, stream and window for ever).  A request
        body must advance by BODY_MIN_PROGRESS bytes every body timeout while the relay
        reads it (a paused read, the origin's window full, does not count), else 408, or
        a close if its response has started."""
        if self.closed:
            return
        unacked = kernel_unacked(self.sock) if self.inflight or self.upgraded else 0
        if self.out or unacked:
            taken = self.out_sent - unacked      # what the visitor has ACKed
            if self.send_mark < 0 or taken != self.send_seen:
                self.send_mark, self.send_seen = now, taken
            elif self.send_mark < send_by:
                log.info("visitor %s: took none of %d bytes for %gs; closing", self.peer,
                         len(self.out), self.relay.config.send_timeout)
                self.abort("the visitor stopped reading")
                return
        else:
            self.send_mark = -1.0
        if self.close_pending or self.upgraded or self.held is not None:
            return          # (held: its credential is being checked; reading is paused)
        if self.in_body:
            read = self.body_read
            if (self.body_mark < 0 or read - self.body_seen >= BODY_MIN_PROGRESS
                    or not self.wants_read()):
                self.body_mark, self.body_seen = now, read
            elif self.body_mark < body_by:
                self.fail(HTTPError(408, "The request body stalled: less than %d bytes "
                                    "arrived in %g s." % (BODY_MIN_PROGRESS,
                                                            self.relay.config.body_timeout)))
            return
        self.body_mark = -1.0
        if self.inflight:
            return
        if self.fresh or not self.requests.idle:
            if self.head_started < head_by:
                self.fail(HTTPError(408, "The request head did not arrive in time."))
        elif self.last_active < idle_by:
            log.debug("visitor %s: idle keep-alive connection closed", self.peer)
            self.finish()

    def _handle_requests(self, events: List[Tuple[str, Any]]) -> None:
        it = iter(events)
        for kind, value in it:
            if self.closed or self.close_pending or self.last_request:
                return
            if kind == EV_BODY:
                if self.stream is not None:
                    self.stream.write(value)
            elif kind == EV_HEAD:
                try:
                    self._forward_head(value)
                except HTTPResponse as exc:
                    self.fail(exc, value.method, value)
                    return
                if self.held is not None:   # its password is being checked: keep the rest
                    self.held = [(k, bytes(v) if k == EV_BODY else v) for k, v in it]
                    self.update()           # (bodies are views of the loop's scratch)
                    return
            elif kind == EV_END:
                self.in_body = False
                self.last_request = self.close_after
            else:
                self.fail(value)
                return

    def _forward_head(self, req: Request) -> None:
        if self.redirect:   # only to the relay's own names: never a Location the visitor chose
            host, domain = req.host.rstrip("."), self.relay.config.domain.lower()
            if not host:
                raise HTTPError(400, "This relay serves HTTPS; a request needs a Host.")
            if host != domain and not (host.endswith("." + domain)
                                       and valid_name(host[:-len(domain) - 1])):
                raise HTTPError(404, "This relay serves *.%s; %s is not one of its names."
                                % (domain, host))
            url = "https://%s%s%s" % (host, self.relay.https_port_suffix(),
                                      req.target if req.target[:1] == "/" else "/")
            raise HTTPResponse(308, "This relay serves HTTPS: %s" % url, (("Location", url),))
        if req.target.startswith(WS_PATH) and req.target.split("?", 1)[0] == WS_PATH \
                and not self.relay.is_tunnel_host(req.host):
            # A tunnel client over WebSocket: the reserved path of the bare domain, or of
            # any name that is not a tunnel's (an address, a load balancer's own name).
            if req.headers.get("upgrade") is None:
                raise HTTPError(404, "Nothing is served at %s on this relay; tunnels are "
                                "reached at NAME.%s." % (WS_PATH, self.relay.config.domain))
            if self.tunnel is not None or self.inflight:
                raise HTTPError(400, "A WebSocket upgrade must be the first request of its "
                                "connection.")
            if req.headers.get("origin") is not None or any(
                    name.startswith("sec-fetch-") for name in req.headers.index):
                # A browser (tunnel.py sends neither): a web page could otherwise make
                # its visitors fail handshakes here, and get their shared address banned.
                raise HTTPError(403, "Tunnel clients do not come from web pages.")
            self.relay._accept_websocket(self, req, ws_check_upgrade(req))
            return
        if req.upgrade is not None and self.relay.is_tunnel_host(req.host) \
                and _offers_tunnel_protocol(req):
            # A tunnel client sent to NAME.DOMAIN: never handed to that tunnel's owner,
            # who could then sit between the client and this relay.
            raise HTTPError(400, "Tunnel clients connect to the relay itself (--relay "
                            "%s), not to a tunnel's name." % self.relay.relay_url())
        tunnel = self.tunnel
        if tunnel is None or req.host != self.bound_host:   # a new connection or Host
            name = self.relay.route(req)
            if tunnel is None:
                try:
                    tunnel = self.relay.tunnel_for(name)
                except HTTPError as exc:   # 502: its client is going away (GOAWAY) or gone
                    if exc.status != 502:
                        raise
                    self._log_refusal(self.relay.tunnels.get(name), req, exc)
                    raise
        else:
            name = tunnel.name
        if name != tunnel.name:
            raise HTTPError(421, "This connection is bound to %s.%s; open a new connection "
                            "for %s." % (tunnel.name, self.relay.config.domain, req.host))
        verdict = None
        if tunnel.policy is not None:
            verdict = self._check_access(tunnel.policy, req)   # before anything reaches
            if verdict is True:                                # the client
                return          # held until its password check is done
            if verdict is not None:   # an unauthenticated CORS preflight: the last request
                if self.inflight:     # (pipelined behind others: refused)
                    raise tunnel.policy.refusal()
                req.keep_alive = False
        if self.tunnel is None:
            cfg = self.relay.config
            refused = self.relay.refused_visitors
            if tunnel.visitors >= cfg.max_visitors_per_tunnel:
                refused["max_visitors_per_tunnel"] += 1
                raise HTTPError(503, "The tunnel %s is at its limit of %d connections; try "
                                "again soon." % (name, cfg.max_visitors_per_tunnel))
            if len(tunnel.session.streams) >= cfg.max_streams:
                refused["max_streams"] += 1
                raise HTTPError(503, "The tunnel %s is at its limit of %d streams; try "
                                "again soon." % (name, cfg.max_streams))
            held = self.relay.tunnel_sources.get((tunnel, self.source), 0)
            if held >= cfg.max_visitors_per_source_per_tunnel:
                refused["max_visitors_per_source_per_tunnel"] += 1
                raise HTTPError(503, "Your address has %d connections to the tunnel %s, "
                                "its limit; try again soon." % (held, name))
            self.tunnel = tunnel
            self.bound_host = req.host
            tunnel.visitors += 1
            self.relay.tunnel_sources[(tunnel, self.source)] = held + 1
            self.stream = tunnel.session.open_stream({"peer": self.peer,
                                                      "host": req.host_header})
            self.stream.handler = self
            log.debug("visitor %s -> %s stream %d", self.peer, name, self.stream.id)
        if self.stream is None or not self.stream.can_send:
            gone = HTTPError(502, "The tunnel's client went away.")
            self._log_refusal(tunnel, req, gone)
            raise gone
        if tunnel.host_header:
            _rewrite_host(req, tunnel, self.relay.scheme)
        self.stream.write(rewrite_request_head(req, self.peer_ip, self.relay.scheme))
        self.responses.expect(req.method)
        self.inflight.append(Exchange(req.method, req.target, req.upgrade))
        if self.access_log is not None:
            self.inflight[-1].details = access_details(req)
        self.in_body = True
        self.close_after = not req.keep_alive
        if verdict is not None:
            self.preflight = bytearray()   # its answer is filtered: _on_preflight_data

    def _check_access(self, policy: AccessPolicy, req: Request) -> Any:
        """Every request, upgrades included: address, then credentials.  Returns None
        (pass), PREFLIGHT (pass, answer filtered) or True: the request waits for its
        password check, which runs in the relay's VerifyPool (``_verified`` goes on)."""
        if self.peer_ok is None:
            self.peer_ok = policy.peer_allowed(self.peer_ip)
        if not self.peer_ok:
            self.relay.refused_visitors["address"] += 1
            raise HTTPError(403, "Your address may not reach this tunnel.")
        if not policy.needs_credentials:
            return None
        penalties = self.relay.visitor_penalties
        key = (source_key(self.peer_ip), policy.name)   # failures per source and tunnel
        if penalties.banned(key):
            self.relay.refused_visitors["banned"] += 1
            raise HTTPError(429, "Too many failed attempts from your address; try again "
                            "later.")
        index = req.headers.index
        target = req.target
        try:
            verdict = policy.check(req, time.time(), defer=True)
        except HTTPError as exc:
            self.relay.refused_visitors["credentials"] += 1
            if exc.status == 401 and ("authorization" in index or TOKEN_HEADER in index
                                      or req.target != target):   # a ?tunnel_token= went
                penalties.fail(key)     # wrong credentials, not just missing ones
            raise
        if isinstance(verdict, bytes):     # a password not verified yet: off the loop
            try:
                self.relay.verify_pool.submit(
                    source_key(self.peer_ip), functools.partial(policy.verify, verdict),
                    functools.partial(self._verified, policy, req, verdict),
                    group=("tunnel", policy.name))
            except HTTPError:
                self.relay.refused_visitors["max_verifications"] += 1
                raise
            self.held = []
            return True
        if verdict is None and ("authorization" in index or TOKEN_HEADER in index):
            penalties.succeed(key)
        return verdict

    def _verified(self, policy: AccessPolicy, req: Request, credential: bytes,
                  ok: bool) -> None:
        """The password check of a held request is done (loop thread): go on."""
        if self.closed or self.close_pending or self.held is None:
            return
        rest, self.held = self.held, None
        try:
            if not ok:
                self.relay.visitor_penalties.fail((source_key(self.peer_ip), policy.name))
                self.relay.refused_visitors["credentials"] += 1
                raise policy.refusal()
            policy.remember(credential)
            req.strip, req.extra = _NO_FIELDS, ()    # check() runs again and sets them
            self._forward_head(req)
        except HTTPResponse as exc:
            self.fail(exc, req.method, req)
            return
        if self.held is not None:    # held again (its credential was forgotten meanwhile)
            self.held = rest
            return
        self._handle_requests(rest)
        self.update()

    def on_socket_eof(self) -> None:
        if self.upgraded:
            super().on_socket_eof()
            return
        if self.requests.feed_eof() and not self.last_request:  # closed mid-request
            self.abort("visitor closed mid-request")
            return
        if self.inflight and self.stream is not None:
            self.stream.close_write()   # half-close: the responses may still come
        else:
            self.finish()

    def fail(self, exc: HTTPResponse, method: str = "GET",
             req: Optional[Request] = None) -> None:
        """Answer a relay-made error (or page) once the responses before it are sent
        (``req``: the request it answers, if there is one, for the access log)."""
        if exc.status >= 400:
            log.info("visitor %s: %d %s", self.peer, exc.status, exc)
        self.refused = req
        if self.in_body:
            # The origin has half a request: reset its stream so it never completes, and
            # answer the visitor ourselves if the origin has not started a response.
            if len(self.inflight) == 1 and self.inflight[0].status == 0 \
                    and self.responses.message_bytes == 0:
                self.inflight.clear()
                self.send_error(exc)
            else:
                self.abort("bad request body: %s" % exc)
        elif self.inflight:
            self.deferred = exc
            self.update()
        else:
            self.send_error(exc, method)

    def send_error(self, exc: HTTPResponse, method: str = "GET") -> None:
        """Answer with a relay-made page and end the connection (lingering close)."""
        if self.stream is not None and not self.stream.done:
            self.stream.reset("relay answered %d" % exc.status)
        answer = http_response(exc.status, str(exc), method, exc.headers)
        self.relay.answered_itself(self, exc.status, len(answer), self.refused)
        page = bytes(self.out) + answer
        self.out.clear()
        self.counted = 0
        relay = self.relay
        sock = self.detach()
        Lingering(relay.loop, sock, page)

    # -- origin -> visitor ---------------------------------------------------------
    def on_stream_data(self, stream: Stream, data: bytes) -> None:
        if self.preflight is not None:
            self._on_preflight_data(data)
            return
        self.send_bytes(data, True)
        if self.upgraded:
            return
        for kind, value in self.responses.feed(data):
            if kind == EV_HEAD:
                self._on_response_head(value)
            elif kind == EV_END:
                self._on_response_end(value)
            elif kind == EV_ERROR:
                log.info("visitor %s: %s", self.peer, value)
                self.close_after_flush()
                return
            if self.closed or self.close_pending:
                return

    def _on_preflight_data(self, data: bytes) -> None:
        """The answer to an unauthenticated CORS preflight: only its status and its
        Access-Control-* and Vary fields go back, without a body; then the connection
        ends (the origin connection is not used again)."""
        buf = self.preflight
        if buf is None or not self.inflight:
            return                      # answered: the rest is dropped
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.relay.config.max_head_size:
                    self._origin_gone("The local service sent an oversized head.")
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            m = _STATUS_LINE_RE.match(head.partition(b"\r\n")[0])
            status = int(m.group(3)) if m is not None else 0
            if 100 <= status < 200 and status != 101:
                continue                # interim: the final answer follows
            break
        if not 200 <= status < 600:
            self._origin_gone("The local service sent a malformed answer to a preflight.")
            return
        lines = [b"HTTP/1.1 %d %s" % (status, HTTP_REASONS.get(status, "").encode())]
        for line in head.split(b"\n")[1:]:
            line = line.rstrip(b"\r")
            name = line.partition(b":")[0].lower()
            if ((name.startswith(b"access-control-") or name == b"vary")
                    and _TRAILER_RE.match(line) is not None):
                lines.append(line)
        if status not in (204, 304):
            lines.append(b"Content-Length: 0")
        lines.append(b"Connection: close")
        answer = b"\r\n".join(lines) + b"\r\n\r\n"
        ex = self.inflight.popleft()
        ex.status = status
        self.send_bytes(answer, False)
        if self.tunnel is not None:
            self.tunnel.codes[status] += 1
            self.tunnel.last = ex
        if self.access_log is not None:
            self.access_log.request(self, ex, len(answer))
        stream = self.stream
        if stream is not None and self.tunnel is not None and self.tunnel.wants_log:
            self.tunnel.session.send_log(stream.id, status, time.monotonic() - ex.started,
                                         len(answer), ex.method, ex.target)
        if stream is not None and not stream.done:
            stream.reset("preflight answered")
        self.close_after_flush()

    def _on_response_head(self, resp: Response) -> None:
        if not self.inflight or 100 <= resp.status < 200 and resp.status != 101:
            return
        ex = self.inflight[0]
        ex.status = resp.status
        if ex.upgrade:
            if resp.status == 101:
                self.upgraded = True
                stream = self.stream
                if stream is not None:   # from here on both ways count for its log line
                    self.upgrade_marks = (stream.bytes_out + len(stream.pending),
                                          stream.bytes_in - self.responses.upgrade_tail)
                rest = self.requests.upgrade_done()
                if rest and self.stream is not None:
                    self.stream.write(rest)
            else:
                self._handle_requests(self.requests.upgrade_refused())
            self.update()

    def _on_response_end(self, nbytes: int) -> None:
        if not self.inflight:
            return
        ex = self.inflight.popleft()
        if len(self.inflight) + 1 == MAX_PIPELINED:
            self.update()               # below the cap again: read the visitor on
        now = time.monotonic()
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.codes[ex.status] += 1
            tunnel.last = ex
            if self.stream is not None and tunnel.wants_log:
                if self.upgraded and tunnel.logs_upgrades:
                    self.upgrade_log = ex       # its line comes when the connection ends
                else:
                    tunnel.session.send_log(self.stream.id, ex.status, now - ex.started,
                                            nbytes, ex.method, ex.target)
        if self.access_log is not None:
            self.access_log.request(self, ex, nbytes, now)
        if self.upgraded:
            return
        if not self.inflight:
            self.last_active = now
            if self.deferred is not None:
                self.send_error(self.deferred)
            elif self.last_request or self.read_eof:
                self.close_after_flush()

    def on_stream_fin(self, stream: Stream) -> None:
        if self.upgraded:
            self.shutdown_after_flush()
            return
        for kind, value in self.responses.feed_eof():
            if kind == EV_END:
                self._on_response_end(value)
        self._origin_gone("The local service closed the connection without a response.")

    def on_stream_reset(self, stream: Stream, reason: str) -> None:
        if stream.session.closed:
            why = "The tunnel's client went away."
        else:
            why = "The tunnel's client reset the stream: %s." % reason
        self._origin_gone(why)

    def _origin_gone(self, why: str) -> None:
        """No more response bytes will come: 502 if nothing was answered yet, then close."""
        if self.closed:
            return
        if (self.inflight and not self.upgraded and self.inflight[0].status == 0
                and self.responses.message_bytes == 0):
            ex = self.inflight[0]
            self.inflight.clear()
            page = http_response(502, why, ex.method)
            self.send_bytes(page, False)
            self._log_answer(self.tunnel, 502, ex.started, len(page), ex.method, ex.target)
            ex.status = 502
            self.relay.relay_errors[502] += 1
            if self.access_log is not None:
                self.access_log.request(self, ex, len(page))
        self.close_after_flush()

    def _log_answer(self, tunnel: Optional[Route], status: int, started: float, nbytes: int,
                    method: str, target: str) -> None:
        """A relay-made answer's access-log line (as the origin's answers get theirs), if
        the tunnel's client is there to print it; the tunnel counts it in any case."""
        if tunnel is not None:
            tunnel.codes[status] += 1
        if tunnel is not None and tunnel.wants_log and not tunnel.session.closed:
            tunnel.session.send_log(self.stream.id if self.stream is not None else 0, status,
                                    time.monotonic() - started, nbytes, method, target)

    def _log_refusal(self, tunnel: Optional[Route], req: Request, exc: HTTPError) -> None:
        """Log the error page the relay is about to answer ``req`` with (made here once
        more, for its size: an error path)."""
        self._log_answer(tunnel, exc.status, self.head_started,
                         len(http_response(exc.status, str(exc), req.method, exc.headers)),
                         req.method, req.target)

    def _log_upgrade_end(self) -> None:
        """The access-log line of an upgraded connection, at its end: its duration from
        the request, and the bytes each way after the 101 (Stream counts them anyway)."""
        ex, self.upgrade_log = self.upgrade_log, None
        stream, tunnel = self.stream, self.tunnel
        if ex is None or stream is None or tunnel is None:
            return
        marked_in, marked_out = self.upgrade_marks
        tunnel.session.send_log(stream.id, ex.status, time.monotonic() - ex.started,
                                max(0, stream.bytes_in - marked_out), ex.method, ex.target,
                                bytes_in=max(0, stream.bytes_out - marked_in),
                                websocket="websocket" in (ex.upgrade or "").lower())

    def connection_lost(self) -> None:
        """The visitor's counts go (and an upgraded connection's log line goes out)."""
        if self.upgrade_log is not None:
            self._log_upgrade_end()
        relay = self.relay
        relay.visitor_left(self.source)
        if self.tunnel is not None:
            self.tunnel.visitors -= 1
            if self.stream is not None:     # its bytes each way, for /status and /metrics
                self.tunnel.bytes_in += self.stream.bytes_out
                self.tunnel.bytes_out += self.stream.bytes_in
            key = (self.tunnel, self.source)
            held = relay.tunnel_sources.pop(key) - 1
            if held:
                relay.tunnel_sources[key] = held
        relay.visitors.discard(self)
        super().connection_lost()


class Relay(Side):
    """The public side: visitors on ``http_port``, tunnel clients on ``control_port``
    (and as WebSockets on the visitor port: ``_accept_websocket``)."""

    def __init__(self, config: RelayConfig, loop: Optional[EventLoop] = None) -> None:
        self.config = config
        # Before anything that holds resources: an unreadable file raises TunnelError.
        self.users: Optional[Dict[str, "User"]] = (load_users(config.tokens_file)
                                                   if config.tokens_file else None)
        self.loop = loop or EventLoop()
        self.tunnels: Dict[str, Route] = {}
        self.reserved: Dict[str, Reservation] = {}
        self.sessions: set = set()
        self.unauthenticated: set = set()       # sessions still in the handshake
        self._visitor_cap_log = Throttle()
        self._handshake_cap_log = Throttle()
        self._source_cap_log = Throttle()       # per-source refusals, visitors and clients
        self.visitor_sources: Dict[str, int] = {}   # source_key -> visitor connections
        self.tunnel_sources: Dict[Tuple[Route, str], int] = {}   # ... bound to a tunnel
        self.visitors: set = set()
        self.listeners: List[Listener] = []
        self.http_port = 0
        self.control_port = 0
        self.redirect_port = 0
        self.scheme = "http"
        self.visitor_tls: Any = None            # ssl.SSLContext when serving HTTPS
        self.control_tls: Any = None
        self.fingerprint = ""                   # of the control certificate
        self.bindings: FrozenSet[str] = frozenset()   # certificates a client may see
        self.trusted: List[Any] = []            # --trusted-proxy networks
        self._xff_log = Throttle()              # unparsable X-Forwarded-For hops
        self.proxy_bindings: FrozenSet[str] = frozenset()   # ... of TLS proxies in front
        self.visitor_binding = ""               # the HTTPS port's certificate (a binding)
        self.identity_created = False           # the control certificate is new
        self.visitor_tls_pending: Dict[Any, str] = {}   # TLS handshakes -> source_key:
        self.control_tls_pending: Dict[Any, str] = {}   # they count against separate caps
        self.secret = secrets.token_bytes(32)   # signs visitor cookies (per relay run)
        self.penalties = Penalties(config.auth_ban_after, config.auth_ban_time)
        self.visitor_penalties = Penalties(config.auth_ban_after, config.auth_ban_time)
        self.verify_pool = VerifyPool(self.loop, config.verify_threads, config.max_verifications,
                                      config.max_verifications_per_source)
        self.stopping = False
        self.session_config = SessionConfig(heartbeat_interval=config.heartbeat_interval,
                                            heartbeat_timeout=config.heartbeat_timeout,
                                            handshake_timeout=config.handshake_timeout,
                                            window_budget=config.session_budget)
        # serve --admin and --access-log (RelayAdmin, AccessLog), and what they show:
        # counted only where something is refused or answered by the relay itself.
        self.access_log: Optional[AccessLog] = None
        self.admin: Optional[RelayAdmin] = None
        self.admin_port = 0
        self.started = time.time()
        self.handshake_failures: Dict[str, int] = collections.Counter()   # by reason
        self.refused_visitors: Dict[str, int] = collections.Counter()     # by reason
        self.relay_errors: Dict[int, int] = collections.Counter()   # 4xx/5xx made here

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Open the access log, load certificates and bind the ports (raises UsageError,
        OSError, TunnelError); the loop is run by ``run``."""
        cfg = self.config.validate()
        if cfg.access_log:
            self.access_log = AccessLog(self.loop, cfg.access_log, cfg.log_format)
        try:
            self._start()
        except BaseException:
            if self.access_log is not None:
                self.access_log.close()
                self.access_log = None
            raise
        self.started = time.time()

    def _start(self) -> None:
        cfg = self.config
        control_cert = None if cfg.plaintext else cfg.control_tls_cert or cfg.tls_cert
        try:
            if cfg.tls_cert:
                self.visitor_tls = server_tls_context(cfg.tls_cert, cfg.tls_key)
                self.visitor_binding = binding_of(certificate_der(cfg.tls_cert))
                self.scheme = "https"
            if cfg.public_scheme in ("http", "https"):   # a TLS proxy in front, say
                self.scheme = cfg.public_scheme
            if control_cert:
                self.control_tls = (server_tls_context(control_cert, cfg.control_tls_key)
                                    if cfg.control_tls_cert else self.visitor_tls)
                self.fingerprint = cert_fingerprint(certificate_der(control_cert))
        except (OSError, ValueError) as exc:
            files = [(flag, path) for flag, path in (
                ("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key),
                ("--control-tls-cert", cfg.control_tls_cert),
                ("--control-tls-key", cfg.control_tls_key)) if path]
            missing = [(flag, path) for flag, path in files if not os.path.isfile(path)]
            if missing:
                raise TunnelError("cannot load the TLS certificate or key: %s %s: no such "
                                  "file" % missing[0]) from None
            raise TunnelError("cannot load the TLS certificate or key (%s): %s" % (
                ", ".join("%s %s" % f for f in files),
                getattr(exc, "reason", None) or exc)) from None
        if not control_cert and not cfg.plaintext:
            self._load_identity()
        if self.control_tls is not None:
            log.info("control channel over TLS; certificate SHA-256 fingerprint %s",
                     self.fingerprint)
            self.bindings = frozenset({self.fingerprint.replace(":", "").lower()})
        else:
            log.warning("control channel in plain TCP (--plaintext, no TLS on the control "
                        "port nor inside WebSockets on a plain HTTP port): anyone on the path "
                        "can read and change tunnel traffic; use it on loopback or a trusted "
                        "network only")
        proxies = frozenset(normalize_fingerprint(fp).replace(":", "").lower()
                            for fp in cfg.tls_proxy_fingerprints)     # (validated)
        self.bindings |= proxies
        self.trusted = _parse_networks(list(cfg.trusted_proxies), "--trusted-proxy")
        self.proxy_bindings = proxies
        http = self._listen(cfg.http_port, "--http-port")
        control = None
        if cfg.control_port is not None:
            try:
                control = self._listen(cfg.control_port, "--control-port")
            except OSError:
                http.close()
                raise
            self.control_port = control.getsockname()[1]
        self.http_port = http.getsockname()[1]
        cfg = self.config
        self.listeners = [Listener(self.loop, http, self._accept_visitor, cfg.accept_pause)]
        if control is not None:
            self.listeners.append(Listener(self.loop, control, self._accept_control,
                                           cfg.accept_pause))
        if cfg.redirect_port is not None:
            redirect = self._listen(cfg.redirect_port, "--http-redirect-port")
            self.redirect_port = redirect.getsockname()[1]
            self.listeners.append(Listener(self.loop, redirect, self._accept_redirect,
                                           cfg.accept_pause))
        if cfg.admin is not None:
            self.admin = RelayAdmin(self, *parse_admin_address(cfg.admin))
            self.admin_port = self.admin.port
        self.loop.call_later(self._sweep_interval(), self._sweep)
        log.info("relay listening: visitors on %s, tunnel clients on %s, domain %s",
                 format_hostport(self.config.bind, self.http_port),
                 format_hostport(self.config.bind, self.control_port) if self.control_port
                 else "that port only (WebSocket: --relay %s)" % self.relay_url(),
                 self.config.domain)
        if self.admin is not None:
            self.admin.announce()

    def _listen(self, port: int, flag: str) -> socket.socket:
        """make_listener, with an error that names the address, port and flag."""
        try:
            return make_listener(self.config.bind, port)
        except OSError as exc:
            raise ListenError("cannot listen on %s (%s): %s" % (
                format_hostport(self.config.bind, port), flag, describe_oserror(exc))) \
                from None

    def _load_identity(self) -> None:
        """TLS without --tls-cert: the relay's own key and self-signed certificate, made
        on first start and kept in the state directory (so the fingerprint stays)."""
        state_dir = self.config.state_dir or default_state_dir()
        scratch = None
        try:
            cert, key, self.identity_created = relay_identity(state_dir)
        except OSError as exc:
            if self.config.state_dir:        # asked for by name: that one or nothing
                raise TunnelError("cannot use --state-dir %s: %s" % (
                    state_dir, describe_oserror(exc))) from None
            import tempfile
            scratch = tempfile.mkdtemp(prefix="tunnel-identity-")
            cert, key, self.identity_created = relay_identity(scratch)
            log.warning("cannot keep the relay's key in %s (%s): using a certificate for "
                        "this run only, its fingerprint changes at every start (pass "
                        "--state-dir DIR)", state_dir, describe_oserror(exc))
        try:
            self.control_tls = server_tls_context(cert, key)
            self.fingerprint = cert_fingerprint(certificate_der(cert))
        except (OSError, ValueError) as exc:
            raise TunnelError("cannot load the relay's key from %s: %s (move the directory "
                              "away to make a new one)" % (state_dir, exc)) from None
        finally:
            if scratch is not None:
                import shutil
                shutil.rmtree(scratch, ignore_errors=True)
        if self.identity_created and scratch is None:
            log.info("made the relay's key and certificate in %s", state_dir)

    def _stopped(self) -> None:
        self.verify_pool.stop()
        if self.access_log is not None:
            self.access_log.close()

    def _drain(self, grace: float) -> None:
        """Go-away to every client, close idle visitors, let the others finish."""
        log.info("relay shutting down: %d tunnels, %d visitor connections; waiting up to "
                 "%.0fs (Ctrl-C again to quit)", len(self.tunnels), len(self.visitors), grace)
        for listener in self.listeners:
            listener.close_socket()
        if self.admin is not None:
            self.admin.close()
        for visitor in list(self.visitors):
            if not visitor.inflight:        # idle keep-alive: nothing to finish
                visitor.finish()
        for session in list(self.sessions):
            session.go_away("relay shutting down")

        def finish() -> None:
            for session in list(self.sessions):
                session.close_after_flush("relay shut down")
        self.loop.stop_when(lambda: not self.visitors, grace, finish)

    def _sweep_interval(self) -> float:
        cfg = self.config
        return max(0.01, min(SWEEP_INTERVAL, cfg.head_timeout / 4, cfg.idle_timeout / 4,
                             cfg.body_timeout / 4, cfg.send_timeout / 4))

    def _sweep(self) -> None:
        """Close visitors whose request head or body is late (408) or that idled too long."""
        now = time.monotonic()
        head_by = now - self.config.head_timeout
        idle_by = now - self.config.idle_timeout
        body_by = now - self.config.body_timeout
        send_by = now - self.config.send_timeout
        for visitor in list(self.visitors):
            visitor.check_deadlines(head_by, idle_by, body_by, now, send_by)
        self.loop.call_later(self._sweep_interval(), self._sweep)

    # -- accepting ------------------------------------------------------------------
    def visitor_came(self, source: str) -> None:
        """Count a visitor connection (or its TLS handshake) from ``source``."""
        self.visitor_sources[source] = self.visitor_sources.get(source, 0) + 1

    def visitor_left(self, source: str) -> None:
        held = self.visitor_sources.pop(source) - 1
        if held:
            self.visitor_sources[source] = held

    def _accept_visitor(self, sock: socket.socket, addr: Any, redirect: bool = False) -> None:
        cfg = self.config
        if len(self.visitors) + len(self.visitor_tls_pending) >= cfg.max_visitors:
            self.refused_visitors["max_visitors"] += 1
            self.relay_errors[503] += 1
            Lingering(self.loop, sock, http_response(
                503, "The relay is at its limit of %d visitor connections; try again soon."
                % cfg.max_visitors))
            self._visitor_cap_log.warn("visitor %s refused: %d connections (--max-visitors)",
                                       peer_text(addr), len(self.visitors))
            return
        source = source_key(addr[0])
        held = self.visitor_sources.get(source, 0)
        if held >= cfg.max_visitors_per_source:
            self.refused_visitors["max_visitors_per_source"] += 1
            self.relay_errors[503] += 1
            Lingering(self.loop, sock, http_response(
                503, "Your address has %d connections to this relay, its limit; try again "
                "soon." % held))
            self._source_cap_log.warn("visitor %s refused: %d connections from %s "
                                      "(--max-visitors-per-source)", peer_text(addr), held,
                                      source)
            return
        if self.visitor_tls is not None and not redirect:
            self.visitor_came(source)       # the handshake counts; VisitorConn then does
            self._tls_accept(sock, addr, self.visitor_tls, cfg.head_timeout,
                             self.visitor_tls_pending, source,
                             lambda tls: self.visitors.add(VisitorConn(self, tls, addr)),
                             lambda: self.visitor_left(source))
        else:
            self.visitors.add(VisitorConn(self, sock, addr, redirect=redirect))

    def _accept_redirect(self, sock: socket.socket, addr: Any) -> None:
        self._accept_visitor(sock, addr, redirect=True)

    def _tls_accept(self, sock: Any, addr: Any, ctx: Any, timeout: float,
                    pending: Dict[Any, str], source: str, then: Callable[[Any], None],
                    lost: Optional[Callable[[], None]] = None, channel: bool = False) -> None:
        """Wrap an accepted socket and run its TLS handshake inside the loop, listed in
        ``pending`` meanwhile; ``then(tls)`` on success, ``lost()`` on failure.  The
        control port's is a TLSChannel (``channel``), a visitor's an ssl.SSLSocket."""
        try:
            tls = (TLSChannel(sock, ctx, server_side=True) if channel else
                   ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False))
        except OSError as exc:
            log.debug("TLS wrap failed for %s: %s", peer_text(addr), exc)
            sock.close()
            if lost is not None:
                lost()
            return
        def done(ready: Any) -> None:
            pending.pop(handshake, None)
            if lost is not None:
                lost()
            then(ready)

        def failed(why: str) -> None:
            pending.pop(handshake, None)
            if lost is not None:
                lost()
            if channel:             # a control connection's TLS
                self.handshake_failures["tls"] += 1
            log.debug("%s: %s", peer_text(addr), why)
        handshake = TLSHandshake(self.loop, tls, timeout, done, failed)
        pending[handshake] = source
        handshake.start()

    def _unauthenticated_from(self, source: str) -> int:
        """Control connections from ``source`` still in a handshake (TLS or ours); a
        scan, but of at most max_unauthenticated entries, once per control accept."""
        return (sum(1 for s in self.unauthenticated if source_key(s.peer_ip) == source)
                + sum(1 for k in self.control_tls_pending.values() if k == source))

    def _handshake_cap(self, addr: Any) -> str:
        """Why a new control connection from ``addr`` is refused ('' if it is not): the
        caps on connections still in a handshake, in total and per source (logged)."""
        cfg = self.config
        pending = len(self.unauthenticated) + len(self.control_tls_pending)
        if pending >= cfg.max_unauthenticated:
            self.handshake_failures["max_unauthenticated"] += 1
            self._handshake_cap_log.warn("control connection from %s refused: %d still in "
                                         "the handshake (--max-unauthenticated)",
                                         peer_text(addr), pending)
            return "The relay has %d tunnel clients in the handshake, its limit." % pending
        source = source_key(addr[0])
        held = self._unauthenticated_from(source)
        if held >= cfg.max_unauthenticated_per_source:
            self.handshake_failures["max_unauthenticated_per_source"] += 1
            self._source_cap_log.warn("control connection from %s refused: %d from %s still "
                                      "in the handshake (--max-unauthenticated-per-source)",
                                      peer_text(addr), held, source)
            return "Your address has %d tunnel clients in the handshake, its limit." % held
        return ""

    def _accept_control(self, sock: socket.socket, addr: Any) -> None:
        # (Bans are per address and user: checked when the AUTH names its user.)
        cfg = self.config
        if self._handshake_cap(addr):
            sock.close()
            return
        source = source_key(addr[0])
        if self.control_tls is not None:
            self._tls_accept(sock, addr, self.control_tls, cfg.handshake_timeout,
                             self.control_tls_pending, source,
                             lambda tls: self._start_session(tls, addr), channel=True)
        else:
            self._start_session(sock, addr)

    def _accept_websocket(self, visitor: VisitorConn, req: Request, protocol: str) -> None:
        """A visitor's upgrade on the reserved path (``ws_check_upgrade`` passed): the
        same caps as the control port (503 over them), then the connection leaves the
        visitors, gets its 101, and runs the control handshake inside WebSocket frames:
        TLS with the control certificate first (WS_PROTOCOL_TLS), or straight away
        (WS_PROTOCOL: TLS is outside, the HTTPS port's or a TLS proxy's, which is what
        the client's binding must name)."""
        addr = self._client_address(visitor.addr, req)
        if protocol == WS_PROTOCOL_TLS and self.control_tls is None:
            raise HTTPError(400, "This relay runs --plaintext (no TLS inside the "
                            "WebSocket): pass --plaintext to expose as well (subprotocol %s)."
                            % WS_PROTOCOL)
        if not visitor.requests.awaiting_upgrade:   # over a head's worth sent before the 101
            raise HTTPError(400, "Data sent before the upgrade was answered.")
        refused = self._handshake_cap(addr)
        if refused:
            raise HTTPError(503, refused + " Try again soon.")
        rest = visitor.requests.upgrade_done()
        sock = visitor.detach()             # visitor counts released (connection_lost)
        key = req.headers.get("sec-websocket-key") or ""
        channel = WSChannel(sock, server_side=True, initial=rest)
        channel.limit_frames(WS_PREAUTH_FRAMES)     # lifted in on_session_up
        channel.write_raw(ws_upgrade_response(key, protocol))
        try:
            channel.push()
        except OSError as exc:
            log.debug("WebSocket from %s lost: %s", visitor.peer, describe_oserror(exc))
            channel.close()
            return
        log.info("control connection from %s over WebSocket", visitor.peer)
        log.debug("WebSocket from %s: subprotocol %s, %d bytes after the head",
                  visitor.peer, protocol, len(rest))
        if protocol == WS_PROTOCOL_TLS:
            self._tls_accept(channel, addr, self.control_tls, self.config.handshake_timeout,
                             self.control_tls_pending, source_key(addr[0]),
                             lambda tls: self._start_session(tls, addr, websocket=True),
                             channel=True)
            return
        # TLS outside the WebSocket: the HTTPS port's certificate, or a TLS proxy's in
        # front of the relay (declared with --tls-proxy-fingerprint).
        bindings = self.proxy_bindings
        if self.visitor_tls is not None:
            bindings = bindings | {self.visitor_binding}
        self._start_session(channel, addr, bindings, self.config.plaintext, websocket=True)

    def _client_address(self, addr: Any, req: Request) -> Any:
        """Who a WebSocket client is: its peer, or behind a --trusted-proxy the right-most
        X-Forwarded-For address that is not a trusted proxy itself (what the nearest
        trusted one saw); anything unparsable counts as the proxy."""
        import ipaddress
        trusted = self.trusted
        if not trusted or not isinstance(addr, tuple):
            return addr

        def address(text: str) -> Optional[str]:
            """A hop as one form: ``[v6]:port``, ``v4:port``, zone ids and IPv4-mapped
            IPv6 (how some proxies write them) reduced to the bare address."""
            text = text.strip()
            if text.startswith("["):
                text = text[1:].partition("]")[0]
            elif text.count(":") == 1:
                text = text.partition(":")[0]
            try:
                ip = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                return None
            mapped = getattr(ip, "ipv4_mapped", None)
            return str(mapped or ip)

        def is_trusted(text: Optional[str]) -> bool:
            if text is None:
                return False
            ip = ipaddress.ip_address(text)
            return any(ip in net for net in trusted)
        if not is_trusted(address(addr[0])):
            return addr
        hops = [h for v in req.headers.get_all("x-forwarded-for") for h in v.split(",")]
        for hop in reversed(hops):
            ip = address(hop)
            if ip is None:
                self._xff_log.warn("X-Forwarded-For from trusted proxy %s has a hop that is "
                                   "not an address (%s): counted as the proxy",
                                   peer_text(addr), escape_unprintable(hop.strip()[:60]))
                return addr
            if not is_trusted(ip):
                return (ip, addr[1])
        return addr

    def _start_session(self, sock: Any, addr: Any, bindings: Optional[FrozenSet[str]] = None,
                       unbound_ok: Optional[bool] = None, websocket: bool = False) -> None:
        """A control session in its handshake; the certificates the client may have seen
        (``bindings``) and whether plain TCP is fine (``unbound_ok``) default to the
        control port's.  ``websocket``: it came in on a visitor port (through proxies
        or load balancers, likely: every read is ACKed at once, Session.quickack)."""
        session = None

        def accept(request: Dict[str, Any]) -> Dict[str, Any]:
            assert session is not None
            return self._claim(session, request)
        peer_ip = str(addr[0]) if isinstance(addr, tuple) else ""
        handshake = RelayHandshake(self.token_for, accept,
                                   bindings=self.bindings if bindings is None else bindings,
                                   unbound_ok=(self.control_tls is None if unbound_ok is None
                                               else unbound_ok),
                                   banned=lambda user: self.penalties.banned(
                                       self.penalty_key(peer_ip, user)))
        session = Session(self.loop, sock, peer_text(addr), handshake, self, is_relay=True,
                          config=self.session_config, peer_ip=peer_ip, quickack=websocket)
        self.sessions.add(session)
        self.unauthenticated.add(session)

    # -- names ------------------------------------------------------------------------
    def public_url(self, name: str) -> str:
        port = self.config.public_port or self.http_port
        default = 443 if self.scheme == "https" else 80
        suffix = "" if port == default else ":%d" % port
        return "%s://%s.%s%s" % (self.scheme, name, self.config.domain, suffix)

    def _claim(self, session: Session, request: Dict[str, Any]) -> Dict[str, Any]:
        if self.stopping:
            raise RefusedError(REFUSED_SHUTTING_DOWN, "the relay is shutting down")
        user = self.users.get(str(request.get("user"))) if self.users is not None else None
        owner = user.name if user is not None else ""   # single token: one owner
        secret = request.get("client_secret")
        # Without a secret, a key nobody else has: such a client gets no reservation back.
        client_key = hashlib.sha256(secret.encode("utf-8") if isinstance(secret, str)
                                    and secret else secrets.token_bytes(32)).digest()
        wanted = request.get("subdomain")
        now = time.monotonic()
        for name in [n for n, r in self.reserved.items() if r.until <= now]:
            del self.reserved[name]
        if wanted:
            name = str(wanted).lower()
            if not valid_name(name):
                raise RefusedError(REFUSED_INVALID_NAME, "%r is not a valid subdomain: use "
                                   "a-z, 0-9 and inner hyphens, 1-63 characters" % str(wanted))
            if not self.name_allowed(user, name):
                raise RefusedError(REFUSED_NAME_NOT_ALLOWED, "user %s may not use subdomain %r"
                                   % (owner or "-", name))
            live = self.tunnels.get(name)
            if live is not None:
                if hmac.compare_digest(live.client_key, client_key) and live.owner == owner:
                    live.session.close("replaced by a new connection from the same client")
                else:
                    raise RefusedError(REFUSED_NAME_TAKEN, "subdomain %r is in use by another "
                                       "tunnel" % name)
            held = self.reserved.get(name)
            if held is not None and not may_take(held, owner, client_key):
                raise RefusedError(REFUSED_NAME_TAKEN, "subdomain %r is reserved for its previous "
                                   "client for another %d s (or choose another "
                                   "--subdomain)" % (name, max(1, round(held.until - now))))
        else:
            candidates = (user.candidates() if user is not None and user.patterns is not None
                          else (random_name() for _ in range(100)))
            for name in candidates:
                held = self.reserved.get(name)
                if (name not in self.tunnels and self.name_allowed(user, name)
                        and (held is None or may_take(held, owner, client_key))):
                    break
            else:
                raise RefusedError(REFUSED_NAME_TAKEN, "could not find a free name")
        if user is not None and user.max_tunnels is not None:
            count = sum(1 for t in self.tunnels.values() if t.owner == owner)
            if count >= user.max_tunnels:
                raise RefusedError(REFUSED_LIMIT, "user %s already has %d tunnels (the limit)"
                                   % (user.name, count))
        spec = request.get("access") or {}
        if not isinstance(spec, dict):
            raise RefusedError(REFUSED_INVALID_ACCESS, "access must be an object")
        policy = AccessPolicy(spec, self.secret, "%s.%s" % (name, self.config.domain),
                              secure=self.scheme == "https")
        self.reserved.pop(name, None)
        session.name = name
        url = self.public_url(name)
        tunnel = Route(name, session, owner, client_key, url, bool(request.get("log", True)))
        tunnel.policy = policy
        tunnel.logs_upgrades = request.get("log_upgrades") is True
        session.log_batch = request.get("log_batch") is True
        tunnel.token_digest = user.digest if user is not None else ""
        tunnel.host_header, tunnel.target_origin = _host_options(request)
        self.tunnels[name] = tunnel
        return {"name": name, "url": url, "heartbeat_interval": self.config.heartbeat_interval}

    def name_allowed(self, user: Optional["User"], name: str) -> bool:
        """A user with patterns may use the names they match; a user without may use any
        name that no other user's patterns claim (their namespace is theirs)."""
        if user is not None and user.patterns is not None:
            return user.may_use(name)
        return self.users is None or not any(
            other.patterns is not None and other is not user and other.may_use(name)
            for other in self.users.values())

    # -- users (serve --tokens FILE) ---------------------------------------------------
    def token_for(self, user: str) -> Optional[str]:
        if self.users is None:
            return self.config.token
        found = self.users.get(user)
        return found.token if found is not None else None

    def reload_users(self) -> None:
        """SIGHUP: read the tokens file again; disconnect the tunnels the new file does not
        allow (user removed or re-keyed, name outside the patterns, over max_tunnels)."""
        if not self.config.tokens_file:
            log.info("SIGHUP ignored: no --tokens file")
            return
        try:
            users = load_users(self.config.tokens_file)
        except TunnelError as exc:
            log.error("tokens file not reloaded, keeping the old one: %s", exc)
            return
        self.users = users
        counts: Dict[str, int] = {}
        for tunnel in list(self.tunnels.values()):     # oldest first: the newest go over a cap
            user = users.get(tunnel.owner)
            if user is None or user.digest != tunnel.token_digest:
                tunnel.session.close("user %s removed or token changed" % tunnel.owner)
                continue
            if not self.name_allowed(user, tunnel.name):
                tunnel.session.close("user %s may no longer use %s" % (user.name, tunnel.name))
                continue
            counts[user.name] = counts.get(user.name, 0) + 1
            if user.max_tunnels is not None and counts[user.name] > user.max_tunnels:
                tunnel.session.close("user %s is over the new limit of %d tunnels"
                                     % (user.name, user.max_tunnels))
        for name in [n for n, r in self.reserved.items()
                     if r.owner not in users or not self.name_allowed(users[r.owner], n)]:
            del self.reserved[name]
        log.info("tokens file reloaded: %d users", len(users))

    def penalty_key(self, peer_ip: str, user: str) -> Tuple[str, str]:
        """What failed handshakes count against: the source and the user, if that user
        exists (a name the client picks must not buy it a fresh count: on a single-token
        relay every name is one user, and unknown names share one count)."""
        known = self.users is not None and user in self.users
        return source_key(peer_ip), user if known else ""

    def on_handshake_refused(self, session: Session, handshake: Any) -> float:
        code = getattr(handshake, "failed_code", "")
        if code == REFUSED_BINDING:
            log.warning("control connection from %s refused: %s", session.peer,
                        handshake.failed)
            return 0.0
        if code != REFUSED_AUTH:
            return 0.0
        key = self.penalty_key(session.peer_ip, handshake.user)
        delay = self.penalties.fail(key)
        if self.penalties.banned(key):
            log.warning("control connections from %s for user %s banned for %.0fs after "
                        "repeated failed handshakes", session.peer_ip,
                        escape_unprintable(handshake.user) or "-", self.penalties.ban_time)
        return delay

    def relay_url(self) -> str:
        """What ``expose --relay`` takes to reach this relay over WebSocket."""
        port = self.config.public_port or self.http_port
        default = 443 if self.scheme == "https" else 80
        return "%s://%s%s" % (self.scheme, self.config.domain,
                              "" if port == default else ":%d" % port)

    def relay_address(self) -> str:
        """What ``expose --relay`` takes: the control port, or (off) the WebSocket URL."""
        if self.control_port:
            return format_hostport(self.config.domain, self.control_port)
        return self.relay_url()

    def https_port_suffix(self) -> str:
        port = self.config.public_port or self.http_port
        return "" if port == 443 else ":%d" % port

    def is_tunnel_host(self, host: str) -> bool:
        """Is ``host`` (lower-case, without port) NAME.DOMAIN, a tunnel's name?"""
        return host.rstrip(".").endswith("." + self.config.domain.lower())

    def route(self, req: Request) -> str:
        """The tunnel name for a request; raises HTTPError (404) or HTTPResponse (the
        root page)."""
        host = req.host.rstrip(".")
        domain = self.config.domain.lower()
        if host == domain or not host:
            raise HTTPResponse(200, "This is a tunnel.py relay.\nTunnels are reached at "
                            "%s; expose a local port with:\n  python3 tunnel.py "
                            "expose PORT --relay %s --token TOKEN"
                            % (self.public_url("NAME"), self.relay_address()))
        if not host.endswith("." + domain):
            raise HTTPError(404, "This relay serves *.%s; %s is not one of its names."
                            % (domain, host))
        name = host[:-len(domain) - 1]
        if not valid_name(name):
            raise HTTPError(404, "No tunnel named %r is online." % name)
        return name

    def tunnel_for(self, name: str) -> Route:
        tunnel = self.tunnels.get(name)
        if tunnel is not None and not tunnel.session.goaway_received:
            return tunnel
        held = self.reserved.get(name)
        if tunnel is not None or (held is not None and held.until > time.monotonic()):
            raise HTTPError(502, "The tunnel %s.%s exists but its client is not connected "
                            "right now." % (name, self.config.domain))
        raise HTTPError(404, "No tunnel named %r is online on this relay." % name)

    # -- session events -------------------------------------------------------------
    def on_session_up(self, session: Session) -> None:
        self.unauthenticated.discard(session)
        channel = session.sock          # a WSChannel, maybe under a TLSChannel
        while channel is not None and not isinstance(channel, WSChannel):
            channel = getattr(channel, "_inner", None)
        if channel is not None:
            channel.limit_frames(None)  # authenticated: frames are its session's business
        handshake = session.handshake
        self.penalties.succeed(self.penalty_key(session.peer_ip, handshake.user))  # just this
        log.info("%s: tunnel online at %s", session.label, self.public_url(session.name))
        if handshake.request.get("tls_interception") is True:
            log.warning("%s: the client declared a TLS-inspecting middlebox (it saw the "
                        "certificate SHA-256 %s): that middlebox can read its traffic",
                        session.label, fingerprint_text(str(handshake.request.get("binding"))))

    def on_session_closed(self, session: Session, reason: str,
                          error: Optional[BaseException]) -> None:
        self.sessions.discard(session)
        if session in self.unauthenticated:     # a handshake that never completed
            self.unauthenticated.discard(session)
            self.handshake_failures[getattr(session.handshake, "failed_code", "")
                                    or "incomplete"] += 1
        tunnel = self.tunnels.get(session.name)
        if tunnel is not None and tunnel.session is session:
            del self.tunnels[session.name]
            if not session.goaway_received:   # a client that said goodbye is not coming back
                self.reserved[session.name] = Reservation(
                    tunnel.owner, tunnel.client_key, time.monotonic() + self.config.reservation)

    def on_goaway(self, session: Session, reason: str) -> None:
        if not session.streams:
            session.close("client went away")

    def answered_itself(self, visitor: VisitorConn, status: int, nbytes: int,
                        req: Optional[Request]) -> None:
        """A page the relay made for a visitor (``send_error``; ``req``: the request it
        answers, if any): counted if it is an error, and an access-log line."""
        if status >= 400:
            self.relay_errors[status] += 1
        if visitor.access_log is not None:
            visitor.access_log.answered(visitor, status, nbytes, req)

    def reload(self) -> None:
        """SIGHUP: reopen the access log (after a rotation), reload the tokens file."""
        if self.access_log is not None:
            self.access_log.reopen()
            if not self.config.tokens_file:
                return
        self.reload_users()

    def stats(self) -> Dict[str, int]:
        """Counts of live objects (for tests and operators)."""
        return {"tunnels": len(self.tunnels), "sessions": len(self.sessions),
                "visitors": len(self.visitors),
                "streams": sum(len(s.streams) for s in self.sessions)}


# =============================================================================
# Relay status, metrics and access log (serve --admin, serve --access-log)
# =============================================================================
#
# Nothing here runs on the data path: VisitorConn counts a response where it looks at
# each one anyway (Route.codes, Route.last), a visitor's stream bytes are added to its
# tunnel when the connection ends, and refusals are counted where they are made.  The
# admin port is served by the relay's own EventLoop (a Listener and AdminConn: one
# request per connection, then a lingering close), with the visitor port's limits:
# a head size, the head timeout, connections in total and per source.

_ADMIN_ADDRESS_RE = re.compile(r"(?:(\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._-]+):)?([0-9]{1,5})\Z")
_ADMIN_TOKEN_RE = re.compile(r"[\x21-\x7e]+\Z")   # what a Bearer header can carry as is
_CLF_UNSAFE_RE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')   # '"', '\' and non-printables
_QUERY_PARTS_RE = re.compile(r"[&;]")


def parse_admin_address(text: str) -> Tuple[str, int]:
    """``serve --admin``: ``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[V6]:PORT``; port 0
    is a free one.  Raises UsageError."""
    m = _ADMIN_ADDRESS_RE.match(str(text).strip())
    if m is None or int(m.group(2)) > 65535:
        raise UsageError("--admin %r is not PORT or HOST:PORT" % (text,))
    host = m.group(1) or LOOPBACK_BIND
    return host.strip("[]"), int(m.group(2))


def access_details(req: Request) -> Tuple[Tuple[int, int], Optional[str], Optional[str]]:
    """What an access-log line needs of a request beyond its Exchange: the HTTP version,
    User-Agent and Referer (kept only with --access-log)."""
    index = req.headers.index
    agent = index.get("user-agent")
    referer = index.get("referer")
    return (req.version, agent[0][:MAX_LOGGED_HEADER] if agent else None,
            referer[0][:MAX_LOGGED_HEADER] if referer else None)


def _clf_char(m: Any) -> str:
    c = m.group()
    if c in '"\\':
        return "\\" + c
    return "\\x%02x" % ord(c) if ord(c) < 0x100 else "\\u%04x" % ord(c)


def clf_escape(text: str) -> str:
    """A visitor's string as a Combined Log Format field shows it (Apache's way): ``"``
    and ``\\`` escaped with a backslash, anything else outside printable ASCII as \\xHH."""
    return _CLF_UNSAFE_RE.sub(_clf_char, text) if _CLF_UNSAFE_RE.search(text) else text


def _iso_time(t: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds."""
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)),
                         int(t * 1000) % 1000)


class AccessLog:
    """``serve --access-log FILE|-``: one line per visitor request, in Combined Log Format
    with the tunnel's name first (Apache's vhost_combined, without a port), or JSON
    (``--log-format json``).  Targets are masked as the client's log masks them
    (``logged_target``) and visitor strings escaped.

    The lines of one loop turn are written together (``LineOutput``'s way: one
    ``os.write``).  A pipe, FIFO or socket is never waited for: what it does not take is
    held (up to ACCESS_LOG_BUFFER, then lines are dropped and counted) and tried again
    every ACCESS_LOG_RETRY, so a slow reader never stalls the relay.  FILE is opened
    non-blocking; standard output is shared (with stderr too, after ``2>&1``), so its
    flags stay as they are and a pipe there gets PIPE_BUF bytes at a time while poll
    says it has room.  A regular file or a terminal takes its writes at once.
    ``reopen`` (SIGHUP) follows a rotated file."""

    def __init__(self, loop: EventLoop, path: str, fmt: str = LOG_FORMAT_COMBINED) -> None:
        self.loop = loop
        self.path = path
        self.json = fmt == LOG_FORMAT_JSON
        self.lines: List[str] = []
        self.held = bytearray()         # bytes the descriptor did not take yet
        self.flush_scheduled = False
        self.closed = False
        self.dropped = 0                # lines dropped (a reader that did not keep up)
        self.stream: Any = None         # a text stream without a descriptor (a notebook)
        self._poll: Any = None          # a shared pipe or socket: poll before each write
        self._chunk = 0                 # ... and write this much at a time
        self.fd = self._open()
        self._retry: Optional[Timer] = None
        self._clock = (-1, "", "")      # (second, its CLF time, its ISO time)
        self._trouble = Throttle()

    def _open(self) -> int:
        """The descriptor to write (-1: ``self.stream``); raises UsageError."""
        if self.path == ACCESS_LOG_STDOUT:
            try:
                fd = os.dup(sys.stdout.fileno())
            except (AttributeError, OSError, ValueError):   # a stream of its own
                self.stream = sys.stdout
                return -1
        else:
            flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
            try:
                fd = os.open(self.path, flags, ACCESS_LOG_MODE)
            except OSError as exc:
                why = ("no process reads that FIFO" if exc.errno == errno.ENXIO
                       else describe_oserror(exc))
                raise UsageError("--access-log %s: %s" % (self.path, why)) from None
            return fd               # O_NONBLOCK: a FIFO's reader sets no pace for us
        import select
        import stat
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return fd
        if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(fd, select.POLLOUT)
            self._chunk = getattr(select, "PIPE_BUF", PIPE_BUF_MIN)   # taken whole
        return fd

    # -- lines ------------------------------------------------------------------------
    def request(self, visitor: Any, ex: Exchange, nbytes: int,
                now: Optional[float] = None) -> None:
        """An answered request (the origin's response, or a relay-made one)."""
        duration = (time.monotonic() if now is None else now) - ex.started
        tunnel = visitor.tunnel
        self.add(tunnel.name if tunnel is not None else None, visitor.peer_ip, visitor.peer,
                 ex.method, ex.target, ex.status, nbytes, duration,
                 getattr(ex, "details", None))

    def answered(self, visitor: Any, status: int, nbytes: int,
                 req: Optional[Request]) -> None:
        """A relay-made page; ``req`` None: no request was read whole (a 400, a 408).
        A request refused before its connection was bound (a 401, a cap) names the
        tunnel it asked for, if that one is online."""
        tunnel = visitor.tunnel
        name = tunnel.name if tunnel is not None else None
        if name is None and req is not None:
            relay = visitor.relay
            wanted = req.host.rstrip(".")[:-len(relay.config.domain) - 1]
            if wanted in relay.tunnels and relay.is_tunnel_host(req.host):
                name = wanted
        self.add(name, visitor.peer_ip, visitor.peer,
                 req.method if req is not None else None,
                 req.target if req is not None else None, status, nbytes,
                 time.monotonic() - visitor.head_started,
                 access_details(req) if req is not None else None)

    def add(self, tunnel: Optional[str], peer_ip: str, peer: str, method: Optional[str],
            target: Optional[str], status: int, nbytes: int, duration: float,
            details: Any) -> None:
        if self.closed:
            return
        now = time.time()
        second = int(now)
        if second != self._clock[0]:     # strftime once a second, not once a line
            local = time.localtime(second)
            self._clock = (second, time.strftime("%d/%b/%Y:%H:%M:%S %z", local),
                           time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        version, agent, referer = details or ((1, 1), None, None)
        shown = logged_target(target) if target is not None else None
        if self.json:
            if agent is not None and not agent.isascii():   # heads are read as latin-1:
                try:                                        # the bytes were UTF-8, mostly
                    agent = agent.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    pass
            line = json.dumps({
                "time": "%s.%03dZ" % (self._clock[2], int(now * 1000) % 1000),
                "tunnel": tunnel, "peer": peer, "method": method, "target": shown,
                "status": status, "bytes": nbytes, "duration": round(max(0.0, duration), 6),
                "user_agent": agent}, separators=(", ", ": "))
        else:
            what = "-" if method is None else "%s %s HTTP/%d.%d" % (method, shown, *version)
            line = '%s %s - - [%s] "%s" %d %d "%s" "%s"' % (
                tunnel or "-", peer_ip, self._clock[1], clf_escape(what), status, nbytes,
                clf_escape(referer) if referer is not None else "-",
                clf_escape(agent) if agent is not None else "-")
        self.lines.append(line)
        self.loop.schedule_flush(self)

    # -- writing ------------------------------------------------------------------------
    def flush(self) -> None:
        """End of the loop turn: this turn's lines in one write."""
        if not self.lines:
            return
        text = "\n".join(self.lines) + "\n"
        count = len(self.lines)
        self.lines.clear()
        if self.stream is not None:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):   # closed, or a broken pipe: stop logging
                self.closed = True
            return
        data = text.encode("utf-8")     # ASCII: every line is escaped
        if len(self.held) + len(data) > ACCESS_LOG_BUFFER:
            self.dropped += count
            self._trouble.warn("access log %s: %d lines dropped, its reader does not keep "
                               "up (%d so far)", self.path, count, self.dropped)
            return
        self.held += data
        if self._retry is None:         # (else a write is due: keep the order)
            self._write()

    def _write(self) -> None:
        self._retry = None
        if self.closed or not self.held:
            return
        n = 0
        try:
            if self._poll is None:
                n = os.write(self.fd, self.held)
            else:           # a shared pipe: what it surely takes without blocking
                view = memoryview(self.held)
                try:
                    while n < len(view) and self._poll.poll(0):
                        n += os.write(self.fd, view[n:n + self._chunk])
                finally:
                    view.release()
        except (BlockingIOError, InterruptedError):
            pass
        except BrokenPipeError:
            log.warning("access log %s: its reader went away; no more lines", self.path)
            self.held.clear()
            self.closed = True
            return
        except OSError as exc:          # a full disk, say: drop these, try the next
            self._trouble.warn("access log %s: %s (%d bytes of lines dropped)", self.path,
                               describe_oserror(exc), len(self.held))
            self.held.clear()
            return
        del self.held[:n]
        if self.held:
            self._retry = self.loop.call_later(ACCESS_LOG_RETRY, self._write)

    def reopen(self) -> None:
        """SIGHUP: open FILE again (a rotation renamed it); the old one stays on error."""
        if self.path == ACCESS_LOG_STDOUT or self.closed:
            return
        self.flush()
        try:
            fd = self._open()
        except UsageError as exc:
            log.error("%s; still writing to the old file", exc)
            return
        old, self.fd = self.fd, fd
        os.close(old)
        log.info("access log %s reopened", self.path)

    def close(self) -> None:
        """Write what is left (a reader gets ACCESS_LOG_EXIT_WAIT to take it)."""
        if self.closed:
            return
        self.flush()
        if self._retry is not None:
            self._retry.cancel()
        deadline = time.monotonic() + ACCESS_LOG_EXIT_WAIT
        while self.held and not self.closed and time.monotonic() < deadline:
            time.sleep(ACCESS_LOG_EXIT_POLL)
            self._write()
            if self._retry is not None:
                self._retry.cancel()
        if self.held:
            log.warning("access log %s: %d bytes of lines not written at exit", self.path,
                        len(self.held))
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the Prometheus text exposition format (0.0.4) ---------------------------------------

def metric_label_value(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and line
    feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_number(value: Any) -> str:
    if isinstance(value, int):
        return "%d" % value
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_metrics(families: List[Tuple[str, str, str, List[Tuple[Any, Any]]]]) -> str:
    """``families``: (name, type, help, [(labels, value)]) with labels a sequence of
    (name, value) pairs, as the text format 0.0.4: HELP and TYPE once each, then the
    samples (a family may have none yet)."""
    out = []
    for name, kind, text, samples in families:
        out.append("# HELP %s %s" % (name, text.replace("\\", "\\\\").replace("\n", "\\n")))
        out.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            if labels:
                out.append("%s{%s} %s" % (name, ",".join(
                    '%s="%s"' % (k, metric_label_value(str(v))) for k, v in labels),
                    _metric_number(value)))
            else:
                out.append("%s %s" % (name, _metric_number(value)))
    return "\n".join(out) + "\n"


def _status_classes(codes: List[int]) -> List[int]:
    """Response counts by status (Route.codes) as counts by class: 0xx to 9xx."""
    return [sum(codes[i:i + 100]) for i in range(0, STATUS_CODES, 100)]


class RelayAdmin:
    """``serve --admin [HOST:]PORT``: ``/status`` (HTML; ``?format=json``) and
    ``/metrics`` (Prometheus) for the relay's operator, on the relay's own loop.

    Only GET and HEAD (else 405).  With ``--admin-token`` (required off loopback) every
    request needs ``Authorization: Bearer TOKEN`` (401 otherwise); without one, only a
    Host that is an address or ``localhost`` is answered (403 otherwise), so a web page
    cannot read it through DNS rebinding."""

    def __init__(self, relay: "Relay", host: str, port: int) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.host = host
        self.token = relay.config.admin_token
        self.connections = 0            # AdminConn and their lingering answers
        self.sources: Dict[str, int] = {}
        self.started = time.monotonic()
        self._cap_log = Throttle()
        try:
            sock = make_listener(host, port)
        except OSError as exc:
            raise ListenError("cannot listen on %s (--admin): %s" % (
                format_hostport(host, port), describe_oserror(exc))) from None
        self.port = sock.getsockname()[1]
        self.listener = Listener(self.loop, sock, self._accept, relay.config.accept_pause)

    def announce(self) -> None:
        log.info("relay status at http://%s/status, metrics at /metrics%s",
                 format_hostport(self.host, self.port),
                 " (Bearer token required)" if self.token else "")
        if not is_loopback(self.host):
            log.warning("--admin %s is not a loopback address: its token and pages cross "
                        "the network in plain HTTP (put TLS or a firewall in front)",
                        format_hostport(self.host, self.port))

    def close(self) -> None:
        self.listener.close_socket()

    # -- connections --------------------------------------------------------------------
    def _accept(self, sock: socket.socket, addr: Any) -> None:
        source = source_key(addr[0]) if isinstance(addr, tuple) else "local"
        held = self.sources.get(source, 0)
        if self.connections >= ADMIN_MAX_CONNECTIONS or held >= ADMIN_MAX_PER_SOURCE:
            self._cap_log.warn("admin connection from %s refused: %d open, %d from %s",
                               peer_text(addr), self.connections, held, source)
            sock.close()
            return
        self.connections += 1
        self.sources[source] = held + 1
        AdminConn(self, sock, addr, source)

    def left(self, source: str) -> None:
        self.connections -= 1
        held = self.sources.pop(source) - 1
        if held:
            self.sources[source] = held

    # -- requests -------------------------------------------------------------------------
    def _authorized(self, req: Request) -> bool:
        values = req.headers.get_all("authorization")
        if len(values) != 1:
            return False
        scheme, _, given = values[0].strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1"), self.token.encode("utf-8"))

    def respond(self, req: Request) -> bytes:
        """The whole answer to one request on the admin port."""
        method = req.method
        if self.token:
            if not self._authorized(req):
                return http_response(401, "This needs the relay's admin token: "
                                     "Authorization: Bearer TOKEN.", method,
                                     (("WWW-Authenticate", 'Bearer realm="%s"' % ADMIN_REALM),))
        elif req.host and req.host != "localhost" and not _is_ip_literal(req.host.strip("[]")):
            return http_response(403, "Ask for this page by address or as localhost (or "
                                 "start the relay with --admin-token).", method)
        if method not in ("GET", "HEAD"):
            return http_response(405, "Only GET and HEAD are served here.", method,
                                 (("Allow", "GET, HEAD"),))
        path, _, query = req.target.partition("?")
        if path not in ADMIN_PATHS:
            return http_response(404, "Nothing here: try /status, /status?format=json or "
                                 "/metrics.", method)
        if path == "/metrics":
            body, ctype = render_metrics(self.metrics()).encode("utf-8"), METRICS_CONTENT_TYPE
        elif "format=json" in _QUERY_PARTS_RE.split(query):
            body = (json.dumps(self.status(), indent=1) + "\n").encode("utf-8")
            ctype = "application/json"
        else:
            body, ctype = status_html(self.status()).encode("utf-8"), "text/html; charset=utf-8"
        head = ["HTTP/1.1 200 OK", "Content-Type: " + ctype,
                "Content-Length: %d" % len(body), "Cache-Control: no-store",
                "X-Content-Type-Options: nosniff", "Connection: close"]
        if ctype.startswith("text/html"):
            head += ["Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'",
                     "X-Frame-Options: DENY", "Referrer-Policy: no-referrer"]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        return data if method == "HEAD" else data + body

    # -- what they show ---------------------------------------------------------------------
    def _tunnels(self) -> List[Tuple[Route, int, int]]:
        """The first ADMIN_MAX_ROWS tunnels online (oldest first), each with its bytes
        from and to visitors so far (those of open connections added)."""
        listed = list(itertools.islice(self.relay.tunnels.values(), ADMIN_MAX_ROWS))
        live: Dict[Route, List[int]] = {}
        for visitor in self.relay.visitors:
            tunnel, stream = visitor.tunnel, visitor.stream
            if tunnel is not None and stream is not None:
                counts = live.get(tunnel)
                if counts is None:
                    counts = live[tunnel] = [0, 0]
                counts[0] += stream.bytes_out
                counts[1] += stream.bytes_in
        return [(t, t.bytes_in + live.get(t, (0, 0))[0], t.bytes_out + live.get(t, (0, 0))[1])
                for t in listed]

    def status(self) -> Dict[str, Any]:
        """What /status shows (its JSON form)."""
        relay = self.relay
        now, wall = time.monotonic(), time.time()
        tunnels = []
        for t, bytes_in, bytes_out in self._tunnels():
            last = t.last
            tunnels.append({
                "name": t.name, "url": t.url, "user": t.owner or None,
                "client": t.session.peer, "connected_since": _iso_time(t.since),
                "streams": len(t.session.streams), "visitors": t.visitors,
                "requests": sum(t.codes),
                "responses": {"%03d" % code: n for code, n in enumerate(t.codes) if n},
                "bytes_in": bytes_in, "bytes_out": bytes_out,
                "last_request": None if last is None else {
                    "time": _iso_time(wall - (now - last.started)), "method": last.method,
                    "target": logged_target(last.target), "status": last.status}})
        reserved = [{"name": name, "user": r.owner or None,
                     "expires_in": round(r.until - now, 1)}
                    for name, r in relay.reserved.items() if r.until > now]
        bans = ([{"kind": "control", "source": key[0], "user": key[1] or None,
                  "expires_in": round(left, 1)} for key, left in relay.penalties.active(now)]
                + [{"kind": "visitor", "source": key[0], "tunnel": key[1],
                    "expires_in": round(left, 1)}
                   for key, left in relay.visitor_penalties.active(now)])
        return {
            "version": __version__, "started": _iso_time(relay.started),
            "uptime": round(now - self.started, 3), "domain": relay.config.domain,
            "sessions": sum(1 for s in relay.sessions if s.established),
            "handshakes": len(relay.unauthenticated) + len(relay.control_tls_pending),
            "visitor_connections": len(relay.visitors),
            "streams": sum(len(s.streams) for s in relay.sessions),
            "tunnels": tunnels, "tunnels_not_listed": len(relay.tunnels) - len(tunnels),
            "reserved": reserved[:ADMIN_MAX_ROWS],
            "reserved_not_listed": max(0, len(reserved) - ADMIN_MAX_ROWS),
            "handshake_failures": dict(sorted(relay.handshake_failures.items())),
            "refused_visitors": dict(sorted(relay.refused_visitors.items())),
            "relay_errors": {str(code): n for code, n in sorted(relay.relay_errors.items())},
            "bans": bans[:ADMIN_MAX_ROWS],
            "bans_not_listed": max(0, len(bans) - ADMIN_MAX_ROWS),
        }

    def metrics(self) -> List[Tuple[str, str, str, List[Tuple[Any, Any]]]]:
        """The families /metrics exposes (see README: Relay status and metrics)."""
        relay = self.relay
        rows = self._tunnels()
        now = time.monotonic()
        requests = []
        for t, _, _ in rows:
            for i, n in enumerate(_status_classes(t.codes)):
                if n or 1 <= i <= 5:
                    requests.append(((("tunnel", t.name), ("code", "%dxx" % i)), n))
        return [
            ("tunnel_info", "gauge", "The relay's version (the value is always 1).",
             [((("version", __version__),), 1)]),
            ("tunnel_start_time_seconds", "gauge", "When the relay started (Unix time).",
             [((), round(relay.started, 3))]),
            ("tunnel_sessions", "gauge", "Control sessions that are up (a tunnel each).",
             [((), sum(1 for s in relay.sessions if s.established))]),
            ("tunnel_handshakes", "gauge", "Control connections still in the handshake.",
             [((), len(relay.unauthenticated) + len(relay.control_tls_pending))]),
            ("tunnel_streams", "gauge", "Open streams, all sessions.",
             [((), sum(len(s.streams) for s in relay.sessions))]),
            ("tunnel_visitor_connections", "gauge", "Visitor connections open.",
             [((), len(relay.visitors))]),
            ("tunnel_tunnel_streams", "gauge", "Open streams of a tunnel.",
             [((("tunnel", t.name),), len(t.session.streams)) for t, _, _ in rows]),
            ("tunnel_tunnel_visitor_connections", "gauge",
             "Visitor connections bound to a tunnel.",
             [((("tunnel", t.name),), t.visitors) for t, _, _ in rows]),
            ("tunnel_requests_total", "counter", "Responses to a tunnel's visitors, by status "
             "class (the origin's, and the relay's 502s for it).", requests),
            ("tunnel_receive_bytes_total", "counter", "Bytes from a tunnel's visitors into "
             "it (request heads as forwarded, bodies, upgraded streams).",
             [((("tunnel", t.name),), b_in) for t, b_in, _ in rows]),
            ("tunnel_transmit_bytes_total", "counter", "Bytes from a tunnel to its visitors.",
             [((("tunnel", t.name),), b_out) for t, _, b_out in rows]),
            ("tunnel_handshake_failures_total", "counter", "Control connections that did "
             "not become a session, by reason (a refusal code, tls, incomplete, a cap).",
             [((("reason", k),), n) for k, n in sorted(relay.handshake_failures.items())]),
            ("tunnel_refused_visitors_total", "counter", "Visitor connections or requests "
             "refused, by reason (a cap, address, credentials, banned).",
             [((("reason", k),), n) for k, n in sorted(relay.refused_visitors.items())]),
            ("tunnel_relay_errors_total", "counter", "4xx and 5xx answers the relay made "
             "itself, by status code.",
             [((("code", str(k)),), n) for k, n in sorted(relay.relay_errors.items())]),
            ("tunnel_bans", "gauge", "Bans in force (control: handshakes per source and "
             "user; visitor: logins per source and tunnel).",
             [((("kind", "control"),), len(relay.penalties.active(now))),
              ((("kind", "visitor"),), len(relay.visitor_penalties.active(now)))]),
        ]


def _html_table(columns: Tuple[str, ...], rows: List[List[Any]]) -> str:
    import html
    if not rows:
        return "<p>none</p>"
    return "<table><tr>%s</tr>%s</table>" % (
        "".join("<th>%s</th>" % html.escape(c) for c in columns),
        "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % html.escape(
            "-" if cell is None else str(cell)) for cell in row) for row in rows))


def status_html(status: Dict[str, Any]) -> str:
    """/status as a page: every value escaped (names, users, addresses, targets)."""
    import html
    up = int(status["uptime"])
    tunnels = [[t["name"], t["user"], t["client"], t["connected_since"], t["streams"],
                t["visitors"], t["requests"], format_size(t["bytes_in"]),
                format_size(t["bytes_out"]),
                "-" if t["last_request"] is None else "%s %s %s %d" % (
                    t["last_request"]["time"], t["last_request"]["method"],
                    escape_unprintable(t["last_request"]["target"]),
                    t["last_request"]["status"])] for t in status["tunnels"]]
    if status["tunnels_not_listed"]:
        tunnels.append(["(%d more)" % status["tunnels_not_listed"]] + [""] * 9)
    sections = [
        ("Tunnels", _html_table(("name", "user", "client", "connected since", "streams",
                                 "visitors", "requests", "in", "out", "last request"),
                                tunnels)),
        ("Reserved names", _html_table(("name", "user", "expires in (s)"), [
            [r["name"], r["user"], r["expires_in"]] for r in status["reserved"]])),
        ("Handshake failures", _html_table(("reason", "count"), [
            list(kv) for kv in status["handshake_failures"].items()])),
        ("Refused visitors", _html_table(("reason", "count"), [
            list(kv) for kv in status["refused_visitors"].items()])),
        ("Answers the relay made (4xx, 5xx)", _html_table(("status", "count"), [
            list(kv) for kv in status["relay_errors"].items()])),
        ("Bans", _html_table(("kind", "source", "user or tunnel", "expires in (s)"), [
            [b["kind"], b["source"], b.get("user") or b.get("tunnel"), b["expires_in"]]
            for b in status["bans"]])),
    ]
    summary = ("tunnel.py %s on %s, up %dd %02d:%02d:%02d since %s: %d sessions, %d in the "
               "handshake, %d visitor connections, %d streams" % (
                   status["version"], status["domain"], up // 86400, up // 3600 % 24,
                   up // 60 % 60, up % 60, status["started"], status["sessions"],
                   status["handshakes"], status["visitor_connections"], status["streams"]))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tunnel.py relay"
            "</title><style>body{font:14px sans-serif;margin:1.5em}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
            "</style></head><body><h1>tunnel.py relay</h1><p>%s</p><p><a href=\"/status?"
            "format=json\">JSON</a> &middot; <a href=\"/metrics\">metrics</a></p>%s"
            "</body></html>\n" % (html.escape(summary), "".join(
                "<h2>%s</h2>%s" % (html.escape(title), body) for title, body in sections)))


class AdminConn(Conn):
    """One connection to the admin port: one request, answered whole, then a lingering
    close (``_AdminAnswer``).  Its head must arrive within --head-timeout (408) and fit
    in ADMIN_MAX_HEAD (431)."""

    def __init__(self, admin: RelayAdmin, sock: socket.socket, addr: Any,
                 source: str) -> None:
        super().__init__(admin.loop, sock)
        self.admin = admin
        self.peer = peer_text(addr)
        self.source = source
        self.parser = HTTPParser(is_request=True, max_head=ADMIN_MAX_HEAD, emit_body=False)
        self.answered = False
        self._timer = admin.loop.call_later(admin.relay.config.head_timeout, self._late)
        self.update()

    def __repr__(self) -> str:
        return "<Admin %s>" % self.peer

    def on_read(self) -> None:
        data = self.read_scratch()
        if data is None:
            return
        for kind, value in self.parser.feed(data):
            if kind == EV_HEAD:
                answer = self.admin.respond(value)
                log.debug("admin %s: %s %s: %s", self.peer, value.method,
                          escape_unprintable(value.target[:MAX_LOGGED_TARGET]),
                          answer[9:12].decode("latin-1"))
                self._answer(answer)
                return
            if kind == EV_ERROR:
                self._answer(http_response(value.status, str(value)))
                return

    def _late(self) -> None:
        if not self.closed:
            self._answer(http_response(408, "The request head did not arrive in time."))

    def _answer(self, data: bytes) -> None:
        self.answered = True
        _AdminAnswer(self.admin, self.detach(), data, self.source)

    def connection_lost(self) -> None:
        self._timer.cancel()
        if not self.answered:
            self.admin.left(self.source)


class _AdminAnswer(Lingering):
    """An admin answer going out (a lingering close): it still counts against the caps."""

    def __init__(self, admin: RelayAdmin, sock: socket.socket, data: bytes,
                 source: str) -> None:
        self.admin = admin
        self.source = source
        super().__init__(admin.loop, sock, data)

    def connection_lost(self) -> None:
        super().connection_lost()
        self.admin.left(self.source)


# =============================================================================
# Client
# =============================================================================


# Query parameters whose values the access log never shows (a Jupyter ?token=, a signed
# URL's X-Amz-Signature=, an OAuth redirect's code=), as Jupyter logs token=[secret]: a
# name (percent-decoded, any case) that ends with one of these words.  Masking a harmless
# "zipcode" costs nothing; printing a secret cannot be undone.
SECRET_QUERY_WORDS = ("token", "key", "password", "passwd", "pwd", "pass", "secret", "sig",
                      "signature", "credential", "code", "auth", "sid", "jwt", "session",
                      "sessionid")
_QUERY_PART_RE = re.compile(r"([^&;=#?]*)(=[^&;#?]*)?")
_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_BRACKETS_RE = re.compile(r"[\[\]]")          # user[password]=, token[]=


def _mask_param(match: "re.Match[str]") -> str:
    name, value = match.group(1), match.group(2)
    if value is None:
        return match.group(0)
    plain = _PERCENT_RE.sub(lambda m: chr(int(m.group(1), 16)), name).lower().strip()
    if any(part.strip().endswith(SECRET_QUERY_WORDS) for part in _BRACKETS_RE.split(plain)):
        return name + "=[secret]"
    return match.group(0)


def logged_target(target: str) -> str:
    """A request target as the access log shows it: secret values masked in the query
    and in a fragment (which a raw request line may carry), cut at MAX_LOGGED_TARGET
    characters."""
    cut = target.find("?")
    hash_at = target.find("#")
    if hash_at >= 0 and (cut < 0 or hash_at < cut):
        cut = hash_at
    if cut >= 0:
        target = target[:cut] + _QUERY_PART_RE.sub(_mask_param, target[cut:])
    if len(target) > MAX_LOGGED_TARGET:
        target = target[:MAX_LOGGED_TARGET] + "..."
    return target


class ClientConfig(Settings):
    NO_FLAG = frozenset({"target_host", "target_port", "relay_host", "relay_port",
                         "handshake_timeout", "backoff_initial", "access_log", "access",
                         "client_secret", "session_budget", "relay_scheme", "target_tls",
                         "target_loopback_fallback"})   # (TARGET, --relay, -q set some)

    target_host: str = "127.0.0.1"
    target_port: int = 5000
    relay_host: str = "localhost"
    relay_port: int = DEFAULT_CONTROL_PORT
    token: str = ""
    subdomain: Optional[str] = None
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    grace: float = GRACE_PERIOD
    access_log: bool = True
    tls: bool = False                       # TLS to the relay's control port
    tls_ca: Optional[str] = None            # verify with this CA file (default: system)
    tls_fingerprint: Optional[str] = None   # or pin the relay certificate's SHA-256
    insecure: bool = False                  # or do not verify at all (warned about)
    user: Optional[str] = None              # user name on a relay with --tokens
    access: Optional[Dict[str, Any]] = None  # visitor access policy (AccessPolicy spec)
    plaintext: bool = False                 # control channel without TLS (warned about)
    tls_interception: bool = False          # a TLS-inspecting middlebox is on the path
    client_secret: Optional[str] = None     # keep one to reclaim a name after a crash
    session_budget: int = SESSION_BUDGET    # receive windows of all streams together
    relay_scheme: str = "tcp"               # tcp (control port), http or https (WebSocket)
    proxy: Optional[str] = None             # proxy URL (default: from the environment)
    no_proxy: bool = False                  # never use a proxy
    proxy_ca: Optional[str] = None          # CA file for an https:// proxy (default: system)
    target_tls: bool = False                # TLS to the target (an https:// TARGET)
    target_insecure: bool = False           # ... without verifying its certificate
    target_ca: Optional[str] = None         # ... verified with this CA file (default: system)
    host_header: Optional[str] = None       # "rewrite" (the target's HOST:PORT) or a Host
    # A bare PORT TARGET: 127.0.0.1, then ::1 if that is refused (servers that listen
    # only where localhost is ::1: Node, Vite); the one that answered is tried first next.
    target_loopback_fallback: bool = False
    inspect: Optional[str] = None           # the request inspector's ADDR (None: off)
    inspect_keep: int = INSPECT_KEEP        # ... and how many requests it keeps

    def validate(self) -> "ClientConfig":
        """Check every setting together, the same for the command line and
        ``tunnel.expose``; raises UsageError naming the flag."""
        if (self.target_insecure or self.target_ca) and not self.target_tls:
            raise UsageError("--target-insecure and --target-ca are for an https:// TARGET")
        if self.target_insecure and self.target_ca:
            raise UsageError("--target-insecure excludes --target-ca")
        if self.host_header is not None and self.host_header.lower() == HOST_HEADER_REWRITE:
            self.host_header = HOST_HEADER_REWRITE          # --host-header Rewrite
        if self.host_header is not None and self.host_header != HOST_HEADER_REWRITE:
            try:
                _host_options({"host_header": self.host_header})
            except RefusedError:
                raise UsageError("--host-header %r: expected 'rewrite' or HOST[:PORT]"
                                 % self.host_header) from None
        if self.host_header == HOST_HEADER_REWRITE:   # what the relay will check: say it now
            try:
                _host_options({"host_header": format_hostport(self.target_host,
                                                              self.target_port)})
            except RefusedError:
                raise UsageError("--host-header rewrite: the TARGET's host %r cannot be "
                                 "sent as a Host (a zone index?): give --host-header HOST"
                                 % self.target_host) from None
        if not self.connect_timeout > 0 or not self.backoff_max > 0:
            raise UsageError("--connect-timeout and --backoff-max must be positive")
        _check_common(self)
        if self.plaintext and self.relay_scheme == "https":
            raise UsageError("--plaintext excludes an https:// relay (use http://HOST:PORT "
                             "for a relay's plain HTTP port)")
        proxy = (self.proxy or "").strip()     # --proxy "": no proxy (curl -x "")
        if proxy and self.no_proxy:
            raise UsageError("--proxy and --no-proxy exclude each other")
        if proxy:
            try:
                parse_proxy_url(proxy)
            except ValueError as exc:
                raise UsageError("invalid --proxy: %s" % exc) from None   # (no password shown)
        if not self.token:
            raise UsageError("no token: pass --token or set TUNNEL_TOKEN (the relay prints "
                             "one)")
        if self.tls_fingerprint:
            try:
                normalize_fingerprint(self.tls_fingerprint)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if self.insecure and (self.tls or self.tls_ca or self.tls_fingerprint):
            raise UsageError("--insecure excludes --tls, --tls-ca and --tls-fingerprint (it "
                             "means no CA or fingerprint check)")
        for flag, cafile in (("--tls-ca", self.tls_ca), ("--proxy-ca", self.proxy_ca),
                             ("--target-ca", self.target_ca)):
            _check_ca_file(flag, cafile)  # a bad file is the user's to fix: say so at once
        if self.tls_interception and not (self.tls or self.tls_ca):
            raise UsageError("--tls-interception needs --tls or --tls-ca: the middlebox's "
                             "certificate must verify")
        if self.plaintext and (self.tls or self.tls_ca or self.tls_fingerprint
                               or self.tls_interception):
            raise UsageError("--plaintext excludes the TLS options")
        if self.subdomain is not None and not valid_name(self.subdomain.lower()):
            raise UsageError("invalid --subdomain %r: use a-z, 0-9 and inner hyphens, 1-63 "
                             "characters" % self.subdomain)
        if self.inspect is not None:
            try:
                parse_inspect_address(self.inspect)
            except ValueError as exc:
                raise UsageError("invalid --inspect %r: %s (expected PORT or HOST:PORT)"
                                 % (self.inspect, exc)) from None
        if (isinstance(self.inspect_keep, bool) or not isinstance(self.inspect_keep, int)
                or not 1 <= self.inspect_keep <= INSPECT_KEEP_MAX):
            raise UsageError("--inspect-keep must be 1 to %d, not %r"
                             % (INSPECT_KEEP_MAX, self.inspect_keep))
        if self.inspect is None and self.inspect_keep != INSPECT_KEEP:
            raise UsageError("--inspect-keep needs --inspect")
        if (self.host_header and self.host_header != HOST_HEADER_REWRITE
                and HOST_HEADER_REWRITE.startswith(self.host_header.lower()[:4])
                and ":" not in self.host_header and "." not in self.host_header):
            log.warning("--host-header %r is sent as the Host itself; for the local "
                        "service's own HOST:PORT say --host-header rewrite",
                        self.host_header)
        return self


_WELCOME_URL_RE = re.compile(r"https?://[A-Za-z0-9.\[\]:-]{1,300}")  # a relay's public URL


def parse_relay(text: str) -> Tuple[str, str, int]:
    """``--relay``: ``HOST[:PORT]`` (the control port) or a URL, ``https://HOST[:PORT]``
    (TLS and WebSocket, 443), ``http://HOST[:PORT]`` (WebSocket, 80), ``wss://`` and
    ``ws://`` as aliases; a URL's path may be empty, ``/`` or WS_PATH.  Returns
    (scheme, host, port), scheme "tcp", "http" or "https"; raises ValueError with the
    reason (which never repeats a user name or password)."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        if "@" in text:
            raise ValueError("the relay address takes no user name or password")
        host, port = parse_hostport(text, default_port=DEFAULT_CONTROL_PORT)
        return "tcp", _relay_host(host), port
    kind = RELAY_SCHEMES.get(scheme.lower())
    if kind is None:
        shown = " '%s'" % scheme if _URL_SCHEME_RE.match(scheme.lower()) else ""
        raise ValueError("unknown scheme%s: use https://, http://, wss://, ws:// or "
                         "HOST:PORT" % shown)
    authority, path = _authority(rest)         # then path, query, fragment
    if "@" in authority:
        raise ValueError("the relay URL takes no user name or password")
    if "?" in path or "#" in path:
        raise ValueError("the relay URL takes no query or fragment")
    if path not in ("", "/", WS_PATH, WS_PATH + "/"):
        raise ValueError("the relay URL takes no path (its WebSocket path is %s)" % WS_PATH)
    if not authority:
        raise ValueError("no host")
    host, port = parse_hostport(authority, default_port=RELAY_DEFAULT_PORTS[kind])
    return kind, _relay_host(host), port


def relay_text_shown(text: str) -> str:
    """A --relay value as error messages show it: escaped, a URL's ``user:pass@`` cut."""
    return escape_unprintable(_RELAY_USERINFO_RE.sub(r"\1", text.strip()))


def _relay_host(host: str) -> str:
    """A host name or address a request line can carry (no spaces, controls, '@')."""
    if len(host) > MAX_HOST_NAME or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host) or (
            ":" not in host and any(len(label) > MAX_HOST_LABEL for label in host.split("."))):
        raise ValueError("'%s' is not a host name or address" % escape_unprintable(host))
    return host


class TargetConn(Pipe):
    """Client side of a stream: a connection to the local service.  Its socket comes from
    a Dialer; until then (``connecting``) what the stream sends is kept in ``out``."""

    def __init__(self, client: "Client", stream: Stream, info: Dict[str, Any]) -> None:
        cfg = client.config
        self.client = client
        self.target = format_hostport(cfg.target_host, cfg.target_port)
        self.connecting = True
        self.failed = False
        self.first_read = True      # the origin's first bytes: a TLS alert is a hint
        super().__init__(client.loop, None)
        self.on_socket_data = self._first_data     # type: ignore[assignment]
        self.stream = stream
        stream.handler = self
        self.peer = str(info.get("peer", "?"))
        addrs = client.loopback_addresses()
        retry_on = None if addrs is None else CONNECT_RETRY_ERRNOS
        self.dialer: Optional[Dialer] = Dialer(self.loop, cfg.target_host, cfg.target_port,
                                               client.target_stages(), cfg.connect_timeout,
                                               self._dialed, self._dial_failed, addrs=addrs,
                                               retry_on=retry_on)

    def __repr__(self) -> str:
        return "<Target %s stream %s>" % (self.target, self.stream.id if self.stream else "-")

    def wants_read(self) -> bool:
        return not self.connecting and super().wants_read()

    def _dialed(self, sock: Any) -> None:
        self.dialer = None
        if self.client.loopback is not None:
            self.client.loopback_answered(sock.family)
        if self.closed:             # the stream went first
            sock.close()
            return
        set_nodelay(sock)
        self.connecting = False
        if hasattr(sock, "unsent"):     # a TLSChannel: an https:// target
            self.wants_write = self._tls_wants_write    # type: ignore[assignment]
            self.on_write = self._tls_on_write          # type: ignore[assignment]
        self.attach(sock)
        if self.out:
            self.on_write()
        elif self.shutdown_pending:
            self.shutdown_pending = False
            self._shutdown_write()

    def _dial_failed(self, why: str, kind: str) -> None:
        self.dialer = None
        if kind == DIAL_FATAL and "TLS handshake failed" in why:
            why += (" (a local server with a self-signed certificate: expose "
                    "--target-insecure, or --target-ca FILE)")
        elif kind == DIAL_TLS_FAILED and (TLS_NOT_SPOKEN in why or TLS_GOT_HTTP in why):
            why += " (the local service does not speak HTTPS: use an http:// TARGET)"
        if why.startswith("cannot resolve "):      # the Dialer's words name the host only
            why = "%s: %s" % (self.target, why)
        elif (kind == DIAL_UNREACHABLE and why.endswith("connection refused")
              and self.client.config.target_host == "localhost"):
            port = self.client.config.target_port    # Node and Vite may listen on ::1 only
            why += (" (a server listening on ::1 only? TARGET %d tries 127.0.0.1, then "
                    "[::1]:%d)" % (port, port))
        if not self.closed:
            self._connect_failed("could not connect to %s" % why)

    # TLS to the target (an https:// TARGET): a TLSChannel may hold ciphertext its
    # socket did not take when ``out`` is empty; that is output to wait for too.  (Bound
    # in _dialed for such targets only: plain ones keep Pipe's, on the hot path.)
    def _tls_wants_write(self) -> bool:
        return bool(self.out) or bool(self.sock.unsent)

    def _tls_on_write(self) -> None:
        if not self.out and self.sock.unsent:
            try:
                self.sock.push()
            except OSError as exc:
                self.on_socket_error(exc)
                return
            self.update()
            return
        Pipe.on_write(self)

    def _first_data(self, data: memoryview) -> None:
        """on_socket_data for the origin's first bytes only (then the class's again)."""
        del self.on_socket_data
        if self.first_read:
            self.first_read = False
            if (not self.tls and data[:len(TLS_ALERT_RECORD)] == TLS_ALERT_RECORD
                    and self.stream is not None and self.stream.can_send):
                # A TLS server answers plain HTTP with an alert record: say what to use.
                self._connect_failed("the local service at %s speaks HTTPS: expose "
                                     "https://%s (with --target-insecure for a self-signed "
                                     "certificate)" % (self.target, self.target))
                return
            if (data[:len(HTTP_RESPONSE_START)] != HTTP_RESPONSE_START[:len(data)]
                    and self.stream is not None and self.stream.can_send):
                # Not HTTP at all (an SSH or database port): a 502 that says so, rather
                # than the bytes themselves for the visitor's browser to choke on.
                shown = bytes(data[:NOT_HTTP_SHOWN]).decode("ascii", "backslashreplace")
                self._connect_failed("the local service at %s did not answer with HTTP (its "
                                     "first bytes: %s)" % (self.target,
                                                           escape_unprintable(shown)))
                return
        self.on_socket_data(data)

    def _closed_unanswered(self) -> bool:
        """Closed (or reset) at the first request without a byte: what a TLS server that
        reads plain HTTP does (OpenSSL sends no alert for a bad first record; Python's
        ssl servers and Jupyter reset).  Then a 502 that says so; True if it was that."""
        if (self.first_read and not self.tls and self.out_sent and self.stream is not None
                and self.stream.can_send):
            self._connect_failed("the local service at %s closed the connection without a "
                                 "response; if it speaks HTTPS, expose https://%s (with "
                                 "--target-insecure for a self-signed certificate)"
                                 % (self.target, self.target))
            return True
        return False

    def on_socket_eof(self) -> None:
        if not self._closed_unanswered():
            super().on_socket_eof()

    def on_socket_error(self, exc: OSError) -> None:
        if exc.errno != errno.ECONNRESET or not self._closed_unanswered():
            super().on_socket_error(exc)

    def mid_message(self, data: memoryview) -> bool:
        # The client does not parse responses, but the usual small one arrives whole in
        # one read; an ACK segment (and a system call) for each of those is a real cost.
        return not whole_response(data)

    def send_bytes(self, data: Any, credited: bool) -> None:
        if self.connecting and not self.failed:
            self.out += data
            if credited:
                self.counted += len(data)
            return
        if self.failed:  # the visitor already has its 502; discard what follows
            if credited and self.stream is not None:
                self.stream.consumed(len(data))
            return
        super().send_bytes(data, credited)

    def shutdown_after_flush(self) -> None:
        if self.failed:
            return
        if self.connecting:
            self.shutdown_pending = True
            return
        super().shutdown_after_flush()

    def _connect_failed(self, why: str) -> None:
        self.failed = True
        self.connecting = False
        log.warning("stream %d: %s", self.stream.id if self.stream else 0, why)
        self.out.clear()
        stream = self.stream
        if stream is not None and stream.can_send:
            if self.counted:
                stream.consumed(self.counted)
            stream.write(http_response(502, why))
            stream.close_write()
        self.counted = 0
        self.close_socket()

    def on_stream_data(self, stream: Stream, data: bytes) -> None:
        self.send_bytes(data, True)

    def on_stream_reset(self, stream: Stream, reason: str) -> None:
        if self.failed:
            return
        self.close_socket()

    def connection_lost(self) -> None:
        if self.dialer is not None:
            self.dialer.abort_quietly()
            self.dialer = None
        self.client.targets.discard(self)
        super().connection_lost()


class Client(Side):
    """The private side: keeps a session to the relay and serves its streams."""

    def __init__(self, config: ClientConfig, loop: Optional[EventLoop] = None,
                 output: Callable[[str], None] = print,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        """``environ``: where proxy variables are read (default: os.environ); a
        malformed proxy URL raises TunnelError."""
        self.config = config
        default = RELAY_DEFAULT_PORTS.get(config.relay_scheme)
        if default is None:
            self.relay_text = format_hostport(config.relay_host, config.relay_port)
        else:
            self.relay_text = "%s://%s" % (config.relay_scheme, (
                format_hostport(config.relay_host, config.relay_port)
                if config.relay_port != default else "[%s]" % config.relay_host
                if ":" in config.relay_host else config.relay_host))
        env: Mapping[str, str] = os.environ if environ is None else environ
        try:
            self.proxy, self.route = proxy_for(
                config.relay_scheme, config.relay_host, config.relay_port,
                env, config.proxy, config.no_proxy)
        except ValueError as exc:
            raise TunnelError(str(exc)) from None
        notice = unused_proxy_variable(config.relay_scheme, env, config.proxy,
                                       config.no_proxy)
        if notice:
            log.info("%s", notice)
        if config.proxy_ca and (self.proxy is None or self.proxy.scheme != "https"):
            log.warning("--proxy-ca is unused: no https:// proxy is in play (the relay's "
                        "own CA goes in --tls-ca)")
        self.loop = loop or EventLoop()
        self.output = output
        self.client_secret = (config.client_secret     # sealed: binds its name reservation
                              or secrets.token_hex(CLIENT_SECRET_BYTES))
        self.binding = ""                    # SHA-256 of the relay certificate last seen
        self._warned_plaintext = False
        self._target_errors = Throttle()     # EMFILE and the like, per stream: one line
        self.session: Optional[Session] = None
        self.targets: set = set()
        self.name: Optional[str] = config.subdomain.lower() if config.subdomain else None
        self.url: Optional[str] = None
        self.exit_code = EXIT_OK
        self.error: Optional[str] = None
        self.failure: Optional[BaseException] = None   # what ended it (tunnel.expose raises)
        self.last_failure = ""               # why the last attempt to reach the relay failed
        self.unreachable = False             # ... refused or not resolvable (a wrong --relay)
        self.failures = 0                    # attempts that failed, all told
        self.on_record: Optional[Callable[[Dict[str, Any]], None]] = None   # API: each LOG
        self.attempt = 0
        self.stopping = False
        self.ready = threading.Event()
        self.up_count = 0                    # sessions established so far
        self.changed = threading.Condition()  # notified when the session goes up or down
        self._connector: Optional[Dialer] = None
        self._tls_context: Any = None
        self._target_tls_context: Any = None
        self.loopback: Optional[List[Any]] = None   # a bare PORT's addresses, see below
        self.loopback_family: Optional[int] = None  # AF_INET once 127.0.0.1 answered
        self._v6_said = False                       # the ::1 fallback's warning, once
        self._hinted = False
        self._relay_hinted = False           # "is the relay running?" said once
        self._ban_logged = False             # REFUSED_BANNED said once per ban
        self._refusals = (0, "")             # same upgrade refusal, how many times in a row
        self._reconnect_timer: Optional[Timer] = None
        self.console = AccessConsole(self.loop, output)   # the access log's lines
        self.up_since: Optional[float] = None    # when the session now up came up (epoch)
        self.inspector: Optional[Inspector] = None   # --inspect: made when the loop starts
        self.session_config = SessionConfig(heartbeat_interval=config.heartbeat_interval,
                                            heartbeat_timeout=config.heartbeat_timeout,
                                            handshake_timeout=config.handshake_timeout,
                                            window_budget=config.session_budget)

    @property
    def target_url(self) -> str:
        return "%s://%s" % ("https" if self.config.target_tls else "http",
                            format_hostport(self.config.target_host, self.config.target_port))

    def target_stages(self) -> List[DialStage]:
        """The way to the target: TCP, and TLS for an https:// TARGET (SNI and the check
        against its host; --target-insecure: no check; --target-ca: that CA)."""
        cfg = self.config
        if not cfg.target_tls:
            return []
        if self._target_tls_context is None:
            ssl = load_ssl()
            if cfg.target_insecure:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = trusting_context(cfg.target_ca)
            self._target_tls_context = ctx
        return [DialStage(DIAL_TLS, self._target_tls_context, cfg.target_host, False)]

    def loopback_addresses(self) -> Optional[List[Any]]:
        """target_loopback_fallback (a bare PORT): 127.0.0.1's addresses, then ::1's (the
        Dialer tries the next only when one is refused), until 127.0.0.1 has answered;
        from then on 127.0.0.1 alone, so that while the service is down nobody else
        listening on ::1 gets its visitors.  None otherwise (the Dialer resolves the
        target's host)."""
        cfg = self.config
        if not cfg.target_loopback_fallback:
            return None
        if self.loopback is None:
            found: List[Any] = []
            for host in LOOPBACK_HOSTS:
                try:
                    found += resolve(host, cfg.target_port)
                except OSError:         # no IPv6 at all: 127.0.0.1 alone
                    pass
            self.loopback = found
        if self.loopback_family is None:
            return self.loopback
        return [info for info in self.loopback if info[0] == self.loopback_family]

    def loopback_answered(self, family: int) -> None:
        """A bare PORT's target connection was made over ``family``.  127.0.0.1: that
        address alone from now on.  ::1 (127.0.0.1 refused): said once, and 127.0.0.1
        is still tried first for every connection (a refusal costs microseconds), so a
        service that starts on 127.0.0.1 later gets its visitors back from whoever
        listened on ::1 while it was down."""
        if self.loopback_family is not None:
            return
        if family == socket.AF_INET:
            self.loopback_family = family
        elif not self._v6_said:
            self._v6_said = True
            port = self.config.target_port
            log.warning("127.0.0.1:%d refused the connection and [::1]:%d answered: "
                        "forwarding there while 127.0.0.1:%d refuses (TARGET [::1]:%d "
                        "says so)", port, port, port, port)

    # -- lifecycle -------------------------------------------------------------------
    def _starting(self) -> None:
        if self.config.inspect is not None:
            inspector = Inspector(self, self.config.inspect, self.config.inspect_keep)
            try:
                inspector.start()
            except OSError as exc:
                why = "cannot listen on --inspect %s: %s" % (self.config.inspect,
                                                             describe_oserror(exc))
                self.fatal(EXIT_FAILURE, why, ListenError(why))
                return
            self.inspector = inspector
        self.loop.call_soon(self.connect)

    def _drain(self, grace: float) -> None:
        """Go-away to the relay, let open streams finish, stop."""
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
        session = self.session
        if session is None or session.closed:
            self.loop.stop()
            return
        session.go_away("client shutting down")
        if session.streams:
            log.info("waiting for %d open connection%s to finish, up to %.0fs; Ctrl-C again "
                     "to quit", len(session.streams), "" if len(session.streams) == 1
                     else "s", grace)
        self.loop.stop_when(lambda: not session.streams or session.closed, grace,
                            lambda: session.close_after_flush("client shut down"))

    def connect(self) -> None:
        if self.stopping:
            return
        cfg = self.config
        log.info("connecting to relay %s: %s%s", self.relay_text, self.route,
                 ", attempt %d" % (self.attempt + 1) if self.attempt else "")
        proxy = self.proxy
        if proxy is not None:
            host, port, where = proxy.host, proxy.port, "proxy %s" % proxy.where
        else:
            host, port, where = cfg.relay_host, cfg.relay_port, ""
        self._connector = Dialer(self.loop, host, port, self._relay_stages(),
                                 cfg.connect_timeout, self._relay_dialed, self._relay_failed,
                                 where=where)

    def _relay_stages(self) -> List[DialStage]:
        """The way to the relay: [TLS to an https:// proxy], CONNECT or SOCKS through
        the proxy, then by --relay's form: control port: TLS (the channel); https://:
        TLS (the channel), WebSocket; http://: WebSocket, TLS inside it (the channel).
        --plaintext drops the channel's TLS."""
        cfg = self.config
        stages: List[DialStage] = []
        relay = format_hostport(cfg.relay_host, cfg.relay_port)
        proxy = self.proxy
        if proxy is not None:
            if proxy.scheme == "https":
                stages.append(DialStage(DIAL_TLS, self.proxy_tls_context(), proxy.host, False,
                                        "proxy %s" % proxy.where))
            kind = DIAL_SOCKS if proxy.scheme.startswith("socks") else DIAL_CONNECT
            stages.append(DialStage(kind, proxy, cfg.relay_host, cfg.relay_port))
        channel = [] if cfg.plaintext else [
            DialStage(DIAL_TLS, self.tls_context(), cfg.relay_host, True, relay)]
        if cfg.relay_scheme == "tcp":
            return stages + channel
        default = RELAY_DEFAULT_PORTS[cfg.relay_scheme]
        host_header = (format_hostport(cfg.relay_host, cfg.relay_port)
                       if cfg.relay_port != default else
                       "[%s]" % cfg.relay_host if ":" in cfg.relay_host else cfg.relay_host)
        url = self.relay_text + WS_PATH
        if cfg.relay_scheme == "https":
            return stages + channel + [DialStage(DIAL_WEBSOCKET, host_header, WS_PROTOCOL,
                                                 url, relay)]
        return stages + [DialStage(DIAL_WEBSOCKET, host_header, WS_PROTOCOL if cfg.plaintext
                                   else WS_PROTOCOL_TLS, url, relay)] + channel

    def proxy_tls_context(self) -> Any:
        """TLS to an https:// proxy: verified against the system store (or --proxy-ca),
        with its host name checked, always."""
        ssl = load_ssl()
        ctx = trusting_context(self.config.proxy_ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def tls_context(self) -> Any:
        """The client's TLS context, built once: the system store (--tls), a CA file
        (--tls-ca), or no CA at all (the default: the handshake's channel binding proves
        the relay, and --tls-fingerprint pins its certificate on top)."""
        if self._tls_context is None:
            ssl = load_ssl()
            cfg = self.config
            if cfg.tls or cfg.tls_ca:
                ctx = trusting_context(cfg.tls_ca)
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls_context = ctx
        return self._tls_context

    def _relay_dialed(self, sock: Any) -> None:
        dialer, self._connector = self._connector, None
        if not self.config.plaintext:
            der = dialer.peer_der if dialer is not None else b""
            wanted = self.config.tls_fingerprint
            if wanted:
                got = cert_fingerprint(der)
                if got != normalize_fingerprint(wanted):
                    sock.close()
                    self.fatal(EXIT_USAGE, "relay certificate fingerprint %s does not match "
                               "--tls-fingerprint" % got)
                    return
            self.binding = binding_of(der)
        self._connected(sock)

    def _relay_failed(self, why: str, kind: str) -> None:
        self._connector = None
        at_proxy = why.startswith("proxy ")    # the Dialer's ``where`` of the proxy's stages
        if kind == DIAL_FATAL:
            if "certificate verify failed" in why or "CERTIFICATE_VERIFY_FAILED" in why:
                why = "could not verify the %s's certificate: %s" % (
                    "proxy" if at_proxy else "relay", why)
                if at_proxy and not self.config.proxy_ca:
                    why += "; pass its CA with --proxy-ca FILE"
                elif not at_proxy and "self-signed" in why and not self.config.tls_ca:
                    why += ("; a relay's own certificate passes no CA check: leave out "
                            "--tls (the handshake proves the relay), or pin it with "
                            "--tls-fingerprint as serve printed it")
            self.fatal(EXIT_USAGE, why)
            return
        first = self.url is None
        if (kind == DIAL_TLS_FAILED and not at_proxy and first and not self._hinted
                and (TLS_NOT_SPOKEN in why or TLS_GOT_HTTP in why)):
            self._hinted = True   # once: the bytes that came back were not TLS at all
            log.warning("the relay's port does not speak TLS: a --plaintext relay's control "
                        "port (pass --plaintext), or its plain HTTP port (use --relay "
                        "http://HOST:PORT)")
        if kind == DIAL_TLS_FAILED and TLS_GOT_HTTP in why and not at_proxy:
            kind = DIAL_REFUSED             # an HTTP port's answer, the same each time
        if kind == DIAL_REFUSED:
            # Never up: the URL is wrong or the relay is set up otherwise.  But the answer
            # is not authenticated (a proxy or captive portal may have written it), so
            # only the same one UPGRADE_REFUSALS_FATAL times in a row ends the client.
            same = self._refusals[0] + 1 if self._refusals[1] == why else 1
            self._refusals = (same, why)
            if self.url is None and same >= UPGRADE_REFUSALS_FATAL:
                self.fatal(EXIT_USAGE, why, ConnectionError(why))
                return
            kind = DIAL_RETRY
        else:
            self._refusals = (0, "")
        if (kind == DIAL_TLS_FAILED and self.config.relay_scheme == "tcp"
                and first and not self._hinted):
            self._hinted = True   # once: a relay that drops TLS may be plain or busy
            log.warning("TLS to the relay failed; if it runs with --plaintext, pass "
                        "--plaintext here too")
        if first and not at_proxy and why.endswith(
                "connection closed during %s" % DIAL_STAGES[DIAL_WEBSOCKET]):
            why += " (is that the relay's control port? then use --relay HOST:PORT)"
        elif (first and not at_proxy and self.config.relay_scheme == "http"
              and "connection reset by peer during" in why):
            why += " (is that an HTTPS port? then use --relay https://HOST:PORT)"
        self._connect_failed(why, unreachable=kind == DIAL_UNREACHABLE and self.proxy is None)

    def _connected(self, sock: Any) -> None:
        self._connector = None
        cfg = self.config
        if cfg.plaintext and not self._plaintext_ok(sock):
            return
        request: Dict[str, Any] = {"subdomain": self.name,
                                   "version": __version__, "log": cfg.access_log,
                                   "log_upgrades": True, "log_batch": True,
                                   "binding": "" if cfg.plaintext else self.binding}
        if cfg.user:
            request["user"] = cfg.user
        if cfg.tls_interception and not cfg.plaintext:
            request["tls_interception"] = True
        if cfg.host_header == HOST_HEADER_REWRITE:
            request["host_header"] = format_hostport(cfg.target_host, cfg.target_port)
            request["target_origin"] = self.target_url
        elif cfg.host_header:
            request["host_header"] = cfg.host_header
        sealed = {"client_secret": self.client_secret, "access": cfg.access or None}
        handshake = ClientHandshake(cfg.token, request, sealed=sealed)
        self.session = Session(self.loop, sock, self.relay_text, handshake, self,
                               is_relay=False, config=self.session_config,
                               quickack=self.proxy is not None or cfg.relay_scheme != "tcp")

    def _plaintext_ok(self, sock: Any) -> bool:
        """--plaintext: warn once when the session leaves loopback, and never send
        visitor-protection secrets that way (the caller stops if this says no)."""
        try:
            peer = sock.getpeername()[0]
        except (OSError, IndexError):
            peer = ""
        if self.proxy is not None and not is_loopback(self.config.relay_host):
            peer = self.config.relay_host       # the bytes go on from the proxy
        if is_loopback(peer):
            return True
        access = self.config.access or {}
        if access.get("basic_auth") or access.get("visitor_token_sha256"):
            sock.close()
            self.fatal(EXIT_USAGE, "--plaintext to a relay that is not on loopback (%s): "
                       "visitor credentials (--basic-auth, --visitor-token) are not sent "
                       "over plain TCP; drop --plaintext" % peer)
            return False
        if not self._warned_plaintext:
            self._warned_plaintext = True
            log.warning("--plaintext: the control channel to %s is not encrypted; anyone on "
                        "the path can read and change this tunnel's traffic", peer)
        return True

    def _connect_failed(self, why: str, unreachable: bool = False) -> None:
        """``unreachable``: refused or not resolvable, likely a wrong --relay."""
        self._connector = None
        log.warning("could not reach the relay: %s", why)
        with self.changed:
            self.last_failure, self.unreachable = why, unreachable
            self.failures += 1
            self.changed.notify_all()
        if unreachable and self.url is None and not self._relay_hinted:
            self._relay_hinted = True
            if self.config.relay_scheme == "tcp":
                log.warning("is the relay running? check --relay HOST:PORT (the control "
                            "port, %d by default)", DEFAULT_CONTROL_PORT)
            else:
                log.warning("is the relay running? check --relay %s (the relay's visitor "
                            "port)", self.relay_text)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self.stopping:
            self.loop.stop()
            return
        delay = min(self.config.backoff_max, self.config.backoff_initial * (2 ** self.attempt))
        delay *= 1.0 - random.uniform(0, BACKOFF_JITTER)
        self.attempt = min(self.attempt + 1, 30)
        log.info("reconnecting in %.1fs", delay)
        self._reconnect_timer = self.loop.call_later(delay, self.connect)

    # -- session events ---------------------------------------------------------------
    def on_session_up(self, session: Session) -> None:
        welcome = session.handshake.welcome
        url, name = welcome.get("url"), welcome.get("name")
        if not (isinstance(url, str) and _WELCOME_URL_RE.fullmatch(url)
                and isinstance(name, str) and valid_name(name)):   # printed and returned
            raise ProtocolError("WELCOME with a malformed url or name: %s" % escape_unprintable(
                repr((url, name)))[:MAX_REFUSAL_TEXT])
        self.name = session.name = name
        self.attempt = 0
        self._ban_logged = False
        self.up_since = time.time()
        if url != self.url:
            self.url = url
            self.output("Forwarding %s -> %s" % (url, self.target_url))
            if self.inspector is not None:      # as the issue spells it (contract)
                self.output("Inspect   %s" % self.inspector.url)
        log.info("tunnel up: %s -> %s", url, self.target_url)
        with self.changed:
            self.up_count += 1
            self.ready.set()
            self.changed.notify_all()

    def on_session_closed(self, session: Session, reason: str,
                          error: Optional[BaseException]) -> None:
        if session is self.session:
            self.session = None
            self.up_since = None
        with self.changed:
            self.ready.clear()
            if not session.established:     # why, for tunnel.expose's TimeoutError
                self.last_failure = ("relay refused: %s" % error
                                     if isinstance(error, RefusedError) else reason)
            self.changed.notify_all()
        code = (REFUSED_AUTH if isinstance(error, AuthError) else
                error.code if isinstance(error, RefusedError) else None)
        if code is not None:
            refusal = REFUSALS.get(code, UNKNOWN_REFUSAL)
            if refusal.action == REFUSE_STOP or (refusal.action == REFUSE_FIRST
                                                 and self.url is None):
                self.fatal(refusal.exit_status, self._refusal_text(code, error),
                           None if code == REFUSED_BINDING else error)
                return
            if code != REFUSED_BANNED or not self._ban_logged:
                log.warning("relay refused: %s", error)
            else:                            # the same ban, seen again by a retry
                log.debug("relay refused: %s", error)
            self._ban_logged = code == REFUSED_BANNED
        if self.stopping:
            self.loop.stop()
            return
        cfg = self.config
        if (not session.established and error is None and self.url is None
                and not self._hinted and cfg.plaintext):
            self._hinted = True   # once: a busy relay closes early too
            log.warning("the relay closed the connection during the handshake; its control "
                        "port speaks TLS unless it runs with --plaintext: drop --plaintext")
        elif (not session.established and self.url is None and not self._hinted
                and cfg.relay_scheme == "tcp" and (isinstance(error, ProtocolError)
                                                   or reason.startswith("handshake timed out"))):
            self._hinted = True   # once: an HTTP answer, or silence, where frames should be
            log.warning("is that the relay's visitor port? use --relay http://HOST:PORT or "
                        "https://HOST:PORT")
        if session.goaway_received:
            self.attempt = 0
        self._schedule_reconnect()

    def _refusal_text(self, code: str, error: Optional[BaseException]) -> str:
        """The line a refusal that ends the client prints."""
        if code == REFUSED_BINDING and self.config.plaintext:
            return "the relay requires TLS (it does not run --plaintext): drop --plaintext"
        if code == REFUSED_BINDING:
            return ("the relay did not see the TLS certificate this client saw (SHA-256 "
                    "%s): a man in the middle, or a TLS-terminating proxy or TLS-inspecting "
                    "middlebox on the path (a TLS proxy or load balancer in front of the "
                    "relay: serve --tls-proxy-fingerprint; a TLS-inspecting middlebox: "
                    "expose --tls-interception; the relay says: %s)"
                    % (fingerprint_text(self.binding), error))
        return str(error)

    def fatal(self, code: int, message: str, error: Optional[BaseException] = None) -> None:
        """Stop for good: ``code`` is the exit status, ``message`` main()'s last line on
        stderr, ``error`` what tunnel.expose raises (default: a TunnelError)."""
        self.exit_code = code
        self.error = message
        self.stopping = True
        self.loop.stop()
        with self.changed:
            self.failure = error or TunnelError(message)
            self.changed.notify_all()

    def on_stream_open(self, session: Session, stream: Stream, info: Dict[str, Any]) -> None:
        if self.stopping:
            stream.reset("client shutting down")
            return
        log.debug("stream %d from %s", stream.id, info.get("peer"))
        try:
            if self.inspector is None:
                target = TargetConn(self, stream, info)
            else:
                target = InspectedTarget(self, stream, info, self.inspector)
        except OSError as exc:      # no socket to be had (EMFILE): this stream only
            self._target_errors.warn("stream %d: cannot open a connection to the target: "
                                     "%s", stream.id, describe_oserror(exc))
            stream.reset("the tunnel's client cannot open a connection: %s"
                         % describe_oserror(exc))
            return
        if not target.closed:
            self.targets.add(target)

    def on_goaway(self, session: Session, reason: str) -> None:
        pass

    def on_access_log(self, session: Session, record: Dict[str, Any]) -> None:
        if self.on_record is not None:
            self.on_record(record)
        if self.config.access_log:
            self.console.record(record)

    def on_access_batch(self, session: Session, records: List[Tuple[int, int, int, int]],
                        payload: bytes, at: int) -> None:
        """While the console is summarizing and no API callback wants records, a
        record is a count: no dict, no text decoded."""
        if self.on_record is None and self.config.access_log and self.console.count(records):
            return
        SessionDelegate.on_access_batch(self, session, records, payload, at)

    def stats(self) -> Dict[str, int]:
        session = self.session
        return {"streams": len(session.streams) if session else 0, "targets": len(self.targets)}


# =============================================================================
# Inspector (expose --inspect: the requests through the tunnel, on a local page)
# =============================================================================
#
# With --inspect, every stream's TargetConn is an InspectedTarget, which hands a copy of
# both directions to an InspectCapture: a request HTTPParser and a response one, fed the
# very bytes the origin and the stream get (nothing on the wire changes; a parse error
# only ends the capture of that connection), make an InspectEntry per request with its
# heads and the first INSPECT_BODY_LIMIT bytes of each body (chunked framing removed;
# a WebSocket's frames counted from their headers).  The Inspector keeps the last
# --inspect-keep entries and serves one inline page and a JSON API from the client's
# own loop (InspectorConn), and replays a request to the target through the client's
# own dialer (ReplayConn).  Without --inspect none of it exists: TargetConn runs as it
# was.  The page holds secrets (the visitors' cookies and tokens): it answers only to
# its own address in Host (DNS rebinding), refuses cross-site API requests (Origin,
# Sec-Fetch-Site) and replays without a JSON body (no form can send one), and renders
# captured text as text only (textContent, a CSP without inline handlers).  The usual
# request (a head, or a head and its small body, in one DATA frame) and response (whole in
# one read) are taken in one step each, as HTTPParser's own fast path does; the rest goes
# through the parsers (InspectCodecTest checks that both make the same entries).

def parse_inspect_address(text: str) -> Tuple[str, int]:
    """--inspect ADDR: ``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` (host 127.0.0.1 by
    default; port 0: a free one); raises ValueError."""
    text = text.strip()
    zero = text == "0" or (text.endswith(":0") and not text.endswith("::0"))
    host, port = parse_hostport(text[:-1] + "1" if zero else text, default_host=LOOPBACK_BIND)
    return host, 0 if zero else port


def _keep(buf: bytearray, data: Any) -> None:
    """Append to a captured body what fits within INSPECT_BODY_LIMIT."""
    room = INSPECT_BODY_LIMIT - len(buf)
    if room > 0:
        buf += data[:room]


def _is_chunked(head: bytes) -> bool:
    """Is a response head's body chunked (as HTTPParser frames it)?"""
    codings = _list_tokens(_framing_fields(_FRAMING_RE.findall(head.lower()))[0])
    return bool(codings) and codings[-1] == "chunked"


_C_SIZE, _C_DATA, _C_DATA_END, _C_TRAILER, _C_DONE = range(5)   # ChunkDecoder states


class ChunkDecoder:
    """The data of a chunked body whose framing an HTTPParser has checked: ``feed(raw)``
    (its EV_BODY bytes) keeps the first ``keep`` bytes of data in ``data`` and counts
    all of them in ``size``; chunk data is skipped by its length, only the chunk lines
    are read.  Pure: bytes in, nothing out."""

    __slots__ = ("data", "keep", "size", "_left", "_line", "_state")

    def __init__(self, data: bytearray, keep: int = INSPECT_BODY_LIMIT) -> None:
        self.data = data
        self.keep = keep
        self.size = 0
        self._left = 0
        self._line = bytearray()
        self._state = _C_SIZE

    def feed(self, raw: Any) -> None:
        mv = memoryview(raw)
        pos, end = 0, len(mv)
        while pos < end and self._state != _C_DONE:
            if self._state == _C_DATA:
                n = min(self._left, end - pos)
                room = self.keep - len(self.data)
                if room > 0:
                    self.data += mv[pos:pos + min(n, room)]
                self.size += n
                self._left -= n
                pos += n
                if not self._left:
                    self._state = _C_DATA_END
                continue
            piece = bytes(mv[pos:pos + MAX_CHUNK_LINE + 2])
            i = piece.find(b"\n")
            if i < 0:
                self._line += piece
                pos += len(piece)
                if len(self._line) > MAX_CHUNK_LINE + MAX_TRAILER_SIZE:
                    self._state = _C_DONE       # not what the parser let through: stop
                continue
            line = (bytes(self._line) + piece[:i]).rstrip(b"\r")
            self._line.clear()
            pos += i + 1
            if self._state == _C_SIZE:
                try:
                    size = int(line.split(b";", 1)[0].strip(b" \t"), 16)
                except ValueError:
                    self._state = _C_DONE
                    continue
                self._left = size
                self._state = _C_DATA if size else _C_TRAILER
            elif self._state == _C_DATA_END:
                self._state = _C_SIZE
            elif not line:                      # the empty line after the trailers
                self._state = _C_DONE


class WSFrameCounter:
    """One direction of an upgraded connection: its bytes and, for a WebSocket, its
    frames and messages (a data frame with FIN ends one), read from the frame headers
    alone (payloads are skipped by their length, never unmasked)."""

    __slots__ = ("websocket", "bytes", "frames", "messages", "capped", "_head", "_skip")

    def __init__(self, websocket: bool) -> None:
        self.websocket = websocket
        self.bytes = 0
        self.frames = 0
        self.messages = 0
        self.capped = False     # INSPECT_MAX_WS_FRAMES counted: bytes only from then on
        self._head = bytearray()
        self._skip = 0

    def feed(self, data: Any) -> None:
        self.bytes += len(data)
        if not self.websocket:
            return
        mv = memoryview(data)
        pos, end = 0, len(mv)
        head = self._head
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                continue
            if self.frames >= INSPECT_MAX_WS_FRAMES:   # a flood of tiny frames costs the
                self.websocket, self.capped = False, True   # loop every visitor shares
                return
            if not head and end - pos >= 2:     # a whole header in this read: at once
                first, second = mv[pos], mv[pos + 1]
                size = self._head_size(second)
                if end - pos >= size:
                    length = second & WS_LENGTH_BITS
                    if length == WS_LENGTH_16:
                        length = WS_U16.unpack_from(mv, pos + 2)[0]
                    elif length == WS_LENGTH_64:
                        length = WS_U64.unpack_from(mv, pos + 2)[0]
                    pos += size
                    self.frames += 1
                    if first & WS_FIN and first & WS_OPCODE_BITS < WS_CONTROL:
                        self.messages += 1
                    self._skip = length
                    continue
            while pos < end:                    # a header cut by the read: byte by byte
                head.append(mv[pos])
                pos += 1
                if len(head) >= 2 and len(head) == self._head_size(head[1]):
                    break
            else:
                if len(head) < 2 or len(head) < self._head_size(head[1]):
                    return
            length = head[1] & WS_LENGTH_BITS
            if length == WS_LENGTH_16:
                length = WS_U16.unpack_from(head, 2)[0]
            elif length == WS_LENGTH_64:
                length = WS_U64.unpack_from(head, 2)[0]
            self.frames += 1
            if head[0] & WS_FIN and head[0] & WS_OPCODE_BITS < WS_CONTROL:
                self.messages += 1
            self._skip = length
            head.clear()

    @staticmethod
    def _head_size(second: int) -> int:
        length = second & WS_LENGTH_BITS
        return (2 + (2 if length == WS_LENGTH_16 else 8 if length == WS_LENGTH_64 else 0)
                + (WS_MASK_KEY_SIZE if second & WS_MASKED else 0))


class _HeadKeepingParser(HTTPParser):
    """A response parser that also keeps every head it reads (``heads``, in order): the
    relay's keeps only the status."""

    def __init__(self) -> None:
        super().__init__(False, INSPECT_MAX_HEAD)
        self.heads: Deque[Tuple[bytes, bool]] = collections.deque()   # (head, chunked)

    def _on_response_head(self, head: bytes, events: List[Tuple[str, Any]]) -> None:
        self.heads.append((head, _is_chunked(head)))
        HTTPParser._on_response_head(self, head, events)

    def _feed_whole_response(self, data: bytes, events: List[Tuple[str, Any]]) -> bool:
        if not HTTPParser._feed_whole_response(self, data, events):
            return False
        self.heads.append((data[:data.find(b"\r\n\r\n")], False))
        return True


# InspectEntry states
INSPECT_PENDING = "pending"     # the request came, its response is not whole yet
INSPECT_COMPLETE = "complete"   # request and response
INSPECT_OPEN = "open"           # upgraded (101) and open
INSPECT_CLOSED = "closed"       # upgraded, and closed since
INSPECT_ERROR = "error"         # no whole response: ``error`` says why


class InspectEntry:
    """One request through the tunnel (or a replay), as the inspector shows it.  What a
    new one starts with is on the class: an entry is made per request, and sets only
    its own fields.  A body is ``bytes`` cut from the one piece that held it whole, or
    a ``bytearray`` the parsers' events fill."""

    request_body: Any = b""                 # the first INSPECT_BODY_LIMIT bytes ...
    request_size = 0                        # ... of how many
    status: Optional[int] = None
    response_head = b""                     # without its final CRLF CRLF
    response_body: Any = b""
    response_size = 0
    duration: Optional[float] = None        # seconds, once answered (or closed)
    state = INSPECT_PENDING
    error: Optional[str] = None
    replay_of: Optional[int] = None         # the entry this one replays
    upgrade = False                         # the request asked for one
    websocket = False                       # ... for a WebSocket
    counters: Optional[Tuple[WSFrameCounter, WSFrameCounter]] = None   # after a 101

    def __init__(self, entry_id: int, method: str, target: str, head: bytes,
                 upgrade: Optional[str], replay_of: Optional[int]) -> None:
        self.id = entry_id
        self.time = time.time()
        self.started = time.monotonic()
        self.method = method
        self.target = target
        self.request_head = head
        if upgrade is not None:
            self.upgrade = True
            self.websocket = upgrade.strip().lower() == "websocket"
        if replay_of is not None:
            self.replay_of = replay_of

    def finish(self, state: str = INSPECT_COMPLETE, error: Optional[str] = None) -> None:
        self.duration = time.monotonic() - self.started
        self.state = state
        self.error = error

    def summary(self) -> Dict[str, Any]:
        duration = self.duration
        if self.state == INSPECT_OPEN:
            duration = time.monotonic() - self.started
        info: Dict[str, Any] = {
            "id": self.id, "time": round(self.time, 3), "method": self.method,
            "path": self.target, "status": self.status, "state": self.state,
            "duration": None if duration is None else round(duration, 6),
            "request_size": self.request_size, "response_size": self.response_size,
            "error": self.error, "replay_of": self.replay_of, "websocket": self.websocket}
        if self.counters is not None:     # "in": from the visitor, "out": to it
            up, down = self.counters
            info["bytes"] = {"in": up.bytes, "out": down.bytes}
            if self.websocket:
                info["messages"] = {"in": up.messages, "out": down.messages}
                info["frames"] = {"in": up.frames, "out": down.frames}
                info["counted_all"] = not (up.capped or down.capped)
        return info

    def detail(self) -> Dict[str, Any]:
        info = self.summary()
        info["request"] = _inspect_part(self.request_head, self.request_body,
                                        self.request_size)
        info["response"] = (_inspect_part(self.response_head, self.response_body,
                                          self.response_size) if self.response_head else None)
        return info


def _inflate(data: bytes, coding: str) -> Optional[bytes]:
    """A gzip or deflate body's first INSPECT_BODY_LIMIT bytes decoded (None if it is not)."""
    import zlib
    for wbits in ((31,) if coding in ("gzip", "x-gzip") else (15, -15)):
        try:
            return zlib.decompressobj(wbits).decompress(data, INSPECT_BODY_LIMIT)
        except zlib.error:
            continue
    return None


def _body_text(data: bytes, truncated: bool) -> Optional[str]:
    """A body as text if it is UTF-8 without NUL (a cut at its end forgiven), else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not truncated or exc.start < len(data) - 3:
            return None
        text = data[:exc.start].decode("utf-8", "replace")
    return None if "\x00" in text else text


def _inspect_part(head: bytes, body: bytearray, size: int) -> Dict[str, Any]:
    """A request's or response's head and body for the API (JSON)."""
    line, block = _split_start_line(head)
    fields = _FIELD_RE.findall(block)
    index = Headers(fields)
    coding = (index.get("content-encoding") or "").strip().lower()
    data = bytes(body)
    truncated = size > len(data)
    decoded = (_inflate(data, coding) if data and not truncated
               and coding in ("gzip", "x-gzip", "deflate") else None)
    return {"head": head.decode("latin-1"), "start_line": line,
            "headers": [list(field) for field in fields],
            "content_type": index.get("content-type") or "", "content_encoding": coding,
            "body": _b64(data), "body_size": size, "truncated": truncated,
            "decoded": None if decoded is None else _b64(decoded),
            "text": _body_text(data if decoded is None else decoded, truncated)}


# The fields InspectCapture's fast path for requests looks at, in any case (an Upgrade
# field sends a request to the parser's path).
_CAPTURE_FIELDS_RE = re.compile(rb"\r\n((?i:transfer-encoding|content-length|upgrade))[ \t]*"
                                rb":([^\r\n]*)")


class InspectCapture:
    """The two directions of one connection to the target, parsed for the inspector from
    copies of its bytes: an InspectEntry per request, each response matched to the
    oldest request still waiting (responses come in order).  A parse error ends the
    capture of this connection only (its waiting entries say why); after a 101 each
    direction goes to a WSFrameCounter."""

    def __init__(self, inspector: "Inspector", replay_of: Optional[int] = None) -> None:
        self.inspector = inspector
        self.replay_of = replay_of
        self.requests = HTTPParser(True, INSPECT_MAX_HEAD)
        self.responses = _HeadKeepingParser()
        self.waiting: Deque[InspectEntry] = collections.deque()
        self.entry: Optional[InspectEntry] = None       # whose request body comes now
        self.last: Optional[InspectEntry] = None        # the newest entry made here
        self._request_chunks: Optional[ChunkDecoder] = None
        self._response_chunks: Optional[ChunkDecoder] = None
        self.upstream: Optional[WSFrameCounter] = None     # after a 101
        self.downstream: Optional[WSFrameCounter] = None
        self.upgraded: Optional[InspectEntry] = None
        self.stopped = False
        self.whole: Optional[bool] = None   # the last response read was one whole message

    # -- visitor -> origin ------------------------------------------------------------
    def request_data(self, data: Any) -> None:
        if self.upstream is not None:
            self.upstream.feed(data)
            self.inspector.version += 1
        elif not self.stopped:
            if self.entry is None and type(data) is bytes and self.requests.idle and (
                    self._whole_request(data)):
                return
            self._request_events(self.requests.feed(data))

    def _whole_request(self, data: bytes) -> bool:
        """The common case in one step (the relay sends a head, and a small body read
        with it, as one DATA frame): ``data`` is one whole request in origin form, a head
        without framing fields or one with a plain Content-Length body, and no Upgrade
        field, as the relay checked it.  False, with nothing changed, for anything else:
        the parser takes it then (and frames it the same)."""
        end = data.find(b"\r\n\r\n", 0, HEAD_PROBE)
        if end < 0:
            return False
        fields = _CAPTURE_FIELDS_RE.findall(data, 0, end)
        length: Optional[int] = 0
        if fields:      # (an Upgrade field is not plain framing either: the parser's path)
            length = _plain_length([(name.lower(), value) for name, value in fields])
        if length is None or end + 4 + length != len(data):
            return False
        parts = data.split(b" ", 2)       # (the relay checked the request line)
        if len(parts) != 3 or parts[1][:1] != b"/":
            return False
        method = parts[0].decode("latin-1")
        entry = self.last = self.inspector.add(method, parts[1].decode("latin-1"),
                                               data[:end], None, self.replay_of)
        if length:
            entry.request_body = data[end + 4:end + 4 + INSPECT_BODY_LIMIT]
            entry.request_size = length
        self.waiting.append(entry)
        self.responses.methods.append(method)
        if len(self.waiting) > INSPECT_MAX_WAITING:
            self._stop("more than %d requests waiting for responses" % INSPECT_MAX_WAITING)
        return True

    def _request_events(self, events: List[Tuple[str, Any]]) -> None:
        for kind, value in events:
            if kind is EV_BODY:
                entry = self.entry
                if entry is not None:
                    chunks = self._request_chunks
                    if chunks is not None:
                        chunks.feed(value)
                        entry.request_size = chunks.size
                    else:
                        _keep(entry.request_body, value)
                        entry.request_size += len(value)
            elif kind is EV_HEAD:
                entry = self.entry = self.last = self.inspector.add(
                    value.method, value.target, value.raw, value.upgrade, self.replay_of)
                entry.request_body = bytearray()
                self.waiting.append(entry)
                if len(self.waiting) > INSPECT_MAX_WAITING:
                    self._stop("more than %d requests waiting for responses"
                               % INSPECT_MAX_WAITING)
                    return
                self.responses.expect(value.method)
                self._request_chunks = (ChunkDecoder(entry.request_body)
                                        if value.body == "chunked" else None)
            elif kind is EV_END:
                self.entry = self._request_chunks = None
            else:
                self._stop("the request: %s" % value)
                return

    # -- origin -> visitor ------------------------------------------------------------
    def response_data(self, data: Any) -> None:
        self.whole = None
        if self.downstream is not None:
            self.downstream.feed(data)
            self.inspector.version += 1
        elif not self.stopped:
            if type(data) is not bytes and len(data) <= WHOLE_RESPONSE_PROBE:
                data = bytes(data)      # (a whole response is taken in one step)
            if (len(self.waiting) == 1 and type(data) is bytes and data[:5] == b"HTTP/"
                    and self.responses.idle):
                head_size = _whole_by_length(data)
                self.whole = head_size > 0
                if head_size and self._whole_response(data, head_size):
                    return
            self._response_events(self.responses.feed(data), data)

    def _whole_response(self, data: bytes, head_size: int) -> bool:
        """The common case in one step, as HTTPParser's own (``_feed_whole_response``):
        ``data`` is one whole response framed by its Content-Length (``head_size``: its
        head's, from ``_whole_by_length``), to the one request waiting (not HEAD, not an
        upgrade).  False, with nothing changed, otherwise."""
        entry = self.waiting[0]
        m = _STATUS_LINE_RE.match(data, 0, head_size - 2)
        if m is None or entry.upgrade:
            return False
        status = int(m.group(3))
        methods = self.responses.methods
        if status < 200 or status in (204, 304) or (methods and methods[0] == "HEAD"):
            return False
        if methods:
            methods.popleft()
        self.waiting.popleft()
        entry.status, entry.response_head = status, data[:head_size - 4]
        if head_size < len(data):
            entry.response_body = data[head_size:head_size + INSPECT_BODY_LIMIT]
            entry.response_size = len(data) - head_size
        entry.duration = time.monotonic() - entry.started
        entry.state = INSPECT_COMPLETE
        self.inspector.version += 1
        return True

    def response_eof(self) -> None:
        if self.downstream is None and not self.stopped:
            self._response_events(self.responses.feed_eof(), b"")

    def _response_events(self, events: List[Tuple[str, Any]], data: Any) -> None:
        for kind, value in events:
            if kind is EV_BODY:
                entry = self.waiting[0]
                chunks = self._response_chunks
                if chunks is not None:
                    chunks.feed(value)
                    entry.response_size = chunks.size
                else:
                    _keep(entry.response_body, value)
                    entry.response_size += len(value)
            elif kind is EV_HEAD:
                head, chunked = self.responses.heads.popleft()
                if 100 <= value.status < 200 and value.status != 101:
                    continue                    # interim (100 Continue): the final follows
                if not self.waiting:
                    self._stop("a response without a request")
                    return
                entry = self.waiting[0]
                entry.status, entry.response_head = value.status, head
                entry.response_body = bytearray()
                self._response_chunks = ChunkDecoder(entry.response_body) if chunked else None
            elif kind is EV_END:
                entry = self.waiting.popleft()
                self._response_chunks = None
                if entry.status == 101:
                    self._upgraded(entry, data)
                    return
                entry.finish()
                self.inspector.version += 1
                if entry.upgrade:               # refused: the connection stays HTTP
                    self._request_events(self.requests.upgrade_refused())
            else:
                self._stop("the response: %s" % value)
                return

    def _upgraded(self, entry: InspectEntry, data: Any) -> None:
        entry.state = INSPECT_OPEN
        self.upgraded = entry
        up, down = WSFrameCounter(entry.websocket), WSFrameCounter(entry.websocket)
        entry.counters = (up, down)
        self.upstream, self.downstream = up, down
        up.feed(self.requests.upgrade_done())   # what came after the request, before the 101
        tail = self.responses.upgrade_tail
        if tail:
            down.feed(memoryview(data)[len(data) - tail:])
        self.inspector.version += 1

    # -- the end ----------------------------------------------------------------------
    def _stop(self, why: str) -> None:
        self.stopped = True
        for entry in self.waiting:
            entry.finish(INSPECT_ERROR, "capture stopped at %s" % why)
        self.waiting.clear()
        self.entry = None
        self.inspector.version += 1

    def failed(self, why: str, status: Optional[int] = None) -> None:
        """The exchange failed (no connection to the target): the waiting entries say why
        (``status``: what the visitor got instead, the client's 502)."""
        for entry in self.waiting:
            if status is not None and entry.status is None:
                entry.status = status
            entry.finish(INSPECT_ERROR, why)
        self.waiting.clear()
        self.stopped = True
        self.inspector.version += 1

    def closed(self) -> None:
        """The connection is gone: an upgraded one is closed, unanswered ones failed."""
        if self.upgraded is not None and self.upgraded.state == INSPECT_OPEN:
            self.upgraded.finish(INSPECT_CLOSED)
        self.failed("the connection closed before the response was whole")


class InspectedTarget(TargetConn):
    """A TargetConn that also hands a copy of both directions to an InspectCapture (only
    with --inspect: without it the plain TargetConn runs, its data path unchanged)."""

    def __init__(self, client: "Client", stream: Stream, info: Dict[str, Any],
                 inspector: "Inspector") -> None:
        self.inspector = inspector
        self.capture = InspectCapture(inspector)
        super().__init__(client, stream, info)

    def on_stream_data(self, stream: Stream, data: bytes) -> None:
        self.inspector.bytes_in += len(data)
        self.capture.request_data(data)
        self.send_bytes(data, True)

    def on_socket_data(self, data: memoryview) -> None:   # (after TargetConn._first_data)
        self.inspector.bytes_out += len(data)
        self.capture.response_data(data)
        if self.stream is not None:                         # (Pipe's)
            self.stream.write(data)

    def mid_message(self, data: memoryview) -> bool:
        whole = self.capture.whole      # (what the capture found out about this read)
        return not whole_response(data) if whole is None else not whole

    def on_socket_eof(self) -> None:
        self.capture.response_eof()
        super().on_socket_eof()

    def _connect_failed(self, why: str) -> None:
        self.capture.failed(why, 502)
        super()._connect_failed(why)

    def connection_lost(self) -> None:
        self.capture.closed()
        super().connection_lost()


_REPLAY_DROPPED = frozenset({"content-length", "transfer-encoding", "connection",
                             "keep-alive", "proxy-connection", "te", "upgrade", "expect"})
_FIELD_VALUE_RE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*\Z")
_REQUEST_TARGET_RE = re.compile(r"[\x21-\x7e]+\Z")


def replay_request(entry: InspectEntry, edits: Dict[str, Any]) -> bytes:
    """The bytes that replay ``entry``'s request, with ``edits`` (the API's JSON:
    "method", "path", "headers" as [[name, value], ...] or {name: value}, "body" as
    text or "body_base64"): its framing as one Content-Length, ``Connection: close``.
    Raises HTTPError (400: a bad edit, 409: nothing to replay whole)."""
    if entry.upgrade:
        raise HTTPError(409, "an upgraded connection (WebSocket) cannot be replayed")
    line, block = _split_start_line(entry.request_head)
    method, target = line.split(" ", 2)[:2]
    fields: List[Tuple[str, str]] = _FIELD_RE.findall(block)
    method = edits.get("method", method)
    target = edits.get("path", target)
    if not isinstance(method, str) or not re.fullmatch(_TOKEN, method):
        raise HTTPError(400, "invalid method")
    if (not isinstance(target, str) or not _REQUEST_TARGET_RE.match(target)
            or not (target.startswith("/") or target == "*")):
        raise HTTPError(400, "invalid path: it starts with / and has no spaces")
    if "headers" in edits:
        given = edits["headers"]
        pairs = list(given.items()) if isinstance(given, dict) else given
        if not isinstance(pairs, list) or len(pairs) > MAX_HEADER_COUNT:
            raise HTTPError(400, "headers: a list of [name, value] (at most %d)"
                            % MAX_HEADER_COUNT)
        fields = []
        for pair in pairs:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(x, str) for x in pair)
                    or not re.fullmatch(_TOKEN, pair[0])
                    or not _FIELD_VALUE_RE.match(pair[1])):
                raise HTTPError(400, "invalid header field %s" % json.dumps(pair)[:100])
            fields.append((pair[0], pair[1].strip(" \t")))
    if "body" in edits:
        if not isinstance(edits["body"], str):
            raise HTTPError(400, "body: a string (or body_base64)")
        try:
            body = edits["body"].encode("utf-8")
        except UnicodeEncodeError:                  # a lone surrogate ("\ud800")
            raise HTTPError(400, "body: not encodable as UTF-8") from None
    elif "body_base64" in edits:
        text = edits["body_base64"]
        body = _unb64(text) if isinstance(text, str) else b""
        if not body and text:
            raise HTTPError(400, "body_base64 is not base64")
    else:
        body = bytes(entry.request_body)
        if entry.request_size > len(body):
            raise HTTPError(409, "only the first %d bytes of this request's body were kept: "
                            "replay it with an edited body" % INSPECT_BODY_LIMIT)
    kept = [(n, v) for n, v in fields if n.lower() not in _REPLAY_DROPPED]
    if body or method in ("POST", "PUT", "PATCH"):
        kept.append(("Content-Length", str(len(body))))
    kept.append(("Connection", "close"))
    try:
        head = ("%s %s HTTP/1.1\r\n%s\r\n" % (method, target, "".join(
            "%s: %s\r\n" % field for field in kept))).encode("latin-1")
    except UnicodeEncodeError:
        raise HTTPError(400, "header values must be Latin-1 (send non-ASCII in the body)")
    data = head + body
    for kind, value in HTTPParser(True).feed(data):     # the relay's own rules
        if kind is EV_ERROR:
            raise HTTPError(400, "the edited request: %s" % value)
    return data


class ReplayConn(Conn):
    """A captured request sent to the target again (POST /api/requests/ID/replay) along
    the client's own way to it (a Dialer: TCP, TLS for an https:// TARGET); the exchange
    is captured as a new entry marked as a replay, and the connection closes when the
    response is whole (or after INSPECT_REPLAY_TIMEOUT)."""

    def __init__(self, inspector: "Inspector", replay_of: int, data: bytes) -> None:
        super().__init__(inspector.loop, None)
        client = inspector.client
        cfg = client.config
        self.capture = InspectCapture(inspector, replay_of)
        self.capture.request_data(data)         # the new entry, at once
        self.entry = self.capture.last
        self.out += data
        self.connected = False
        self._timer = self.loop.call_later(INSPECT_REPLAY_TIMEOUT, self._timeout)
        self.dialer: Optional[Dialer] = Dialer(
            self.loop, cfg.target_host, cfg.target_port, client.target_stages(),
            cfg.connect_timeout, self._dialed, self._dial_failed,
            addrs=client.loopback_addresses())

    def __repr__(self) -> str:
        return "<Replay of %s>" % self.capture.replay_of

    def wants_read(self) -> bool:
        return self.connected

    def wants_write(self) -> bool:
        return self.connected and (bool(self.out) or bool(getattr(self.sock, "unsent", b"")))

    def _dialed(self, sock: Any) -> None:
        self.dialer = None
        if self.closed:
            sock.close()
            return
        self.connected = True
        self.attach(sock)
        self.on_write()

    def _dial_failed(self, why: str, kind: str) -> None:
        self.dialer = None
        self._fail("could not connect to %s" % why)

    def _timeout(self) -> None:
        self._fail("no whole response within %gs" % INSPECT_REPLAY_TIMEOUT)

    def _fail(self, why: str) -> None:
        self.capture.failed("replay: %s" % why)
        self.close_socket()

    def on_write(self) -> None:
        try:
            if self.out:
                del self.out[:self.sock.send(self.out)]
            elif getattr(self.sock, "unsent", b""):
                self.sock.push()
        except WOULD_BLOCK:
            pass
        except OSError as exc:
            self._fail(describe_oserror(exc))
            return
        self.update()

    def on_read(self) -> None:
        try:
            n = self.sock.recv_into(self.loop.scratch)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self._fail(describe_oserror(exc))
            return
        if not n:
            self.capture.response_eof()
        else:
            self.capture.response_data(self.loop.scratch_view[:n])
        if not n or not self.capture.waiting:   # answered (or the capture gave up)
            self.close_socket()
            return
        self.update()
        self.read_pending()

    def abort(self, reason: str) -> None:
        self._fail(reason)

    def connection_lost(self) -> None:
        self._timer.cancel()
        if self.dialer is not None:
            self.dialer.abort_quietly()
            self.dialer = None
        self.capture.closed()


class InspectorConn(Conn):
    """One connection to the inspector: HTTP/1.1 requests read by an HTTPParser (its
    limits; a body up to INSPECT_API_BODY), answered in order by ``Inspector.answer``;
    pipelined requests wait (``events``) while an answer over INSPECT_API_BODY is
    queued, and nothing more is read meanwhile; closed when idle INSPECT_IDLE_TIMEOUT."""

    def __init__(self, inspector: "Inspector", sock: socket.socket) -> None:
        super().__init__(inspector.loop, sock)
        self.inspector = inspector
        inspector.connections += 1
        self.parser = HTTPParser(True)
        self.events: Deque[Tuple[str, Any]] = collections.deque()
        self.req: Optional[Request] = None
        self.body = bytearray()
        self.chunks: Optional[ChunkDecoder] = None
        self.active = time.monotonic()
        self._timer = self.loop.call_later(INSPECT_IDLE_TIMEOUT, self._idle)
        self.update()

    def __repr__(self) -> str:
        return "<InspectorConn>"

    def wants_read(self) -> bool:
        return not self.events and len(self.out) < INSPECT_API_BODY

    def _idle(self) -> None:
        left = self.active + INSPECT_IDLE_TIMEOUT - time.monotonic()
        if left > 0:
            self._timer = self.loop.call_later(left, self._idle)
        else:
            self.close_socket()

    def on_read(self) -> None:
        data = self.read_scratch()
        if data is None:
            return
        self.active = time.monotonic()
        for kind, value in self.parser.feed(data):
            # (a body's bytes are a view of the loop's scratch buffer: copied to wait)
            self.events.append((kind, bytes(value) if kind is EV_BODY else value))
        self._serve()

    def _serve(self) -> None:
        while True:
            if not self._answer():
                return                          # (closed)
            if not self._send():
                return
            if not self.events or len(self.out) >= INSPECT_API_BODY:
                break
        self.update()

    def _answer(self) -> bool:
        """Work through the waiting events while the queued answers are small; False
        once the connection is handed to a lingering close."""
        events = self.events
        while events and len(self.out) < INSPECT_API_BODY:
            kind, value = events.popleft()
            if kind is EV_BODY:
                if self.chunks is not None:
                    self.chunks.feed(value)
                else:
                    self.body += value
                if len(self.body) > INSPECT_API_BODY:
                    self._last(413, "a request body over %d bytes" % INSPECT_API_BODY)
                    return False
            elif kind is EV_HEAD:
                self.req, self.body = value, bytearray()
                self.chunks = (ChunkDecoder(self.body, INSPECT_API_BODY + 1)
                               if value.body == "chunked" else None)
                length = value.headers.get("content-length")
                if value.upgrade is not None:
                    self._last(400, "the inspector takes no upgrades")
                    return False
                if length is not None and length.strip().isdigit() and (
                        int(length) > INSPECT_API_BODY):
                    self._last(413, "a request body over %d bytes" % INSPECT_API_BODY)
                    return False
            elif kind is EV_END:
                req = self.req
                assert req is not None
                self.out += self.inspector.answer(req, bytes(self.body))
                if not req.keep_alive:
                    self._last(0, "")
                    return False
            else:
                self._last(value.status, str(value))
                return False
        return True

    def _last(self, status: int, why: str) -> None:
        """A last answer (an error page, or just what is queued), then a lingering close."""
        if status:
            self.out += http_response(status, why)
        Lingering(self.loop, self.detach(), bytes(self.out))

    def _send(self) -> bool:
        """Write what the socket takes; False if the connection is gone."""
        if self.out:
            try:
                del self.out[:self.sock.send(self.out)]
            except WOULD_BLOCK:
                pass
            except OSError:
                self.close_socket()
                return False
        return True

    def on_write(self) -> None:
        if self._send():
            if self.events and len(self.out) < INSPECT_API_BODY:
                self._serve()
            else:
                self.update()

    def connection_lost(self) -> None:
        self._timer.cancel()
        self.inspector.connections -= 1


def _inspect_query(query: str) -> Dict[str, str]:
    """A query string's parameters (the last of each name; the API's are plain ASCII)."""
    params = {}
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name:
            params[name] = value
    return params


class Inspector:
    """The request inspector of one Client (``expose --inspect``): the last ``keep``
    InspectEntries, the page and the JSON API at ``url`` (served on the client's loop),
    and the replays."""

    def __init__(self, client: "Client", address: str, keep: int) -> None:
        self.client = client
        self.loop = client.loop
        self.address = address
        self.entries: Deque[InspectEntry] = collections.deque(maxlen=keep)
        self._ids = itertools.count(1)
        self.version = 0                # changes whenever an entry does (the page's poll)
        self.host = ""
        self.port = 0
        self.url = ""
        self.listener: Optional[Listener] = None
        self.connections = 0            # InspectorConns open
        self.requests = 0               # requests through the tunnel, ever (no replays)
        self.bytes_in = 0               # bytes from the visitors to the target, ever
        self.bytes_out = 0              # ... and back

    # -- the listening socket --------------------------------------------------------
    def start(self) -> None:
        """Listen (raises OSError); the default address moves on to the next free port."""
        host, port = parse_inspect_address(self.address)
        tries = INSPECT_PORT_TRIES if self.address == INSPECT_DEFAULT else 1
        sock = None
        for i in range(tries):
            try:
                sock = make_listener(host, port + i)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or i + 1 == tries:
                    raise
                continue
            if i:
                log.info("inspector: %s is in use; listening on %s instead",
                         format_hostport(host, port), format_hostport(host, port + i))
            break
        assert sock is not None
        self.listener = Listener(self.loop, sock, self._accept)
        self.host, self.port = host, sock.getsockname()[1]
        shown = host
        if host in ("0.0.0.0", "::", ""):       # every address: show loopback's
            shown = "::1" if ":" in host else "127.0.0.1"
        self.url = "http://%s" % format_hostport(shown, self.port)
        if not is_loopback(host):
            log.warning("--inspect %s is not on loopback: anyone who can reach it sees every "
                        "request and response through the tunnel, request bodies and "
                        "credentials (Authorization, cookies) included, and can replay them",
                        format_hostport(host, self.port))
        log.info("inspector on %s", self.url)

    def _accept(self, sock: socket.socket, addr: Any) -> None:
        if self.connections >= INSPECT_MAX_CONNECTIONS:
            sock.close()
            return
        InspectorConn(self, sock)

    # -- entries ------------------------------------------------------------------------
    def add(self, method: str, target: str, head: bytes, upgrade: Optional[str],
            replay_of: Optional[int]) -> InspectEntry:
        entry = InspectEntry(next(self._ids), method, target, head, upgrade, replay_of)
        self.entries.append(entry)      # the oldest goes when ``keep`` are held
        if replay_of is None:
            self.requests += 1
        self.version += 1
        return entry

    def find(self, entry_id: int) -> Optional[InspectEntry]:
        entries = self.entries          # ids are consecutive: an index, not a search
        i = entry_id - entries[0].id if entries else -1
        return entries[i] if 0 <= i < len(entries) else None

    def tunnels(self) -> List[Dict[str, Any]]:
        client = self.client
        return [{"name": client.name, "public_url": client.url, "target": client.target_url,
                 "relay": client.relay_text, "connected": client.ready.is_set(),
                 "connected_since": client.up_since, "requests": self.requests,
                 "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                 "open_connections": len(client.targets)}]

    # -- HTTP ---------------------------------------------------------------------------
    def _host_ok(self, req: Request) -> bool:
        """Host names this inspector (DNS rebinding: a name that resolves here is not)."""
        try:
            host, port = _split_host(req.host_header)
        except HTTPError:
            return False
        name = host[1:-1] if host.startswith("[") else host
        return port == str(self.port) and (name in ("localhost", self.host.lower())
                                           or _is_ip_literal(name))

    def answer(self, req: Request, body: bytes) -> bytes:
        """The whole response to one request of the page or the API."""
        extra: Tuple[Tuple[str, str], ...] = ()
        try:
            status, ctype, payload, extra = self._route(req, body)
        except HTTPError as exc:
            status, ctype = exc.status, "application/json"
            payload = _json_bytes({"error": str(exc)})
            extra = exc.headers
        page = ctype.startswith("text/html")
        csp = _inspector_page()[1] if page else "default-src 'none'; frame-ancestors 'none'"
        lines = ["HTTP/1.1 %d %s" % (status, INSPECT_REASONS.get(status)
                                     or HTTP_REASONS.get(status, "Error")),
                 "Content-Type: %s" % ctype, "Content-Length: %d" % len(payload),
                 "Cache-Control: no-store", "X-Content-Type-Options: nosniff",
                 "X-Frame-Options: DENY", "Referrer-Policy: no-referrer",
                 "Content-Security-Policy: %s" % csp]
        lines.extend("%s: %s" % kv for kv in extra)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if req.method == "HEAD" else head + payload

    def _route(self, req: Request, body: bytes) -> Tuple[int, str, bytes,
                                                         Tuple[Tuple[str, str], ...]]:
        if not self._host_ok(req):
            raise HTTPError(403, "the inspector answers to its own address only (Host "
                            "127.0.0.1:%d or localhost:%d)" % (self.port, self.port))
        path, _, query = req.target.partition("?")
        origin = req.headers.get("origin")
        if origin is not None and origin != "http://" + req.host_header:
            raise HTTPError(403, "a request from another origin")
        if path.startswith("/api/") and req.headers.get("sec-fetch-site") in (
                "cross-site", "same-site"):
            raise HTTPError(403, "a request from another site")
        parts = path.split("/")
        reading = req.method in ("GET", "HEAD")
        if path == "/":
            self._method(reading, "GET, HEAD")
            return 200, "text/html; charset=utf-8", _inspector_page()[0], ()
        if path == "/api/tunnels":
            self._method(reading, "GET, HEAD")
            return self._json({"tunnels": self.tunnels()})
        if path == "/api/requests":
            self._method(reading, "GET, HEAD")
            limit = _inspect_query(query).get("limit", "")
            count = len(self.entries)
            if limit:
                if not limit.isdigit() or not limit.isascii():
                    raise HTTPError(400, "limit: a number")
                count = min(count, int(limit))
            newest = [self.entries[-1 - i].summary() for i in range(count)]
            return self._json({"version": self.version, "requests": newest})
        if len(parts) in (4, 5) and parts[:3] == ["", "api", "requests"] and (
                parts[3].isdigit() and parts[3].isascii() and len(parts[3]) < 19):
            entry = self.find(int(parts[3]))
            if len(parts) == 5 and parts[4] != "replay":
                raise HTTPError(404, "not found")
            if entry is None:
                raise HTTPError(404, "no request %s (the inspector keeps the last %d)"
                                % (parts[3], self.entries.maxlen or 0))
            if len(parts) == 4:
                self._method(reading, "GET, HEAD")
                return self._json(entry.detail())
            self._method(req.method == "POST", "POST")
            return self._json(self._replay(entry, req, body))
        raise HTTPError(404, "not found")

    @staticmethod
    def _method(allowed: bool, allow: str) -> None:
        if not allowed:
            raise HTTPError(405, "method not allowed here", headers=(("Allow", allow),))

    @staticmethod
    def _json(value: Any) -> Tuple[int, str, bytes, Tuple[Tuple[str, str], ...]]:
        return 200, "application/json", _json_bytes(value), ()

    def _replay(self, entry: InspectEntry, req: Request, body: bytes) -> Dict[str, Any]:
        ctype = (req.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "a replay takes a JSON body (Content-Type: "
                            "application/json), {} for the request as it was")
        edits: Any = {}
        if body.strip():
            if body.count(b"[") + body.count(b"{") > INSPECT_JSON_CONTAINERS:
                raise HTTPError(400, "the JSON nests too much")
            try:
                edits = json.loads(body.decode("utf-8"))
            except (ValueError, RecursionError) as exc:
                raise HTTPError(400, "invalid JSON: %s" % exc) from None
        if not isinstance(edits, dict):
            raise HTTPError(400, "the body is a JSON object")
        data = replay_request(entry, edits)
        replay = ReplayConn(self, entry.id, data)
        new = replay.entry
        assert new is not None
        return {"id": new.id, "replay_of": entry.id}


_INSPECT_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:8px 12px;background:#234;color:#eee;display:flex;gap:16px;flex-wrap:wrap}
header b{color:#fff}#status{color:#f99}
main{display:grid;grid-template-columns:minmax(360px,1fr) 1.3fr;height:calc(100vh - 36px)}
#list{overflow:auto;border-right:1px solid #ccc}
table{border-collapse:collapse;width:100%}
th,td{padding:3px 6px;text-align:left;white-space:nowrap;border-bottom:1px solid #eee}
th{position:sticky;top:0;background:#eee}
tr.row{cursor:pointer}tr.row:hover{background:#eef}tr.sel{background:#dde}
td.path{max-width:280px;overflow:hidden;text-overflow:ellipsis}
.s2{color:#070}.s3{color:#06a}.s4{color:#a60}.s5,.err{color:#c00}.pend{color:#888}
#detail{overflow:auto;padding:8px 14px}
h2{font-size:15px;word-break:break-all}h3{font-size:13px;margin:14px 0 4px}
pre{background:#fff;border:1px solid #ddd;padding:6px;white-space:pre-wrap;
word-break:break-all;max-height:480px;overflow:auto;margin:4px 0}
img{max-width:100%;border:1px solid #ddd}.hint{color:#777}
button{margin-right:6px}form{display:grid;gap:4px;margin:8px 0}
textarea,input{font:12px monospace;width:100%;box-sizing:border-box}
"""

_INSPECT_JS = r"""
"use strict";
const POLL = %(poll)d, HEX = %(hex)d;
let version = -1, selected = null, current = null;
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function ms(s) {
  if (s === null || s === undefined) return "";
  return s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s";
}
function size(n) {
  return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB"
    : (n / 1048576).toFixed(1) + " MiB";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
async function api(path, opts) {
  const r = await fetch(path, opts);
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || String(r.status));
  return j;
}
function statusOf(r) {
  if (r.state === "error") return [r.status ? r.status + " error" : "error", "err"];
  if (r.status === null) return ["...", "pend"];
  if (r.websocket) return ["WS " + (r.state === "open" ? "open" : "closed"), "s2"];
  return [String(r.status), "s" + String(r.status)[0]];
}
function render(list) {
  const rows = $("rows");
  rows.textContent = "";
  for (const r of list) {
    const tr = el("tr", null, r.id === selected ? "row sel" : "row");
    const [st, cls] = statusOf(r);
    let sz = size(r.response_size);
    if (r.messages) sz = r.messages.in + " in / " + r.messages.out + " out";
    tr.append(el("td", clock(r.time)), el("td", r.method),
              el("td", (r.replay_of ? "\u21bb " : "") + r.path, "path"),
              el("td", st, cls), el("td", ms(r.duration)), el("td", sz));
    tr.title = r.path;
    tr.dataset.id = String(r.id);
    tr.addEventListener("click", () => select(r.id));
    rows.append(tr);
  }
}
async function poll() {
  try {
    const t = (await api("/api/tunnels")).tunnels[0];
    $("tunnel").textContent = (t.public_url || "(not up)") + " \u2192 " + t.target +
      (t.connected ? "" : "  (reconnecting)") + "  \u00b7  " + t.requests + " requests";
    const list = await api("/api/requests");
    if (list.version !== version) {
      version = list.version;
      render(list.requests);
      if (current && (current.state === "pending" || current.state === "open"))
        select(current.id, true);
    }
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "inspector unreachable: " + e.message;
  }
  setTimeout(poll, POLL);
}
async function select(id, quiet) {
  selected = id;
  history.replaceState(null, "", "#" + id);
  for (const tr of $("rows").children) tr.classList.toggle("sel", tr.dataset.id === String(id));
  try {
    current = await api("/api/requests/" + id);
    show(current);
  } catch (e) {
    if (!quiet) { $("detail").textContent = ""; $("detail").append(el("p", e.message, "err")); }
  }
}
function bytesOf(b64) {
  const bin = atob(b64), a = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
  return a;
}
function hex(a) {
  const out = [];
  for (let i = 0; i < a.length; i += 16) {
    const row = a.subarray(i, i + 16);
    let h = "", t = "";
    for (const b of row) {
      h += b.toString(16).padStart(2, "0") + " ";
      t += b >= 32 && b < 127 ? String.fromCharCode(b) : ".";
    }
    out.push(i.toString(16).padStart(8, "0") + "  " + h.padEnd(48) + " " + t);
  }
  return out.join("\n");
}
const IMAGE = /^image\/(png|jpeg|gif|webp|bmp|avif|x-icon|vnd\.microsoft\.icon|svg\+xml)$/;
function body(p) {
  const box = el("div");
  const type = p.content_type.toLowerCase().split(";")[0].trim();
  const b64 = p.decoded !== null ? p.decoded : p.body;
  let note = size(p.body_size) + (type ? ", " + type : "");
  if (p.content_encoding) note += ", " + p.content_encoding + (p.decoded !== null ? " (decoded)" : "");
  if (p.truncated) note += ", the first " + size(bytesOf(p.body).length) + " kept";
  box.append(el("p", note, "hint"));
  if (IMAGE.test(type) && !p.truncated) {
    const img = el("img");
    img.alt = "the image in the body";
    img.src = "data:" + type + ";base64," + b64;
    box.append(img);
  } else if (p.text !== null) {
    let text = p.text;
    if (/[/+]json$/.test(type)) { try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) {} }
    box.append(el("pre", text));
  } else {
    box.append(el("pre", hex(bytesOf(b64).subarray(0, HEX)) +
      (p.body_size > HEX ? "\n..." : "")));
  }
  return box;
}
function part(title, p) {
  const s = el("section");
  s.append(el("h3", title));
  if (!p) { s.append(el("p", "nothing yet", "hint")); return s; }
  s.append(el("pre", p.head));
  if (p.body_size) s.append(body(p));
  return s;
}
function show(d) {
  const box = $("detail");
  box.textContent = "";
  box.append(el("h2", d.method + " " + d.path));
  const [st, cls] = statusOf(d);
  let meta = clock(d.time) + "  \u00b7  " + st + "  \u00b7  " + ms(d.duration);
  if (d.replay_of) meta += "  \u00b7  replay of #" + d.replay_of;
  if (d.messages) meta += "  \u00b7  messages " + d.messages.in + " in, " + d.messages.out +
    " out (frames " + d.frames.in + ", " + d.frames.out + ")";
  if (d.bytes) meta += "  \u00b7  " + size(d.bytes.in) + " in, " + size(d.bytes.out) + " out";
  box.append(el("p", meta, cls));
  if (d.error) box.append(el("p", d.error, "err"));
  if (!d.websocket) {
    const again = el("button", "Replay"), edit = el("button", "Edit and replay");
    again.addEventListener("click", () => replay(d.id, {}));
    edit.addEventListener("click", () => editor(box, d));
    box.append(again, edit);
  }
  box.append(part("Request", d.request), part("Response", d.response));
}
function editor(box, d) {
  const form = el("form");
  const method = el("input"), path = el("input"), heads = el("textarea"), text = el("textarea");
  method.value = d.method;
  path.value = d.path;
  heads.rows = 8;
  heads.value = d.request.headers.map((h) => h[0] + ": " + h[1]).join("\n");
  text.rows = 6;
  const editable = d.request.text !== null && d.request.decoded === null;
  text.value = editable ? d.request.text : "";
  text.disabled = !editable;
  if (!editable && d.request.body_size) text.placeholder = "(binary body: sent as captured)";
  const go = el("button", "Send");
  go.type = "submit";
  form.append(el("label", "method"), method, el("label", "path"), path,
              el("label", "headers, one per line"), heads, el("label", "body"), text, go);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const headers = [];
    for (const line of heads.value.split("\n")) {
      const i = line.indexOf(":");
      if (i > 0) headers.push([line.slice(0, i).trim(), line.slice(i + 1).trim()]);
    }
    const edits = {method: method.value.trim(), path: path.value.trim(), headers: headers};
    if (editable) edits.body = text.value;
    replay(d.id, edits);
  });
  box.insertBefore(form, box.children[box.children.length - 2]);
}
async function replay(id, edits) {
  try {
    const r = await api("/api/requests/" + id + "/replay", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(edits)});
    version = -1;
    select(r.id);
  } catch (e) {
    $("status").textContent = "replay: " + e.message;
  }
}
if (/^#[0-9]+$/.test(location.hash)) select(Number(location.hash.slice(1)));
poll();
"""

_INSPECT_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tunnel.py inspector</title><style>%(css)s</style></head>
<body><header><b>tunnel.py inspector</b><span id="tunnel"></span><span id="status"></span>
</header><main><section id="list"><table><thead><tr><th>time</th><th>method</th>
<th>path</th><th>status</th><th>duration</th><th>size</th></tr></thead>
<tbody id="rows"></tbody></table></section>
<section id="detail"><p class="hint">Requests through the tunnel appear on the left,
newest first; click one to see it.</p></section></main>
<script>%(js)s</script></body></html>
"""

_inspector_page_cache: List[Tuple[bytes, str]] = []


def _inspector_page() -> Tuple[bytes, str]:
    """The page (HTML, CSS and script inline: nothing external) and its
    Content-Security-Policy, which allows exactly that script and style (their
    SHA-256), images from data: URLs and requests to itself; made once."""
    if not _inspector_page_cache:
        js = _INSPECT_JS % {"poll": INSPECT_POLL_MS, "hex": INSPECT_HEX_PREVIEW}
        page = _INSPECT_HTML % {"css": _INSPECT_CSS, "js": js}

        def digest(text: str) -> str:
            return "'sha256-%s'" % _b64(hashlib.sha256(text.encode("utf-8")).digest())
        csp = ("default-src 'none'; script-src %s; style-src %s; img-src data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'" % (digest(js), digest(_INSPECT_CSS)))
        _inspector_page_cache.append((page.encode("utf-8"), csp))
    return _inspector_page_cache[0]


# =============================================================================
# Python API (a notebook's tunnel: tunnel.expose, tunnel.serve)
# =============================================================================
#
# The same Client and Relay as the command line, each on a daemon thread with its own
# EventLoop (never the caller's: it works inside a running asyncio loop, as in Jupyter),
# configured by the same flags under their keyword names and checked by the same
# serve_config / expose_config.  Nothing is printed unless asked (``output=print``;
# warnings go to the "tunnel" logger, which has only a NullHandler until configured).

_API_SKIPPED = ("help", "version", "verbose")   # flags that mean nothing to an API call


def _discard(line: str) -> None:
    """Client output for the API: nothing printed unless asked."""


_API_SECRETS = frozenset({"token", "basic_auth", "visitor_token", "proxy", "client_secret",
                          "admin_token"})   # a wrong value's type is said, never the value


def _api_value(flag: str, action: argparse.Action, value: Any) -> Any:
    """A keyword's value as the flag's parsed value would be; raises UsageError (which
    names a secret keyword's wrong value by its type only: notebooks share tracebacks)."""
    shown = ("a %s" % type(value).__name__) if flag in _API_SECRETS else repr(value)
    if action.nargs == 0:                                  # store_true
        if not isinstance(value, bool):
            raise UsageError("%s must be True or False, not %s" % (flag, shown))
        return value
    if action.nargs == "?" and isinstance(value, bool):     # --inspect [ADDR]: True is
        return action.const if value else None              # the flag alone, False off
    if isinstance(action, argparse._AppendAction):          # repeatable: one or a list
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str)
                                                            for v in values):
            raise UsageError("%s must be a string or a list of strings, not %s"
                             % (flag, shown))
        if not values and flag == "allow":      # an empty allow list would admit anyone
            raise UsageError("allow=[] admits nobody, yet no list at all admits everyone: "
                             "pass None (or leave it out) for no allow list")
        return list(values) or None
    if value is None:
        if action.default is None or action.type is _port_or_off:
            return None
        raise UsageError("%s may not be None" % flag)
    if isinstance(value, bool):
        raise UsageError("%s must not be a bool" % flag)
    if action.type in (int, float, _port_or_off) and isinstance(value, (int, float)):
        if action.type is not float and not isinstance(value, int):
            raise UsageError("%s must be an integer, not %r" % (flag, value))
        try:
            value = float(value) if action.type is float else value
        except OverflowError:                               # 10 ** 400
            raise UsageError("%s %r is too large" % (flag, value)) from None
    elif isinstance(value, str):
        if action.type is not None:
            try:
                value = action.type(value)                  # type: ignore[operator]
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise UsageError("invalid %s %s" % (flag, shown)) from None
    else:
        raise UsageError("%s must be a %s, not %s" % (
            flag, "number" if action.type in (int, float) else "string", shown))
    if action.choices is not None and value not in action.choices:
        raise UsageError("%s must be one of %s, not %s" % (
            flag, ", ".join(map(repr, action.choices)), shown))
    return value


def _api_args(command: str, positional: List[str], options: Dict[str, Any],
              caller: str) -> argparse.Namespace:
    """The namespace ``python3 tunnel.py COMMAND POSITIONAL`` would give, with
    ``options`` (keyword names of the long flags) set on it."""
    commands: Dict[str, _Parser] = {}
    parser = build_parser(commands)
    args = parser.parse_args([command] + (["--"] + positional if positional else []))
    #                                               (after "--", a TARGET "-h" is a TARGET)
    flags = commands[command].flags()
    for key, value in options.items():
        action = flags.get(key)
        if action is None or key in _API_SKIPPED:
            known = sorted(k for k in flags if k not in _API_SKIPPED)
            import difflib
            near = difflib.get_close_matches(str(key), known, 1)
            raise OptionError("%s() got an unexpected keyword argument %r (%sits options: %s)"
                              % (caller, key, "did you mean %r? " % near[0] if near else "",
                                 ", ".join(known)))
    if isinstance(options.get("config"), os.PathLike):
        options["config"] = os.fspath(options["config"])
    if options.get("config") is not None:     # config="FILE": the keywords override it
        source = ConfigFile(_api_value("config", flags["config"], options["config"]),
                            command, commands)
        for warning in source.warnings:
            log.warning("%s", warning)
        for dest, value in source.values.items():
            setattr(args, dest, value)
        source.overridden(flags[key].dest for key in options)
        args.config_source = source
    for key, value in options.items():
        action = flags[key]
        setattr(args, action.dest, _api_value(key, action, value))
    return args


def _seconds(name: str, value: Any, positive: bool = False) -> float:
    """An API call's number of seconds; inf (or anything over threading.TIMEOUT_MAX)
    means as long as a wait can be; raises UsageError."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (value > 0 if positive else value >= 0)):     # also refuses nan
        raise UsageError("%s must be a %s number of seconds, not %r"
                         % (name, "positive" if positive else "non-negative", value))
    return min(float(value), threading.TIMEOUT_MAX)


def _guarded(callback: Callable[[Any], None], what: str) -> Callable[[Any], None]:
    """The caller's callback, run on a tunnel's loop thread: whatever it raises
    (SystemExit too) is logged, never the end of the tunnel."""
    def call(arg: Any) -> None:
        try:
            callback(arg)
        except BaseException:        # the caller's bug: say so, keep the tunnel up
            log.exception("the %s callback %r raised", what, callback)
    return call


class RequestLog(collections.namedtuple("RequestLog", "time method path status duration "
                                        "bytes upgraded websocket bytes_in")):
    """One access-log line of a tunnel, as ``Tunnel.requests`` and ``on_request`` get it:
    ``time`` (seconds since the epoch, when the client heard of it), ``method``,
    ``path`` (secret query values masked, as the console shows), ``status``,
    ``duration`` (seconds) and ``bytes`` (of the response, head and body).  An
    upgraded connection (101) comes when it ends: ``upgraded`` True, ``websocket``
    True for a WebSocket, ``duration`` its whole life, ``bytes`` what went to the
    visitor after the upgrade and ``bytes_in`` what came from it (else 0)."""

    __slots__ = ()


_open_tunnels: List["Tunnel"] = []      # what tunnels() lists (under _api_lock)
_api_lock = threading.Lock()


class Tunnel:
    """A tunnel kept up by ``expose``: a Client on a daemon thread.

    ``url`` (the public URL), ``name``, ``target`` (the local service's URL),
    ``relay`` (where it connects), ``requests`` (the last 100 (API_KEEP_REQUESTS) access-log
    records, oldest first), ``connected`` (a session is up right now; it reconnects by
    itself), ``error`` (why it stopped for good, if it did), ``inspect_url`` (the
    request inspector's page with ``inspect=...``).  ``close()`` ends it and
    waits for its thread; a ``with`` block closes it too."""

    def __init__(self, client: "Client",
                 on_request: Optional[Callable[[RequestLog], None]] = None) -> None:
        self._client = client
        self._on_request = None if on_request is None else _guarded(on_request, "on_request")
        self._requests: Deque[RequestLog] = collections.deque(maxlen=API_KEEP_REQUESTS)
        self._lock = threading.Lock()
        self._closed = False
        client.on_record = self._record
        self._thread = threading.Thread(target=client.run, daemon=True,
                                        name="tunnel.py expose %s" % client.target_url)

    # -- what the caller sees ------------------------------------------------------
    @property
    def url(self) -> str:
        return self._client.url or ""

    @property
    def name(self) -> str:
        return self._client.name or ""

    @property
    def target(self) -> str:
        return self._client.target_url

    @property
    def relay(self) -> str:
        return self._client.relay_text

    @property
    def connected(self) -> bool:
        return self._client.ready.is_set()

    @property
    def error(self) -> Optional[str]:
        return self._client.error

    @property
    def requests(self) -> List[RequestLog]:
        with self._lock:
            return list(self._requests)

    @property
    def inspect_url(self) -> Optional[str]:
        """The request inspector's page (``inspect=...``), else None."""
        inspector = self._client.inspector
        return inspector.url if inspector is not None else None

    def __repr__(self) -> str:
        return "<Tunnel %s -> %s%s>" % (self.url or "(not up)", self.target,
                                        " closed" if self._closed else "")

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- life ------------------------------------------------------------------------
    def _record(self, record: Dict[str, Any]) -> None:
        """A LOG frame (on the client's loop thread)."""
        method = str(record.get("method", ""))
        path = logged_target(str(record.get("target", "")))
        entry = RequestLog(time.time(), method if method.isprintable()
                           else escape_unprintable(method),
                           path if path.isprintable() else escape_unprintable(path),
                           record.get("status", 0), record.get("duration", 0.0),
                           record.get("bytes", 0), bool(record.get("upgraded")),
                           bool(record.get("websocket")), record.get("bytes_in", 0))
        with self._lock:
            self._requests.append(entry)
        if self._on_request is not None:
            self._on_request(entry)

    def _start(self, timeout: float) -> None:
        """Start the thread; return once the tunnel is up, else stop it and raise (a
        KeyboardInterrupt in the wait too: nothing is left running that tunnels() does
        not list)."""
        client = self._client
        try:
            self._thread.start()
            deadline = time.monotonic() + timeout
            with client.changed:
                while not (client.up_count or client.failure or client.unreachable):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    client.changed.wait(min(left, threading.TIMEOUT_MAX))
                up, failure, why = client.up_count, client.failure, client.last_failure
                unreachable = client.unreachable
        except BaseException:
            self._closed = True
            self._stop(0.0)
            raise
        if up:
            with _api_lock:
                _open_tunnels.append(self)
            return
        self._closed = True
        self._stop(0.0)
        if failure is not None:
            raise failure
        if unreachable:
            raise ConnectionError("cannot reach the relay%s: %s" % (
                "" if self.relay in why else " at " + self.relay, why))
        raise TimeoutError("the tunnel to %s did not come up within %gs%s" % (
            self.relay, timeout, " (last: %s)" % why if why else ""))

    def _stop(self, grace: float) -> None:
        client = self._client
        if self._thread.ident is None:          # never started
            client.loop.close()
            return
        client.loop.call_soon_threadsafe(lambda: client.shutdown(grace))
        if threading.current_thread() is not self._thread:    # not from on_request
            self._thread.join(min(grace + API_CLOSE_GRACE + client.config.connect_timeout,
                                  threading.TIMEOUT_MAX))

    def close(self, grace: float = API_CLOSE_GRACE) -> None:
        """End the tunnel: requests in flight get ``grace`` seconds, then the thread
        is joined (not when called from ``on_request``, on that thread).  Closing twice
        does nothing.  An ``on_request`` callback that blocks holds the tunnel's thread:
        ``close`` then returns after its wait and the thread ends when the callback
        returns."""
        grace = min(_seconds("grace", grace), MAX_SECONDS)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with _api_lock:
            if self in _open_tunnels:
                _open_tunnels.remove(self)
        self._stop(grace)


def expose(target: Any, relay: Any = None, token: Optional[str] = None,
           subdomain: Optional[str] = None, user: Optional[str] = None, *,
           timeout: float = API_TIMEOUT,
           on_request: Optional[Callable[[RequestLog], None]] = None,
           output: Optional[Callable[[str], None]] = None, **options: Any) -> Tunnel:
    """Expose a local service through a relay; return a ``Tunnel`` once it is up.

    ``target`` is what ``python3 tunnel.py expose`` takes: a port (``8888``),
    ``"HOST:PORT"``, ``"http://HOST:PORT"`` or ``"https://HOST:PORT"``.  ``relay``:
    ``"HOST:PORT"`` (the control port) or a URL (``"https://relay.example.com"``), or
    a ``RunningRelay`` from ``serve()`` (its address and token); default
    $TUNNEL_RELAY, else localhost:7835.  ``token``: default $TUNNEL_TOKEN.
    ``subdomain``: ask for that name.  ``user``: on a relay with per-user tokens
    (default $TUNNEL_USER).  Proxy variables apply as on the command line.

    Every long flag of ``expose`` is a keyword: ``host_header="rewrite"``,
    ``basic_auth="me:secret"``, ``visitor_token=...``, ``allow=["10.0.0.0/8"]``,
    ``target_insecure=True``, ``target_ca=FILE``, ``proxy=URL``, ``tls_ca=FILE``,
    ``tls_fingerprint=...``, ``plaintext=True``, ``connect_timeout=5``,
    ``quiet=True`` (no access log: ``requests`` stays empty), ``config="tunnel.ini"``
    (the ``[expose]`` and ``[DEFAULT]`` sections of that file; keywords override it),
    ``inspect="127.0.0.1:0"`` (the request inspector on a free port:
    ``Tunnel.inspect_url``; True: the default address), and so on.

    ``timeout``: seconds to wait for the tunnel (default 10, API_TIMEOUT).
    ``on_request(RequestLog)`` is called (on the tunnel's thread) for each request;
    ``output``: where the Forwarding and access-log lines go (``print``; default
    nowhere).

    Raises ``ValueError`` (UsageError) for a bad argument, ``AuthError`` for a
    rejected token, ``RefusedError`` when the relay refuses the tunnel (a name taken,
    say), ``ConnectionError`` naming the relay when it cannot be reached,
    ``TimeoutError`` when the tunnel is not up within ``timeout``, ``TunnelError``
    for other failures (a certificate that does not verify).  The tunnel then runs
    until ``close()`` (or the end of the process), reconnecting as the command line
    does.
    """
    timeout = _seconds("timeout", timeout, positive=True)
    if isinstance(relay, RunningRelay):
        token = token if token is not None else relay.token
        if relay.plaintext and "plaintext" not in options:
            options["plaintext"] = True
        relay = relay.relay
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise UsageError("target must be a port or a string such as 'HOST:PORT', not %r"
                         % (target,))
    for key, value in (("relay", relay), ("token", token), ("subdomain", subdomain),
                       ("user", user)):
        if value is not None:
            options[key] = value
    if output is not None and not callable(output):
        raise UsageError("output must be callable (print, say), not %r" % (output,))
    if on_request is not None and not callable(on_request):
        raise UsageError("on_request must be callable, not %r" % (on_request,))
    args = _api_args("expose", [str(target)], options, "expose")
    config = expose_config(args)
    try:
        client = Client(config, output=_discard if output is None else _guarded(output,
                                                                               "output"))
    except TunnelError as exc:       # a malformed proxy variable
        raise UsageError(str(exc)) from None
    handle = Tunnel(client, on_request)
    handle._start(timeout)
    return handle


def tunnels() -> List[Tunnel]:
    """The tunnels ``expose`` opened in this process and nobody closed yet."""
    with _api_lock:
        return list(_open_tunnels)


def close_all() -> None:
    """Close every tunnel ``tunnels()`` lists."""
    for handle in tunnels():
        handle.close()


class RunningRelay:
    """A relay started by ``serve``: ``http_port``, ``control_port`` and ``admin_port``
    (the ports it listens on, None when off), ``token`` (the shared token, generated if none was
    given; None with a tokens file), ``domain``, ``fingerprint`` (of its control
    certificate, "" with plaintext), ``relay`` (what ``expose`` takes as ``relay``),
    ``url(name)`` (a tunnel's public URL); ``close()``; a ``with`` block closes it."""

    def __init__(self, relay: "Relay") -> None:
        self._relay = relay
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=relay.run, daemon=True,
                                        name="tunnel.py serve :%d" % relay.http_port)

    @property
    def http_port(self) -> int:
        return self._relay.http_port

    @property
    def control_port(self) -> Optional[int]:
        return self._relay.control_port or None

    @property
    def admin_port(self) -> Optional[int]:
        """The port of /status and /metrics (``admin=``), None when off."""
        return self._relay.admin_port or None

    @property
    def token(self) -> Optional[str]:
        return None if self._relay.config.tokens_file else self._relay.config.token

    @property
    def domain(self) -> str:
        return self._relay.config.domain

    @property
    def fingerprint(self) -> str:
        return self._relay.fingerprint or ""

    @property
    def plaintext(self) -> bool:
        return self._relay.control_tls is None

    @property
    def relay(self) -> str:
        return self._relay.relay_address()

    def url(self, name: str) -> str:
        return self._relay.public_url(name)

    def __repr__(self) -> str:
        return "<RunningRelay %s, clients at %s%s>" % (
            self.url("NAME"), self.relay, " closed" if self._closed else "")

    def __enter__(self) -> "RunningRelay":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self, grace: float = API_CLOSE_GRACE) -> None:
        """Stop the relay: visitors in flight get ``grace`` seconds.  Idempotent."""
        grace = min(_seconds("grace", grace), MAX_SECONDS)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        relay = self._relay
        relay.loop.call_soon_threadsafe(lambda: relay.shutdown(grace))
        self._thread.join(grace + API_CLOSE_GRACE)
        if self._thread.is_alive():
            relay.stop()
            self._thread.join()


def serve(**options: Any) -> RunningRelay:
    """Start a relay on a daemon thread and return it running (``RunningRelay``).

    Every long flag of ``serve`` is a keyword: ``http_port`` and ``control_port``
    (0: a free port, which the handle tells; ``control_port="off"`` or None: WebSocket
    on the visitor port only), ``bind``, ``domain``, ``token`` (default
    $TUNNEL_TOKEN, else a generated one, in ``.token``), ``tokens`` (a users file),
    ``tls_cert``, ``tls_key``, ``state_dir``, ``plaintext=True``, ``max_visitors``,
    ``head_timeout``, ``config="tunnel.ini"`` (its ``[serve]`` and ``[DEFAULT]``
    sections; keywords override it) and so on; defaults as on the command line.

    Raises ``ValueError`` (UsageError) for a bad option, ``OSError`` (ListenError)
    when a port is taken, ``TunnelError`` for unreadable certificates or a bad
    tokens file."""
    args = _api_args("serve", [], options, "serve")
    config, _ = serve_config(args)
    relay = Relay(config)
    try:
        relay.start()
    except BaseException:
        relay.verify_pool.stop()
        relay.loop.close()
        raise
    handle = RunningRelay(relay)
    handle._thread.start()
    return handle


# =============================================================================
# Command line
# =============================================================================

EPILOG = """\
examples:
  python3 tunnel.py serve                       # relay for http://NAME.localhost:8080
  python3 tunnel.py expose 5000 --token T       # share 127.0.0.1:5000 through it
  python3 tunnel.py serve --domain example.com --http-port 80 --token T
  python3 tunnel.py expose 192.168.1.20:3000 --relay example.com:7835 --subdomain demo
"""


class _Parser(argparse.ArgumentParser):
    def flags(self) -> Dict[str, argparse.Action]:
        """Long flags as keyword names (``--host-header``: ``host_header``), for the API."""
        return {opt[2:].replace("-", "_"): action for action in self._actions
                for opt in action.option_strings if opt.startswith("--")}

    def error(self, message: str) -> Any:  # one line, status 2 (not argparse's usage dump)
        raise UsageError(message)


def _port_or_off(text: str) -> Optional[int]:
    """``serve --control-port``: a port number, or ``off`` (None)."""
    if text.strip().lower() == "off":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is neither a port number nor 'off'"
                                         % text) from None


def build_parser(commands: Optional[Dict[str, "_Parser"]] = None) -> argparse.ArgumentParser:
    """The command line; ``commands`` (if given) receives the serve and expose parsers."""
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log every stream (DEBUG)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors (and the Forwarding line)")
    common.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL,
                        metavar="SEC", help="PING interval (default %(default)s)")
    common.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT,
                        metavar="SEC", help="silence that kills a session (default %(default)s)")
    common.add_argument("--grace", type=float, default=GRACE_PERIOD, metavar="SEC",
                        help="on SIGTERM/Ctrl-C, let in-flight requests finish this long "
                        "(default %(default)s)")
    common.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from FILE (INI: a [serve] and an [expose] "
                        "section, [DEFAULT] for both; keys are the long flags without "
                        "their dashes); flags given here override it, it overrides "
                        "the environment variables")
    parser = _Parser(prog="tunnel.py", description="Expose a local port through a relay you "
                     "host yourself.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="tunnel.py " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", parents=[common], help="run the relay",
                           description="Run the relay: visitors connect to --http-port, "
                           "tunnel clients to --control-port.", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--bind", default=None, metavar="ADDR",
                       help="address to listen on (default: 127.0.0.1 with the default "
                       "--domain localhost, whose names only resolve on this machine; else "
                       "%s)" % DEFAULT_BIND)
    serve.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, metavar="PORT",
                       help="port for visitors (default %(default)s)")
    serve.add_argument("--control-port", type=_port_or_off, default=DEFAULT_CONTROL_PORT,
                       metavar="PORT", help="port for tunnel clients (default %(default)s), "
                       "or 'off': clients come in over WebSocket on the visitor port only")
    serve.add_argument("--domain", default=DEFAULT_DOMAIN,
                       help="tunnels are NAME.DOMAIN (default %(default)s)")
    serve.add_argument("--token", default=None,
                       help="shared secret (default: $TUNNEL_TOKEN, else a generated one)")
    serve.add_argument("--public-port", type=int, default=None, metavar="PORT",
                       help="port shown in URLs, when a proxy in front maps ports")
    serve.add_argument("--public-scheme", choices=("http", "https"), default=None,
                       help="scheme shown in URLs (and sent as X-Forwarded-Proto), when a "
                       "TLS proxy or load balancer in front serves HTTPS (default: https "
                       "with --tls-cert, else http)")
    serve.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT,
                       metavar="SEC", help="clients must authenticate within (default "
                       "%(default)s)")
    serve.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT, metavar="SEC",
                       help="a visitor's request head must arrive within, else 408 "
                       "(default %(default)s)")
    serve.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SEC",
                       help="idle keep-alive visitor connections are closed after "
                       "(default %(default)s)")
    serve.add_argument("--max-visitors", type=int, default=MAX_VISITORS, metavar="N",
                       help="visitor connections on the relay; more get 503 (default "
                       "%(default)s)")
    serve.add_argument("--max-visitors-per-tunnel", type=int, default=MAX_VISITORS_PER_TUNNEL,
                       metavar="N", help="visitor connections per tunnel; more get 503 "
                       "(default %(default)s)")
    serve.add_argument("--max-streams", type=int, default=MAX_STREAMS, metavar="N",
                       help="open streams per client session; more get 503 (default "
                       "%(default)s)")
    serve.add_argument("--tokens", metavar="FILE", default=None, dest="tokens_file",
                       help='per-user tokens instead of --token: JSON {"users": {NAME: '
                       '{"token": T, "subdomains": ["NAME", "NAME-*"], "max_tunnels": 3}}}; '
                       "SIGHUP reloads it")
    serve.add_argument("--auth-ban-after", type=int, default=PENALTY_BAN_AFTER, metavar="N",
                       help="failed handshakes (or visitor logins) from one address before "
                       "a temporary ban; 0 disables (default %(default)s)")
    serve.add_argument("--auth-ban-time", type=float, default=PENALTY_BAN_TIME,
                       metavar="SEC", help="length of that ban (default %(default)s)")
    serve.add_argument("--tls-cert", metavar="FILE", default=None,
                       help="serve visitors over HTTPS with this certificate chain (PEM; "
                       "normally a wildcard for *.DOMAIN); also used for the control port")
    serve.add_argument("--tls-key", metavar="FILE", default=None,
                       help="private key for --tls-cert (default: in the same file)")
    serve.add_argument("--control-tls-cert", metavar="FILE", default=None,
                       help="a separate certificate for the control port (TLS there even "
                       "without --tls-cert)")
    serve.add_argument("--control-tls-key", metavar="FILE", default=None,
                       help="private key for --control-tls-cert")
    serve.add_argument("--state-dir", metavar="DIR", default=None,
                       help="where the relay keeps the key and self-signed certificate it "
                       "makes for its control port when it has no --tls-cert (default: "
                       "$TUNNEL_STATE_DIR, else ~/.local/state/tunnel.py)")
    serve.add_argument("--plaintext", action="store_true",
                       help="control port in plain TCP instead of TLS: for loopback and "
                       "trusted networks only (warns)")
    serve.add_argument("--tls-proxy-fingerprint", metavar="SHA256", action="append",
                       dest="tls_proxy_fingerprints", default=None,
                       help="a TLS-terminating proxy in front of the control port shows "
                       "clients this certificate: accept it in the channel binding "
                       "(repeatable)")
    serve.add_argument("--http-redirect-port", type=int, default=None, metavar="PORT",
                       dest="redirect_port",
                       help="with --tls-cert: also listen on PORT for plain HTTP that "
                       "only redirects to HTTPS (for the domain and NAME.DOMAIN; other "
                       "hosts get 404)")
    serve.add_argument("--max-head-size", type=int, default=MAX_HEAD_SIZE, metavar="BYTES",
                       help="largest request head; larger gets 431 (default %(default)s)")
    serve.add_argument("--max-unauthenticated", type=int, default=MAX_UNAUTHENTICATED,
                       metavar="N", help="control connections still in the handshake; "
                       "more are closed (default %(default)s)")
    serve.add_argument("--session-budget", type=int, default=SESSION_BUDGET, metavar="BYTES",
                       help="receive windows of all of one client's streams together: what "
                       "the relay may buffer for it, plus %d KiB a stream once it is spent "
                       "(default %%(default)s)" % (MIN_INITIAL_WINDOW // 1024))
    serve.add_argument("--max-unauthenticated-per-source", type=int,
                       default=MAX_UNAUTHENTICATED_PER_SOURCE, metavar="N",
                       help="control connections in the handshake from one source address "
                       "(an IPv6 source is its /64); more are closed (default %(default)s)")
    serve.add_argument("--trusted-proxy", dest="trusted_proxies", metavar="CIDR",
                       action="append", default=None,
                       help="a load balancer or proxy in front of the relay: tunnel clients "
                       "over WebSocket from these addresses count by the last address of "
                       "X-Forwarded-For, for the handshake caps and bans (repeatable; "
                       "default: none)")
    serve.add_argument("--max-visitors-per-source", type=int, default=MAX_VISITORS_PER_SOURCE,
                       metavar="N", help="visitor connections from one source address (an "
                       "IPv6 source is its /64), TLS handshakes included; more get 503 "
                       "(default %(default)s)")
    serve.add_argument("--max-visitors-per-source-per-tunnel", type=int,
                       default=MAX_VISITORS_PER_SOURCE_PER_TUNNEL, metavar="N",
                       help="... of them bound to one tunnel; more get 503 (default "
                       "%(default)s)")
    serve.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT, metavar="SEC",
                       help="a request body that advances by less than %d bytes for this "
                       "long (while the relay reads it) is cut off: 408, or a close if the "
                       "response has started (default %%(default)s)" % BODY_MIN_PROGRESS)
    serve.add_argument("--send-timeout", type=float, default=SEND_TIMEOUT, metavar="SEC",
                       help="a visitor with response bytes waiting that takes none of them "
                       "for this long is disconnected (default %(default)s)")
    serve.add_argument("--verify-threads", type=int, default=VERIFY_THREADS, metavar="N",
                       help="threads that check visitors' basic-auth passwords "
                       "(default %(default)s)")
    serve.add_argument("--max-verifications", type=int, default=MAX_VERIFICATIONS,
                       metavar="N", help="password checks queued or running; more answer "
                       "503 (default %(default)s)")
    serve.add_argument("--max-verifications-per-source", type=int,
                       default=MAX_VERIFICATIONS_PER_SOURCE, metavar="N",
                       help="password checks from one address queued or running; "
                       "more answer 429 (default %(default)s)")
    serve.add_argument("--admin", default=None, metavar="[HOST:]PORT",
                       help="serve /status (a page; ?format=json) and /metrics (Prometheus) "
                       "for the operator on this address; a bare PORT is on 127.0.0.1, any "
                       "address off loopback needs --admin-token (default: off)")
    serve.add_argument("--admin-token", default=None, metavar="TOKEN",
                       help="--admin answers only requests with Authorization: Bearer TOKEN "
                       "(default: $%s)" % ADMIN_TOKEN_ENV)
    serve.add_argument("--access-log", default=None, metavar="FILE|-",
                       help="one line per visitor request, appended to FILE (-: standard "
                       "output; SIGHUP reopens FILE), secret query values masked "
                       "(default: none)")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default=LOG_FORMAT_COMBINED,
                       help="--access-log lines: combined (Combined Log Format, the tunnel's "
                       "name first) or json (default %(default)s)")
    expose = sub.add_parser("expose", parents=[common], help="share a local port",
                            description="Share a local port through a relay.", epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    expose.add_argument("target", metavar="TARGET", help="PORT (127.0.0.1:PORT, or [::1]:PORT "
                        "when 127.0.0.1 refuses), HOST:PORT, http://HOST:PORT or "
                        "https://HOST:PORT (TLS to the local service)")
    expose.add_argument("extra", nargs="?", default=None, help=argparse.SUPPRESS)
    expose.add_argument("--proxy", default=None, metavar="URL",
                        help="reach the relay through this proxy: http://[USER:PASS@]HOST:PORT "
                        "(CONNECT), https://..., socks5://..., socks5h://... (default: "
                        "$HTTPS_PROXY, $HTTP_PROXY or $ALL_PROXY by the relay's form, "
                        "curl's rules, $NO_PROXY honoured; an empty URL: none)")
    expose.add_argument("--host-header", metavar="rewrite|HOST", default=None,
                        help="the Host the local service gets: 'rewrite' sends its own "
                        "HOST:PORT (and an Origin/Referer naming the tunnel becomes its "
                        "origin: Jupyter, Django, Vite), HOST sends that; the visitor's stays "
                        "in X-Forwarded-Host (default: the visitor's Host, unchanged)")
    expose.add_argument("--target-insecure", action="store_true",
                        help="an https:// TARGET's certificate is not verified (a local "
                        "server with a self-signed one)")
    expose.add_argument("--target-ca", metavar="FILE", default=None,
                        help="CA certificates that verify an https:// TARGET (default: the "
                        "system's)")
    expose.add_argument("--proxy-ca", metavar="FILE", default=None,
                        help="CA certificates that verify an https:// proxy (default: the "
                        "system's)")
    expose.add_argument("--no-proxy", action="store_true",
                        help="connect directly, whatever the proxy variables say")
    expose.add_argument("--relay", default=None, metavar="ADDR",
                        help="the relay: HOST:PORT of its control port, or its URL, "
                        "https://HOST[:PORT] or http://HOST[:PORT] (WebSocket on its visitor "
                        "port; wss://, ws:// too) (default: $TUNNEL_RELAY, else %s)"
                        % DEFAULT_RELAY)
    expose.add_argument("--token", default=None, help="shared secret (default: $TUNNEL_TOKEN)")
    expose.add_argument("--subdomain", default=None, metavar="NAME",
                        help="ask for NAME.DOMAIN (default: a random readable name)")
    expose.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT,
                        metavar="SEC", help="for the relay and the target (default "
                        "%(default)s)")
    expose.add_argument("--user", default=None, metavar="NAME",
                        help="user name on a relay with --tokens (default: $TUNNEL_USER)")
    expose.add_argument("--basic-auth", metavar="USER:PASS", default=None,
                        help="visitors must log in with HTTP Basic; PASS may be a hash from "
                        "'tunnel.py hash-password'")
    expose.add_argument("--visitor-token", metavar="TOKEN", default=None,
                        help="visitors must send TOKEN (X-Tunnel-Token header, or once "
                        "?tunnel_token=TOKEN, which sets a cookie)")
    expose.add_argument("--allow", metavar="CIDR", action="append", default=None,
                        help="only visitors from these addresses (repeatable)")
    expose.add_argument("--deny", metavar="CIDR", action="append", default=None,
                        help="never visitors from these addresses (repeatable)")
    expose.add_argument("--tls", action="store_true",
                        help="also verify the relay's certificate with the system store "
                        "(the control channel is TLS anyway, and the handshake's channel "
                        "binding detects a man in the middle without any CA)")
    expose.add_argument("--tls-ca", metavar="FILE", default=None,
                        help="also verify the relay's certificate with this CA file")
    expose.add_argument("--tls-fingerprint", metavar="SHA256", default=None,
                        help="also pin the relay certificate's SHA-256 fingerprint, as "
                        "printed by serve")
    expose.add_argument("--insecure", action="store_true",
                        help="no CA or fingerprint check: the default now (kept for old "
                        "scripts; the channel binding still runs)")
    expose.add_argument("--plaintext", action="store_true",
                        help="control channel in plain TCP (for a relay started with "
                        "--plaintext): loopback and trusted networks only; warns, and "
                        "refuses to send visitor credentials off loopback")
    expose.add_argument("--tls-interception", action="store_true",
                        help="this network inspects TLS (a corporate middlebox re-signs "
                        "it): skip the channel binding, verify the middlebox with --tls "
                        "or --tls-ca; the relay logs it")
    expose.add_argument("--backoff-max", type=float, default=BACKOFF_MAX, metavar="SEC",
                        help="longest wait between reconnects (default %(default)s)")
    expose.add_argument("--inspect", nargs="?", const=INSPECT_DEFAULT, default=None,
                        metavar="ADDR",
                        help="serve a page (and a JSON API) that shows the requests and "
                        "responses through the tunnel, with replay, on ADDR: HOST:PORT or "
                        "PORT (without ADDR: %s, or the next free port; after TARGET); "
                        "off unless given; off loopback it warns: it shows credentials"
                        % INSPECT_DEFAULT)
    expose.add_argument("--inspect-keep", type=int, default=INSPECT_KEEP, metavar="N",
                        help="requests the inspector keeps, each with the first %d KiB of "
                        "its bodies (default %%(default)s)" % (INSPECT_BODY_LIMIT // 1024))
    if commands is not None:
        commands.update(serve=serve, expose=expose)
    sub.add_parser("token", help="print a new strong token",
                   description="Print a new random token (256 bits, URL-safe).")
    sub.add_parser("hash-password", help="print a PBKDF2 hash for --basic-auth",
                   description="Read a password (prompted, or one line on stdin) and print "
                   "its PBKDF2-SHA256 hash, usable as --basic-auth USER:HASH.")
    return parser


# -- the configuration file: serve --config FILE, expose --config FILE ----------------
#
# INI, read by configparser without interpolation (a "%" or "$" in a password is itself):
# a [serve] section, an [expose] section, and [DEFAULT] for the keys both commands have
# (token, plaintext, the heartbeats...), so that one file can hold both.  A key is a long
# flag without its dashes ("-" or "_" inside), its value what the flag takes, converted by
# the flag's own argparse type (so a bad value reads as it would on the command line);
# flags without a value take true/false, repeatable ones several lines or commas.  The
# order: a flag given overrides the file, the file overrides the environment variables
# (serve_config and expose_config read TUNNEL_TOKEN and the like only for what is still
# unset), which override the defaults; the Python API's keywords override the file too.


class ConfigFile:
    """One command's settings from a config file: ``values`` (argparse dest -> value, as
    the flag would have parsed it), ``where`` (dest -> "[section] key", for messages
    about it) and ``warnings`` (a secret in a file others can read: said, not refused,
    as the file is the operator's).  Raises ConfigError "config FILE: ..." for anything
    wrong in it: unreadable, not INI, an unknown section or key, a bad value."""

    def __init__(self, path: str, command: str, commands: Dict[str, "_Parser"]) -> None:
        self.path = path
        self.command = command
        self.parser = commands[command]
        self.flags = self.parser.flags()
        self.values: Dict[str, Any] = {}
        self.where: Dict[str, str] = {}
        self.warnings: List[str] = []
        self.section_names = list(commands) + [CONFIG_SHARED]   # (in that order)
        others = [name for name in commands if name != command]
        self.other = others[0] if others else ""
        theirs = commands[self.other].flags() if self.other else {}
        positional = {action.dest for action in self.parser._actions
                      if not action.option_strings and action.help != argparse.SUPPRESS}
        text, mode = self._read()
        parsed = self._parse(text)
        sections = self._sections(parsed)
        secrets_seen: List[str] = []
        for section in (sections.get(CONFIG_SHARED), sections.get(command)):
            if section is None:
                continue
            names: Dict[str, str] = {}
            for key, value in parsed.items(section, raw=True):
                name = key.replace("-", "_")
                label = "[%s] %s" % (section, key)
                if name in names:
                    raise self.error("[%s] %s and %s are the same key" % (section, names[name],
                                                                           key))
                names[name] = key
                action = self.flags.get(name)
                if name == "config":
                    raise self.error("%s: one file a run (a config file names no other)"
                                     % label)
                if name in positional:
                    raise self.error("%s: %s goes on the command line" % (label,
                                                                          name.upper()))
                if name in CONFIG_NOT_SETTABLE or action is None and name not in theirs:
                    raise self.error("[%s] unknown key %r%s" % (section, key,
                                                                self._hint(name)))
                if section == sections.get(CONFIG_SHARED) and (action is None
                                                               or name not in theirs):
                    owner = command if action is not None else self.other
                    raise self.error("%s: only %s has it (put it in [%s])"
                                     % (label, owner, owner))
                if action is None:
                    raise self.error("%s: an option of %s, not of %s (put it in [%s])"
                                     % (label, self.other, command, self.other))
                self.values[action.dest] = self._value(action, label, value)
                self.where[action.dest] = label
                if (name.endswith("token") or name == "basic_auth"
                        or name == "proxy" and "@" in value) and key not in secrets_seen:
                    secrets_seen.append(key)
        if os.name == "posix" and mode & CONFIG_FOREIGN:
            self.warnings.append("config %s belongs to another user, who can change what "
                                 "this tool does (its relay, tokens, files): use a file of "
                                 "your own" % path)
        elif os.name == "posix" and mode & CONFIG_WRITABLE_MODE:
            self.warnings.append("config %s can be changed by others (mode %03o): chmod "
                                 "go-w %s" % (path, mode & 0o777, path))
        elif secrets_seen and os.name == "posix" and mode & CONFIG_SECRET_MODE:
            self.warnings.append("config %s holds %s and others can read it (mode %03o): "
                                 "chmod 600 %s" % (path, ", ".join(secrets_seen),
                                                   mode & 0o777, path))

    def error(self, what: str) -> ConfigError:
        return ConfigError("config %s: %s" % (self.path, what))

    def _read(self) -> Tuple[str, int]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                mode = st.st_mode
                import stat
                if (os.name == "posix" and st.st_uid not in (0, os.getuid())
                        and stat.S_ISREG(mode)):    # as ssh: another user's file
                    mode |= CONFIG_FOREIGN          # steers this tool
                data = f.read(CONFIG_MAX_SIZE + 1)    # bounded: --config /dev/zero ends
        except OSError as exc:
            raise self.error("cannot read it: %s" % describe_oserror(exc)) from None
        if len(data) > CONFIG_MAX_SIZE:
            raise self.error("larger than %d KiB: not a settings file"
                             % (CONFIG_MAX_SIZE // 1024))
        try:
            return data.decode("utf-8-sig"), mode
        except UnicodeDecodeError as exc:
            raise self.error("line %d: not UTF-8 text" % (data.count(b"\n", 0, exc.start)
                                                          + 1)) from None

    def _parse(self, text: str) -> Any:
        import configparser    # here: only a run with --config pays for the module
        # No default section of configparser's own: [DEFAULT] is read (and checked) here.
        parsed = configparser.ConfigParser(interpolation=None, default_section="\0",
                                           empty_lines_in_values=False,
                                           inline_comment_prefixes=None)
        try:
            parsed.read_string(text, source=self.path)
        except configparser.MissingSectionHeaderError as exc:
            raise self.error("line %d: %r comes before any section (such as [%s])"
                             % (exc.lineno, exc.line.strip(), self.command)) from None
        except configparser.DuplicateSectionError as exc:
            raise self.error("line %s: section [%s] appears twice"
                             % (exc.lineno, exc.section)) from None
        except configparser.DuplicateOptionError as exc:
            raise self.error("line %s: [%s] %s is set twice"
                             % (exc.lineno, exc.section, exc.option)) from None
        except configparser.ParsingError as exc:
            lineno = exc.errors[0][0]             # (its text: a repr before Python 3.13)
            lines = text.splitlines()
            raise self.error("line %d: expected KEY = VALUE, not %r" % (
                lineno, lines[lineno - 1].strip() if lineno <= len(lines) else "")) from None
        except configparser.Error as exc:
            raise self.error(str(exc).splitlines()[0]) from None
        return parsed

    def _sections(self, parsed: Any) -> Dict[str, str]:
        """The sections there are, by what they mean (serve, expose, CONFIG_SHARED)."""
        known = {name.lower(): name for name in self.section_names}
        found: Dict[str, str] = {}
        for section in parsed.sections():
            meaning = known.get(section.strip().lower())
            if meaning is None:
                raise self.error("unknown section [%s] (expected %s)" % (
                    section, ", ".join("[%s]" % name for name in self.section_names)))
            if meaning in found:
                raise self.error("sections [%s] and [%s] are the same" % (found[meaning],
                                                                          section))
            found[meaning] = section
        if self.command not in found and CONFIG_SHARED not in found:
            raise self.error("no [%s] section (nor [%s])" % (self.command, CONFIG_SHARED))
        return found

    def _hint(self, name: str) -> str:
        import difflib
        close = difflib.get_close_matches(name, [n for n in self.flags
                                                 if n not in CONFIG_NOT_SETTABLE], 1)
        return " (did you mean %s?)" % close[0].replace("_", "-") if close else ""

    def _value(self, action: argparse.Action, label: str, text: str) -> Any:
        """``text`` as the flag would have parsed it (its own type and choices)."""
        if action.nargs == 0:                                  # store_true
            state = CONFIG_BOOLEANS.get(text.lower())
            if state is None:
                raise self.error("%s: expected true or false, not %r" % (label, text))
            return action.const if state else action.default
        if isinstance(action, argparse._AppendAction):          # repeatable
            items = [item.strip() for line in text.splitlines() for item in line.split(",")]
            return [self._one(action, label, item) for item in items if item] or None
        if "\n" in text:
            raise self.error("%s: one value, not %d lines (only a repeatable flag takes "
                             "several)" % (label, len(text.splitlines())))
        if action.nargs == "?" and text.lower() in CONFIG_BOOLEANS and not text.isdigit():
            return action.const if CONFIG_BOOLEANS[text.lower()] else action.default
        return self._one(action, label, text)

    def _one(self, action: argparse.Action, label: str, text: str) -> Any:
        try:
            value = self.parser._get_value(action, text)
            self.parser._check_value(action, value)
        except argparse.ArgumentError as exc:
            raise self.error("%s: %s" % (label, exc.message)) from None
        return value

    def overridden(self, dests: Iterable[str]) -> None:
        """These settings came from the command line (or a keyword) after all."""
        for dest in dests:
            self.where.pop(dest, None)

    def blame(self, exc: UsageError) -> UsageError:
        """A validate() error, "config FILE: [section] key: " first when a flag it names
        was set by this file."""
        labels: List[str] = []
        for flag in re.findall(r"--([a-z][a-z0-9-]*)", str(exc)):
            action = self.flags.get(flag.replace("-", "_"))
            label = self.where.get(action.dest) if action is not None else None
            if label is not None and label not in labels:
                labels.append(label)
        if not labels:
            return exc
        return self.error("%s: %s" % (", ".join(labels), exc))


def with_config_file(parser: argparse.ArgumentParser, commands: Dict[str, "_Parser"],
                     argv: Optional[List[str]], args: argparse.Namespace) -> argparse.Namespace:
    """``args`` parsed again with ``args.config``'s values as the defaults: what a flag
    gives still wins (a repeatable flag given replaces the file's list rather than adding
    to it).  The ConfigFile is ``config_source`` on the namespace returned."""
    source = ConfigFile(args.config, args.command, commands)
    command = commands[args.command]
    repeatable = {action.dest for action in command._actions
                  if isinstance(action, argparse._AppendAction)}
    given = vars(args)                   # without the file: a flag given differs from
    source.overridden(dest for dest in source.values    # its default (or it is the default)
                      if given[dest] != command.get_default(dest))
    command.set_defaults(**{dest: value for dest, value in source.values.items()
                            if dest not in repeatable})
    again = parser.parse_args(argv)
    for dest in repeatable & set(source.values):
        setattr(again, dest, source.values[dest] if given[dest] is None else given[dest])
    again.config_source = source
    return again


if TYPE_CHECKING:
    from typing import Iterable, TypeVar
    _Made = TypeVar("_Made")


def _blames_config_file(make: Callable[[argparse.Namespace], _Made]
                        ) -> Callable[[argparse.Namespace], _Made]:
    """serve_config and expose_config: a UsageError about a flag the config file set says
    where it was set."""
    @functools.wraps(make)
    def checked(args: argparse.Namespace) -> _Made:
        try:
            return make(args)
        except UsageError as exc:
            source = getattr(args, "config_source", None)
            if source is None:
                raise
            raise source.blame(exc) from None
    return checked


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Lift the soft open-files limit towards the hard one (each visitor costs a
    descriptor on the relay and one on the client); returns the new soft limit."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class LineOutput:
    """stdout for the access log: the lines of one loop turn are written together, in
    one system call even with PYTHONUNBUFFERED=1 (common in containers): at 10,000
    requests/s a write per line is a visible cost."""

    def __init__(self, loop: EventLoop, stream: Any = None) -> None:
        self.loop = loop
        self.stream = stream or sys.stdout
        self.lines: List[str] = []
        self.flush_scheduled = False
        self.closed = False

    def __call__(self, line: str) -> None:
        if self.closed:
            return
        self.lines.append(line)
        self.loop.schedule_flush(self)

    def flush(self) -> None:
        if not self.lines:
            return
        text = "\n".join(self.lines) + "\n"
        self.lines.clear()
        try:
            self.stream.write(text)     # one write even when stdout is unbuffered
            self.stream.flush()
        except (OSError, ValueError):   # stdout closed or a broken pipe: stop logging
            self.closed = True


def access_line(record: Dict[str, Any], clock: str) -> str:
    """One request's access-log line: ``10:42:07 GET / 200 3.1ms 1.2KB``; an upgraded
    connection's at its end: ``... 101 WebSocket 12.3s 1.2KB in 3.4KB out``."""
    what = "%s %s" % (record["method"], logged_target(record["target"]))
    if not what.isprintable():   # C0, DEL, C1 (CSI is 0x9b), format and separator chars
        what = escape_unprintable(what)
    if record.get("upgraded"):      # the end of a WebSocket (or other 101) connection
        seconds = record["duration"]
        return "%s %s %d %s %s %s in %s out" % (
            clock, what, record["status"], "WebSocket" if record.get("websocket") else "upgraded",
            "%.1fms" % (seconds * 1000.0) if seconds < 1.0 else "%.1fs" % seconds,
            format_size(record["bytes_in"]), format_size(record["bytes"]))
    return "%s %s %d %.1fms %s" % (clock, what, record["status"], record["duration"] * 1000.0,
                                   format_size(record["bytes"]))


class AccessSummary:
    """The client's access log as console lines, pure (the caller says what time it is):
    ``feed(record, now) -> lines`` for each LOG record, ``tick(now) -> lines`` after a
    second ends while ``busy``.

    One line a request (``access_line``) while at most SUMMARY_RATE come in one
    wall-clock second.  The next one in that second starts the summaries: SUMMARY_NOTICE,
    then one line a second, ``12:00:03  14,210 requests  200 x14,190  404 x20  p50 1.2ms
    p99 3.4ms``, for the requests not printed as lines (each request is in one line).
    Back to a line a request only after a second with at most SUMMARY_CALM requests: a
    hysteresis, so that a rate around SUMMARY_RATE does not switch the console between
    the two every second.  A second without any request is calm too.  In summary mode a
    record costs a count and a list append: no line is formatted."""

    def __init__(self, rate: int = SUMMARY_RATE, calm: int = SUMMARY_CALM,
                 samples: int = SUMMARY_MAX_SAMPLES) -> None:
        self.rate = rate
        self.calm = calm
        self.samples = samples
        self.busy = False
        self.second = 0.0                    # the wall-clock second being counted
        self.ends = 0.0                      # ... and the next one
        self.clock = ""                      # ... as HH:MM:SS (strftime once a second)
        self.count = 0                       # requests in it
        self.statuses: Dict[int, int] = {}   # summarized requests in it, by status
        self.durations: List[float] = []     # ... their durations in us (not upgraded ones')
        self.timed = 0                       # ... how many more there were

    def feed(self, record: Dict[str, Any], now: float) -> List[str]:
        lines = [] if self.second <= now < self.ends else self._roll(int(now))
        self.count += 1
        if not self.busy:
            if self.count <= self.rate:
                lines.append(access_line(record, self.clock))
                return lines
            self.busy = True
            lines.append("%s %s" % (self.clock, SUMMARY_NOTICE))
        status = record["status"]       # (the summary's own work, once a request: kept
        statuses = self.statuses        # to a count and an append)
        if status in statuses:
            statuses[status] += 1
        else:
            statuses[status] = 1
        if "upgraded" in record and record["upgraded"]:
            return lines                # a WebSocket's life is no response time
        durations = self.durations
        if len(durations) < self.samples:
            durations.append(record["duration"] * 1e6)
        else:
            self.sample(record["duration"] * 1e6)
        return lines

    def sample(self, duration: float) -> None:
        """A flood: keep a uniform sample of the second's durations (us; reservoir)."""
        self.timed += 1
        at = random.randrange(self.samples + self.timed)
        if at < self.samples:
            self.durations[at] = duration

    def tick(self, now: float) -> List[str]:
        return [] if self.second <= now < self.ends else self._roll(int(now))

    def flush(self) -> List[str]:
        """The summary of this second so far, now (the client is stopping)."""
        lines = [self.summary_line()] if self.statuses else []
        self.statuses = {}
        self.durations = []
        self.timed = 0
        return lines

    def _roll(self, second: int) -> List[str]:
        """A new second: the last one's summary line; lines again after a calm second."""
        lines = [self.summary_line()] if self.statuses else []
        if self.busy and (self.count <= self.calm or second > self.ends):
            self.busy = False
        self.second = float(second)          # (floats: compared with a float a request)
        self.ends = self.second + 1.0
        self.clock = time.strftime("%H:%M:%S", time.localtime(second))
        self.count = 0
        self.statuses = {}
        self.durations = []
        self.timed = 0
        return lines

    def summary_line(self) -> str:
        """The summary of the requests counted in this second so far."""
        total = sum(self.statuses.values())
        common = sorted(self.statuses.items(), key=lambda item: -item[1])
        parts = ["%s  %s request%s" % (self.clock, format(total, ","),
                                       "" if total == 1 else "s")]
        parts += ["%d x%s" % (status, format(n, ","))
                  for status, n in sorted(common[:SUMMARY_MAX_STATUSES])]
        rest = sum(n for _, n in common[SUMMARY_MAX_STATUSES:])
        if rest:
            parts.append("other x%s" % format(rest, ","))
        durations = sorted(self.durations)
        for percent in SUMMARY_PERCENTILES if durations else ():
            rank = max(1, -(-percent * len(durations) // 100))     # nearest rank
            parts.append("p%d %.1fms" % (percent, durations[rank - 1] / 1000.0))
        return "  ".join(parts)


class AccessConsole:
    """AccessSummary on a loop: its lines go to ``output``, and while it is busy a timer
    ends each second, so a second's summary line comes when the second is over, not
    with the next request."""

    def __init__(self, loop: EventLoop, output: Callable[[str], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.loop = loop
        self.output = output
        self.clock = clock                   # the wall clock (the lines show its time)
        self.summary = AccessSummary()
        self.timer: Optional[Timer] = None

    def record(self, record: Dict[str, Any]) -> None:
        summary = self.summary
        for line in summary.feed(record, self.clock()):
            self.output(line)
        if summary.busy and self.timer is None:
            self._arm()

    def count(self, records: List[Tuple[int, int, int, int]]) -> bool:
        """Take a batch's records (status, us, bytes, text length) as counts if the
        summary is busy in the current second (True); else False: they are for
        ``record``, one by one."""
        summary = self.summary
        now = self.clock()
        if not (summary.busy and summary.second <= now < summary.ends):
            return False
        summary.count += len(records)
        statuses, durations = summary.statuses, summary.durations
        for status, n in collections.Counter(map(_FIRST, records)).items():
            statuses[status] = statuses.get(status, 0) + n
        room = summary.samples - len(durations)
        if len(records) <= room:
            durations.extend(map(_SECOND, records))     # (microseconds: see AccessSummary)
        else:
            for _, micros, _, _ in records:
                summary.sample(micros)
        return True

    def _arm(self) -> None:
        delay = self.summary.ends - self.clock() + SUMMARY_TICK_SLACK
        self.timer = self.loop.call_later(max(delay, 0.0), self._tick)

    def _tick(self) -> None:
        self.timer = None
        for line in self.summary.tick(self.clock()):
            self.output(line)
        if self.summary.busy:
            self._arm()

    def close(self) -> None:
        """The client stopped: the requests of a second not summarized yet, now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for line in self.summary.flush():
            self.output(line)


def _install_signals(loop: EventLoop, on_signal: Callable[[], None],
                     on_hup: Optional[Callable[[], None]] = None) -> None:
    """Signals only queue work for the loop: a handler runs between any two bytecodes,
    so doing the work there could interrupt the loop in the middle of a change."""
    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(on_signal)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if on_hup is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: loop.call_soon_threadsafe(on_hup))


@_blames_config_file
def serve_config(args: argparse.Namespace) -> Tuple[RelayConfig, bool]:
    """``serve``'s flags (or ``tunnel.serve``'s keywords) as a checked RelayConfig, and
    whether its token was generated; raises UsageError.  The flags' destinations are
    the config's field names: they are copied in one loop."""
    config = RelayConfig(**{name: getattr(args, name) for name in RelayConfig.fields()
                            if hasattr(args, name)})
    config.token = config.token or ("" if config.tokens_file
                                    else os.environ.get("TUNNEL_TOKEN", ""))
    config.admin_token = args.admin_token or (os.environ.get(ADMIN_TOKEN_ENV, "")
                                              if args.admin is not None else "")
    generated = not config.token and not config.tokens_file
    if generated:
        config.token = new_token()
    return config.validate(), generated


def cmd_serve(args: argparse.Namespace) -> int:
    config, generated = serve_config(args)
    token = config.token
    try:
        relay = Relay(config)
    except TunnelError as exc:     # an unreadable tokens file
        log.error("%s", exc)
        return EXIT_FAILURE
    _install_signals(relay.loop, relay.shutdown, relay.reload)  # before "listening"
    try:
        relay.start()
    except UsageError:             # an access log that cannot be opened
        relay.loop.close()
        raise
    except TunnelError as exc:
        log.error("%s", exc)
        relay.loop.close()
        return EXIT_FAILURE
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.bind, describe_oserror(exc))
        relay.loop.close()
        return EXIT_FAILURE
    tls_flag = " --plaintext" if relay.control_tls is None else ""
    if relay.fingerprint:
        _print("TLS certificate SHA-256 fingerprint: %s" % relay.fingerprint)
    if generated:
        _print("No token given; generated one for this run. Expose a port with:")
        _print("  python3 tunnel.py expose 5000 --relay %s --token %s%s"
               % (relay.relay_address(), token, tls_flag))
    relay.run()
    log.info("relay stopped")
    return EXIT_OK


TARGET_PROTOCOLS = ("http", "https", "tcp", "tls")   # "expose http 5000" is ngrok's habit
TARGET_DEFAULT_PORTS = {"http": 80, "https": 443}     # a TARGET URL without a port
HOST_HEADER_REWRITE = "rewrite"         # expose --host-header rewrite: the target's own


def parse_target(text: str) -> Tuple[str, int]:
    """expose's TARGET as (host, port); see parse_target_url."""
    return parse_target_url(text)[1:]


def is_bare_port(text: str) -> bool:
    """expose's TARGET is just a PORT (no host, no scheme): loopback, IPv4 or IPv6."""
    return bool(_ASCII_DIGITS.fullmatch(text.strip()))


def parse_target_url(text: str) -> Tuple[str, str, int]:
    """expose's TARGET: ``PORT``, ``HOST:PORT``, ``http://HOST[:PORT][/]`` or
    ``https://HOST[:PORT][/]`` (TLS to the origin), as (scheme, host, port); raises
    UsageError with a hint for what a user of other tools may type instead."""
    lowered = text.strip().lower()
    if "@" in text:             # user info: never repeated (it would show a password)
        raise UsageError("invalid TARGET: it takes no user name or password (expected PORT, "
                         "HOST:PORT or http(s)://HOST:PORT)")
    if lowered in TARGET_PROTOCOLS:
        raise UsageError("TARGET is the port (or HOST:PORT), not a protocol: as in "
                         "'expose 5000'")
    scheme, sep, rest = text.strip().partition("://")
    scheme = scheme.lower() if sep else "http"
    if sep:
        if scheme not in ("http", "https"):
            raise UsageError("invalid TARGET %r: expected PORT, HOST:PORT, http://HOST:PORT "
                             "or https://HOST:PORT" % text)
        if rest.endswith("/"):
            rest = rest[:-1]
        if not rest or "/" in rest or "?" in rest or "#" in rest or "@" in rest:
            raise UsageError("invalid TARGET %r: expected http://HOST:PORT, without a "
                             "path" % text)
        text = rest
    try:
        host, port = parse_hostport(text, default_host="127.0.0.1", default_port=(
            TARGET_DEFAULT_PORTS[scheme] if sep else None))
        return scheme, _relay_host(host), port
    except ValueError as exc:
        raise UsageError("invalid TARGET %r: expected PORT or HOST:PORT (%s)"
                         % (text, exc)) from None


@_blames_config_file
def expose_config(args: argparse.Namespace) -> ClientConfig:
    """``expose``'s flags (or ``tunnel.expose``'s arguments) as a checked ClientConfig,
    with $TUNNEL_RELAY, $TUNNEL_TOKEN and $TUNNEL_USER filled in; raises UsageError.
    The flags named after config fields are copied in one loop; TARGET, --relay,
    --quiet and the visitor-access flags are translated here."""
    if args.extra is not None:
        if args.target.strip().lower() in TARGET_PROTOCOLS:
            raise UsageError("TARGET is the port (or HOST:PORT), not a protocol: as in "
                             "'expose %s'" % args.extra)
        raise UsageError("unexpected argument %r after TARGET %r" % (args.extra, args.target))
    config = ClientConfig(**{name: getattr(args, name) for name in ClientConfig.fields()
                             if hasattr(args, name)})
    target_scheme, config.target_host, config.target_port = parse_target_url(args.target)
    config.target_tls = target_scheme == "https"
    source = "--relay" if args.relay else "TUNNEL_RELAY"
    relay_text = args.relay or os.environ.get("TUNNEL_RELAY") or DEFAULT_RELAY
    try:
        config.relay_scheme, config.relay_host, config.relay_port = parse_relay(relay_text)
    except ValueError as exc:
        reason = str(exc)
        if "expected" not in reason and "use https://" not in reason:
            reason += " (expected HOST:PORT, https://HOST[:PORT] or http://HOST[:PORT])"
        raise UsageError("invalid %s '%s': %s" % (source, relay_text_shown(relay_text),
                                                   reason)) from None
    config.token = args.token or os.environ.get("TUNNEL_TOKEN", "")
    config.user = args.user or os.environ.get("TUNNEL_USER") or None
    config.target_loopback_fallback = is_bare_port(args.target)
    config.access_log = not args.quiet
    config.access = visitor_access(args) or None
    config.validate()
    if config.insecure:
        log.warning("--insecure: the relay's certificate is NOT verified by a CA or a "
                    "fingerprint; that is the default now, and the handshake's channel "
                    "binding still detects a man in the middle")
    return config


def visitor_access(args: argparse.Namespace) -> Dict[str, Any]:
    """--basic-auth, --visitor-token, --allow and --deny as the AccessPolicy spec the
    relay gets (a password becomes its PBKDF2 hash here: the relay never sees it)."""
    access: Dict[str, Any] = {}
    if args.basic_auth is not None:
        user, sep, password = args.basic_auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("--basic-auth needs USER:PASS")
        if password.startswith(PBKDF2_PREFIX) and not is_password_hash(password):
            # Unquoted, the shell turns "$100000$salt$hash" into "00000": never use what
            # is left as a plain password.
            raise UsageError("--basic-auth: PASS starts with %s but is not a valid hash "
                             "(%d to %d iterations, from hash-password); single-quote it "
                             "so the shell keeps its $ signs: --basic-auth 'USER:%s$...'"
                             % (PBKDF2_PREFIX, PBKDF2_MIN_ITERATIONS, PBKDF2_MAX_ITERATIONS,
                                PBKDF2_PREFIX))
        # The relay gets a hash, never the password itself.
        access["basic_auth"] = {"user": user, "hash": password if is_password_hash(password)
                                else hash_password(password)}
    if args.visitor_token is not None:
        if len(args.visitor_token) < 8:
            raise UsageError("--visitor-token must be at least 8 characters")
        access["visitor_token_sha256"] = hashlib.sha256(
            args.visitor_token.encode("utf-8")).hexdigest()
    for flag in ("allow", "deny"):
        values = getattr(args, flag)
        if values:
            try:
                _parse_networks(values, "--" + flag)
            except RefusedError as exc:
                raise UsageError(str(exc)) from None
            access[flag] = values
    return access


def cmd_expose(args: argparse.Namespace) -> int:
    config = expose_config(args)
    loop = EventLoop()
    output = LineOutput(loop)
    try:
        client = Client(config, loop=loop, output=output)
    except TunnelError as exc:       # a malformed proxy variable: the user's to fix
        loop.close()
        raise UsageError(str(exc)) from None
    _install_signals(loop, client.shutdown)
    code = client.run()
    client.console.close()           # a busy last second's summary, after the loop ended
    output.flush()
    if client.error and code != EXIT_OK:
        sys.stderr.write("tunnel.py: %s\n" % client.error)
    return code


def cmd_hash_password() -> int:
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            sys.stderr.write("tunnel.py: the passwords differ\n")
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        sys.stderr.write("tunnel.py: empty password\n")
        return EXIT_USAGE
    _print(hash_password(password))
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``python3 tunnel.py serve|expose ...``; returns the exit status."""
    commands: Dict[str, _Parser] = {}
    parser = build_parser(commands)
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        if args.command in ("token", "hash-password"):
            args.verbose = args.quiet = False
        elif args.config is not None:
            args = with_config_file(parser, commands, argv, args)
        _setup_logging(args)
        if getattr(args, "config_source", None) is not None:
            for warning in args.config_source.warnings:
                log.warning("%s", warning)
        raise_fd_limit()
        if args.command in ("serve", "expose"):
            release_free_memory()      # long-running: drop what compiling this file left
        if args.command == "token":
            _print(new_token())
            return EXIT_OK
        if args.command == "hash-password":
            return cmd_hash_password()
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_expose(args)
    except UsageError as exc:
        sys.stderr.write("tunnel.py: error: %s%s\n" % (
            exc, "" if isinstance(exc, ConfigError) else " (see --help)"))
        return EXIT_USAGE
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return EXIT_OK


def _script_main() -> int:
    """``python3 tunnel.py ...``, run as a script or in the interpreter _REEXEC started."""
    signal.signal(signal.SIGINT, signal.default_int_handler)   # main catches it from here
    return main()


if __name__ == "__main__":
    sys.exit(_script_main())
