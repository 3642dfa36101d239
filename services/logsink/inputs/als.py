"""Envoy's gRPC Access Log Service (`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`), so sidecars
can stream their logs straight to the logsink (`envoy.access_loggers.http_grpc` / `tcp_grpc`).

Each `HTTPAccessLogEntry`/`TCPAccessLogEntry` becomes the same record a JSON line with Istio's fields would,
with exact nanosecond times. The stream's first message names the node (`identifier.node.id`, an Istio node
id), which gives the spans their service. Headers Envoy was told to log
(`additional_request_headers_to_log`: traceparent, …) and custom tags are kept; the span id hashes the
entry's deterministic serialization.
"""

from __future__ import annotations

import logging
import time

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from mizzen.services.mesh.grpcserver import admission_options

from ..flags import ALS_FIELDS
from ..identity import Source
from ..parse import BadLine, record_from_dict
from ..pipeline import Pipeline

log = logging.getLogger("mizzen.logsink.als")

_PROTOCOLS = {
    al.HTTPAccessLogEntry.HTTP10: "HTTP/1.0",
    al.HTTPAccessLogEntry.HTTP11: "HTTP/1.1",
    al.HTTPAccessLogEntry.HTTP2: "HTTP/2",
    al.HTTPAccessLogEntry.HTTP3: "HTTP/3",
}
_METHODS = {v.number: v.name for v in al.HTTPRequestProperties.DESCRIPTOR.fields_by_name[
    "request_method"].enum_type.values if v.number != 0}


def format_address(addr) -> str | None:
    which = addr.WhichOneof("address")
    if which == "socket_address":
        sa = addr.socket_address
        host = f"[{sa.address}]" if ":" in sa.address else sa.address
        return f"{host}:{sa.port_value}"
    if which == "pipe":
        return addr.pipe.path
    if which == "envoy_internal_address":
        return f"envoy://{addr.envoy_internal_address.server_listener_name}"
    return None


def _ms(d) -> int:
    return d.seconds * 1000 + d.nanos // 1_000_000


def _ns(d) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def _common(c, d: dict) -> tuple[int, int]:
    """Fill the fields AccessLogCommon carries; return (start_ns, end_ns)."""
    start = c.start_time.seconds * 1_000_000_000 + c.start_time.nanos
    if c.HasField("duration"):
        dur = _ns(c.duration)
    elif c.HasField("time_to_last_downstream_tx_byte"):
        dur = _ns(c.time_to_last_downstream_tx_byte)
    else:
        dur = 0
    d["duration"] = dur // 1_000_000
    for key, field in (("downstream_remote_address", "downstream_remote_address"),
                       ("downstream_local_address", "downstream_local_address"),
                       ("upstream_host", "upstream_remote_address"),
                       ("upstream_local_address", "upstream_local_address"),
                       ("downstream_direct_remote_address", "downstream_direct_remote_address")):
        if c.HasField(field):
            d[key] = format_address(getattr(c, field))
    for key in ("upstream_cluster", "upstream_transport_failure_reason", "route_name",
                "connection_termination_details", "downstream_transport_failure_reason"):
        v = getattr(c, key)
        if v:
            d[key] = v
    if c.upstream_request_attempt_count:
        d["upstream_request_attempt_count"] = c.upstream_request_attempt_count
    flags = tuple(short for name, short in ALS_FIELDS.items() if getattr(c.response_flags, name))
    if c.response_flags.HasField("unauthorized_details"):
        flags += ("UAEX",)
    d["response_flags"] = flags
    if c.HasField("tls_properties"):
        tls = c.tls_properties
        if tls.tls_sni_hostname:
            d["requested_server_name"] = tls.tls_sni_hostname
        peer = [s.uri for s in tls.peer_certificate_properties.subject_alt_name if s.uri]
        local = [s.uri for s in tls.local_certificate_properties.subject_alt_name if s.uri]
        if peer:
            d["downstream_peer_uri_san"] = ",".join(peer)
        if local:
            d["downstream_local_uri_san"] = ",".join(local)
    if c.HasField("time_to_last_rx_byte"):
        d["request_duration"] = _ms(c.time_to_last_rx_byte)
    if c.HasField("time_to_first_upstream_rx_byte"):
        d["response_duration"] = _ms(c.time_to_first_upstream_rx_byte)
    for k, v in c.custom_tags.items():
        d[k] = v
    return start, start + dur


def http_entry_fields(e: al.HTTPAccessLogEntry) -> tuple[dict, int, int]:
    d: dict = {}
    start, end = _common(e.common_properties, d)
    req, resp = e.request, e.response
    if req.request_method:
        d["method"] = _METHODS.get(req.request_method)
    if req.original_path or req.path:
        d["path"] = req.original_path or req.path
    if e.protocol_version in _PROTOCOLS:
        d["protocol"] = _PROTOCOLS[e.protocol_version]
    for key, v in (("authority", req.authority), ("user_agent", req.user_agent), ("request_id", req.request_id),
                   ("x_forwarded_for", req.forwarded_for)):
        if v:
            d[key] = v
    d["bytes_received"] = req.request_body_bytes
    d["bytes_sent"] = resp.response_body_bytes
    d["response_code"] = resp.response_code.value if resp.HasField("response_code") else 0
    if resp.response_code_details:
        d["response_code_details"] = resp.response_code_details
    for name, value in req.request_headers.items():
        if name.lower() in ("traceparent", "tracestate"):
            d[name.lower()] = value
        else:
            d["request_header." + name.lower()] = value
    for name, value in resp.response_headers.items():
        if name.lower() == "x-envoy-upstream-service-time":
            d["upstream_service_time"] = value
        else:
            d["response_header." + name.lower()] = value
    return d, start, end


def tcp_entry_fields(e: al.TCPAccessLogEntry) -> tuple[dict, int, int]:
    d: dict = {}
    start, end = _common(e.common_properties, d)
    d["bytes_received"] = e.connection_properties.received_bytes
    d["bytes_sent"] = e.connection_properties.sent_bytes
    d["response_code"] = 0
    return d, start, end


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, pipeline: Pipeline, shipper):
        self.pipeline = pipeline
        self.shipper = shipper
        self.streams = 0

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 - gRPC method name
        self.streams += 1
        src = Source("als")
        async for msg in request_iterator:
            if msg.HasField("identifier"):
                src = Source("als", msg.identifier.node.id or msg.identifier.node.cluster)
            which = msg.WhichOneof("log_entries")
            if which == "http_logs":
                entries, convert = msg.http_logs.log_entry, http_entry_fields
            elif which == "tcp_logs":
                entries, convert = msg.tcp_logs.log_entry, tcp_entry_fields
            else:
                continue
            now = time.monotonic()
            for entry in entries:
                raw = entry.SerializeToString(deterministic=True)
                self.pipeline.stats.lines["als"] += 1
                try:
                    d, start, end = convert(entry)
                    rec = record_from_dict(d, raw, src, start, end)
                except BadLine as e:
                    self.pipeline.bad_line(raw, e, src, None)
                    continue
                self.pipeline.add_record(rec, raw, None, now)
            await self.shipper.wait_room()
        return als_pb2.StreamAccessLogsResponse()


async def start_als_server(address: str, pipeline: Pipeline, shipper) -> tuple[grpc.aio.Server, int]:
    # every Envoy of a restarted mesh reopens its log stream at once: queue them (admission_options)
    server = grpc.aio.server(options=admission_options() + [("grpc.max_receive_message_length", 64 << 20)])
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogService(pipeline, shipper), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} for the access log service")
    await server.start()
    log.info("access log service listening", extra={"address": address, "port": port})
    return server, port

