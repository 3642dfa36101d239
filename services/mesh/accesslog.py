"""The sidecars' JSON access-log format: one definition for the bootstrap, the translator (which attaches it
to the listeners it builds) and, by field name, the logsink that parses the lines."""

from __future__ import annotations

# The access-log fields, in the seed's order, then those Istio 1.9 added, then Mizzen's extras.
# `istio_policy_status` is the Mixer-era field the seed shows; stock Envoy renders it as null.
SEED_ACCESS_LOG_FIELDS: dict[str, str] = {
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "duration": "%DURATION%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "route_name": "%ROUTE_NAME%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "user_agent": "%REQ(USER-AGENT)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "bytes_received": "%BYTES_RECEIVED%",
    "istio_policy_status": "%DYNAMIC_METADATA(istio.mixer:status)%",
    "bytes_sent": "%BYTES_SENT%",
    # The raw cluster name, never an alt_stat_name (Istio's JSON default since 1.25).
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
}
ISTIO_ACCESS_LOG_FIELDS: dict[str, str] = {
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
}
# Not in Istio's default: the timings and peer identities the logsink turns into span data.
MIZZEN_ACCESS_LOG_FIELDS: dict[str, str] = {
    "request_duration": "%REQUEST_DURATION%",
    "response_duration": "%RESPONSE_DURATION%",
    "downstream_peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "upstream_peer_uri_san": "%UPSTREAM_PEER_URI_SAN%",
    # AuthorizationPolicy AUDIT: the RBAC filters' LOG action sets Envoy's shared `envoy.common` hint, true when an
    # audit rule matched, false when an AUDIT filter ran and nothing matched, null without AUDIT policies.
    "access_log_hint": "%DYNAMIC_METADATA(envoy.common:access_log_hint)%",
}
ACCESS_LOG_FIELDS: dict[str, str] = {
    **SEED_ACCESS_LOG_FIELDS,
    **ISTIO_ACCESS_LOG_FIELDS,
    **MIZZEN_ACCESS_LOG_FIELDS,
}


def partition_key(line: bytes) -> bytes:
    """What both sides of a call share: the request id (with Envoy's trace-decision nibble reset, as the
    logsink's join does), else the W3C trace id, else — for a TCP connection — its client and server
    addresses as the client side (upstream_local/upstream_host) and the server side
    (downstream_remote/downstream_local) both log them. Unparsable lines share one key."""
    import orjson

    try:
        d = orjson.loads(line)
    except orjson.JSONDecodeError:
        return b""
    if not isinstance(d, dict):
        return b""
    rid = d.get("request_id")
    if isinstance(rid, str) and rid not in ("", "-"):
        if len(rid) == 36 and rid[14:15].isalnum():
            rid = rid[:14] + "4" + rid[15:]  # Envoy rewrites the version nibble between hops
        return rid.lower().encode()
    tp = d.get("traceparent")
    if isinstance(tp, str) and tp.count("-") >= 3:
        return tp.split("-")[1].encode()
    cl = d.get("upstream_cluster")
    inbound = isinstance(cl, str) and (cl.startswith("inbound|") or cl.startswith("InboundPassthrough"))
    src, dst = ((d.get("downstream_remote_address"), d.get("downstream_local_address")) if inbound
                else (d.get("upstream_local_address"), d.get("upstream_host")))
    return f"tcp|{src}|{dst}".encode()


def partition_of(line: bytes, partitions: int) -> int:
    """The partition (0..partitions-1) of an access-log line; stable across processes and versions."""
    import zlib

    return zlib.crc32(partition_key(line)) % partitions


def split_by_partition(lines: list[bytes], partitions: int) -> dict[int, list[bytes]]:
    """Lines grouped by partition, order kept within each: publish each group as one NDJSON message to
    `bus.accesslog_subject(proxy, k)`."""
    out: dict[int, list[bytes]] = {}
    for raw in lines:
        out.setdefault(partition_of(raw, partitions), []).append(raw)
    return out
