"""The gRPC side: Envoy's AggregatedDiscoveryService with both methods, answering with pre-encoded bytes."""

from __future__ import annotations

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from mizzen.services.mesh.grpcserver import admission_options

from .delta import DeltaStream
from .snapshot_api import snapshot_handler
from .sotw import SotwStream
from .stream import Gateway
from .tls import TokenCheck, is_tls

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _raw(data: bytes) -> bytes:
    return data  # responses are assembled as wire bytes already (see wire.py)


def ads_handler(gw: Gateway, token_check: TokenCheck | None = None) -> grpc.GenericRpcHandler:
    async def authenticate(context) -> None:
        # the TLS port wants a workload token; the plaintext port is for local tools (as istiod's 15010)
        if token_check is not None and is_tls(context):
            reason = token_check.check(context.invocation_metadata())
            if reason is not None:
                gw.metrics.unauthenticated.inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"xDS over TLS needs a valid token: {reason}")

    async def stream_aggregated(request_iterator, context):
        await authenticate(context)
        await SotwStream(gw, context).run(request_iterator)

    async def delta_aggregated(request_iterator, context):
        await authenticate(context)
        await DeltaStream(gw, context).run(request_iterator)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            stream_aggregated, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_raw),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            delta_aggregated, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_raw),
    })


def server_options(max_pending: int = 20_000, reuse_port: bool = False) -> list[tuple[str, int]]:
    """gRPC options of the ADS server (bench/xds_floor.py serves with the same ones)."""
    return admission_options(max_pending) + [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_concurrent_streams", 100_000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # clients may ping every second to notice a dead or partitioned gateway quickly (Envoy's
        # connection keepalive); gRPC's default would answer such pings with GOAWAY "too_many_pings"
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def make_server(gw: Gateway, host: str, port: int, tls: tuple[int, grpc.ServerCredentials, TokenCheck] | None = None,
                reuse_port: bool = False, max_pending: int = 20_000) -> tuple[grpc.aio.Server, int]:
    """The ADS server on host:port (plaintext) and, with `tls` (port, credentials, token check), on a TLS port.
    `reuse_port`: several worker processes share the ports (SO_REUSEPORT; the kernel spreads new connections
    over them); off, a second gateway on a taken port fails. `max_pending`: new streams queued for admission
    before gRPC refuses more (see admission_options)."""
    server = grpc.aio.server(options=server_options(max_pending, reuse_port))
    # the snapshot API shares the port and the snapshot cache with ADS
    server.add_generic_rpc_handlers((ads_handler(gw, tls[2] if tls else None), snapshot_handler(gw.cache)))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    if tls is not None and server.add_secure_port(f"{host}:{tls[0]}", tls[1]) == 0:
        raise OSError(f"cannot listen on {host}:{tls[0]} (TLS)")
    return server, bound
