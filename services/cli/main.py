"""`mizzen <command> …`: a thin dispatcher. Each command lives in its own module with `main(argv) -> int`,
imported only when used so that `mizzen get` does not pay for the Envoy protos."""

from __future__ import annotations

import importlib
import sys

# command → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("mizzen.services.cli.up", "run the whole stack in the foreground (--demo adds a demo mesh)"),
    "apply": ("mizzen.services.cli.resources", "apply resources from files, directories or stdin"),
    "get": ("mizzen.services.cli.resources", "list or show resources"),
    "delete": ("mizzen.services.cli.resources", "delete resources by file or by kind and name"),
    "proxy-config": ("mizzen.services.cli.proxy_config", "show a proxy's clusters, listeners, routes, endpoints, bootstrap"),
    "pc": ("mizzen.services.cli.proxy_config", "alias of proxy-config"),
    "proxy-status": ("mizzen.services.cli.proxy_status", "show each proxy's xDS sync state"),
    "ps": ("mizzen.services.cli.proxy_status", "alias of proxy-status"),
    "watch": ("mizzen.services.cli.watch", "print each new snapshot version of a proxy as it arrives"),
    "bootstrap": ("mizzen.services.cli.bootstrap", "write an Envoy sidecar bootstrap"),
    "agent": ("mizzen.services.sidecar.agent", "run a sidecar: workload certificate over SDS, renewal, Envoy"),
    "iptables": ("mizzen.services.cli.iptables", "set up (or print) istio-iptables traffic interception"),
    "logsink": ("mizzen.services.logsink.cli", "run the access-log → OpenTelemetry service, or convert log files"),
    "registry": ("mizzen.services.registry.__main__", "run the registry service"),
    "translator": ("mizzen.services.translator.__main__", "run the translator service"),
    "xds-gateway": ("mizzen.services.xds_gateway.__main__", "run the xDS gateway service"),
    "certauth": ("mizzen.services.certauth.__main__", "run the mesh CA (Istio's CSR API over TLS)"),
    "ca": ("mizzen.services.certauth.cli", "the mesh CA: trust bundle, sign a CSR, rotate the root"),
    "token": ("mizzen.services.certauth.cli", "print a workload token for a namespace and service account"),
}


def usage() -> str:
    lines = ["usage: mizzen <command> [options]", "", "commands:"]
    for name, (_mod, text) in COMMANDS.items():
        lines.append(f"  {name:<14} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"mizzen: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    try:
        rc = module.main(rest, command=cmd)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
