"""`mizzen bootstrap`: write the Envoy bootstrap of one sidecar (or gateway) as JSON.

    mizzen bootstrap --pod NAME --namespace NS --ip IP [--xds HOST:PORT] [--router] [--delta]
                     [--access-log PATH] [--admin-port N] [-o FILE [--exec]]

Then `envoy -c FILE` runs the sidecar (or `--exec` starts it at once, with the command line
`bootstrap.envoy_command` gives). Without -o the JSON goes to stdout. The pod, namespace and IP fall back
to the environment Istio's injector sets (POD_NAME, POD_NAMESPACE, INSTANCE_IP), so a sidecar container can
run `mizzen bootstrap -o /etc/envoy/envoy.json` with nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import orjson

from mizzen.services.mesh import settings
from mizzen.services.mesh.validation.common import label_value_errors
from mizzen.services.sidecar import bootstrap as bs
from mizzen.services.sidecar.grpc_bootstrap import build_grpc_bootstrap


def _labels(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        for pair in item.split(","):
            if not pair:
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise argparse.ArgumentTypeError(f"--label wants KEY=VALUE, got {pair!r}")
            out[key] = value
    return out


def _locality(value: str) -> str:
    """`region[/zone[/subzone]]`, each part a label value (node labels hold them), or ""."""
    parts = value.split("/") if value else []
    if len(parts) > 3 or any(label_value_errors(p) for p in parts):
        raise argparse.ArgumentTypeError(f"--locality wants REGION[/ZONE[/SUBZONE]] (label values), got {value!r}")
    return value


def build_parser(prog: str = "mizzen bootstrap") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Write an Envoy sidecar bootstrap (JSON).")
    p.add_argument("--pod", default=os.environ.get("POD_NAME"), help="pod name (env POD_NAME)")
    p.add_argument(
        "--namespace", "-n", default=os.environ.get("POD_NAMESPACE"), help="namespace (env POD_NAMESPACE)"
    )
    p.add_argument("--ip", default=os.environ.get("INSTANCE_IP"), help="the pod's IP (env INSTANCE_IP)")
    p.add_argument("--xds", default=bs.DEFAULT_XDS, help="control plane HOST:PORT (default %(default)s)")
    p.add_argument("--router", action="store_true", help="a gateway (node id router~…) instead of a sidecar")
    p.add_argument("--delta", action="store_true", help="incremental xDS (ADS api_type DELTA_GRPC)")
    p.add_argument(
        "--access-log",
        default=bs.DEFAULT_ACCESS_LOG,
        help="where the JSON access log goes (default %(default)s; empty: no access log)",
    )
    p.add_argument(
        "--label", "-l", action="append", default=[], metavar="KEY=VALUE", help="pod label (repeatable)"
    )
    p.add_argument(
        "--locality",
        default=os.environ.get("MIZZEN_LOCALITY", ""),
        metavar="REGION/ZONE/SUBZONE",
        help="node.locality when the labels give none (istio-locality, topology.*) (env MIZZEN_LOCALITY); "
        "the control plane prefers the locality of the pod's Node",
    )
    p.add_argument(
        "--cluster-id", default="Kubernetes", help="node metadata CLUSTER_ID (default %(default)s)"
    )
    p.add_argument("--service-account", default="default", help="node metadata SERVICE_ACCOUNT")
    p.add_argument("--admin-port", type=int, default=settings.PROXY_ADMIN_PORT)
    p.add_argument("--agent-port", type=int, default=settings.PROXY_AGENT_PORT)
    p.add_argument("--health-port", type=int, default=settings.PROXY_HEALTH_PORT)
    p.add_argument("--prometheus-port", type=int, default=settings.PROXY_PROMETHEUS_PORT)
    p.add_argument(
        "--listen-address", default=None, help="address of the 15090/15021 listeners (default: wildcard)"
    )
    p.add_argument(
        "--health",
        choices=bs.HEALTH_MODES,
        default="envoy",
        help="who answers /healthz/ready: Envoy's own readiness (default) or the agent on --agent-port",
    )
    p.add_argument("--sds-path", default=bs.DEFAULT_SDS_PATH, help="unix socket of the SDS server")
    p.add_argument(
        "--zipkin",
        default=bs.DEFAULT_ZIPKIN,
        help="Zipkin collector HOST:PORT (default %(default)s; empty: no tracing)",
    )
    p.add_argument(
        "--xds-root-cert", default=None, help="CA file: talk TLS to the control plane and check it"
    )
    p.add_argument(
        "--initial-fetch-timeout", default=None, help="how long to wait for the first CDS/LDS (e.g. 5s)"
    )
    p.add_argument("--all-stats", action="store_true", help="keep every Envoy stat (no Istio stats matcher)")
    p.add_argument("-o", "--output", default=None, help="write to FILE instead of stdout")
    p.add_argument(
        "--exec",
        dest="exec_envoy",
        action="store_true",
        help="after writing -o FILE, replace this process with Envoy running on it (for sidecar containers)",
    )
    p.add_argument("--concurrency", type=int, default=None, help="with --exec: Envoy worker threads")
    return p


def write_file(out: Path, data: bytes, mode: int = 0o644) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(out)  # Envoy (or a watcher) never sees half a file


def check_required(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    missing = [
        flag
        for flag, value in (("--pod", args.pod), ("--namespace", args.namespace), ("--ip", args.ip))
        if not value
    ]
    if missing:
        parser.error(f"missing {', '.join(missing)}")


def config_from_args(args: argparse.Namespace, **overrides) -> dict:
    """The bootstrap the parsed flags describe (`overrides` are build_bootstrap keywords; the agent sets the
    xDS TLS ones). Raises ValueError / ArgumentTypeError for bad values."""
    kwargs = dict(
        xds=args.xds,
        router=args.router,
        access_log=args.access_log or None,
        delta=args.delta,
        labels=_labels(args.label),
        cluster_id=args.cluster_id,
        admin_port=args.admin_port,
        agent_port=args.agent_port,
        health_port=args.health_port,
        prometheus_port=args.prometheus_port,
        listen_address=args.listen_address,
        health=args.health,
        sds_path=args.sds_path,
        zipkin=args.zipkin or None,
        service_account=args.service_account,
        xds_root_cert=args.xds_root_cert,
        initial_fetch_timeout=args.initial_fetch_timeout,
        all_stats=args.all_stats,
        locality=_locality(args.locality),
    )
    kwargs.update(overrides)
    return bs.build_bootstrap(args.pod, args.namespace, args.ip, **kwargs)


def main(argv: list[str], command: str = "bootstrap") -> int:
    parser = build_parser(f"mizzen {command}")
    parser.add_argument("--grpc", action="store_true",  # bootstrap only: the agent always runs an Envoy
                        help="a proxyless gRPC application's GRPC_XDS_BOOTSTRAP file instead of an Envoy bootstrap")
    args = parser.parse_args(argv)
    check_required(parser, args)
    if args.exec_envoy and (not args.output or args.output == "-"):
        parser.error("--exec needs -o FILE")
    if args.grpc and (args.exec_envoy or args.router):
        parser.error("--grpc writes a gRPC bootstrap: it takes neither --exec nor --router")
    try:
        if args.grpc:
            config = build_grpc_bootstrap(args.pod, args.namespace, args.ip, args.xds, labels=_labels(args.label),
                                          service_account=args.service_account, cluster_id=args.cluster_id)
        else:
            config = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"mizzen {command}: {e}", file=sys.stderr)
        return 2
    data = orjson.dumps(config, option=orjson.OPT_INDENT_2) + b"\n"
    if args.output and args.output != "-":
        write_file(Path(args.output), data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    if args.exec_envoy:
        argv = bs.envoy_command(
            str(Path(args.output).resolve()), concurrency=args.concurrency, ipv6=":" in args.ip
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
