"""Shared fixtures: private NATS and Redis servers on free loopback ports, started and stopped per test."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from mizzen.services.mesh import procs
from tests.otlp_classes import ensure_current

# before any test module imports opentelemetry.proto: the official classes even when xds-protos' copy won
ensure_current()

FIXTURES = Path(__file__).parent / "fixtures"
SEED_MESH = FIXTURES / "seed-mesh"


@pytest.fixture
def nats_server(tmp_path):
    p = procs.start_nats(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def redis_server(tmp_path):
    p = procs.start_redis(tmp_path / "logs", data_dir=tmp_path / "redis-data")
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def control_plane(tmp_path):
    """Real registry and translator processes over private NATS and Redis (services/mesh/stack.py)."""
    from mizzen.services.mesh.stack import Stack

    s = Stack(tmp_path)
    try:
        s.start(services=("registry", "translator"))
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def grpc_server(add_servicer, servicer):
    """A real gRPC server for `servicer` on a free loopback port; yields (port, servicer)."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=0)


def is_root() -> bool:
    return os.geteuid() == 0


def _netns_unavailable() -> str | None:
    from mizzen.services.sidecar.netns import unavailable_reason

    return unavailable_reason()


# The marks of a module whose tests run pods in network namespaces (real interception, Envoy as uid 1337).
NETNS_E2E = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(not is_root(), reason="needs root: network namespaces, iptables, processes as uid 1337"),
    pytest.mark.skipif(is_root() and _netns_unavailable() is not None, reason=str(_netns_unavailable())),
]
