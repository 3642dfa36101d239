"""The test pods' application: an HTTP and plain-TCP echo server that reports what it saw, and clients for both.

Standard library only, so it runs as `python tests/apps/echo.py …` inside any network namespace, as any uid.

  serve  [--http PORT]… [--tcp PORT]… [--mixed PORT]… [--name NAME] [--bind ADDR]
  http   URL [--header 'K: V']… [--next URL]… [--timeout S]
  tcp    HOST:PORT [--send TEXT] [--timeout S]

HTTP replies are JSON: method, path, query, headers (lower-cased), x-request-id, the server's own address
(`local`), the peer's (`peer`), the original destination of the accepted connection (`original_dst`, from
SO_ORIGINAL_DST; null when the connection was not NATed or conntrack has no entry), and, when the request
names a next hop (`x-echo-next: URL[,URL…]` header or `?next=URL` query), the next hop's answer under
`next`. The next hop gets the rest of the list, x-request-id and the tracing headers, so A→B→C works.

TCP is client-first (safe behind protocol sniffing): the server reads one line, answers one JSON line
(`name`, `local`, `peer`, `original_dst`, `data`), then echoes every further byte until EOF. A `--mixed`
port speaks both on one port: a connection whose first bytes are an HTTP request line gets the HTTP echo,
any other the TCP echo (for a Service port whose protocol the sidecar has to sniff).

Clients print one JSON object: `status`/`body` (HTTP) or `reply`/`echo` (TCP), plus `local` and `peer` of
the client's socket, which show the destination the client believes it is talking to. A TCP connection that
was accepted but then closed or reset gives `reply: null` and `closed`; one that failed gives `error`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import urllib.parse
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


# --- servers ---------------------------------------------------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_name_label = "echo"

    def log_message(self, fmt: str, *args: object) -> None:  # one line per request on stderr
        sys.stderr.write(f"{self.server_name_label} {self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        u = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(u.query)
        headers = {k.lower(): v for k, v in self.headers.items()}
        seen = {
            "name": self.server_name_label,
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
        hops = [h for v in query.get("next", []) for h in v.split(",") if h]
        hops += [h.strip() for h in headers.get("x-echo-next", "").split(",") if h.strip()]
        if hops:
            onward = {k: v for k, v in headers.items() if k in PROPAGATED}
            if hops[1:]:
                onward["x-echo-next"] = ",".join(hops[1:])
            try:
                seen["next"] = http_call(hops[0], onward)
            except OSError as e:
                seen["next"] = {"error": f"{type(e).__name__}: {e}", "url": hops[0]}
        self._reply(200, seen)

    do_POST = do_GET  # noqa: N815

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


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


def serve(http_ports: list[int], tcp_ports: list[int], name: str, bind: str, mixed_ports: list[int] = ()) -> None:
    servers: list[socketserver.BaseServer] = []
    handler = type("Handler", (EchoHandler,), {"server_name_label": name})
    for port in http_ports:
        srv = ThreadingHTTPServer((bind, port), handler)
        srv.daemon_threads = True
        servers.append(srv)
    for port in tcp_ports:
        srv = TcpServer((bind, port), TcpEchoHandler)
        srv.label = name  # type: ignore[attr-defined]
        servers.append(srv)
    for port in mixed_ports:
        srv = MixedServer((bind, port), TcpEchoHandler)
        srv.label = name  # type: ignore[attr-defined]
        srv.http_handler = handler
        servers.append(srv)
    if not servers:
        raise SystemExit("serve: give at least one --http, --tcp or --mixed port")
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print(json.dumps({"serving": name, "http": http_ports, "tcp": tcp_ports, "mixed": list(mixed_ports)}), flush=True)
    threading.Event().wait()  # until SIGTERM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="echo.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--http", type=int, action="append", default=[])
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--mixed", type=int, action="append", default=[], help="HTTP and TCP echo on one port")
    s.add_argument("--name", default="echo")
    s.add_argument("--bind", default="0.0.0.0")
    h = sub.add_parser("http")
    h.add_argument("url")
    h.add_argument("--header", action="append", default=[], help="'Name: value'")
    h.add_argument("--next", action="append", default=[], help="next hop URL (sent as x-echo-next)")
    h.add_argument("--timeout", type=float, default=10.0)
    t = sub.add_parser("tcp")
    t.add_argument("target", help="HOST:PORT")
    t.add_argument("--send", default="hello")
    t.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)

    if args.cmd == "serve":
        serve(args.http, args.tcp, args.name, args.bind, args.mixed)
        return 0
    try:
        if args.cmd == "http":
            headers = dict(hv.split(":", 1) for hv in args.header)
            headers = {k.strip(): v.strip() for k, v in headers.items()}
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
