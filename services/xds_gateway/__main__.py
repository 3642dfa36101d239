"""`python -m mizzen.services.xds_gateway` / `mizzen xds-gateway`: run the xDS gateway."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

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
    # ADS streams never end by themselves: the grace only lets a push in flight finish before they are cancelled
    # (and their proxies reconnect elsewhere), so a long one is only a delay
    p.add_argument("--grace", type=float, default=1.0, help="seconds a push in flight gets to finish on SIGTERM")
    p.add_argument("--workers", type=int, default=int(env("MIZZEN_XDS_WORKERS", "1")),
                   help="worker processes sharing the gRPC port (SO_REUSEPORT); 0: one per core. Worker i serves "
                        "/metrics on --http-port + i and is replica <replica-id>-w<i>")
    p.add_argument("--reuse-port", action="store_true",
                   help="share the gRPC port with other processes (set for workers; off, a taken port fails)")
    p.add_argument("--push-slots", type=int, default=int(env("MIZZEN_XDS_PUSH_SLOTS", str(settings.XDS_PUSH_SLOTS))),
                   help="config pushes building and sending at once (bounds memory during a mass push)")
    p.add_argument("--slot-lease", type=float, default=float(env("MIZZEN_XDS_SLOT_LEASE", "1")),
                   help="seconds a push keeps its slot before a client that does not read loses it")
    p.add_argument("--max-pending-streams", type=int, default=int(env("MIZZEN_XDS_MAX_PENDING_STREAMS", "20000")),
                   help="new streams queued for admission during a connection storm before gRPC refuses more "
                        "(default 20000; gRPC's own 1000 cancels streams of a reconnect storm)")
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


def _die_with_parent() -> None:
    """In a worker: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def run_workers(args: argparse.Namespace, argv: list[str], replica: str) -> int:
    """Run N gateway processes on one port; forward SIGTERM/SIGINT to them, restart one that dies."""
    n = args.workers or os.cpu_count() or 1
    base = [a for a in argv]
    procs: dict[int, subprocess.Popen] = {}
    stopping = False

    def start(i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "mizzen.services.xds_gateway", *base, "--workers", "1", "--reuse-port",
               "--http-port", str(args.http_port + i), "--replica-id", f"{replica}-w{i}"]
        return subprocess.Popen(cmd, preexec_fn=_die_with_parent)

    def stop(_sig, _frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(n):
        procs[i] = start(i)
    restarts = 0
    while True:
        alive = [p for p in procs.values() if p.poll() is None]
        if stopping and not alive:
            break
        for i, p in list(procs.items()):
            if p.poll() is not None and not stopping and restarts < 100:
                restarts += 1
                procs[i] = start(i)
        time.sleep(0.2)
    return max((p.returncode or 0) for p in procs.values())


def main(argv: list[str] | None = None, command: str = "xds-gateway") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(f"mizzen {command}").parse_args(argv)
    setup_logging(args.log_level)
    replica = args.replica_id or f"xds-gateway-{socket.gethostname()}-{os.getpid()}"
    if args.workers != 1:
        # workers get the same flags; theirs (port sharing, /metrics port, name) come last and win
        return run_workers(args, argv, replica)
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
        replica=replica, resync_interval=args.resync_interval, status_ttl=args.status_ttl, grace=args.grace,
        push_slots=args.push_slots, slot_lease=args.slot_lease, reuse_port=args.reuse_port, tls=tls,
        max_pending_streams=args.max_pending_streams)
    run_service(lambda stop: run_gateway(opts, stop), name="mizzen-xds-gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
