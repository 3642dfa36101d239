"""`python -m mizzen.services.xds_gateway` / `mizzen xds-gateway`: run the xDS gateway."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from mizzen.services.mesh import settings
from mizzen.services.mesh.service import run_service, setup_logging


def parser(prog: str = "mizzen xds-gateway") -> argparse.ArgumentParser:
    env = settings.env
    p = argparse.ArgumentParser(prog=prog, description="Serve Envoy ADS (SotW and delta) from snapshots in Redis.")
    p.add_argument("--host", default=env("MIZZEN_XDS_HOST", "127.0.0.1"), help="gRPC listen address ($MIZZEN_XDS_HOST)")
    p.add_argument("--port", type=int, default=int(env("MIZZEN_XDS_PORT", str(settings.XDS_PORT))),
                   help="plaintext gRPC port ($MIZZEN_XDS_PORT, default 15010)")
    p.add_argument("--http-host", default=env("MIZZEN_XDS_HTTP_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=int, default=int(env("MIZZEN_XDS_HTTP_PORT", "15014")),
                   help="/healthz/ready and /metrics ($MIZZEN_XDS_HTTP_PORT, default 15014 as istiod)")
    p.add_argument("--nats-url", default=None, help="NATS URL ($MIZZEN_NATS_URL)")
    p.add_argument("--redis-url", default=None, help="Redis URL ($MIZZEN_REDIS_URL)")
    p.add_argument("--replica-id", default=env("MIZZEN_REPLICA_ID", ""),
                   help="name shown in proxy-status's ISTIOD column ($MIZZEN_REPLICA_ID; default host-pid)")
    p.add_argument("--resync-interval", type=float, default=float(env("MIZZEN_XDS_RESYNC", "5")),
                   help="seconds between re-reads of watched manifests (covers missed NATS events)")
    p.add_argument("--status-ttl", type=float, default=float(env("MIZZEN_XDS_STATUS_TTL", "30")))
    p.add_argument("--grace", type=float, default=5.0, help="seconds streams get to finish on SIGTERM")
    p.add_argument("--log-level", default=env("MIZZEN_LOG_LEVEL", "info"))
    return p


def main(argv: list[str] | None = None, command: str = "xds-gateway") -> int:
    args = parser(f"mizzen {command}").parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level)
    from .app import Options, run_gateway

    opts = Options(
        host=args.host, port=args.port, http_host=args.http_host, http_port=args.http_port,
        nats_url=settings.nats_url(args.nats_url), redis_url=settings.redis_url(args.redis_url),
        replica=args.replica_id or f"xds-gateway-{socket.gethostname()}-{os.getpid()}",
        resync_interval=args.resync_interval, status_ttl=args.status_ttl, grace=args.grace)
    run_service(lambda stop: run_gateway(opts, stop), name="mizzen-xds-gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
