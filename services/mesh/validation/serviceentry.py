"""ServiceEntry and WorkloadEntry rules, after Istio's `ValidateServiceEntry` and `ValidateWorkloadEntry`."""

from __future__ import annotations

from .common import (
    HTTP_PROTOCOLS,
    TLS_PROTOCOLS,
    Errs,
    check_export_to,
    check_istio_labels,
    check_workload_selector,
    fqdn_error,
    ip_subnet_error,
    is_dns1123_label,
    is_ip,
    parse_protocol,
    port_error,
    protocol_error,
    unix_address_error,
    wildcard_domain_error,
)
from .schema import child, index, key

UNIX_PREFIX = "unix://"


def check_service_entry(obj: dict, errs: Errs) -> None:
    spec = obj["spec"]
    namespace = obj["metadata"]["namespace"]
    hosts: list[str] = spec.get("hosts", [])
    endpoints: list[dict] = spec.get("endpoints", [])
    resolution = spec.get("resolution", "NONE")

    if "workloadSelector" in spec:
        check_workload_selector(spec["workloadSelector"].get("labels", {}), "spec.workloadSelector.labels", errs)
        if endpoints:
            errs.add("spec", "only one of WorkloadSelector or Endpoints is allowed in Service Entry")

    if not hosts:
        errs.add("spec.hosts", "service entry must have at least one host")
    for i, host in enumerate(hosts):
        at = index("spec.hosts", i)
        errs.add(at, f"invalid host {host}" if host == "*" else wildcard_domain_error(host))

    cidr = False
    for i, addr in enumerate(spec.get("addresses", [])):
        cidr = cidr or "/" in addr
        errs.add(index("spec.addresses", i), ip_subnet_error(addr))
    if cidr and resolution not in ("NONE", "STATIC"):
        errs.add("spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types")

    port_names: set[str] = set()
    port_numbers: set[int] = set()
    for i, port in enumerate(spec.get("ports", [])):
        at = index("spec.ports", i)
        name, number = port.get("name", ""), port.get("number", 0)
        if name in port_names:
            errs.add(child(at, "name"), f'service entry port name "{name}" already defined')
        if number in port_numbers:
            errs.add(child(at, "number"), f"service entry port {number} already defined")
        port_names.add(name)
        port_numbers.add(number)
        if port.get("targetPort", 0) != 0:
            errs.add(child(at, "targetPort"), port_error(port["targetPort"]))
        if not is_dns1123_label(name):
            errs.add(child(at, "name"), f"invalid port name: {name}")
        errs.add(child(at, "protocol"), protocol_error(port.get("protocol", "")))
        errs.add(child(at, "number"), port_error(number))

    if resolution == "NONE":
        if endpoints:
            errs.add("spec.endpoints", "no endpoints should be provided for resolution type none")
    elif resolution == "STATIC":
        for i, ep in enumerate(endpoints):
            check_workload_entry(ep, index("spec.endpoints", i), errs, port_names, allow_fqdn=False)
    elif resolution in ("DNS", "DNS_ROUND_ROBIN"):
        _check_dns_resolution(spec, resolution, port_names, errs)
    elif resolution == "DYNAMIC_DNS":
        _check_dynamic_dns(spec, errs)

    # Plain TCP cannot tell several hosts apart (no Host header, no SNI), unless the hosts are ignored (NONE).
    if resolution != "NONE" and len(hosts) > 1:
        for port in spec.get("ports", []):
            proto = parse_protocol(port.get("protocol", ""))
            if proto not in HTTP_PROTOCOLS and proto not in TLS_PROTOCOLS:
                errs.add("spec.hosts", "multiple hosts provided with non-HTTP, non-TLS ports")
                break

    check_export_to(spec.get("exportTo", []), namespace, "spec.exportTo", errs, service_entry=True)


def _check_dns_resolution(spec: dict, resolution: str, port_names: set[str], errs: Errs) -> None:
    endpoints = spec.get("endpoints", [])
    if not endpoints:
        for i, host in enumerate(spec.get("hosts", [])):
            err = fqdn_error(host)
            if err:
                errs.add(index("spec.hosts", i),
                         "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for "
                         f"resolution mode {resolution}, {err}")
                break
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        errs.add("spec.endpoints", f"there must only be 0 or 1 endpoint for resolution mode {resolution}")
    for i, ep in enumerate(endpoints):
        at = index("spec.endpoints", i)
        addr = ep.get("address", "")
        if not is_ip(addr) and fqdn_error(addr):
            errs.add(child(at, "address"), f'endpoint address "{addr}" is not a valid FQDN or an IP address')
        check_istio_labels(ep.get("labels", {}), child(at, "labels"), errs)
        _check_endpoint_ports(ep, at, port_names, errs)


def _check_dynamic_dns(spec: dict, errs: Errs) -> None:
    resolution = "DYNAMIC_DNS"
    for i, host in enumerate(spec.get("hosts", [])):
        if not host.startswith("*"):
            errs.add(index("spec.hosts", i), f"host must be wildcarded for resolution mode {resolution}")
    if spec.get("addresses"):
        errs.add("spec.addresses", f"addresses cannot be set for resolution type {resolution}. HTTP route domains "
                                   "will only be generated from the hosts field values")
    if spec.get("endpoints"):
        errs.add("spec.endpoints", f"endpoints cannot be set for resolution type {resolution}. Destination IP "
                                   "address determined from hosts field values")
    for i, port in enumerate(spec.get("ports", [])):
        if parse_protocol(port.get("protocol", "")) not in ("HTTP", "TLS", "GRPC", "HTTP2"):
            errs.add(child(index("spec.ports", i), "protocol"),
                     f"only HTTP, TLS, GRPC, and HTTP2 protocols are supported for resolution type {resolution}")


def _check_endpoint_ports(ep: dict, path: str, service_ports: set[str] | None, errs: Errs) -> None:
    for name, number in ep.get("ports", {}).items():
        at = key(child(path, "ports"), name)
        if service_ports is not None and name not in service_ports:
            errs.add(at, f"endpoint port {number} is not defined by the service entry")
        if not is_dns1123_label(str(name)):
            errs.add(at, f"invalid port name: {name}")
        errs.add(at, port_error(number))


def check_workload_entry(we: dict, path: str, errs: Errs, service_ports: set[str] | None = None,
                         allow_fqdn: bool = True) -> None:
    """`validateWorkloadEntry`: a WorkloadEntry's spec, or a STATIC ServiceEntry's endpoint."""
    addr = we.get("address", "")
    at = child(path, "address")
    if not addr and not we.get("network"):
        errs.add(at, "address is required")
        return
    unix = addr.startswith(UNIX_PREFIX)
    if unix:
        errs.add(at, unix_address_error(addr[len(UNIX_PREFIX):]))
        if we.get("ports"):
            errs.add(child(path, "ports"), f"unix endpoint {addr} must not include ports")
    elif addr and not is_ip(addr):
        if not allow_fqdn:
            errs.add(at, f'endpoint address "{addr}" is not a valid IP address')
        elif fqdn_error(addr):
            errs.add(at, f'endpoint address "{addr}" is not a valid FQDN or an IP address')
    _check_endpoint_ports(we, path, service_ports, errs)
    check_istio_labels(we.get("labels", {}), child(path, "labels"), errs)
    if unix and service_ports is not None and len(service_ports) != 1:
        errs.add(at, "exactly 1 service port required for unix endpoints")


def check_workload_entry_object(obj: dict, errs: Errs) -> None:
    check_workload_entry(obj["spec"], "spec", errs)
