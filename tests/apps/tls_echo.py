"""A small HTTPS server for the file-certificate tests: answers every GET with JSON naming itself and the
client certificate it verified (if any), then closes the connection (so every request is a new handshake).

    python -m tests.apps.tls_echo NAME PORT CERT KEY [--client-ca FILE]

With --client-ca a client certificate signed by that CA is required. The certificate files are read again for
every handshake, so a test can rotate them under a running server."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection
    name = "tls-echo"

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        peer = self.connection.getpeercert() or {}
        subject = dict(x[0] for x in peer.get("subject", ()))
        body = json.dumps({"name": self.name, "path": self.path, "client_cn": subject.get("commonName"),
                           "client_serial": peer.get("serialNumber"), "sni": getattr(self.server, "last_sni", None),
                           "headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, cert: str, key: str, client_ca: str | None) -> None:
        super().__init__(("0.0.0.0", port), Handler)
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.last_sni: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.client_ca)
        return ctx

    def get_request(self):  # type: ignore[override]
        sock, addr = super().get_request()
        ctx = self.context()

        def sni(_sock: ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
            self.last_sni = name

        ctx.sni_callback = sni
        sock.settimeout(10)
        try:
            return ctx.wrap_socket(sock, server_side=True), addr
        except OSError as e:  # socketserver drops it silently: a failed handshake is one line of the log
            sys.stderr.write(f"{addr[0]} handshake failed: {e!r}\n")
            sock.close()
            raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.apps.tls_echo")
    p.add_argument("name")
    p.add_argument("port", type=int)
    p.add_argument("cert")
    p.add_argument("key")
    p.add_argument("--client-ca", default=None)
    a = p.parse_args(argv)
    Handler.name = a.name
    Server(a.port, a.cert, a.key, a.client_ca).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
