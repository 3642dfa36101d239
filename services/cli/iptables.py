"""`mizzen iptables`: istio-iptables' flags and environment fallbacks; print (`--dry-run`), apply or clean up
the sidecar's traffic capture in the current network namespace."""

from __future__ import annotations

import argparse
import os
import sys

from ..sidecar import iptables as ipt

HELP = {
    "envoy-port": "port to which all outbound TCP traffic is redirected (default $ENVOY_PORT or 15001)",
    "inbound-capture-port": "port to which inbound TCP traffic is redirected (default $INBOUND_CAPTURE_PORT or 15006)",
    "inbound-tunnel-port": "tunnel port that inbound capture leaves alone (default $INBOUND_TUNNEL_PORT or 15008)",
    "proxy-uid": "comma-separated UIDs whose traffic is not redirected (default $PROXY_UID, else the uid of "
    "$ENVOY_USER or istio-proxy, else 1337)",
    "proxy-gid": "comma-separated GIDs whose traffic is not redirected (default $PROXY_GID, else the -u value)",
    "istio-inbound-interception-mode": "REDIRECT or TPROXY (default $ISTIO_INBOUND_INTERCEPTION_MODE or REDIRECT)",
    "istio-inbound-tproxy-mark": "TPROXY packet mark (default $ISTIO_INBOUND_TPROXY_MARK or 1337)",
    "istio-inbound-tproxy-route-table": "TPROXY routing table (default $ISTIO_INBOUND_TPROXY_ROUTE_TABLE or 133)",
    "istio-inbound-ports": "comma-separated inbound ports to redirect, '*' for all, empty for none "
    "(default $ISTIO_INBOUND_PORTS)",
    "istio-local-exclude-ports": "inbound ports not redirected when -b is '*' (default $ISTIO_LOCAL_EXCLUDE_PORTS)",
    "istio-service-cidr": "comma-separated outbound CIDRs to redirect, '*' for all, empty for none "
    "(default $ISTIO_SERVICE_CIDR)",
    "istio-service-exclude-cidr": "outbound CIDRs never redirected (default $ISTIO_SERVICE_EXCLUDE_CIDR)",
    "istio-outbound-ports": "outbound ports always redirected (default $ISTIO_OUTBOUND_PORTS)",
    "istio-local-outbound-ports-exclude": "outbound ports never redirected (default $ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE)",
    "kube-virt-interfaces": "interfaces whose inbound traffic is treated as outbound (default $KUBE_VIRT_INTERFACES)",
}


def build_parser(prog: str = "mizzen iptables") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Set up the sidecar's traffic capture as istio-iptables (Istio 1.8) does, in the current "
        "network namespace. With --dry-run, print the resulting tables in iptables-save form instead.",
        epilog="ISTIO_META_DNS_CAPTURE=true also captures DNS (port 53) to the agent on 15053, as istio-iptables.",
    )
    for short, long, _env, _default in ipt.FLAGS:
        p.add_argument(short, f"--{long}", dest=long, default=None, metavar="VALUE", help=HELP[long])
    p.add_argument("-n", "--dry-run", action="store_true", default=None,
                   help="print the rules (iptables-save text) and change nothing (default $DRY_RUN)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every ISTIO_* chain, every jump to one, and the other rules these flags add")
    return p


def main(argv: list[str], command: str = "iptables") -> int:
    args = build_parser(f"mizzen {command}").parse_args(argv)
    flags = {long: getattr(args, long) for _s, long, _e, _d in ipt.FLAGS}
    try:
        cfg = ipt.resolve_config(flags, os.environ)
        rules = ipt.build_rules(cfg)
    except ipt.IptablesConfigError as e:
        print(f"mizzen iptables: {e}", file=sys.stderr)
        return 2
    for w in rules.warnings:
        print(f"mizzen iptables: warning: {w}", file=sys.stderr)
    dry_run = args.dry_run if args.dry_run is not None else ipt.parse_go_bool(os.environ.get("DRY_RUN"))

    if args.cleanup:
        if dry_run:
            try:
                saved = ipt.save()
            except (ipt.IptablesRunError, FileNotFoundError) as e:
                print(f"mizzen iptables: cannot read the current rules: {e}", file=sys.stderr)
                return 1
            sys.stdout.write(ipt.plan_cleanup(saved, rules.builtin_rules()))
            return 0
        try:
            ipt.cleanup(cfg)
        except (ipt.IptablesRunError, FileNotFoundError) as e:
            print(f"mizzen iptables: {e}", file=sys.stderr)
            return 1
        return 0

    if dry_run:
        sys.stdout.write(rules.save_text())
        return 0
    try:
        ipt.apply(cfg)
    except (ipt.IptablesRunError, FileNotFoundError) as e:
        print(f"mizzen iptables: {e}", file=sys.stderr)
        return 1
    return 0
