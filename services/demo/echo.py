"""Mizzen's demo and test application: an HTTP and plain-TCP echo server that reports what it saw, and clients.

Standard library only, so it runs anywhere: `python -m mizzen.services.demo.echo …`, or by path
(`python services/demo/echo.py …`) inside any network namespace, as any uid, in any container.

  serve  [--http PORT]… [--tcp PORT]… [--mixed PORT]… [--name NAME] [--version V] [--pod POD] [--bind ADDR]
         [--next URL]… [--status CODE] [--delay S]
  http   URL [--header 'K: V']… [--next URL]… [--timeout S]
  tcp    HOST:PORT [--send TEXT] [--timeout S]
  loop   URL [--every S] [--count N] [--summary S] [--label NAME] [--header 'K: V']… [--timeout S]

HTTP replies are JSON: `name` (also as `service`), `version` (when given), `pod` (--pod, else $POD_NAME, else
the host name), `uid`, method, path, query, headers (lower-cased), `request_id` (x-request-id), the server's
own address (`local`), the peer's (`peer`), the original destination of the accepted connection
(`original_dst`, from SO_ORIGINAL_DST; null when the connection was not NATed), and, when there is a next
hop, the next hop's answer under `next`. Next hops come from the request (`x-echo-next: URL[,URL…]` header
or `?next=URL` query), else from the server's own `--next` list. The first hop gets the rest of the list,
x-request-id and the tracing headers (as any app in an Istio mesh must forward them), so A→B→C works and
every sidecar logs the same request id. The status is 200, or 502 when a next hop could not be reached or
answered 5xx.

For traffic tests a request can ask for a status and a delay (`?status=503&delay=2`, or the headers
`x-echo-status` / `x-echo-delay`); `--status` / `--delay` set the server's default for every request (an
upstream that always fails or is always slow). A server keeps every request it answered (method, path,
headers) in `server.seen`, so an in-process test can count the attempts that reached it (retries, mirrors).

TCP is client-first (safe behind protocol sniffing): the server reads one line, answers one JSON line
(`name`, `local`, `peer`, `original_dst`, `data`), then echoes every further byte until EOF. A `--mixed`
port speaks both on one port: a connection whose first bytes are an HTTP request line gets the HTTP echo,
any other the TCP echo (for a Service port whose protocol the sidecar has to sniff).

`http` and `tcp` print one JSON object: `status`/`body` (HTTP) or `reply`/`echo` (TCP), plus `local` and
`peer` of the client's socket, which show the destination the client believes it is talking to. A TCP
connection that was accepted but then closed or reset gives `reply: null` and `closed`; one that failed gives
`error`. `loop` calls a URL over and over: one line per call (`GET URL -> 200 hello-v1`), or with
`--summary S` one line every S seconds such as `hello: 200 x40 (v1 32, v2 8)`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SOL_IP = 0
PROPAGATED = ("x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
              "x-b3-sampled", "x-b3-flags", "b3", "x-ot-span-context")


def addr(sockaddr: tuple) -> str:
    return f"{sockaddr[0]}:{sockaddr[1]}"


def original_dst(sock: socket.socket) -> str | None:
    try:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, ip = struct.unpack("!2xH4s8x", raw)
    return f"{socket.inet_ntoa(ip)}:{port}"


# --- clients ---------------------------------------------------------------------------------------------


def http_call(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> dict:
    """GET url; returns status, headers, body (JSON when it parses), and the client socket's local/peer."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.connect()
        local, peer = addr(conn.sock.getsockname()), addr(conn.sock.getpeername())
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body: object = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return {"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()}, "body": body,
                "local": local, "peer": peer}
    finally:
        conn.close()


