"""`mizzen proxy-config cluster|listener|route|endpoint|bootstrap|all <pod>[.<ns>]` (alias `pc`): what a
sidecar gets, as `istioctl proxy-config` (1.7) prints it.

Where the config comes from (first that applies):
  --config DIR|FILE    translate Kubernetes/Istio YAML offline (no running stack needed)
  --file DUMP.json     an Envoy `/config_dump?include_eds` saved to a file
  --admin HOST:PORT    a live Envoy's admin: GET /config_dump?include_eds
  (default)            the registry: GET {server}/debug/config_dump?pod=&namespace=

Every source becomes a config dump document and goes through the one parser
(mizzen.services.mesh.configdump.parse_config_dump), so the same config prints the same rows whatever its source.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..mesh import settings
from ..mesh.configdump import (
    ConfigDumpError,
    ParsedDump,
    config_dump_for_snapshot,
    merge_layers,
    parse_config_dump,
)
from . import tables

SUBCOMMANDS: dict[str, tuple[str, ...]] = {
    "cluster": ("clusters", "c"),
    "listener": ("listeners", "l"),
    "route": ("routes", "r"),
    "endpoint": ("endpoints", "ep"),
    "bootstrap": ("b",),
    "secret": ("s", "secrets"),
    "all": (),
}
ALIASES = {alias: name for name, aliases in SUBCOMMANDS.items() for alias in (name, *aliases)}


class ProxyConfigError(Exception):
    """A user-facing failure: printed as `error: …`, exit status 1."""


@dataclass
class Source:
    """A loaded config: the parsed dump, the JSON document it came from, and where the pod lives."""

    dump: ParsedDump
    document: dict
    bootstrap: dict | None = None  # offline/registry modes build the bootstrap separately


# ---------------------------------------------------------------------------------------------------------
# arguments


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "t", "true", "yes", "y", "on"):
        return True
    if low in ("0", "f", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Show a sidecar's Envoy configuration as istioctl proxy-config prints it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sources: --config DIR|FILE (offline), --file DUMP.json, --admin HOST:PORT, else the registry")
    sub = p.add_subparsers(dest="what", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    for name, aliases in SUBCOMMANDS.items():
        s = sub.add_parser(name, aliases=list(aliases), help=f"show the proxy's {name} configuration")
        s.add_argument("pod", nargs="?", default="", help="<pod-name>[.<namespace>] (optional with --file/--admin)")
        s.add_argument("-n", "--namespace", default="default", help="namespace of the pod when not given as pod.ns")
        s.add_argument("-o", "--output", choices=("short", "json", "yaml"), default="short",
                       help="short (the table), or the raw protos as json|yaml")
        src = s.add_mutually_exclusive_group()
        src.add_argument("--config", action="append", metavar="DIR|FILE",
                         help="translate this YAML offline (repeatable; `-` reads stdin)")
        src.add_argument("-f", "--file", metavar="DUMP.json", help="read an Envoy /config_dump?include_eds file")
        src.add_argument("--admin", metavar="HOST:PORT", help="read a live Envoy's admin /config_dump?include_eds")
        s.add_argument("--server", "-s", default=None,
                       help="registry URL (default $MIZZEN_SERVER or http://127.0.0.1:15080)")
        s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an HTTP source")
        if name == "cluster":
            s.add_argument("--fqdn", default="", help="filter clusters by substring of the Service FQDN field")
            s.add_argument("--direction", default="", help="filter clusters by the Direction field")
            s.add_argument("--subset", default="", help="filter clusters by substring of the Subset field")
        if name in ("listener", "endpoint"):
            s.add_argument("--address", default="", help=f"filter {name}s by address")
        if name == "listener":
            s.add_argument("--type", default="", help="filter listeners by type (HTTP, TCP, HTTP+TCP)")
        if name in ("listener", "route"):
            s.add_argument("--verbose", type=_bool, nargs="?", const=True, default=True,
                           help="more columns (default true; --verbose=false for the short form)")
        if name == "route":
            s.add_argument("--name", default="", help="filter routes by route configuration name")
        if name == "endpoint":
            s.add_argument("--cluster", default="", help="filter endpoints by cluster name")
            s.add_argument("--status", default="", help="filter endpoints by status (HEALTHY, UNHEALTHY, …)")
        if name in ("cluster", "listener", "route", "endpoint"):
            what = {"cluster": "the Port field", "listener": "the listener port", "endpoint": "the endpoint port",
                    "route": "route configurations named <port> or <host>:<port>"}[name]
            s.add_argument("--port", type=int, default=0, help=f"filter by {what}")
    return p


def split_pod(pod: str, namespace: str) -> tuple[str, str]:
    """`name.ns` → (name, ns) at the last dot, as istioctl; a bare name takes -n."""
    name, dot, ns = pod.rpartition(".")
    return (name, ns) if dot and name and ns else (pod, namespace)


# ---------------------------------------------------------------------------------------------------------
# sources


def _http_get_json(url: str, timeout: float, what: str) -> tuple[dict, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as resp:
            body, headers = resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            message = json.loads(raw).get("message", raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace").strip()
        raise ProxyConfigError(f"{what} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ProxyConfigError(f"cannot reach {what} at {url}: {reason}") from None
    try:
        return json.loads(body), headers
    except ValueError as e:
        raise ProxyConfigError(f"{what} did not answer JSON: {e}") from None


def translate_offline(paths: list[str], pod: str, namespace: str) -> tuple[dict, dict]:
    """Translate YAML files for one pod: (snapshot resources type → name → message, the Pod object)."""
    from ..mesh.validation import check_documents
    from ..mesh.yamlio import load_paths

    objects, errors = check_documents(load_paths(paths))
    if errors:
        lines = [line for err in errors for line in str(err).splitlines()]
        raise ProxyConfigError("invalid config:\n  " + "\n  ".join(lines))
    try:
        from ..translator.proxies import pod_node_ids
        from ..translator.proxy import Proxy
        from ..translator.push_context import PushContext
        from ..translator.snapshot import build_snapshot
    except ImportError as e:  # the translator core is not installed in this build
        raise ProxyConfigError(f"offline translation is unavailable: {e}") from None
    pod_obj = next((o for o in objects if o.get("kind") == "Pod" and o["metadata"].get("name") == pod
                    and o["metadata"].get("namespace", "default") == namespace), None)
    if pod_obj is None:
        raise ProxyConfigError(f"pod {pod}.{namespace} is not in the given config")
    # the proxy the translator service builds for this pod (the same node id the registry path finds)
    node_ids = [n for n in pod_node_ids([pod_obj]) if f"~{pod}.{namespace}~" in n]
    if not node_ids:
        raise ProxyConfigError(f"pod {pod}.{namespace} has no proxy (no status.podIP, or host network)")
    push = PushContext.from_resources(objects)
    snapshot = build_snapshot(push, Proxy.from_node_id(node_ids[0], push))
    return merge_layers(snapshot.layers), pod_obj


def bootstrap_for_pod(pod_obj: dict) -> dict:
    """The bootstrap `mizzen bootstrap` would write for this pod (xDS at the default address)."""
    try:
        from ..sidecar.bootstrap import build_bootstrap
    except ImportError as e:
        raise ProxyConfigError(f"bootstrap builder unavailable ({e}); use --file or --admin") from None
    meta = pod_obj["metadata"]
    spec = pod_obj.get("spec") or {}
    return build_bootstrap(meta["name"], meta.get("namespace") or "default", pod_obj["status"]["podIP"],
                           labels=meta.get("labels") or {}, service_account=spec.get("serviceAccountName") or "default")


def load_source(args: argparse.Namespace, need_bootstrap: bool = False) -> Source:
    pod, namespace = split_pod(args.pod, args.namespace)
    if args.file:
        try:
            with open(args.file, "rb") as fh:
                document = json.loads(fh.read())
        except OSError as e:
            raise ProxyConfigError(f"cannot read {args.file}: {e.strerror}") from None
        except ValueError as e:
            raise ProxyConfigError(f"{args.file} is not JSON: {e}") from None
        return Source(_parse(document, args.file), document)
    if args.admin:
        url = f"http://{args.admin}/config_dump?include_eds"
        document, _ = _http_get_json(url, args.timeout, "the Envoy admin")
        return Source(_parse(document, url), document)
    if not pod:
        raise ProxyConfigError("give a pod (<pod-name>[.<namespace>]), or --file/--admin")
    if args.config:
        resources, pod_obj = translate_offline(args.config, pod, namespace)
        document = config_dump_for_snapshot(resources)
        boot = bootstrap_for_pod(pod_obj) if need_bootstrap else None
        return Source(_parse(document, "the offline translation"), document, boot)
    server = settings.registry_url(args.server)
    query = urllib.parse.urlencode({"pod": pod, "namespace": namespace})
    document, _ = _http_get_json(f"{server}/debug/config_dump?{query}", args.timeout, "the registry")
    boot = None
    if need_bootstrap:
        pod_obj, _ = _http_get_json(f"{server}/api/v1/namespaces/{namespace}/pods/{pod}", args.timeout, "the registry")
        boot = bootstrap_for_pod(pod_obj)
    return Source(_parse(document, server), document, boot)


def _parse(document: dict, where: str) -> ParsedDump:
    try:
        return parse_config_dump(document)
    except ConfigDumpError as e:
        raise ProxyConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# printing


def _cluster_filter(a) -> tables.ClusterFilter:
    return tables.ClusterFilter(fqdn=a.fqdn, port=a.port, subset=a.subset, direction=a.direction)


def render(args: argparse.Namespace, src: Source) -> str:
    what, out = ALIASES[args.what], args.output
    dump = src.dump
    if what == "bootstrap":
        boot = src.bootstrap
        if boot is None:
            if dump.bootstrap is None:
                raise ProxyConfigError("the config dump has no bootstrap section")
            boot = tables.to_dicts([dump.bootstrap])[0]
        return tables.render_raw({"bootstrap": boot}, "yaml" if out == "yaml" else "json")
    if what == "secret":
        section = tables.secrets_section(src.document)
        if section is None:
            raise ProxyConfigError("no secrets here: they live in the Envoy, read them with --admin HOST:PORT or "
                                   "--file DUMP.json")
        if out != "short":
            return tables.render_raw(section, out)
        return tables.secret_table(src.document)
    if what == "all":
        if out != "short":
            return tables.render_raw(src.document, out)
        sections = [tables.cluster_table(dump), tables.listener_table(dump), tables.route_table(dump)]
        if dump.has_endpoints:
            sections.append(tables.endpoint_table(dump))
        return "\n".join(sections)
    if what == "cluster":
        flt = _cluster_filter(args)
        if out == "short":
            return tables.cluster_table(dump, flt)
        return tables.render_raw(tables.to_dicts(tables.filtered_clusters(dump, flt)), out)
    if what == "listener":
        lf = tables.ListenerFilter(address=args.address, port=args.port, type=args.type)
        if out == "short":
            return tables.listener_table(dump, lf, verbose=args.verbose)
        return tables.render_raw(tables.to_dicts(tables.filtered_listeners(dump, lf)), out)
    if what == "route":
        rf = tables.RouteFilter(name=args.name, port=args.port)
        if out == "short":
            return tables.route_table(dump, rf, verbose=args.verbose)
        return tables.render_raw(tables.to_dicts(tables.filtered_routes(dump, rf)), out)
    if what == "endpoint":
        if not dump.has_endpoints:
            raise ProxyConfigError("the config dump has no endpoints: take it with /config_dump?include_eds")
        ef = tables.EndpointFilter(address=args.address, port=args.port, cluster=args.cluster, status=args.status)
        if out == "short":
            return tables.endpoint_table(dump, ef)
        return tables.render_raw(tables.to_dicts(tables.filtered_endpoint_configs(dump, ef)), out)
    raise ProxyConfigError(f"unknown section {what!r}")


def main(argv: list[str], command: str = "proxy-config") -> int:
    args = parser(f"mizzen {command}").parse_args(argv)
    try:
        src = load_source(args, need_bootstrap=ALIASES[args.what] == "bootstrap")
        text = render(args, src)
    except (ProxyConfigError, tables.TableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0
