"""The `istioctl proxy-config` tables of Istio 1.7 (the seed's vintage), printed from a parsed config dump.

Sources of truth (istio/istio at tag 1.7.0): `istioctl/pkg/writer/envoy/configdump/{cluster,listener,route}.go`
and `istioctl/pkg/writer/envoy/clusters/clusters.go` (endpoints). What is kept exactly:
- columns, cell texts and Go `text/tabwriter` alignment (minwidth 0, padding 5; listeners padding 1);
  trailing blanks are trimmed from each line, as the seed's tables show them;
- cluster rows sorted by (host, subset, port, direction) after splitting `dir|port|subset|host`, other names
  printed with `-` columns; DESTINATION RULE / VIRTUAL SERVICE as `name.namespace` from the
  `istio.config` metadata path;
- listener rows sorted by (port, address, type), each filter chain a row (MATCH: `SNI:`, `Trans:`,
  `App: HTTP`-style ALPN names, `Addr:`, else `ALL`; DESTINATION: `Route: <rds>`, `Inline Route: …`, a
  tcp_proxy cluster bare when its name contains "Cluster", else `Cluster: <name>`), chains ordered by
  destination, descending;
- route rows per virtual host and route, routes to PassthroughCluster hidden, DOMAINS the shortest domain
  not starting with 1-9, MATCH `prefix*`, `path` or `regex <RegexMatcher in Go's compact text form>`;
- endpoint rows sorted by (address, port, cluster).

Where istioctl 1.7's order is undefined we pick a fixed one, so that every source of the same config prints
the same text: routes (istioctl runs an unstable sort with an inconsistent comparator over Envoy's
hash-map order) come dynamic first, then static, numeric names ascending before other names by name; equal
keys keep a stable order. Chains with equal destinations keep their listener order. A listener's
`default_filter_chain` (newer than 1.7) is printed as one more chain.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..mesh.configdump import ParsedDump

HCM_NAMES = ("envoy.http_connection_manager", "envoy.filters.network.http_connection_manager")
TCP_PROXY_NAMES = ("envoy.tcp_proxy", "envoy.filters.network.tcp_proxy")
BLACKHOLE = "BlackHoleCluster"
PASSTHROUGH = "PassthroughCluster"


class TableError(Exception):
    """Nothing to print (istioctl's "no clusters found" and friends)."""


# ---------------------------------------------------------------------------------------------------------
# Go text/tabwriter (flags 0, padchar ' '): a cell ends at a tab; the last cell of a line is not aligned.


def tabwrite(lines: Sequence[Sequence[str]], padding: int, minwidth: int = 0) -> str:
    """Align lines of cells the way Go's tabwriter does: a column's width is its widest cell plus padding,
    computed over each run of consecutive lines that have that column."""
    out: list[str] = []

    def write_lines(widths: list[int], line0: int, line1: int) -> None:
        for line in lines[line0:line1]:
            parts = []
            for j, cell in enumerate(line):
                parts.append(cell)
                if j < len(widths):
                    parts.append(" " * (widths[j] - len(cell)))
            out.append("".join(parts).rstrip())

    def fmt(widths: list[int], line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(widths, line0, this)
            line0 = this
            width = minwidth
            while this < line1 and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + padding)
                this += 1
            widths.append(width)
            fmt(widths, line0, this)
            widths.pop()
            line0 = this
        write_lines(widths, line0, line1)

    fmt([], 0, len(lines))
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def render_config(path: str) -> str:
    """`/apis/networking.istio.io/<v>/namespaces/<ns>/<kind>/<name>` → `name.ns` (istioctl's renderConfig;
    1.7 accepted only v1alpha3, later releases any version)."""
    if path.startswith("/apis/networking.istio.io/"):
        pieces = path.split("/")
        if len(pieces) != 8 or pieces[4] != "namespaces":
            return ""
        return f"{pieces[7]}.{pieces[5]}"
    return "<unknown>"


def describe_management(metadata) -> str:
    if metadata is None or "istio" not in metadata.filter_metadata:
        return ""
    fields = metadata.filter_metadata["istio"].fields
    if "config" not in fields:
        return ""
    return render_config(fields["config"].string_value)


def _go_quote(text: str) -> str:
    """A string as Go's protobuf text encoder quotes it."""
    out = ['"']
    for ch in text:
        r = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif r < 0x20 or r == 0x7F:
            out.append(f"\\x{r:02x}")
        elif 0x80 <= r <= 0x9F:
            out.append(f"\\u{r:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_text(msg) -> str:
    """A message in Go protobuf's compact text form (what `.String()` printed for istioctl), e.g.
    `google_re2:{max_program_size:{value:1024}} regex:".*"`."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    def value(fd, v) -> str:
        if fd.type == FD.TYPE_MESSAGE or fd.type == FD.TYPE_GROUP:
            return "{" + go_text(v) + "}"
        if fd.type == FD.TYPE_STRING:
            return _go_quote(v)
        if fd.type == FD.TYPE_BYTES:
            return _go_quote(v.decode("latin-1"))
        if fd.type == FD.TYPE_BOOL:
            return "true" if v else "false"
        if fd.type == FD.TYPE_ENUM:
            ev = fd.enum_type.values_by_number.get(v)
            return ev.name if ev is not None else str(v)
        if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return repr(float(v)).removesuffix(".0") if float(v).is_integer() else repr(float(v))
        return str(v)

    parts: list[str] = []
    for fd, v in sorted(msg.ListFields(), key=lambda fv: fv[0].index):
        if fd.is_repeated:
            parts.extend(f"{fd.name}:{value(fd, item)}" for item in v)
        else:
            parts.append(f"{fd.name}:{value(fd, v)}")
    return " ".join(parts)


def _unpack(any_msg, cls):
    out = cls()
    out.ParseFromString(any_msg.value)
    return out


# ---------------------------------------------------------------------------------------------------------
# clusters


@dataclass
class ClusterFilter:
    fqdn: str = ""
    port: int = 0
    subset: str = ""
    direction: str = ""

    def verify(self, name: str) -> bool:
        """istioctl 1.7: substring matches on the whole cluster name; the port as `|<port>|`."""
        if self.fqdn and self.fqdn not in name:
            return False
        if self.direction and self.direction not in name:
            return False
        if self.subset and self.subset not in name:
            return False
        return not (self.port and f"|{self.port}|" not in name)


def parse_subset_key(name: str) -> tuple[str, str, str, int]:
    """(direction, subset, host, port) of `dir|port|subset|host` (or the `outbound_.port_.subset_.host` form)."""
    srv = name.startswith(("outbound_", "inbound_"))
    parts = name.split(".", 3) if srv else name.split("|")
    if len(parts) < 4:
        return "", "", "", 0
    port_text = parts[1].removesuffix("_")
    port = int(port_text) if re.fullmatch(r"[+-]?\d+", port_text) else 0
    subset = parts[2].removesuffix("_") if srv else parts[2]
    return parts[0].removesuffix("_"), subset, parts[3], port


def _safe_subset_key(name: str) -> tuple[str, str, str, int]:
    if len(name.split("|")) > 3:
        return parse_subset_key(name)
    return "", "", name, 0


def sorted_clusters(dump: ParsedDump) -> list:
    clusters = dump.clusters
    if not clusters:
        raise TableError("no clusters found")

    def key(c):
        direction, subset, host, port = _safe_subset_key(c.name)
        return host, subset, port, direction

    return sorted(clusters, key=key)


def filtered_clusters(dump: ParsedDump, flt: ClusterFilter) -> list:
    return [c for c in sorted_clusters(dump) if flt.verify(c.name)]


def cluster_rows(dump: ParsedDump, flt: ClusterFilter | None = None) -> list[list[str]]:
    from envoy.config.cluster.v3 import cluster_pb2

    rows = []
    for c in filtered_clusters(dump, flt or ClusterFilter()):
        ctype = cluster_pb2.Cluster.DiscoveryType.Name(c.type)
        if len(c.name.split("|")) > 3:
            direction, subset, host, port = parse_subset_key(c.name)
            rows.append([host, str(port), subset or "-", direction, ctype, describe_management(c.metadata)])
        else:
            rows.append([c.name, "-", "-", "-", ctype, describe_management(c.metadata)])
    return rows


CLUSTER_HEADER = ["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE"]


def cluster_table(dump: ParsedDump, flt: ClusterFilter | None = None) -> str:
    return tabwrite([CLUSTER_HEADER, *cluster_rows(dump, flt)], padding=5)


# ---------------------------------------------------------------------------------------------------------
# listeners

PLAINTEXT_HTTP_ALPNS = ["http/1.0", "http/1.1", "h2c"]
PROTOCOL_DESCRIPTIONS = {
    "App: HTTP TLS": ["http/1.0", "http/1.1", "h2c", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
    "App: Istio HTTP Plain": ["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
    "App: TCP TLS": ["istio-peer-exchange", "istio"],
    "App: HTTP": PLAINTEXT_HTTP_ALPNS,
}


@dataclass
class ListenerFilter:
    address: str = ""
    port: int = 0
    type: str = ""

    def verify(self, listener) -> bool:
        if self.address and listener_address(listener).lower() != self.address.lower():
            return False
        if self.port and listener_port(listener) != self.port:
            return False
        return not (self.type and listener_type(listener).lower() != self.type.lower())


def listener_address(listener) -> str:
    return listener.address.socket_address.address


def listener_port(listener) -> int:
    return listener.address.socket_address.port_value


def _chains(listener) -> list:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    return chains


def _is_hcm(f) -> bool:
    return f.name in HCM_NAMES or f.typed_config.type_url.endswith(".HttpConnectionManager")


def _is_tcp_proxy(f) -> bool:
    return f.name in TCP_PROXY_NAMES or f.typed_config.type_url.endswith(".TcpProxy")


def listener_type(listener) -> str:
    """HTTP, TCP, HTTP+TCP or UNKNOWN; tcp_proxy chains to the BlackHoleCluster do not count."""
    n_http = n_tcp = 0
    for chain in _chains(listener):
        for f in chain.filters:
            if _is_hcm(f):
                n_http += 1
            elif _is_tcp_proxy(f) and BLACKHOLE.encode() not in f.typed_config.value:
                n_tcp += 1
    if n_http:
        return "HTTP+TCP" if n_tcp else "HTTP"
    return "TCP" if n_tcp else "UNKNOWN"


def describe_chain_match(chain) -> str:
    m = chain.filter_chain_match
    descrs: list[str] = []
    if m.server_names:
        descrs.append("SNI: " + ",".join(m.server_names))
    if m.transport_protocol:
        descrs.append(f"Trans: {m.transport_protocol}")
    if m.application_protocols:
        alpns = list(m.application_protocols)
        for text, protocols in PROTOCOL_DESCRIPTIONS.items():
            if alpns == protocols:
                descrs.append(text)
                break
        else:
            descrs.append("App: " + ",".join(alpns))
    port = f":{m.destination_port.value}" if m.HasField("destination_port") else ""
    if m.address_suffix:
        descrs.append(f"Addr: {m.address_suffix}{port}")
    if m.prefix_ranges:
        ranges = ",".join(f"{p.address_prefix}/{p.prefix_len.value}" for p in m.prefix_ranges)
        descrs.append(f"Addr: {ranges}{port}")
    return "; ".join(descrs) if descrs else "ALL"


def describe_domains(vhost) -> str:
    if len(vhost.domains) == 1 and vhost.domains[0] == "*":
        return ""
    return "/".join(vhost.domains)


def describe_match(match) -> str:
    conds = []
    spec = match.WhichOneof("path_specifier")
    if spec == "prefix" and match.prefix:
        conds.append(f"{match.prefix}*")
    elif spec == "path" and match.path:
        conds.append(match.path)
    elif spec == "safe_regex":
        conds.append(f"regex {go_text(match.safe_regex)}")
    elif spec == "path_separated_prefix" and match.path_separated_prefix:
        conds.append(f"{match.path_separated_prefix}*")
    return " ".join(conds)


def describe_routes(vhost) -> str:
    return ", ".join(describe_match(r.match) for r in vhost.routes)


def describe_route_config(route_config) -> str:
    vhosts = []
    for vh in route_config.virtual_hosts:
        domains = describe_domains(vh)
        vhosts.append(f"{domains} {describe_routes(vh)}" if domains else describe_routes(vh))
    return "Inline Route: " + "; ".join(vhosts)


def chain_destination(chain) -> str:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

    for f in chain.filters:
        if _is_hcm(f):
            manager = _unpack(f.typed_config, hcm.HttpConnectionManager)
            if manager.HasField("route_config"):
                return describe_route_config(manager.route_config)
            if manager.rds.route_config_name:
                return f"Route: {manager.rds.route_config_name}"
            return "HTTP"
        if _is_tcp_proxy(f) and BLACKHOLE.encode() not in f.typed_config.value:
            proxy = _unpack(f.typed_config, tcp_proxy_pb2.TcpProxy)
            if "Cluster" in proxy.cluster:
                return proxy.cluster
            return f"Cluster: {proxy.cluster}"
    return "Non-HTTP/Non-TCP"


def filtered_listeners(dump: ParsedDump, flt: ListenerFilter) -> list:
    listeners = dump.listeners
    if not listeners:
        raise TableError("no listeners found")
    chosen = [lst for lst in listeners if flt.verify(lst)]
    return sorted(chosen, key=lambda lst: (listener_port(lst), listener_address(lst), listener_type(lst)))


def listener_rows(dump: ParsedDump, flt: ListenerFilter | None = None, verbose: bool = True) -> list[list[str]]:
    rows = []
    for lst in filtered_listeners(dump, flt or ListenerFilter()):
        address, port = listener_address(lst), str(listener_port(lst))
        if not verbose:
            rows.append([address, port, listener_type(lst)])
            continue
        matches = [(describe_chain_match(c), chain_destination(c)) for c in _chains(lst)]
        matches.sort(key=lambda md: md[1], reverse=True)  # stable: equal destinations keep chain order
        rows.extend([address, port, m, d] for m, d in matches)
    return rows


def listener_table(dump: ParsedDump, flt: ListenerFilter | None = None, verbose: bool = True) -> str:
    header = ["ADDRESS", "PORT", "MATCH", "DESTINATION"] if verbose else ["ADDRESS", "PORT", "TYPE"]
    table = tabwrite([header, *listener_rows(dump, flt, verbose)], padding=1)
    rbac = rbac_policy_lines(dump, flt or ListenerFilter())
    return table + "".join(f"{line}\n" for line in rbac)


RBAC_HTTP = "envoy.filters.http.rbac"
RBAC_NETWORK = "envoy.filters.network.rbac"


def _rbac_names(any_msg, network: bool) -> list[str]:
    if network:
        from envoy.extensions.filters.network.rbac.v3 import rbac_pb2
    else:
        from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    r = _unpack(any_msg, rbac_pb2.RBAC)
    return [*r.rules.policies, *r.shadow_rules.policies]


def chain_rbac_policies(chain) -> list[str]:
    """The AuthorizationPolicy rules (RBAC policy names) a filter chain enforces or shadows, HTTP or TCP."""
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb,
    )

    names: list[str] = []
    for f in chain.filters:
        if f.name == RBAC_NETWORK:
            names += _rbac_names(f.typed_config, network=True)
        elif _is_hcm(f):
            for hf in _unpack(f.typed_config, hcm_pb.HttpConnectionManager).http_filters:
                if hf.name == RBAC_HTTP:
                    names += _rbac_names(hf.typed_config, network=False)
    return names


def rbac_policy_lines(dump: ParsedDump, flt: ListenerFilter) -> list[str]:
    """istioctl's `RBAC policies: <names>` (`x describe pod`), one line per inbound port that has any, prefixed
    with that port as istioctl does for multi-port services; names sorted (istioctl prints Go's map order)."""
    by_port: dict[int, set[str]] = {}
    try:
        listeners = filtered_listeners(dump, flt)
    except TableError:
        return []
    for lst in listeners:
        for chain in _chains(lst):
            names = chain_rbac_policies(chain)
            if names:
                port = chain.filter_chain_match.destination_port.value or listener_port(lst)
                by_port.setdefault(port, set()).update(names)
    return [f"{port} RBAC policies: {', '.join(sorted(names))}" for port, names in sorted(by_port.items())]


# ---------------------------------------------------------------------------------------------------------
# routes


@dataclass
class RouteFilter:
    name: str = ""
    port: int = 0  # Mizzen's addition: route configurations named `<port>` or `<host>:<port>`

    def verify(self, route_config) -> bool:
        if self.name and route_config.name != self.name:
            return False
        return not (self.port and route_config.name != str(self.port)
                    and not route_config.name.endswith(f":{self.port}"))


def describe_route_domains(domains: Sequence[str]) -> str:
    if not domains:
        return ""
    if len(domains) == 1:
        return domains[0]
    candidate = domains[0]
    for d in domains:
        if not d or "1" <= d[0] <= "9":
            continue
        if len(d) < len(candidate):
            candidate = d
    return candidate


def _is_passthrough(route) -> bool:
    return route.WhichOneof("action") == "route" and route.route.WhichOneof("cluster_specifier") == "cluster" \
        and route.route.cluster == PASSTHROUGH


def _route_config_rows(rc, verbose: bool) -> list[list[str]]:
    if not verbose:
        return [[rc.name, str(len(rc.virtual_hosts))]]
    rows = []
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            if not _is_passthrough(r):
                rows.append([rc.name, describe_route_domains(vh.domains), describe_match(r.match),
                             describe_management(r.metadata)])
    return rows


def _route_order(static: bool, name: str) -> tuple:
    numeric = re.fullmatch(r"[+-]?\d+", name) is not None
    return (static, not numeric, int(name) if numeric else 0, name)


def sorted_routes(dump: ParsedDump) -> list:
    if not dump.routes:
        raise TableError("no routes found")
    keyed = [(_route_order(False, rc.name), rc) for rc in dump.dynamic_routes]
    keyed += [(_route_order(True, rc.name), rc) for rc in dump.static_routes]
    # equal names (inline route configs repeat) are ordered by what they print, so the source's order never shows
    keyed.sort(key=lambda kr: (kr[0], _route_config_rows(kr[1], True)))
    return [rc for _k, rc in keyed]


def filtered_routes(dump: ParsedDump, flt: RouteFilter) -> list:
    return [rc for rc in sorted_routes(dump) if flt.verify(rc)]


def route_rows(dump: ParsedDump, flt: RouteFilter | None = None, verbose: bool = True) -> list[list[str]]:
    rows = []
    for rc in filtered_routes(dump, flt or RouteFilter()):
        rows.extend(_route_config_rows(rc, verbose))
    return rows


def route_table(dump: ParsedDump, flt: RouteFilter | None = None, verbose: bool = True) -> str:
    header = ["NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"] if verbose else ["NAME", "VIRTUAL HOSTS"]
    return tabwrite([header, *route_rows(dump, flt, verbose)], padding=5)


# ---------------------------------------------------------------------------------------------------------
# endpoints (istioctl reads Envoy's /clusters; we read the dump's EDS section, so OUTLIER CHECK is always OK)


@dataclass
class EndpointFilter:
    address: str = ""
    port: int = 0
    cluster: str = ""
    status: str = ""

    def verify(self, address: str, port: int, cluster: str, status: str) -> bool:
        if self.address and address.lower() != self.address.lower():
            return False
        if self.port and port != self.port:
            return False
        if self.cluster and cluster.lower() != self.cluster.lower():
            return False
        return not (self.status and status.lower() != self.status.lower())


@dataclass(frozen=True)
class EndpointRow:
    address: str
    port: int
    status: str
    outlier: str
    cluster: str

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}" if self.port else self.address


def _host_address(address) -> tuple[str, int]:
    kind = address.WhichOneof("address")
    if kind == "socket_address":
        return address.socket_address.address, address.socket_address.port_value
    if kind == "pipe":
        return "unix://" + address.pipe.path, 0
    if kind == "envoy_internal_address":
        return "envoy://" + address.envoy_internal_address.server_listener_name, 0
    return "", 0


def _endpoint_hosts(cla) -> Iterable[EndpointRow]:
    from envoy.config.core.v3 import health_check_pb2

    for locality in cla.endpoints:
        for lb in locality.lb_endpoints:
            if lb.WhichOneof("host_identifier") != "endpoint":
                continue
            address, port = _host_address(lb.endpoint.address)
            status = health_check_pb2.HealthStatus.Name(lb.health_status)
            yield EndpointRow(address, port, status, "OK", cla.cluster_name)


def endpoint_entries(dump: ParsedDump, flt: EndpointFilter | None = None) -> list[tuple[EndpointRow, object]]:
    flt = flt or EndpointFilter()
    out = [(row, cla) for cla in dump.endpoints for row in _endpoint_hosts(cla)
           if flt.verify(row.address, row.port, row.cluster, row.status)]
    out.sort(key=lambda rc: (rc[0].address, rc[0].port, rc[0].cluster))
    return out


def endpoint_rows(dump: ParsedDump, flt: EndpointFilter | None = None) -> list[list[str]]:
    return [[r.endpoint, r.status, r.outlier, r.cluster] for r, _cla in endpoint_entries(dump, flt)]


def endpoint_table(dump: ParsedDump, flt: EndpointFilter | None = None) -> str:
    return tabwrite([["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"], *endpoint_rows(dump, flt)], padding=5)


def filtered_endpoint_configs(dump: ParsedDump, flt: EndpointFilter) -> list:
    """The ClusterLoadAssignments with at least one host the filter keeps, in table order."""
    seen: list = []
    for _row, cla in endpoint_entries(dump, flt):
        if not any(cla is s for s in seen):
            seen.append(cla)
    return seen


# ---------------------------------------------------------------------------------------------------------
# raw output


def to_dicts(messages: Iterable) -> list[dict]:
    from google.protobuf import json_format

    return [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]


def render_raw(data: object, output: str) -> str:
    """`-o json` (indented, like istioctl) or `-o yaml`."""
    if output == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return json.dumps(data, indent=4) + "\n"


# ---------------------------------------------------------------------------------------------------------
# secrets (istioctl proxy-config secret: the config dump's SecretsConfigDump, warming then active)

SECRET_COLUMNS = ["RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]


def secrets_section(document: dict) -> dict | None:
    for c in document.get("configs", []):
        if str(c.get("@type", "")).endswith(".SecretsConfigDump"):
            return c
    return None


def _first_cert_meta(pem_data: bytes, now: datetime.datetime) -> tuple[str, bool, str, str, str]:
    """(type, valid, serial, not after, not before) of the first PEM certificate, as istioctl's
    secretMetaFromCert: `CA` for a CA certificate, else `Cert Chain`; serial in lowercase hex."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem_data)
    except ValueError:
        return "", False, "", "", ""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return ("CA" if is_ca else "Cert Chain", nb < now < na, format(cert.serial_number, "x"),
            na.strftime(stamp), nb.strftime(stamp))


def _inline(source: dict | None) -> bytes:
    data = (source or {}).get("inline_bytes") or (source or {}).get("inlineBytes") or ""
    try:
        return base64.b64decode(data) if data else b""
    except ValueError:
        return b""


def secret_rows(document: dict, now: datetime.datetime | None = None) -> list[list[str]]:
    section = secrets_section(document) or {}
    now = now or datetime.datetime.now(datetime.UTC)
    rows = []
    for state, key in (("WARMING", "dynamic_warming_secrets"), ("ACTIVE", "dynamic_active_secrets")):
        for s in section.get(key, []):
            secret = s.get("secret") or {}
            tls = secret.get("tls_certificate") or {}
            vc = secret.get("validation_context") or {}
            data = _inline(tls.get("certificate_chain")) or _inline(vc.get("trusted_ca"))
            status = "UNINITIALIZED" if state == "ACTIVE" and s.get("version_info") == "uninitialized" else state
            if data:
                kind, valid, serial, not_after, not_before = _first_cert_meta(data, now)
            else:
                kind, valid, serial, not_after, not_before = "", False, "", "", ""
            rows.append([s.get("name", ""), kind, status, "true" if valid else "false", serial, not_after, not_before])
    return rows


def secret_table(document: dict, now: datetime.datetime | None = None) -> str:
    return tabwrite([SECRET_COLUMNS, *secret_rows(document, now)], padding=5)
