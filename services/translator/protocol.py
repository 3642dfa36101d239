"""Port protocol selection, as Istio's `pkg/config/protocol` and `pkg/config/kube.ConvertProtocol`.

Protocols are Istio's names (`HTTP`, `GRPC-Web`, `UnsupportedProtocol`, …). A port whose protocol is
`UnsupportedProtocol` is "auto": the sidecar sniffs HTTP vs TCP on it.
"""

from __future__ import annotations

GRPC = "GRPC"
GRPC_WEB = "GRPC-Web"
HTTP = "HTTP"
HTTP_PROXY = "HTTP_PROXY"
HTTP2 = "HTTP2"
HTTPS = "HTTPS"
THRIFT = "Thrift"
TCP = "TCP"
TLS = "TLS"
UDP = "UDP"
MONGO = "Mongo"
REDIS = "Redis"
MYSQL = "MySQL"
UNSUPPORTED = "UnsupportedProtocol"

_BY_NAME = {
    "tcp": TCP, "udp": UDP, "grpc": GRPC, "grpc-web": GRPC_WEB, "http": HTTP, "http_proxy": HTTP_PROXY,
    "http2": HTTP2, "https": HTTPS, "thrift": THRIFT, "tls": TLS, "mongo": MONGO, "redis": REDIS, "mysql": MYSQL,
}
# Kubernetes' own appProtocol values (KEP-3726).
_KUBE_APP_PROTOCOLS = {"kubernetes.io/h2c": HTTP2, "kubernetes.io/ws": HTTP, "kubernetes.io/wss": HTTPS}

# Server-first protocols live on these ports; sniffing would break them, so unnamed ports there are TCP.
WELL_KNOWN_TCP_PORTS = frozenset({25, 53, 3306, 27017})

_HTTP = frozenset({HTTP, HTTP2, HTTP_PROXY, GRPC, GRPC_WEB})
_HTTP2 = frozenset({HTTP2, GRPC, GRPC_WEB})
_TCP = frozenset({TCP, HTTPS, TLS, MONGO, REDIS, MYSQL, THRIFT})


def parse(name: str | None) -> str:
    """An explicit protocol string (ServiceEntry/Gateway/Sidecar ports), case-insensitive."""
    return _BY_NAME.get((name or "").lower(), UNSUPPORTED)


def from_kube_port(port: int, name: str | None, transport: str | None = "TCP", app_protocol: str | None = None) -> str:
    """A Kubernetes Service port's protocol: UDP, else appProtocol, else the port-name prefix."""
    if (transport or "TCP").upper() == "UDP":
        return UDP
    text = name or ""
    if app_protocol:
        kube = _KUBE_APP_PROTOCOLS.get(app_protocol)
        if kube:
            return kube
        text = app_protocol
    if text[:8].lower() == "grpc-web":
        return GRPC_WEB
    prefix = text.split("-", 1)[0]
    proto = parse(prefix)
    if proto == UNSUPPORTED and port in WELL_KNOWN_TCP_PORTS:
        return TCP
    return proto


def is_http(p: str) -> bool:
    return p in _HTTP


def is_http2(p: str) -> bool:
    return p in _HTTP2


def is_grpc(p: str) -> bool:
    return p in (GRPC, GRPC_WEB)


def is_tcp(p: str) -> bool:
    return p in _TCP


def is_tls(p: str) -> bool:
    return p in (HTTPS, TLS)


def is_auto(p: str) -> bool:
    return p == UNSUPPORTED


def listener_class(p: str) -> str | None:
    """`HTTP`, `TCP` or `AUTO` (sniffed); None for UDP, which Envoy is never configured for."""
    if p in _HTTP:
        return "HTTP"
    if p in _TCP:
        return "TCP"
    if p == UDP:
        return None
    return "AUTO"
