"""Gateway rules, after Istio's `ValidateGateway`, and the server TLS checks Sidecar ingress shares."""

from __future__ import annotations

from .common import (
    HTTP_PROTOCOLS,
    TLS_PROTOCOLS,
    Errs,
    ip_error,
    is_dns1123_label,
    namespace_slash_host_errors,
    parse_protocol,
    port_error,
    unix_address_error,
)
from .schema import child, index

UNIX_PREFIX = "unix://"
_TERMINATING = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")


def check_gateway(obj: dict, errs: Errs) -> None:
    name = obj["metadata"]["name"]
    if not is_dns1123_label(name):
        errs.add("metadata.name", f'invalid gateway name: "{name}"')
    spec = obj.get("spec", {})
    servers = spec.get("servers", [])
    if not servers:
        errs.add("spec.servers", "gateway must have at least one server")
    port_names: set[str] = set()
    for i, server in enumerate(servers):
        at = index("spec.servers", i)
        _check_server(server, at, errs)
        port_name = server["port"].get("name", "")
        if port_name in port_names:
            errs.add(child(at, "port.name"), f"port names in servers must be unique: duplicate name {port_name}")
        port_names.add(port_name)


def _check_server(server: dict, path: str, errs: Errs) -> None:
    hosts = server.get("hosts", [])
    if not hosts:
        errs.add(child(path, "hosts"), "server config must contain at least one host")
    for j, host in enumerate(hosts):
        errs.add_all(index(child(path, "hosts"), j), namespace_slash_host_errors(host, is_gateway=True))
    port = server["port"]
    bind = server.get("bind", "")
    port_errs = Errs()
    _check_server_port(port, bind, child(path, "port"), port_errs)
    errs.items.extend(port_errs.items)
    if bind.startswith(UNIX_PREFIX):
        errs.add(child(path, "bind"), unix_address_error(bind[len(UNIX_PREFIX):]))
        if port.get("number", 0) != 0:
            errs.add(child(path, "port.number"), "port number must be 0 for unix domain socket")
    elif bind:
        errs.add(child(path, "bind"), ip_error(bind))
    tls = server.get("tls")
    if tls is not None:
        check_server_tls(tls, child(path, "tls"), errs)
    if port_errs:
        return
    protocol = parse_protocol(port["protocol"])
    if protocol in TLS_PROTOCOLS and tls is None:
        errs.add(child(path, "tls"), "server must have TLS settings for HTTPS/TLS protocols")
    elif protocol not in TLS_PROTOCOLS and tls is not None:
        if protocol in HTTP_PROTOCOLS:
            # Only an httpsRedirect (a PASSTHROUGH-mode tls block without certificates) fits a plain HTTP server.
            passthrough = tls.get("mode", "PASSTHROUGH") in ("PASSTHROUGH", "AUTO_PASSTHROUGH")
            if not passthrough or any(tls.get(f) for f in ("caCertificates", "privateKey", "serverCertificate")):
                errs.add(child(path, "tls"), "server cannot have TLS settings for plain text HTTP ports")
        else:
            errs.add(child(path, "tls"), "server cannot have TLS settings for non HTTPS/TLS ports")


def _check_server_port(port: dict, bind: str, path: str, errs: Errs) -> None:
    protocol = port.get("protocol", "")
    if parse_protocol(protocol) is None:
        errs.add(child(path, "protocol"), f'invalid protocol "{protocol}", supported protocols are HTTP, HTTP2, GRPC, '
                                          "GRPC-WEB, MONGO, REDIS, MYSQL, TCP")
    number = port.get("number", 0)
    if number > 0 or not bind.startswith(UNIX_PREFIX):
        errs.add(child(path, "number"), port_error(number))
    if port.get("targetPort", 0) > 0:
        errs.add(child(path, "targetPort"), "targetPort has no impact on Gateways")
    if not port.get("name"):
        errs.add(child(path, "name"), "port name must be set")


def check_server_tls(tls: dict, path: str, errs: Errs) -> None:
    """Istio's `validateTLSOptions` (errors only; its warnings about ciphers are not failures)."""
    mode = tls.get("mode", "PASSTHROUGH")
    if mode == "ISTIO_MUTUAL":
        for field, what in (("serverCertificate", "server certificate"), ("privateKey", "private key"),
                            ("caCertificates", "CA bundle"), ("tlsCertificates", "tlsCertificates"),
                            ("credentialName", "credentialName"), ("credentialNames", "credentialNames")):
            if tls.get(field):
                errs.add(child(path, field), f"ISTIO_MUTUAL TLS cannot have associated {what}")
        return
    sources = sum((
        bool(tls.get("serverCertificate") and tls.get("privateKey")),
        bool(tls.get("credentialName")),
        bool(tls.get("credentialNames")),
        bool(tls.get("tlsCertificates")),
    ))
    if sources > 1:
        errs.add(path, "only one of credential_name, credential_names, server_certificate/private_key, "
                       "tls_certificates should be specified")
    if mode in _TERMINATING and (tls.get("credentialName") or tls.get("credentialNames")):
        return  # certificates come from the credential (SDS); no file paths needed
    if mode in _TERMINATING:
        prefix = "SIMPLE TLS" if mode == "SIMPLE" else "MUTUAL TLS"
        if mode != "SIMPLE" and not tls.get("caCertificates"):
            errs.add(child(path, "caCertificates"), f"{prefix} requires a client CA bundle")
        certs = tls.get("tlsCertificates") or [tls]
        for cert in certs:
            if not cert.get("serverCertificate"):
                errs.add(child(path, "serverCertificate"), f"{prefix} requires a server certificate")
            if not cert.get("privateKey"):
                errs.add(child(path, "privateKey"), f"{prefix} requires a private key")
    if tls.get("caCrl"):
        if tls.get("credentialName"):
            errs.add(child(path, "caCrl"), "CRL is not supported with credentialName. CRL has to be specified in the "
                                           "credential")
        if mode == "SIMPLE":
            errs.add(child(path, "caCrl"), "CRL is not supported with SIMPLE TLS")
