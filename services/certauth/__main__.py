"""`python -m mizzen.services.certauth` / `mizzen certauth`: run the mesh CA."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mizzen.services.mesh import settings
from mizzen.services.mesh.service import run_service, setup_logging

from . import ca


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser(prog: str = "mizzen certauth") -> argparse.ArgumentParser:
    env = settings.env
    p = argparse.ArgumentParser(prog=prog, description="The mesh CA: signs SPIFFE workload certificates through "
                                "Istio's CSR API (gRPC over TLS) for callers holding a Mizzen workload token.")
    p.add_argument("--host", default=env("MIZZEN_CA_HOST", "127.0.0.1"), help="gRPC listen address ($MIZZEN_CA_HOST)")
    p.add_argument("--port", type=int, default=int(env("MIZZEN_CA_PORT", str(settings.CA_PORT))),
                   help="gRPC TLS port ($MIZZEN_CA_PORT, default 8060; 0 picks a free one)")
    p.add_argument("--http-host", default=env("MIZZEN_CA_HTTP_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=int, default=int(env("MIZZEN_CA_HTTP_PORT", "8061")),
                   help="/healthz/ready and /metrics ($MIZZEN_CA_HTTP_PORT, default 8061)")
    p.add_argument("--data-dir", default=None, help="state dir; the CA lives in <data-dir>/ca "
                   "($MIZZEN_DATA_DIR, default ~/.mizzen)")
    p.add_argument("--plugin-ca-dir", default=env("MIZZEN_CA_PLUGIN_DIR", "") or None,
                   help="use a plug-in CA laid out as Istio's cacerts (ca-cert.pem, ca-key.pem, root-cert.pem, "
                   "cert-chain.pem) instead of the self-signed root ($MIZZEN_CA_PLUGIN_DIR)")
    p.add_argument("--trust-domain", default=env("MIZZEN_TRUST_DOMAIN", settings.TRUST_DOMAIN))
    p.add_argument("--root-key-type", choices=ca.KEY_TYPES, default=env("MIZZEN_CA_KEY_TYPE", "ec"),
                   help="key of a new self-signed root: ec (P-256, default) or rsa (2048)")
    p.add_argument("--workload-cert-ttl", default=env("MIZZEN_WORKLOAD_CERT_TTL", "24h"),
                   help="TTL when the request asks for none (Istio DEFAULT_WORKLOAD_CERT_TTL, default 24h)")
    p.add_argument("--max-workload-cert-ttl", default=env("MIZZEN_MAX_WORKLOAD_CERT_TTL", "90d"),
                   help="longest TTL a request may ask for; more is refused (Istio MAX_WORKLOAD_CERT_TTL, 90d)")
    p.add_argument("--dns-names", default=env("MIZZEN_CA_DNS_NAMES",
                                              "localhost,certauth.istio-system.svc,istiod.istio-system.svc"),
                   help="DNS SANs of certauth's own serving certificate, comma-separated")
    p.add_argument("--ip-sans", default=env("MIZZEN_CA_IP_SANS", "127.0.0.1,::1"),
                   help="IP SANs of the serving certificate, comma-separated")
    p.add_argument("--reload-interval", type=float, default=float(env("MIZZEN_CA_RELOAD_INTERVAL", "2")),
                   help="seconds between checks of the CA files (rotation, plug-in changes)")
    p.add_argument("--audience", default=env("MIZZEN_TOKEN_AUDIENCE", "istio-ca"), help="token audience required")
    p.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT: several replicas on one port (the kernel spreads connections)")
    p.add_argument("--grace", type=float, default=3.0, help="seconds calls get to finish on SIGTERM")
    p.add_argument("--log-level", default=env("MIZZEN_LOG_LEVEL", "info"))
    return p


def main(argv: list[str] | None = None, command: str = "certauth") -> int:
    args = parser(f"mizzen {command}").parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level)
    from .server import Options, run_certauth

    try:
        ttl = ca.parse_ttl(args.workload_cert_ttl)
        max_ttl = ca.parse_ttl(args.max_workload_cert_ttl)
    except ValueError as e:
        print(f"mizzen {command}: {e}", file=sys.stderr)
        return 2
    if ttl > max_ttl:
        print(f"mizzen {command}: --workload-cert-ttl {args.workload_cert_ttl} is above --max-workload-cert-ttl "
              f"{args.max_workload_cert_ttl}", file=sys.stderr)
        return 2
    opts = Options(host=args.host, port=args.port, http_host=args.http_host, http_port=args.http_port,
                   data_dir=settings.data_dir(args.data_dir),
                   plugin_dir=Path(args.plugin_ca_dir) if args.plugin_ca_dir else None,
                   trust_domain=args.trust_domain, key_type=args.root_key_type, default_ttl=ttl, max_ttl=max_ttl,
                   dns_names=_csv(args.dns_names), ip_sans=_csv(args.ip_sans),
                   reload_interval=args.reload_interval, audience=args.audience, grace=args.grace,
                   reuse_port=args.reuse_port)
    try:
        run_service(lambda stop: run_certauth(opts, stop))
    except ca.CAError as e:
        print(f"mizzen {command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
