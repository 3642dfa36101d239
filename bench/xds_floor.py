"""The gRPC fan-out floor under the push benchmark: the least an ADS server on grpc.aio can do per push.

    python bench/xds_floor.py --port P --services S --clients N --api sotw|delta   (started by xds_push.py --floor)

It serves the same bytes the push benchmark's snapshots hold (bench.xds_push.build_layers, generation 1, then 2
on SIGUSR1), with the gateway's server options, to the same simulated clients, and does nothing else: no
snapshot store, no NATS, no per-type ordering or ACK tracking, no status or metrics. Each response is assembled
from bytes built once per generation and type (plus the proxy's own cluster and a nonce), as the gateway's
responses are, and no more streams push at once than the gateway lets (XDS_PUSH_SLOTS). What the benchmark
measures against it is what gRPC, Python and the machine cost for that many bytes to that many streams; the
gateway's figures divided by these are its own overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.xds_push import build_layers  # noqa: E402
from mizzen.services.mesh.settings import XDS_PUSH_SLOTS  # noqa: E402
from mizzen.services.mesh.xds_types import CLUSTER, PUSH_ORDER  # noqa: E402
from mizzen.services.xds_gateway import wire  # noqa: E402
from mizzen.services.xds_gateway.server import SERVICE, server_options  # noqa: E402


def version(generation: int) -> str:
    return f"g{generation}"


class Floor:
    def __init__(self, services: int, api: str):
        self.api = api
        self.generation = 1
        self.shared: dict[int, dict[str, bytes]] = {}  # generation -> type -> encoded resource entries
        self.own_layer = None
        for g in (1, 2):
            shared, own, _, _ = build_layers(services, 0, g)
            self.own_layer = own
            self.shared[g] = {t: self._entries(t, shared[t], g) for t in PUSH_ORDER}
        self.streams: set[asyncio.Queue] = set()
        self.slots = asyncio.Semaphore(XDS_PUSH_SLOTS)

    def _entries(self, t: str, resources: dict[str, bytes], generation: int) -> bytes:
        if self.api == "sotw":
            return b"".join(wire.sotw_resource_entry(t, v) for v in resources.values())
        return b"".join(wire.delta_resource_entry(t, n, version(generation), v) for n, v in resources.items())

    def own_entries(self, index: int) -> bytes:
        return self._entries(CLUSTER, self.own_layer(index)[CLUSTER], 1)  # not changed by a generation

    def response(self, t: str, own: bytes, nonce: str) -> bytes:
        g = self.generation
        bodies = [self.shared[g][t], own] if t == CLUSTER else [self.shared[g][t]]
        if self.api == "sotw":
            return wire.sotw_response(version(g), t, nonce, bodies)
        return wire.delta_response(version(g), t, nonce, bodies, [])

    def push(self) -> None:
        self.generation = 2
        for q in self.streams:
            q.put_nowait(None)  # every type again

    async def stream(self, request_iterator, context) -> None:
        q: asyncio.Queue = asyncio.Queue()
        nonces = itertools.count(1)
        opened: list[str] = []
        state = {"own": b""}

        async def read() -> None:
            async for req in request_iterator:
                if req.node.id:  # the proxy's index is the last number of its IP (bench.xds_push.proxy_id)
                    ip = req.node.id.split("~")[1].split(".")
                    state["own"] = self.own_entries((int(ip[2]) << 8) | int(ip[3]))
                if not req.response_nonce:
                    q.put_nowait(req.type_url)  # a subscription: answer it; ACKs need nothing

        reader = asyncio.create_task(read())
        self.streams.add(q)
        try:
            while True:
                item = await q.get()
                types = [item] if item else [t for t in PUSH_ORDER if t in opened]
                if item:
                    opened.append(item)
                async with self.slots:
                    for t in types:
                        await context.write(self.response(t, state["own"], str(next(nonces))))
        finally:
            self.streams.discard(q)
            reader.cancel()


async def serve(port: int, services: int, api: str) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2

    floor = Floor(services, api)
    method = "StreamAggregatedResources" if api == "sotw" else "DeltaAggregatedResources"
    request = discovery_pb2.DiscoveryRequest if api == "sotw" else discovery_pb2.DeltaDiscoveryRequest
    handler = grpc.method_handlers_generic_handler(SERVICE, {method: grpc.stream_stream_rpc_method_handler(
        floor.stream, request_deserializer=request.FromString, response_serializer=lambda b: b)})
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, floor.push)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--services", type=int, required=True)
    ap.add_argument("--api", choices=("sotw", "delta"), default="sotw")
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.services, args.api))
    return 0


if __name__ == "__main__":
    sys.exit(main())
