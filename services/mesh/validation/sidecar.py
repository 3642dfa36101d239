"""Sidecar rules, after Istio's `ValidateSidecar`."""

from __future__ import annotations

from .common import (
    TLS_PROTOCOLS,
    Errs,
    check_workload_selector,
    fqdn_error,
    ip_error,
    is_dns1123_label,
    namespace_slash_host_errors,
    parse_protocol,
    port_error,
    protocol_error,
    unix_address_error,
)
from .destinationrule import check_connection_pool
from .gateway import UNIX_PREFIX, check_server_tls
from .schema import child, index
from .virtualservice import check_destination

_DEFAULT_ENDPOINT_HOSTS = ("", "127.0.0.1", "0.0.0.0", "::1", "::")


def check_sidecar(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    if "workloadSelector" in spec:
        check_workload_selector(spec["workloadSelector"].get("labels", {}), "spec.workloadSelector.labels", errs)
    ingress, egress = spec.get("ingress", []), spec.get("egress", [])
    if not ingress and not egress and "outboundTrafficPolicy" not in spec and "inboundConnectionPool" not in spec:
        errs.add("spec", "sidecar: empty configuration provided")
        return

    ports: set[int] = set()
    for i, listener in enumerate(ingress):
        _check_ingress(listener, index("spec.ingress", i), ports, errs)
    if "inboundConnectionPool" in spec:
        check_connection_pool(spec["inboundConnectionPool"], "spec.inboundConnectionPool", errs)

    ports, sockets = set(), set()
    catch_all = False
    for i, listener in enumerate(egress):
        at = index("spec.egress", i)
        if "port" not in listener:
            if catch_all:
                errs.add(at, "sidecar: egress can have only one listener with empty port")
                continue
            if i == len(egress) - 1:
                catch_all = True
            else:
                errs.add(at, "sidecar: the egress listener with empty port should be the last listener in the list")
        else:
            _check_egress_port(listener, at, ports, sockets, errs)
        hosts = listener.get("hosts", [])
        if not hosts:
            errs.add(child(at, "hosts"), "sidecar: egress listener must contain at least one host")
        for j, host in enumerate(hosts):
            errs.add_all(index(child(at, "hosts"), j), namespace_slash_host_errors(host, is_gateway=False))

    if "outboundTrafficPolicy" in spec:
        _check_outbound_policy(spec["outboundTrafficPolicy"], "spec.outboundTrafficPolicy", errs)


def _check_port_name(port: dict, path: str, errs: Errs) -> None:
    name = port.get("name", "")
    if name and not is_dns1123_label(name):
        errs.add(child(path, "name"), f"invalid port name: {name}")


def _check_ingress(listener: dict, path: str, ports: set[int], errs: Errs) -> None:
    port = listener["port"]
    pp = child(path, "port")
    if port.get("targetPort", 0) > 0:
        errs.add(child(pp, "targetPort"), "targetPort has no impact on Sidecars")
    _check_port_name(port, pp, errs)
    errs.add(child(pp, "protocol"), protocol_error(port.get("protocol", "")))
    number = port.get("number", 0)
    errs.add(child(pp, "number"), port_error(number))
    if listener.get("bind"):
        errs.add(child(path, "bind"), ip_error(listener["bind"]))
    if number in ports:
        errs.add(child(pp, "number"), "sidecar: ports on IP bound listeners must be unique")
    ports.add(number)
    if listener.get("defaultEndpoint"):
        _check_default_endpoint(listener["defaultEndpoint"], child(path, "defaultEndpoint"), errs)
    tls = listener.get("tls")
    if tls is not None:
        at = child(path, "tls")
        for field, text in (("subjectAltNames", "sidecar: subjectAltNames is not supported in ingress tls"),
                            ("httpsRedirect", "sidecar: httpsRedirect is not supported"),
                            ("credentialName", "sidecar: credentialName is not currently supported"),
                            ("credentialNames", "sidecar: credentialNames is not currently supported"),
                            ("tlsCertificates", "sidecar: tls_certificates is not currently supported")):
            if tls.get(field):
                errs.add(child(at, field), text)
        mode = tls.get("mode", "PASSTHROUGH")
        if mode in ("ISTIO_MUTUAL", "AUTO_PASSTHROUGH"):
            errs.add(child(at, "mode"), f"configuration is invalid: cannot set mode to {mode} in sidecar ingress tls")
        if parse_protocol(port.get("protocol", "")) not in TLS_PROTOCOLS:
            errs.add(at, "server cannot have TLS settings for non HTTPS/TLS ports")
        check_server_tls(tls, at, errs)
    if "connectionPool" in listener:
        check_connection_pool(listener["connectionPool"], child(path, "connectionPool"), errs)


def _check_default_endpoint(endpoint: str, path: str, errs: Errs) -> None:
    if endpoint.startswith(UNIX_PREFIX):
        errs.add(path, unix_address_error(endpoint[len(UNIX_PREFIX):]))
        return
    split = _split_host_port(endpoint)
    if isinstance(split, str):
        errs.add(path, split)
        return
    host, port = split
    if host not in _DEFAULT_ENDPOINT_HOSTS:
        errs.add(path, "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,"
                       "[::]:port,unix://filepath or unset")
    if not port.isdigit():
        errs.add(path, f"sidecar: defaultEndpoint port ({port}) is not a number")
    else:
        errs.add(path, port_error(int(port)))


def _split_host_port(text: str) -> tuple[str, str] | str:
    """Go's `net.SplitHostPort`, returning its error text on failure."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return f"address {text}: missing ']' in address"
        if not text[end + 1:].startswith(":"):
            return f"address {text}: missing port in address"
        return text[1:end], text[end + 2:]
    host, colon, port = text.rpartition(":")
    if not colon:
        return f"address {text}: missing port in address"
    if ":" in host:
        return f"address {text}: too many colons in address"
    return host, port


def _check_egress_port(listener: dict, path: str, ports: set[int], sockets: set[str], errs: Errs) -> None:
    port = listener["port"]
    pp = child(path, "port")
    if port.get("targetPort", 0) > 0:
        errs.add(child(pp, "targetPort"), "targetPort has no impact on Sidecars")
    _check_port_name(port, pp, errs)
    bind = listener.get("bind", "")
    number = port.get("number", 0)
    errs.add(child(pp, "protocol"), protocol_error(port.get("protocol", "")))
    if number == 0:
        if not bind.startswith(UNIX_PREFIX):
            errs.add(child(path, "bind"), "sidecar: ports with 0 value must have a unix domain socket bind address")
        else:
            errs.add(child(path, "bind"), unix_address_error(bind[len(UNIX_PREFIX):]))
        if listener.get("captureMode", "DEFAULT") not in ("DEFAULT", "NONE"):
            errs.add(child(path, "captureMode"), "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners")
        if bind in sockets:
            errs.add(child(path, "bind"), "sidecar: unix domain socket values for listeners must be unique")
        sockets.add(bind)
        return
    errs.add(child(pp, "number"), port_error(number))
    if bind:
        errs.add(child(path, "bind"), ip_error(bind))
    if number in ports:
        errs.add(child(pp, "number"), "sidecar: ports on IP bound listeners must be unique")
    ports.add(number)


def _check_outbound_policy(policy: dict, path: str, errs: Errs) -> None:
    proxy = policy.get("egressProxy")
    if proxy is None:
        return
    at = child(path, "egressProxy")
    if policy.get("mode", "REGISTRY_ONLY") != "ALLOW_ANY":
        errs.add(at, "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode")
        return
    errs.add(child(at, "host"), fqdn_error(proxy.get("host", "")))
    if "port" not in proxy:
        errs.add(child(at, "port"), "sidecar: egress_proxy port must be non-nil")
        return
    check_destination(proxy, at, errs)