def tcp_call(target: str, text: str, timeout: float = 10.0) -> dict:
    host, _, port = target.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        local, peer = addr(s.getsockname()), addr(s.getpeername())
        try:
            s.sendall(text.encode() + b"\n")
            f = s.makefile("rb")
            line = f.readline()
            if not line:
                raise ConnectionAbortedError("closed before answering")
            reply = json.loads(line)
            s.sendall(b"again\n")
            s.shutdown(socket.SHUT_WR)
            echo = f.read().decode()
        except OSError as e:  # connected, then closed or reset (e.g. a proxy with nowhere to go)
            return {"local": local, "peer": peer, "reply": None, "echo": None, "closed": f"{type(e).__name__}: {e}"}
    return {"local": local, "peer": peer, "reply": reply, "echo": echo}


def who_answered(result: dict) -> str | None:
    """The version (else the name) of the echo server that answered an http_call, if it was one."""
    body = result.get("body")
    if isinstance(body, dict):
        return body.get("version") or body.get("name")
    return None


class Tally:
    """Counts of answers (status codes, and which version answered) over an interval and in total."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.window: tuple[Counter, Counter] = (Counter(), Counter())
        self.total: tuple[Counter, Counter] = (Counter(), Counter())

    def add(self, status: int | str, version: str | None) -> None:
        with self.lock:
            for statuses, versions in (self.window, self.total):
                statuses[str(status)] += 1
                if version:
                    versions[version] += 1

    def record(self, url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> dict | None:
        """One call; failures count as `error`. Returns the http_call result (None on failure)."""
        try:
            result = http_call(url, headers, timeout)
        except OSError:
            self.add("error", None)
            return None
        self.add(result["status"], who_answered(result) if result["status"] < 400 else None)
        return result

    @staticmethod
    def format(label: str, statuses: Counter, versions: Counter) -> str:
        """`hello: 200 x40 (v1 32, v2 8)`."""
        if not statuses:
            return f"{label}: no requests"
        counts = ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items()))
        split = ", ".join(f"{v} {n}" for v, n in sorted(versions.items()))
        return f"{label}: {counts}" + (f" ({split})" if split else "")

    def flush(self, label: str) -> str:
        """The interval's line; starts a new interval."""
        with self.lock:
            line = self.format(label, *self.window)
            self.window = (Counter(), Counter())
        return line

    def summary(self, label: str) -> str:
        with self.lock:
            return self.format(label, *self.total)


def loop(url: str, every: float, count: int, summary: float, label: str, headers: dict[str, str],
         timeout: float, stop: threading.Event | None = None) -> int:
    """Call url every `every` seconds (count 0: until stopped); print each call, or a tally every `summary` s."""
    stop = stop or threading.Event()
    tally = Tally()
    sent = 0
    next_report = time.monotonic() + summary
    while not stop.is_set() and (count <= 0 or sent < count):
        result = tally.record(url, headers, timeout)
        sent += 1
        if not summary:
            if result is None:
                print(f"GET {url} -> error", flush=True)
            else:
                print(f"GET {url} -> {result['status']} {who_answered(result) or ''}".rstrip(), flush=True)
        elif time.monotonic() >= next_report:
            print(tally.flush(label), flush=True)
            next_report = time.monotonic() + summary
        stop.wait(every)
    if summary:
        if tally.window[0]:
            print(tally.flush(label), flush=True)
        print(f"total {tally.summary(label)}", flush=True)
    return 0


