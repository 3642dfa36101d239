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
    p.add_argument("--tls-port", type=int, default=int(env("MIZZEN_XDS_TLS_PORT", "0")),
                   help="also serve xDS over TLS here (Istio's 15012; $MIZZEN_XDS_TLS_PORT; 0: off); needs "
                        "--token-file and certauth")
    p.add_argument("--ca", default=None, help="certauth HOST:PORT ($MIZZEN_CA, default 127.0.0.1:8060)")
    p.add_argument("--ca-root-cert", default=None,
                   help="roots that verify certauth (default <data-dir>/ca/trust-bundle.pem)")
    p.add_argument("--data-dir", default=None, help="$MIZZEN_DATA_DIR or ~/.mizzen")
    p.add_argument("--token-file", default=env("MIZZEN_XDS_TOKEN_FILE", ""),
                   help="the gateway's own workload token (`mizzen token -n istio-system --sa xds-gateway`)")
    p.add_argument("--trust-domain", default=env("MIZZEN_TRUST_DOMAIN", settings.TRUST_DOMAIN))
    p.add_argument("--root-poll", type=float, default=30.0, help="seconds between trust-bundle polls")
    p.add_argument("--log-level", default=env("MIZZEN_LOG_LEVEL", "info"))
    return p


def main(argv: list[str] | None = None, command: str = "xds-gateway") -> int:
    args = parser(f"mizzen {command}").parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level)
    from .app import Options, run_gateway

    tls = None
    if args.tls_port:
        if not args.token_file:
            print(f"mizzen {command}: --tls-port needs --token-file (the gateway's own token)", file=sys.stderr)
            return 2
        from pathlib import Path

        from .tls import TlsOptions

        root = Path(args.ca_root_cert) if args.ca_root_cert else settings.data_dir(args.data_dir) / "ca" / \
            "trust-bundle.pem"
        tls = TlsOptions(port=args.tls_port, ca=settings.ca_address(args.ca), ca_root_cert=root,
                         token_file=Path(args.token_file), trust_domain=args.trust_domain,
                         root_poll_seconds=args.root_poll)
    opts = Options(
        host=args.host, port=args.port, http_host=args.http_host, http_port=args.http_port,
        nats_url=settings.nats_url(args.nats_url), redis_url=settings.redis_url(args.redis_url),
        replica=args.replica_id or f"xds-gateway-{socket.gethostname()}-{os.getpid()}",
        resync_interval=args.resync_interval, status_ttl=args.status_ttl, grace=args.grace, tls=tls)
    run_service(lambda stop: run_gateway(opts, stop), name="mizzen-xds-gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
