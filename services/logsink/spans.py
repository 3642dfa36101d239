"""A parsed access-log record → the body of an OTLP Span (name, kind, times, attributes, status), following
OpenTelemetry's stable HTTP semantic conventions (semconv ≥ 1.23):

- CLIENT spans (the caller's sidecar, outbound) carry `url.full`, `server.address`/`server.port` (from the
  authority, else the cluster's service and port), `network.peer.*` = the endpoint Envoy picked (`upstream_host`),
  and `service.peer.name` from the cluster.
- SERVER spans (the callee's sidecar, inbound) carry `url.path`/`url.query`/`url.scheme`, `client.address`
  (first X-Forwarded-For entry, else the peer), `network.peer.*` = `downstream_remote_address`.
- Status: 5xx is an error on both kinds, 4xx only on CLIENT spans; no response (code 0) is an error whose
  `error.type` is the first failure flag's long name (`UpstreamConnectionFailure`).
- Everything Envoy-specific goes under `envoy.<field>`; the decoded cluster under `envoy.upstream_cluster.*`;
  unknown log fields under `envoy.<field>` as logged (never dropped).

The ids, parent and resource are added when the joiner emits the span (`otlp_wire.span_header`), so the
body is built once, at parse time, and the record can drop its fields while it waits for its other side.
"""

from __future__ import annotations

from ..mesh.otlp_wire import (
    SPAN_KIND,
    SPAN_NAME,
    STATUS_ERROR,
    Key,
    span_times,
    status,
)
from ..mesh.protowire import ld
from .cluster_name import ClusterName
from .flags import is_failure, long_name
from .parse import KIND_CLIENT, KIND_SERVER, Record, split_address

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

K = {
    name: Key(name)
    for name in (
        "http.request.method",
        "http.request.method_original",
        "http.response.status_code",
        "http.request.body.size",
        "http.response.body.size",
        "url.full",
        "url.path",
        "url.query",
        "url.scheme",
        "server.address",
        "server.port",
        "client.address",
        "network.peer.address",
        "network.peer.port",
        "network.protocol.name",
        "network.protocol.version",
        "network.transport",
        "user_agent.original",
        "error.type",
        "service.peer.name",
        "rpc.grpc.status_code",
        "envoy.response_flags",
        "envoy.response_flags_long",
        "envoy.upstream_cluster",
        "envoy.upstream_cluster.direction",
        "envoy.upstream_cluster.port",
        "envoy.upstream_cluster.subset",
        "envoy.upstream_cluster.service",
        "envoy.upstream_cluster.namespace",
        "envoy.bytes_received",
        "envoy.bytes_sent",
        "envoy.grpc_status",
        "mizzen.parent.source",
    )
}

_extra_keys: dict[str, Key] = {}

# Low-cardinality values are encoded once and reused: one dict lookup instead of an encode.
_CACHE_MAX = 20000


def _cache() -> dict:
    return {}


def _fill(cache: dict, key, value: bytes) -> bytes:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


_NAME: dict = _cache()
_METHOD: dict = _cache()
_PROTO: dict = _cache()
_CODE: dict = _cache()
_SERVER: dict = _cache()
_UA: dict = _cache()
_PEER: dict = _cache()
_CLUSTER: dict = _cache()
_FLAGS: dict = _cache()
_ETYPE: dict = _cache()
_CLIENT_ADDR: dict = _cache()
_K_URL_FULL = K["url.full"]
_K_URL_PATH = K["url.path"]
_K_URL_QUERY = K["url.query"]
_K_REQ_SIZE = K["http.request.body.size"]
_K_RESP_SIZE = K["http.response.body.size"]
# Key.s/Key.i's caches, read inline on the per-line path (the Key methods fill them)
_URL_FULL_HEADS = _K_URL_FULL.heads
_URL_PATH_HEADS = _K_URL_PATH.heads
_URL_QUERY_HEADS = _K_URL_QUERY.heads
_REQ_SIZE_INTS = _K_REQ_SIZE.ints
_RESP_SIZE_INTS = _K_RESP_SIZE.ints
_SCHEME_HTTP = Key("url.scheme").s("http")
_TRANSPORT_TCP = Key("network.transport").s("tcp")
_KIND = {KIND_SERVER: SPAN_KIND + b"\x02", KIND_CLIENT: SPAN_KIND + b"\x03"}


def _method_blob(method: str) -> bytes:
    if method in KNOWN_METHODS:
        return K["http.request.method"].s(method)
    return K["http.request.method"].s("_OTHER") + K["http.request.method_original"].s(method)


def _protocol_blob(proto: str) -> bytes:
    if proto[:5] == "HTTP/":
        version = proto[5:]
        return K["network.protocol.name"].s("http") + K["network.protocol.version"].s(version)
    return K["network.protocol.name"].s(proto.lower())