# --- servers ---------------------------------------------------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_name_label = "echo"
    version_label: str | None = None
    pod_name = ""
    default_next: tuple[str, ...] = ()

    def log_message(self, fmt: str, *args: object) -> None:  # one line per request on stderr
        sys.stderr.write(f"{self.server_name_label} {self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        u = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(u.query)
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)  # keep the connection usable for the next request
        seen: dict = {
            "name": self.server_name_label,
            "service": self.server_name_label,
            **({"version": self.version_label} if self.version_label else {}),
            "pod": self.pod_name,
            "uid": os.getuid(),
            "method": self.command,
            "path": u.path,
            "query": {k: v if len(v) > 1 else v[0] for k, v in query.items()},
            "headers": headers,
            "request_id": headers.get("x-request-id"),
            "local": addr(self.connection.getsockname()),
            "peer": addr(self.connection.getpeername()),
            "original_dst": original_dst(self.connection),
        }
        self._record(seen)
        delay = _first(query.get("delay"), headers.get("x-echo-delay"), getattr(self.server, "delay", None))
        if delay:
            time.sleep(float(delay))
        wanted = _first(query.get("status"), headers.get("x-echo-status"), getattr(self.server, "status", None))
        if wanted:
            self._reply(int(wanted), seen)
            return
        hops = [h for v in query.get("next", []) for h in v.split(",") if h]
        hops += [h.strip() for h in headers.get("x-echo-next", "").split(",") if h.strip()]
        hops = hops or list(self.default_next)
        status = 200
        if hops:
            onward = {k: v for k, v in headers.items() if k in PROPAGATED}
            if hops[1:]:
                onward["x-echo-next"] = ",".join(hops[1:])
            try:
                seen["next"] = http_call(hops[0], onward)
                if seen["next"]["status"] >= 500:
                    status = 502
            except OSError as e:
                seen["next"] = {"error": f"{type(e).__name__}: {e}", "url": hops[0]}
                status = 502
        self._reply(status, seen)

    do_POST = do_GET  # noqa: N815
    do_PUT = do_GET  # noqa: N815
    do_DELETE = do_GET  # noqa: N815
    do_OPTIONS = do_GET  # noqa: N815

    def _record(self, seen: dict) -> None:
        log = getattr(self.server, "seen", None)
        if log is not None:
            log.append({k: seen[k] for k in ("method", "path", "headers")})  # list.append is atomic

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _first(*values: object) -> str | None:
    """The first given value (a query parameter's list counts by its first item)."""
    for v in values:
        if isinstance(v, list):
            v = v[0] if v else None
        if v not in (None, ""):
            return str(v)
    return None


class TcpEchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(65536)
        reply = {
            "name": self.server.label,  # type: ignore[attr-defined]
            "uid": os.getuid(),
            "local": addr(self.connection.getsockname()),
            "peer": addr(self.connection.getpeername()),
            "original_dst": original_dst(self.connection),
            "data": line.decode(errors="replace").rstrip("\n"),
        }
        self.wfile.write(json.dumps(reply).encode() + b"\n")
        self.wfile.flush()
        while chunk := self.connection.recv(65536):
            self.connection.sendall(chunk)


class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many concurrent clients in the connection-pool tests

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict] = []
        self.status: int | None = None  # answer every request with this status (tests flip it at run time)
        self.delay: float | None = None  # ... after this many seconds


HTTP_STARTS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"PRI * ")


class MixedServer(TcpServer):
    """HTTP or TCP echo on one port, chosen by peeking at the first bytes the client sends."""

    http_handler: type[EchoHandler] = EchoHandler

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        request.settimeout(30)
        try:
            head = request.recv(8, socket.MSG_PEEK)
        except OSError:
            return
        finally:
            request.settimeout(None)
        if head.startswith(HTTP_STARTS) or any(h.startswith(head) for h in HTTP_STARTS if head):
            self.http_handler(request, client_address, self)
        else:
            TcpEchoHandler(request, client_address, self)


def handler_class(name: str, version: str | None = None, pod: str | None = None,
                  next_hops: list[str] | tuple[str, ...] = ()) -> type[EchoHandler]:
    pod = pod or os.environ.get("POD_NAME") or socket.gethostname()
    return type("Handler", (EchoHandler,), {"server_name_label": name, "version_label": version, "pod_name": pod,
                                            "default_next": tuple(next_hops)})


def make_servers(http_ports: list[int], tcp_ports: list[int], name: str, bind: str, mixed_ports: list[int] = (),
                 version: str | None = None, pod: str | None = None,
                 next_hops: list[str] | tuple[str, ...] = ()) -> list[socketserver.BaseServer]:
    """Bound servers (not yet serving); serve_forever() each on a thread, shutdown() to stop."""
    handler = handler_class(name, version, pod, next_hops)
    servers: list[socketserver.BaseServer] = []
    try:
        for port in http_ports:
            servers.append(HttpServer((bind, port), handler))
        for port in tcp_ports:
            srv = TcpServer((bind, port), TcpEchoHandler)
            srv.label = name  # type: ignore[attr-defined]
            servers.append(srv)
        for port in mixed_ports:
            srv = MixedServer((bind, port), TcpEchoHandler)
            srv.label = name  # type: ignore[attr-defined]
            srv.http_handler = handler
            servers.append(srv)
    except OSError:
        for s in servers:
            s.server_close()
        raise
    return servers


