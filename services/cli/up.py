"""`mizzen up`: the whole stack in the foreground for development.

Private NATS and Redis from the bundled binaries (or `--nats-url`/`--redis-url`), then the registry, the
translator, the xDS gateway, certauth (the mesh CA, its files in `<data-dir>/ca`) (and the logsink when it is installed). State lives in `--data-dir`, so a second
`mizzen up` comes back with the same config. Ctrl-C or SIGTERM stops everything it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from ..mesh import settings
from ..mesh.stack import Stack


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mizzen up", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="state directory (default $MIZZEN_DATA_DIR or ~/.mizzen)")
    p.add_argument("--nats-url", default=None, help="use this NATS instead of starting one")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--registry-port", type=int, default=settings.REGISTRY_PORT)
    p.add_argument("--xds-port", type=int, default=settings.XDS_PORT)
    p.add_argument("--ca-port", type=int, default=settings.CA_PORT, help="certauth's gRPC TLS port")
    p.add_argument("--xds-tls-port", type=int, default=settings.XDS_TLS_PORT,
                   help="the gateway's xDS over TLS (certificate from certauth, workload tokens); 0: off")
    p.add_argument("--demo", action="store_true",
                   help="apply a demo mesh and run it: echo apps, a real Envoy ingress gateway, traffic (docs/demo.md)")
    p.add_argument("--netns", action="store_true", help="with --demo: run the demo pods in network namespaces (root)")
    p.add_argument("--gateway-port", type=int, default=None,
                   help="with --demo: the ingress gateway's port on 127.0.0.1 (default 18080, or a free one if taken)")
    p.add_argument("--otlp-endpoint", default=settings.env("MIZZEN_OTLP_ENDPOINT", "localhost:4317"),
                   help="where the logsink sends traces (OTLP gRPC, e.g. Jaeger's 4317)")
    p.add_argument("--no-logsink", action="store_true", help="do not run the logsink")
    p.add_argument("--log-level", default="info")
    p.add_argument("--for", dest="duration", type=float, default=None,
                   help="stop by itself after this many seconds (for scripts and smoke tests)")
    return p


def main(argv: list[str], command: str = "up") -> int:
    args = parser().parse_args(argv)
    data_dir = settings.data_dir(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(Path(data_dir) / "stack", nats_url=args.nats_url, redis_url=args.redis_url,
                  registry_port=args.registry_port, xds_port=args.xds_port, ca_port=args.ca_port,
                  xds_tls_port=args.xds_tls_port,
                  ca_data_dir=Path(data_dir), log_level=args.log_level,
                  otlp_endpoint=args.otlp_endpoint)
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    demo = None
    try:
        print(f"mizzen: state in {data_dir}", flush=True)
        stack.start_infra()
        print(f"  nats         {stack.nats_url}", flush=True)
        print(f"  redis        {stack.redis_url}", flush=True)
        for name in ("certauth", "registry", "translator", "xds-gateway"):
            stack.start_service(name)
        print(f"  registry     {stack.registry_url}   (export MIZZEN_SERVER={stack.registry_url})", flush=True)
        print(f"  translator   http://127.0.0.1:{stack.http_ports['translator']}/metrics", flush=True)
        print(f"  xds-gateway  grpc://{stack.xds_address}   http://127.0.0.1:{stack.http_ports['xds-gateway']}/metrics",
              flush=True)
        if stack.xds_tls_port:
            print(f"  xds (TLS)    grpcs://{stack.xds_tls_address}   (sidecars: mizzen agent, token required)",
                  flush=True)
        print(f"  certauth     grpcs://{stack.ca_address}   roots {stack.trust_bundle_path}   "
              f"(export MIZZEN_CA={stack.ca_address})", flush=True)
        print(f"  logs         {stack.log_dir}", flush=True)
        if args.demo:
            from .demo import Demo, DemoError

            demo = Demo(stack, netns=args.netns, gateway_port=args.gateway_port, abort=stop)
            try:
                demo.start()
            except DemoError as e:  # a clear message, no traceback; `finally` still stops everything
                print(f"mizzen: the demo did not start: {e}", file=sys.stderr, flush=True)
                return 1
        if not args.no_logsink:
            # after the demo: it tails the demo sidecars' JSON access logs (and NATS mizzen.accesslog.<proxy>)
            files = [f"{node}={path}" for node, path in (demo.access_logs.items() if demo else [])]
            stack.start_service("logsink", extra=[a for f in files for a in ("--file", f)])
            print(f"  logsink      http://127.0.0.1:{stack.http_ports['logsink']}/metrics   traces → OTLP "
                  f"{args.otlp_endpoint} (e.g. Jaeger all-in-one)", flush=True)
        print("mizzen: ready (Ctrl-C to stop)", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set():
            if deadline and time.monotonic() > deadline:
                break
            for name, p in list(stack.procs.items()):
                if not p.alive():
                    print(f"mizzen: {name} exited ({p.popen.returncode}); restarting. Log: {p.log_path}", file=sys.stderr)
                    stack.procs.pop(name)
                    if name in ("nats", "redis"):
                        raise RuntimeError(f"{name} died; see {p.log_path}")
                    stack.start_service(name)
            stop.wait(0.5)
    finally:
        print("mizzen: stopping", flush=True)
        if demo is not None:
            demo.stop()
        stack.stop()
    return 0
