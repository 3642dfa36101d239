"""Small constructors for the Envoy protos every builder uses (xds-protos classes only).

Names follow Istio 1.7 where `istioctl` 1.7 reads them (network filters `envoy.http_connection_manager` and
`envoy.tcp_proxy`); everything is typed_config, so Envoy finds each extension by its type URL.
"""

from __future__ import annotations

import os

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from ..mesh import protowire
from ..mesh.accesslog import ACCESS_LOG_FIELDS
from ..mesh.protowire import LENGTH_DELIMITED

# Filter names istioctl 1.7 recognises (go-control-plane's wellknown names of that release).
HTTP_CONNECTION_MANAGER = "envoy.http_connection_manager"
TCP_PROXY = "envoy.tcp_proxy"
TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER_SOCKET = "envoy.transport_sockets.raw_buffer"
HTTP_ROUTER = "envoy.filters.http.router"
HTTP_FAULT = "envoy.filters.http.fault"
HTTP_CORS = "envoy.filters.http.cors"
HTTP_GRPC_STATS = "envoy.filters.http.grpc_stats"
HTTP_GRPC_WEB = "envoy.filters.http.grpc_web"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
HTTP_INSPECTOR = "envoy.filters.listener.http_inspector"
ORIGINAL_DST = "envoy.filters.listener.original_dst"

BLACKHOLE_CLUSTER = "BlackHoleCluster"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER_IPV4 = "InboundPassthroughClusterIpv4"
PASSTHROUGH_FILTER_CHAIN = "PassthroughFilterChain"
SDS_CLUSTER = "sds-grpc"
# istiod sends SDS references with initial_fetch_timeout 0s (wait forever): its node agent is always there.
# Without an SDS server Envoy would then never finish initialising, so Mizzen waits this long for the
# certificates and then starts anyway (plaintext keeps working; mTLS starts when the secrets arrive).
SDS_FETCH_TIMEOUT = float(os.environ.get("MIZZEN_SDS_FETCH_TIMEOUT") or 3.0)
MAX_UINT32 = 4294967295

_any_cache: dict = {}


def pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg, deterministic=True)  # map fields (Struct, metadata) in a stable order across processes
    return a


def duration(seconds: float) -> duration_pb2.Duration:
    nanos = round(seconds * 1e9)
    s, n = divmod(nanos, 1_000_000_000)
    return duration_pb2.Duration(seconds=s, nanos=n)


def set_duration(field, seconds: float) -> None:
    nanos = round(seconds * 1e9)
    field.seconds, field.nanos = divmod(nanos, 1_000_000_000)


def u32(v: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=int(v))


def set_socket_address(field: address_pb2.Address, address: str, port: int) -> None:
    """Writes the address in place (cheaper than building an Address and copying it in)."""
    sa = field.socket_address
    sa.address = address
    sa.port_value = int(port)


def ads_config_source() -> config_source_pb2.ConfigSource:
    """`ads {}` with initial_fetch_timeout 0s and V3, as istiod sends for EDS and RDS."""
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          initial_fetch_timeout=duration_pb2.Duration(),
                                          resource_api_version=config_source_pb2.V3)


def ads_sds_config_source() -> config_source_pb2.ConfigSource:
    """SDS over the ADS stream itself (gateway credentials come from the control plane, as istiod's)."""
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def sds_config_source() -> config_source_pb2.ConfigSource:
    """SDS over the bootstrap's `sds-grpc` cluster (the CA agent / certauth)."""
    return config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            set_node_on_first_message_only=True,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER))]),
        initial_fetch_timeout=duration(SDS_FETCH_TIMEOUT),
        resource_api_version=config_source_pb2.V3)


def struct_of(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def tag(message_class, field: str, wire_type: int = LENGTH_DELIMITED) -> bytes:
    """The wire tag of a field of a message class (length-delimited: message, string, bytes; or a VARINT one: ints,
    enums), for builders that parse a message from bytes they put together (see assignment.build_assignment)."""
    return protowire.tag(message_class.DESCRIPTOR.fields_by_name[field].number, wire_type)


_MD_CACHE: dict[tuple, base_pb2.Metadata] = {}


def istio_metadata(values: dict) -> base_pb2.Metadata:
    """`filter_metadata.istio` (config path, subset); built once per distinct value, callers CopyFrom it."""
    key = tuple(sorted(values.items()))
    md = _MD_CACHE.get(key)
    if md is None:
        md = base_pb2.Metadata()
        md.filter_metadata["istio"].update(values)
        if len(_MD_CACHE) > 100_000:
            _MD_CACHE.clear()
        _MD_CACHE[key] = md
    return md


def raw_buffer_socket() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=RAW_BUFFER_SOCKET, typed_config=pack(raw_buffer_pb2.RawBuffer()))


# The JSON access-log fields of the seed (Istio 1.7's EnvoyJSONLogFormat).
JSON_LOG_FORMAT = ACCESS_LOG_FIELDS  # the seed's fields first, then Istio's and Mizzen's additions

TEXT_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% "%DYNAMIC_METADATA(istio.mixer:status)%" "%UPSTREAM_TRANSPORT_FAILURE_REASON%" '
    '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% "
    "%ROUTE_NAME%\n"
)


def access_logs(path: str, encoding: str) -> list[accesslog_pb2.AccessLog]:
    """The file access log Istio configures from mesh accessLogFile/accessLogEncoding (none if no path)."""
    if not path:
        return []
    key = (path, encoding)
    cached = _any_cache.get(key)
    if cached is None:
        cfg = file_pb2.FileAccessLog(path=path)
        if encoding.upper() == "JSON":
            cfg.log_format.json_format.update(JSON_LOG_FORMAT)
        else:
            cfg.log_format.text_format_source.inline_string = TEXT_LOG_FORMAT
        cached = _any_cache[key] = pack(cfg)
    return [accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=cached)]
