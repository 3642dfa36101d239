"""The compose demo's workload (standard library only): an HTTP server that answers with what it saw and,
with --next, first calls the next hop; or, with --client, a loop that calls a URL every few seconds.

    python app.py --name app-a --port 8080 --next http://app-b:9080/
    python app.py --name app-b --port 9080
    python app.py --client http://app-a:8080/ --every 2

Like any app in an Istio mesh, a server that calls onward copies the request's tracing headers to its own
call, so both sidecars log the same x-request-id and the logsink can join the hops into one trace.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROPAGATE = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
)


def make_handler(name: str, next_url: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server API
            reply: dict = {
                "service": name,
                "pod": socket.gethostname(),
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
            status = 200
            if next_url:
                headers = {h: self.headers[h] for h in PROPAGATE if self.headers.get(h)}
                try:
                    with urllib.request.urlopen(
                        urllib.request.Request(next_url, headers=headers), timeout=5
                    ) as r:
                        reply["next"] = {"status": r.status, "body": json.loads(r.read() or b"null")}
                except (urllib.error.URLError, OSError, ValueError) as e:
                    status = 502
                    reply["next"] = {"error": str(e)}
            body = json.dumps(reply, indent=1).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            sys.stderr.write(f"{name}: {fmt % args}\n")

    return Handler


def client(url: str, every: float, count: int) -> int:
    sent = 0
    while count <= 0 or sent < count:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                print(f"GET {url} -> {r.status}", flush=True)
        except (urllib.error.URLError, OSError) as e:
            print(f"GET {url} -> {e}", flush=True)
        sent += 1
        time.sleep(every)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=os.environ.get("APP_NAME", "app"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--next", default=None, help="URL to call for every request")
    p.add_argument("--client", default=None, help="instead of serving, call this URL in a loop")
    p.add_argument("--every", type=float, default=2.0, help="seconds between client calls")
    p.add_argument("--count", type=int, default=0, help="client calls to make (0: forever)")
    args = p.parse_args(argv)
    if args.client:
        return client(args.client, args.every, args.count)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.name, args.next))
    print(f"{args.name} listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
