"""Checks shared by several kinds: host names, ports, labels, IPs, regexes, header names, exportTo.

Each check returns the error text (Istio's or Kubernetes' wording) or None, so callers attach it to the field
path they know. `Errs` collects FieldErrors for one object.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable

import re2

from ..addresses import is_ip
from ..errors import FieldError
from .schema import index

# ---------------------------------------------------------------------------------------------------------------
# Error collection


class Errs:
    """The FieldErrors of one object, in the order the rules found them."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, path: str, message: str | None) -> None:
        if message:
            self.items.append(FieldError(path, message))

    def add_all(self, path: str, messages: Iterable[str]) -> None:
        for m in messages:
            self.add(path, m)

    def __bool__(self) -> bool:
        return bool(self.items)


# ---------------------------------------------------------------------------------------------------------------
# Ports

def port_error(port: int) -> str | None:
    """Istio's `ValidatePort`."""
    if 1 <= port <= 65535:
        return None
    return f"port number {port} must be in the range 1..65535"


def k8s_port_error(port: int) -> str | None:
    """Kubernetes' `IsValidPortNum` wording."""
    if 1 <= port <= 65535:
        return None
    return f"Invalid value: {port}: must be between 1 and 65535, inclusive"


_IANA_CHARSET = re.compile(r"[-a-z0-9]+")
_IANA_LETTER = re.compile(r"[a-z]")


def iana_port_name_errors(name: str) -> list[str]:
    """Kubernetes' `IsValidPortName` (IANA_SVC_NAME): a container port name or a named targetPort."""
    errs = []
    if len(name) > 15:
        errs.append("must be no more than 15 characters")
    if not _IANA_CHARSET.fullmatch(name):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not _IANA_LETTER.search(name):
        errs.append("must contain at least one letter (a-z)")
    if "--" in name:
        errs.append("must not contain consecutive hyphens")
    if name and (name[0] == "-" or name[-1] == "-"):
        errs.append("must not begin or end with a hyphen")
    return errs


# Protocols as `pkg/config/protocol.Parse` knows them (case-insensitive).
ISTIO_PROTOCOLS = {
    "tcp": "TCP", "udp": "UDP", "grpc": "GRPC", "grpc-web": "GRPC-Web", "http": "HTTP", "http_proxy": "HTTP_PROXY",
    "http2": "HTTP2", "https": "HTTPS", "tls": "TLS", "mongo": "Mongo", "redis": "Redis", "mysql": "MySQL",
}
HTTP_PROTOCOLS = {"HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-Web"}
TLS_PROTOCOLS = {"HTTPS", "TLS"}
TCP_PROTOCOLS = {"TCP", "HTTPS", "TLS", "Mongo", "Redis", "MySQL"}


def parse_protocol(text: str) -> str | None:
    """The canonical Istio protocol, or None for an unsupported one (which means "sniff" when empty)."""
    return ISTIO_PROTOCOLS.get(text.lower())


def protocol_error(text: str) -> str | None:
    """Istio's `ValidateProtocol`: empty is allowed (protocol sniffing)."""
    if text and parse_protocol(text) is None:
        return f"unsupported protocol: {text}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# DNS names, Istio flavour (`pkg/config/labels`: labels may hold upper case)