def serve(http_ports: list[int], tcp_ports: list[int], name: str, bind: str, mixed_ports: list[int] = (),
          version: str | None = None, pod: str | None = None, next_hops: list[str] | tuple[str, ...] = (),
          status: int | None = None, delay: float | None = None) -> None:
    servers = make_servers(http_ports, tcp_ports, name, bind, mixed_ports, version, pod, next_hops)
    for srv in servers:
        srv.status, srv.delay = status, delay  # type: ignore[attr-defined]
    if not servers:
        raise SystemExit("serve: give at least one --http, --tcp or --mixed port")
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(json.dumps({"serving": name, "bind": bind, "http": http_ports, "tcp": tcp_ports,
                      "mixed": list(mixed_ports)}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


def _headers(items: list[str]) -> dict[str, str]:
    pairs = (hv.split(":", 1) for hv in items)
    return {k.strip(): v.strip() for k, v in pairs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mizzen.services.demo.echo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer HTTP/TCP with what was seen")
    s.add_argument("--http", type=int, action="append", default=[])
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--mixed", type=int, action="append", default=[], help="HTTP and TCP echo on one port")
    s.add_argument("--name", default=os.environ.get("APP_NAME", "echo"))
    s.add_argument("--version", default=None, help="reported as `version` (e.g. the pod's version label)")
    s.add_argument("--pod", default=None, help="reported as `pod` (default $POD_NAME or the host name)")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--next", action="append", default=[], help="call this URL for every request (chain: repeat)")
    s.add_argument("--status", type=int, default=None, help="answer every HTTP request with this status")
    s.add_argument("--delay", type=float, default=None, help="answer every HTTP request after this many seconds")
    h = sub.add_parser("http", help="one HTTP request; prints JSON")
    h.add_argument("url")
    h.add_argument("--header", action="append", default=[], help="'Name: value'")
    h.add_argument("--next", action="append", default=[], help="next hop URL (sent as x-echo-next)")
    h.add_argument("--timeout", type=float, default=10.0)
    t = sub.add_parser("tcp", help="one TCP echo exchange; prints JSON")
    t.add_argument("target", help="HOST:PORT")
    t.add_argument("--send", default="hello")
    t.add_argument("--timeout", type=float, default=10.0)
    lp = sub.add_parser("loop", help="call a URL over and over")
    lp.add_argument("url")
    lp.add_argument("--every", type=float, default=2.0, help="seconds between calls")
    lp.add_argument("--count", type=int, default=0, help="calls to make (0: until stopped)")
    lp.add_argument("--summary", type=float, default=0.0, help="print a tally every this many seconds")
    lp.add_argument("--label", default=None, help="the tally's label (default: the URL's host)")
    lp.add_argument("--header", action="append", default=[], help="'Name: value'")
    lp.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)

    if args.cmd == "serve":
        serve(args.http, args.tcp, args.name, args.bind, args.mixed, args.version, args.pod, args.next,
              args.status, args.delay)
        return 0
    if args.cmd == "loop":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        label = args.label or urllib.parse.urlsplit(args.url).hostname or args.url
        with contextlib.suppress(KeyboardInterrupt):
            loop(args.url, args.every, args.count, args.summary, label, _headers(args.header), args.timeout, stop)
        return 0
    try:
        if args.cmd == "http":
            headers = _headers(args.header)
            if args.next:
                headers["x-echo-next"] = ",".join(args.next)
            result = http_call(args.url, headers, args.timeout)
        else:
            result = tcp_call(args.target, args.send, args.timeout)
    except OSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
