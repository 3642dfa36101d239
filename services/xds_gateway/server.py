"""The gRPC side: Envoy's AggregatedDiscoveryService with both methods, answering with pre-encoded bytes."""

from __future__ import annotations

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from .delta import DeltaStream
from .snapshot_api import snapshot_handler
from .sotw import SotwStream
from .stream import Gateway

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _raw(data: bytes) -> bytes:
    return data  # responses are assembled as wire bytes already (see wire.py)


def ads_handler(gw: Gateway) -> grpc.GenericRpcHandler:
    async def stream_aggregated(request_iterator, context):
        await SotwStream(gw, context).run(request_iterator)

    async def delta_aggregated(request_iterator, context):
        await DeltaStream(gw, context).run(request_iterator)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            stream_aggregated, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_raw),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            delta_aggregated, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_raw),
    })


def make_server(gw: Gateway, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_concurrent_streams", 100_000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ])
    # the snapshot API shares the port and the snapshot cache with ADS
    server.add_generic_rpc_handlers((ads_handler(gw), snapshot_handler(gw.cache)))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return server, bound