_ISTIO_DNS_LABEL = re.compile(r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?")
_ISTIO_WILDCARD_LABEL = re.compile(r"\*|(?:\*|\*-)?[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?")
_SIGNED_INT = re.compile(r"[+-]?[0-9]+")


def is_dns1123_label(value: str) -> bool:
    """Istio's `labels.IsDNS1123Label` (upper case allowed, at most 63 characters)."""
    return len(value) <= 63 and bool(_ISTIO_DNS_LABEL.fullmatch(value))


def _dns_preconditions(name: str) -> str | None:
    if len(name) > 255:
        return f'domain name "{name}" too long (max 255)'
    if not name:
        return "empty domain name not allowed"
    return None


def _dns1123_labels_error(domain: str) -> str | None:
    parts = domain.split(".")
    tld = parts[-1]
    if _SIGNED_INT.fullmatch(tld):
        return f'domain name "{domain}" invalid (top level domain "{tld}" cannot be all-numeric)'
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None  # a trailing dot: `istio.io.`
        if not is_dns1123_label(label):
            return f'domain name "{domain}" invalid (label "{label}" invalid)'
    return None


def fqdn_error(name: str) -> str | None:
    """Istio's `ValidateFQDN`."""
    return _dns_preconditions(name) or _dns1123_labels_error(name)


def wildcard_domain_error(domain: str) -> str | None:
    """Istio's `ValidateWildcardDomain`: a DNS name whose first label may be a wildcard (`*`, `*.foo`, `*-x`)."""
    pre = _dns_preconditions(domain)
    if pre:
        return pre
    first, dot, rest = domain.partition(".")
    if len(first) > 63 or not _ISTIO_WILDCARD_LABEL.fullmatch(first):
        return f'domain name "{domain}" invalid (label "{first}" invalid)'
    if dot:
        return _dns1123_labels_error(rest)
    return None


def partial_wildcard_error(host: str) -> str | None:
    if "*" in host and len(host) != 1 and not host.startswith("*."):
        return f'partial wildcard "{host}" not allowed'
    return None


def host_matches(a: str, b: str) -> bool:
    """Istio's `host.Name.Matches`: the two names overlap (wildcards included)."""
    aw, bw = a.startswith("*"), b.startswith("*")
    if aw and bw:
        return b[1:].endswith(a[1:]) if len(a) < len(b) else a[1:].endswith(b[1:])
    if aw:
        return b.endswith(a[1:])
    if bw:
        return a.endswith(b[1:])
    return a == b


def host_subset_of(a: str, b: str) -> bool:
    """Istio's `host.Name.SubsetOf`: every name `a` matches is matched by `b`."""
    aw, bw = a.startswith("*"), b.startswith("*")
    if aw:
        return bw and len(a) >= len(b) and a[1:].endswith(b[1:])
    if bw:
        return a.endswith(b[1:])
    return a == b


def _hostname_part_errors(hostname: str, is_gateway: bool) -> list[str]:
    errs = []
    if hostname != "*" and "." not in hostname:
        errs.append("short names (non FQDN) are not allowed")
    err = wildcard_domain_error(hostname)
    if err and not (is_gateway and is_ip(hostname)):
        errs.append(err)
    pw = partial_wildcard_error(hostname)
    if pw:
        errs.append(pw)
    return errs


def namespace_slash_host_errors(hostname: str, is_gateway: bool) -> list[str]:
    """Istio's `ValidateNamespaceSlashWildcardHostname` for Gateway server hosts and Sidecar egress hosts."""
    ns, slash, dns = hostname.partition("/")
    if not slash:
        if is_gateway:
            return _hostname_part_errors(hostname, True)
        return ["host must be of form namespace/dnsName"]
    errs = []
    if not ns or not dns:
        errs.append("config namespace and dnsName in host entry cannot be empty")
    if not is_gateway:
        bare = ns.removeprefix("~")
        if bare and bare not in ("*", ".") and not is_dns1123_label(bare):
            errs.append(f'invalid namespace value "{ns}" in sidecar')
    elif ns not in ("*", ".") and not is_dns1123_label(ns):
        errs.append(f'invalid namespace value "{ns}" in gateway')
    errs.extend(_hostname_part_errors(dns, is_gateway))
    return errs


# ---------------------------------------------------------------------------------------------------------------
# DNS names, Kubernetes flavour (lower case only)

_K8S_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_K8S_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_K8S_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def k8s_label_errors(value: str) -> list[str]:
    """Kubernetes' `IsDNS1123Label`."""
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _K8S_LABEL.fullmatch(value):
        if _K8S_SUBDOMAIN.fullmatch(value):
            errs.append("must not contain dots")
        else:
            errs.append("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
                        "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc')")
    return errs


def k8s_subdomain_errors(value: str) -> list[str]:
    """Kubernetes' `IsDNS1123Subdomain`."""
    errs = []
    if len(value) > 253:
        errs.append("must be no more than 253 characters")
    if not _K8S_SUBDOMAIN.fullmatch(value):
        errs.append("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                    "and must start and end with an alphanumeric character (e.g. 'example.com')")
    return errs


def k8s_dns1035_errors(value: str) -> list[str]:
    """Kubernetes' `IsDNS1035Label` (Service names)."""
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _K8S_1035.fullmatch(value):
        errs.append("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123')")
    return errs


def invalid(value: object, message: str) -> str:
    """Kubernetes' `field.Invalid` wording."""
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return f"Invalid value: {shown}: {message}"


# ---------------------------------------------------------------------------------------------------------------
# Labels

_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def qualified_name_errors(name: str) -> list[str]:
    """Kubernetes' `IsQualifiedName` (label keys, annotation keys, appProtocol)."""
    parts = name.split("/")
    if len(parts) == 1:
        prefix, short = "", parts[0]
    elif len(parts) == 2:
        prefix, short = parts
        if not prefix:
            return ["prefix part must be non-empty"]
    else:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc') with an optional DNS "
                "subdomain prefix and '/' (e.g. 'example.com/MyName')"]
    errs = []
    if not short:
        errs.append("name part must be non-empty")
    elif len(short) > 63:
        errs.append("name part must be no more than 63 characters")
    if short and not _QUALIFIED_NAME.fullmatch(short):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc')")
    if prefix:
        errs.extend("prefix part " + e for e in k8s_subdomain_errors(prefix))
    return errs


def label_value_errors(value: str) -> list[str]:
    """Kubernetes' `IsValidLabelValue`."""
    errs = []
    if len(value) > 63:
        errs.append("must be no more than 63 characters")
    if not _LABEL_VALUE.fullmatch(value):
        errs.append("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                    "'12345')")
    return errs


def check_k8s_labels(labels: dict, path: str, errs: Errs) -> None:
    """Kubernetes' `ValidateLabels` (metadata.labels, a Service's selector)."""
    for k, v in labels.items():
        for m in qualified_name_errors(k):
            errs.add(f"{path}[{k}]", invalid(k, m))
        for m in label_value_errors(v):
            errs.add(f"{path}[{k}]", invalid(v, m))


_ISTIO_TAG_KEY = re.compile(
    r"((?:[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)*/)?"
    r"((?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])"
)


def check_istio_labels(labels: dict, path: str, errs: Errs) -> None:
    """Istio's `labels.Instance.Validate` (subset labels, sourceLabels, endpoint labels)."""
    for k, v in labels.items():
        m = _ISTIO_TAG_KEY.fullmatch(k)
        if m is None:
            errs.add(f"{path}[{k}]", f'invalid tag key: "{k}"')
        elif m.group(1) and len(m.group(1)) - 1 > 253:
            errs.add(f"{path}[{k}]", f'invalid tag key: "{k}" (DNS prefix is too long)')
        elif len(m.group(2)) > 63:
            errs.add(f"{path}[{k}]", f'invalid tag key: "{k}" (name is too long)')
        if not _LABEL_VALUE.fullmatch(v):
            errs.add(f"{path}[{k}]", f'invalid tag value: "{v}"')


def check_workload_selector(labels: dict, path: str, errs: Errs) -> None:
    """Istio's `validateWorkloadSelector` / `ValidateAlphaWorkloadSelector` (no empty keys, no wildcards)."""
    for k, v in labels.items():
        if k == "":
            errs.add(f"{path}[]", f'empty key is not supported in selector: "{k}={v}"')
        if "*" in k or "*" in v:
            errs.add(f"{path}[{k}]", f'wildcard is not supported in selector: "{k}={v}"')
        if len(v) > 63:
            errs.add(f"{path}[{k}]", "Too long: may not be longer than 63")


# ---------------------------------------------------------------------------------------------------------------
# IP addresses


def ip_error(addr: str) -> str | None:
    """Istio's `ValidateIPAddress`."""
    return None if is_ip(addr) else f"{addr} is not a valid IP"


def ip_subnet_error(subnet: str) -> str | None:
    """Istio's `ValidateIPSubnet`: an address or a CIDR block."""
    if subnet.count("/") == 1:
        try:
            ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            return f"{subnet} is not a valid CIDR block"
        return None
    return ip_error(subnet)


K8S_IP_HINT = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"


def k8s_ip_errors(addr: str) -> list[str]:
    return [] if is_ip(addr) else [invalid(addr, K8S_IP_HINT)]


def k8s_endpoint_ip_errors(addr: str) -> list[str]:
    """Kubernetes' endpoint address rules (`ValidateNonSpecialIP`), except loopback.

    Kubernetes refuses 127.0.0.0/8 and ::1 as endpoints; Mizzen accepts them because its meshes often run the
    workloads on one machine's loopback addresses (and its tests may only use 127.0.0.0/8).
    """
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return [invalid(addr, K8S_IP_HINT)]
    if ip.is_unspecified:
        return [invalid(addr, f"may not be unspecified ({addr})")]
    multicast_link_local = ipaddress.ip_network("224.0.0.0/24" if ip.version == 4 else "ff02::/16")
    if ip in multicast_link_local:
        return [invalid(addr, "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")]
    if ip.is_link_local:
        return [invalid(addr, "may not be in the link-local range (169.254.0.0/16, fe80::/10)")]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Regexes (RE2, as Envoy runs them)

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
MAX_REGEX_LEN = 1024


def regex_error(regex: str, where: str) -> str | None:
    """Istio's `validateStringRegexp`: at most 1024 characters and RE2 syntax."""
    if len(regex) > MAX_REGEX_LEN:
        return f'"{where}": regex is too large, max length allowed is {MAX_REGEX_LEN}'
    try:
        re2.compile(regex, options=_RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        return (f'"{where}": error parsing regexp: {reason}; Istio uses RE2 style regex-based match '
                "(https://github.com/google/re2/wiki/Syntax)")
    return None


def string_match_errors(sm: dict, where: str, allow_empty_prefix: bool = False) -> list[str]:
    """Istio's `validateStringMatch` (prefix must be non-empty except for uri; regex must compile)."""
    if "prefix" in sm and sm["prefix"] == "" and not allow_empty_prefix:
        return [f'"{where}": prefix string match should not be empty']
    if "regex" in sm:
        if sm["regex"] == "":
            return [f'"{where}": regex string match should not be empty']
        err = regex_error(sm["regex"], where)
        return [err] if err else []
    return []


# ---------------------------------------------------------------------------------------------------------------
# HTTP headers

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~A-Za-z0-9]+")
_PSEUDO_HEADERS = {":method", ":scheme", ":authority", ":path", ":status"}
_JWT_CLAIM_PREFIX = "@request.auth.claims"
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def is_jwt_claim_header(name: str) -> bool:
    if not name.lower().startswith(_JWT_CLAIM_PREFIX):
        return False
    rest = name[len(_JWT_CLAIM_PREFIX):]
    return (rest.startswith(".") and len(rest) > 1) or (rest.startswith("[") and rest.endswith("]") and len(rest) > 2)


def header_match_name_error(name: str) -> str | None:
    """Istio's `ValidateHTTPHeaderNameOrJwtClaimRoute`."""
    if name == "":
        return "header name cannot be empty"
    if is_jwt_claim_header(name) or name in _PSEUDO_HEADERS or _TOKEN.fullmatch(name):
        return None
    return f"header name {name} is not a valid header name"


def cors_header_name_error(name: str) -> str | None:
    if name == "":
        return "header name cannot be empty"
    if name == "*" or _TOKEN.fullmatch(name):
        return None
    return f"header name {name} is not a valid header name"


def _is_internal_header(name: str) -> bool:
    return name.startswith(":") or name.lower() == "host"


def is_authority_header(name: str) -> bool:
    return name.lower() in (":authority", "host")


def header_set_name_error(name: str) -> str | None:
    """Istio's `ValidateHTTPHeaderWithAuthorityOperationName` (request add/set)."""
    if name == "":
        return "header name cannot be empty"
    if _is_internal_header(name) and not is_authority_header(name):
        return f'invalid header "{name}": header cannot have ":" prefix'
    return None


def header_op_name_error(name: str) -> str | None:
    """Istio's `ValidateHTTPHeaderOperationName` (request remove, response add/set/remove)."""
    if name == "":
        return "header name cannot be empty"
    if name.lower() == "host":
        return f'invalid header "{name}": cannot set Host header'
    if _is_internal_header(name):
        return f'invalid header "{name}": header cannot have ":" prefix'
    return None


def header_value_error(value: str) -> str | None:
    """Istio's `ValidateHTTPHeaderValue`: no control characters, and Envoy's `%VAR%` syntax well formed."""
    if _HEADER_VALUE_BAD.search(value):
        return f"header value configuration {value} is invalid"
    err = _header_format_error(value)
    return f"header value configuration: {err}" if err else None


def _header_format_error(value: str) -> str | None:
    """A port of Envoy's header formatter parser states (`header_parser.cc`)."""
    state = "literal"
    pos = 0
    n = len(value)
    while pos < n:
        ch = value[pos]
        has_next = pos + 1 < n
        if state == "literal":
            if ch == "%":
                if not has_next:
                    return "invalid header configuration. Un-escaped %"
                if value[pos + 1] == "%":
                    pos += 1
                else:
                    state = "name"
        elif state == "name":
            if ch == "%":
                state = "literal"
            elif ch == "(":
                state = "expect_array"
        elif state == "expect_array":
            if ch == "[":
                state = "expect_string"
            elif ch != " ":
                state = "string"
        elif state == "array_delim":
            if ch == ",":
                state = "expect_string"
            elif ch == "]":
                state = "args_end"
            elif ch != " ":
                return "invalid header configuration. Expecting ',', ']', or whitespace"
        elif state == "expect_string":
            if ch == '"':
                state = "string"
            elif ch != " ":
                return "invalid header configuration. Expecting '\"'"
        elif state == "string":
            if ch == "\\":
                if not has_next:
                    return "invalid header configuration. Un-terminated backslash in JSON string"
                pos += 1
            elif ch == ")":
                state = "var_end"
            elif ch == '"':
                state = "array_delim"
        elif state == "args_end":
            if ch == ")":
                state = "var_end"
            elif ch != " ":
                return "invalid header configuration. Expecting ')' or whitespace"
        elif state == "var_end":
            if ch == "%":
                state = "literal"
            elif ch != " ":
                return "invalid header configuration. Expecting '%' or whitespace after"
        pos += 1
    if state != "literal":
        return f"invalid header configuration. Un-terminated variable expression '{value}'"
    return None


# ---------------------------------------------------------------------------------------------------------------
# exportTo


def check_export_to(export_to: list[str], namespace: str, path: str, errs: Errs, service_entry: bool = False,
                    dr_with_selector: bool = False) -> None:
    """Istio's `validateExportTo`: `.`, `*`, namespace names; `~` only for ServiceEntries; no duplicates."""
    if not export_to:
        return
    seen: set[str] = set()
    for i, e in enumerate(export_to):
        key = namespace if e == "." else e
        at = index(path, i)
        if key in seen:
            if key != e:
                errs.add(at, f"duplicate entries in exportTo: . and current namespace {namespace}")
            else:
                errs.add(at, f"duplicate entries in exportTo for entry {e}")
            continue
        if service_entry and e == "~":
            seen.add(key)
            continue
        err = export_to_entry_error(key)
        if err:
            errs.add(at, err)
        else:
            seen.add(key)
    if dr_with_selector and seen:
        if namespace in seen:
            if len(seen) > 1:
                errs.add(path, "destination rule with workload selector cannot have multiple entries in exportTo")
        else:
            errs.add(path, "destination rule with workload selector cannot have exportTo beyond current namespace")
    if "*" in seen and len(export_to) > 1:
        errs.add(path, "cannot have both public (*) and non-public exportTo values for a resource")
    if "~" in seen and len(export_to) > 1:
        errs.add(path, "cannot export service entry to no one (~) and someone")


def export_to_entry_error(entry: str) -> str | None:
    if entry in (".", "*"):
        return None
    if entry == "~":
        return "exportTo ~ (none) is not allowed for Istio configuration objects"
    if not is_dns1123_label(entry):
        return "only .,*, or a valid DNS 1123 label is allowed as exportTo entry"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Misc


def percent_error(value: int) -> str | None:
    """Istio's `ValidatePercent` (integer percentages)."""
    if 0 <= value <= 100:
        return None
    return f"percentage {value} is not in range 0..100"


def fractional_percent_error(value: float) -> str | None:
    """Istio's `validatePercentage` (a `Percent{value}`): 0, or within [0.0001, 100]."""
    if value < 0.0 or value > 100.0 or 0.0 < value < 0.0001:
        return f"percentage {value:g} is neither 0.0, nor in range [0.0001, 100.0]"
    return None


def unix_address_error(addr: str) -> str | None:
    """Istio's `ValidateUnixAddress` (the part after `unix://`)."""
    if not addr:
        return "unix address must not be empty"
    if addr.startswith("@"):
        return None
    if not addr.startswith("/") or addr.endswith("/"):
        return f"{addr} is not an absolute path to a file"
    return None


def base64_error(text: str) -> str | None:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "must be base64-encoded bytes"
    return None


def go_float(value: float) -> str:
    """Go's `%f` formatting, which Istio's mirror-percentage messages use."""
    return f"{value:f}"