def _cluster_blob(cl: ClusterName) -> bytes:
    out = [K["envoy.upstream_cluster"].s(cl.raw)]
    if cl.direction:
        out.append(K["envoy.upstream_cluster.direction"].s(cl.direction))
    if cl.port is not None:
        out.append(K["envoy.upstream_cluster.port"].i(cl.port))
    if cl.subset:
        out.append(K["envoy.upstream_cluster.subset"].s(cl.subset))
    if cl.service:
        out.append(K["envoy.upstream_cluster.service"].s(cl.service))
    if cl.namespace:
        out.append(K["envoy.upstream_cluster.namespace"].s(cl.namespace))
    if cl.direction == "outbound" and cl.host:
        out.append(K["service.peer.name"].s(cl.service_id))
    return b"".join(out)


def _flags_blob(flags: tuple[str, ...]) -> bytes:
    return K["envoy.response_flags"].s(",".join(flags)) + K["envoy.response_flags_long"].s(
        ",".join(long_name(f) for f in flags)
    )


def _authority(authority: str) -> tuple[str, int | None]:
    host, port = split_address(authority)
    return host or authority, port


def _server_blob(host: str, port: int | None) -> bytes:
    out = K["server.address"].s(host)
    if port is not None:
        out += K["server.port"].i(port)
    return out


def _peer_blob(addr: str) -> bytes:
    ip, port = split_address(addr)
    out = K["network.peer.address"].s(ip) if ip else b""
    if port is not None:
        out += K["network.peer.port"].i(port)
    return out


_PEER_IP: dict = _cache()
_PEER_PORT = K["network.peer.port"]


def _peer_blob_fast(addr: str) -> bytes:
    """`_peer_blob` for `ip:port` addresses whose port changes on every connection: the address part is cached
    per ip, the port part per port."""
    if addr[:1] != "[":
        host, sep, port = addr.rpartition(":")
        if sep and len(port) <= 5 and port.isdigit() and port.isascii() and ":" not in host:
            a = _PEER_IP.get(host)
            if a is None:
                a = _fill(_PEER_IP, host, K["network.peer.address"].s(host) if host else b"")
            return a + _PEER_PORT.i(int(port))
    return _peer_blob(addr)


def span_name(rec: Record) -> str:
    f = rec.f
    if rec.http:
        method = f.get("method")
        if method in KNOWN_METHODS:
            return method
        return "HTTP"
    cl = f.get("upstream_cluster")
    return f"TCP {cl}" if cl else "TCP"


def _status(rec: Record) -> tuple[int, str, str]:
    """(status code, error.type, status message) per the HTTP semconv rules; TCP errors come from flags."""
    f = rec.f
    code = f.get("response_code") or 0  # "-" (no response) is stored as None
    flags = rec.flags
    if rec.http:
        if code >= 500 or (code >= 400 and rec.kind == KIND_CLIENT):
            return STATUS_ERROR, str(code), ""
        if code != 0:
            return 0, "", ""
    elif not is_failure(flags) and not f.get("upstream_transport_failure_reason"):
        return 0, "", ""
    failing = [fl for fl in flags if is_failure((fl,))]
    etype = long_name(failing[0]) if failing else "_OTHER"
    msg = (
        f.get("response_code_details")
        or f.get("upstream_transport_failure_reason")
        or f.get("connection_termination_details")
        or ""
    )
    return STATUS_ERROR, etype, msg


