"""A tiny gRPC service with no .proto: `/mizzen.test.Who/Name` answers the server's name (raw bytes).

    python -m tests.apps.grpc_who serve NAME HOST:PORT     a real grpcio server
    python -m tests.apps.grpc_who call TARGET              call forever, one answer (or ERR:<code>) per line

`call` is the proxyless client of tests/test_proxyless_grpc.py: with TARGET `xds:///host:port` and
GRPC_XDS_BOOTSTRAP set, grpcio's own xDS resolver and balancer pick the server."""

from __future__ import annotations

import sys
import time
from concurrent import futures

import grpc

METHOD = "/mizzen.test.Who/Name"


def _raw(b: bytes) -> bytes:
    return b


def server(name: str, address: str) -> grpc.Server:
    def answer(_request: bytes, _context) -> bytes:
        return name.encode()

    handler = grpc.method_handlers_generic_handler("mizzen.test.Who", {
        "Name": grpc.unary_unary_rpc_method_handler(answer, request_deserializer=_raw, response_serializer=_raw),
    })
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    s.add_generic_rpc_handlers((handler,))
    if s.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    s.start()
    return s


def call_forever(target: str, interval: float = 0.02) -> None:
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(METHOD, request_serializer=_raw, response_deserializer=_raw)
        while True:
            try:
                out = call(b"", timeout=5).decode()
            except grpc.RpcError as e:
                out = f"ERR:{e.code().name}:{(e.details() or '')[:200]}"
            print(out, flush=True)
            time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        server(sys.argv[2], sys.argv[3]).wait_for_termination()
    else:
        call_forever(sys.argv[2])