def encode_body(rec: Record, as_parts: bool = False) -> bytes | list[bytes]:
    """Span fields 5–15 (name, kind, times, attributes, status) for a record. With `as_parts`, the pieces
    unjoined (name, kind, times, attribute blobs…, status): `convert` writes JSON from them, piece by piece,
    most of them the same cached objects line after line."""
    f = rec.f
    get = f.get
    parts: list[bytes] = []
    add = parts.append
    kind = rec.kind
    cl = rec.cluster

    http = rec.http
    if http:
        method = get("method")
        name = method if method in KNOWN_METHODS else "HTTP"
    else:
        name = span_name(rec)
    add(_NAME.get(name) or _fill(_NAME, name, ld(SPAN_NAME, name.encode())))
    add(_KIND[kind])
    add(span_times(rec.start_ns, rec.end_ns))

    if http:
        if method:
            add(_METHOD.get(method) or _fill(_METHOD, method, _method_blob(method)))
        proto = get("protocol")
        if proto:
            add(_PROTO.get(proto) or _fill(_PROTO, proto, _protocol_blob(proto)))
        code = get("response_code")
        if code:
            add(_CODE.get(code) or _fill(_CODE, code, K["http.response.status_code"].i(code)))
        authority = get("authority")
        path = get("path")
        ua = get("user_agent")
        if ua:
            add(_UA.get(ua) or _fill(_UA, ua, K["user_agent.original"].s(ua)))
        if kind == KIND_CLIENT:
            skey = (authority, cl.raw if cl is not None else None)
            blob = _SERVER.get(skey)
            if blob is None:
                blob = _fill(_SERVER, skey, _client_server_blob(authority, cl))
            add(blob)
            if path:
                host = authority or (cl.host if cl is not None else "")
                if host:
                    b = f"http://{host}{path}".encode()  # Key.s's fast path inline: a new value every line
                    h = _URL_FULL_HEADS.get(len(b))
                    add(h + b if h is not None else _K_URL_FULL.s(f"http://{host}{path}"))
            uh = get("upstream_host")
            if uh:
                add(_PEER.get(uh) or _fill(_PEER, uh, _peer_blob(uh)))
        else:
            dla = get("downstream_local_address")
            skey = (authority, dla)
            blob = _SERVER.get(skey)
            if blob is None:
                blob = _fill(_SERVER, skey, _server_server_blob(authority, dla))
            add(blob)
            if path:
                q = path.find("?")
                if q >= 0:
                    b = path[:q].encode()
                    h = _URL_PATH_HEADS.get(len(b))
                    add(h + b if h is not None else _K_URL_PATH.s(path[:q]))
                    b = path[q + 1 :].encode()
                    h = _URL_QUERY_HEADS.get(len(b))
                    add(h + b if h is not None else _K_URL_QUERY.s(path[q + 1 :]))
                else:
                    b = path.encode()
                    h = _URL_PATH_HEADS.get(len(b))
                    add(h + b if h is not None else _K_URL_PATH.s(path))
            add(_SCHEME_HTTP)
            xff = get("x_forwarded_for")
            dra = get("downstream_remote_address")
            if xff:
                client = xff.split(",", 1)[0].strip()
            else:
                client = rec.dr_ip
            if client:
                add(_CLIENT_ADDR.get(client) or _fill(_CLIENT_ADDR, client, K["client.address"].s(client)))
            if dra:
                add(_peer_blob_fast(dra))
        br = get("bytes_received")
        if br is not None:
            add(_REQ_SIZE_INTS.get(br) or _K_REQ_SIZE.i(br))
        bs = get("bytes_sent")
        if bs is not None:
            add(_RESP_SIZE_INTS.get(bs) or _K_RESP_SIZE.i(bs))
    else:
        add(_TRANSPORT_TCP)
        if kind == KIND_CLIENT:
            if cl is not None and cl.host:
                skey = ("tcp>", cl.raw)
                blob = _SERVER.get(skey)
                if blob is None:
                    blob = _fill(_SERVER, skey, _server_blob(cl.host, cl.port))
                add(blob)
            peer = get("upstream_host")
        else:
            dla = get("downstream_local_address")
            if dla:
                skey = ("tcp<", dla)
                blob = _SERVER.get(skey)
                if blob is None:
                    h, p = split_address(dla)
                    blob = _fill(_SERVER, skey, _server_blob(h, p))
                add(blob)
            peer = get("downstream_remote_address")
        if peer:
            add(_peer_blob_fast(peer))
        br = get("bytes_received")
        if br is not None:
            add(K["envoy.bytes_received"].i(br))
        bs = get("bytes_sent")
        if bs is not None:
            add(K["envoy.bytes_sent"].i(bs))

    if cl is not None:
        add(_CLUSTER.get(cl.raw) or _fill(_CLUSTER, cl.raw, _cluster_blob(cl)))
    if rec.flags:
        fl = rec.flags
        add(_FLAGS.get(fl) or _fill(_FLAGS, fl, _flags_blob(fl)))
    parts.extend(rec.env)
    gs = get("grpc_status")
    if gs is not None:
        if gs.__class__ is int or (gs.isdigit() and gs.isascii()):
            add(K["rpc.grpc.status_code"].i(int(gs)))
        else:
            add(K["envoy.grpc_status"].s(gs))
    extra = rec.extra
    if extra:
        for k, v in extra.items():
            key = _extra_keys.get(k)
            if key is None:
                key = Key("envoy." + k)
                if len(_extra_keys) < 10000:
                    _extra_keys[k] = key
            add(key.any(v))

    # The common cases need no status (see _status): an HTTP answer below 400 (500 on the server side), a TCP
    # connection without failure flags or TLS failure.
    if http:
        rc = code
        if rc.__class__ is int and 0 < rc < 500 and (rc < 400 or kind == KIND_SERVER):
            return parts if as_parts else b"".join(parts)
    elif not rec.flags and not get("upstream_transport_failure_reason"):
        return parts if as_parts else b"".join(parts)
    code, etype, msg = _status(rec)
    if code:
        add(_ETYPE.get(etype) or _fill(_ETYPE, etype, K["error.type"].s(etype)))
        add(status(code, msg))
    return parts if as_parts else b"".join(parts)


def _client_server_blob(authority: str | None, cl: ClusterName | None) -> bytes:
    """server.address/server.port of a client span: the authority, else the cluster's host; the port from the
    authority, else the cluster's (service) port."""
    if authority:
        host, port = _authority(authority)
    elif cl is not None and cl.host:
        host, port = cl.host, None
    else:
        return b""
    if port is None and cl is not None and cl.direction == "outbound":
        port = cl.port
    return _server_blob(host, port)


def _server_server_blob(authority: str | None, dla: str | None) -> bytes:
    """server.address/server.port of a server span: the authority; the port from it, else the local port."""
    if not authority:
        return b""
    host, port = _authority(authority)
    if port is None:
        port = split_address(dla)[1]
    return _server_blob(host, port)
