"""Shared fixtures: private NATS and Redis servers on free loopback ports, started and stopped per test."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from mizzen.services.mesh import procs
from tests.otlp_classes import ensure_current

# before any test module imports opentelemetry.proto: the official classes even when xds-protos' copy won
ensure_current()

FIXTURES = Path(__file__).parent / "fixtures"
SEED_MESH = FIXTURES / "seed-mesh"


def pytest_configure(config):
    """An xdist worker takes free ports from its own range below the kernel's ephemeral ports (32768+), so a
    port one test picked cannot be picked by another worker, or become some connection's local port, before
    its service binds it (services/mesh/procs.py; a stack once failed to start on that race)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and not os.environ.get(procs.PORT_RANGE_ENV):
        k = int(worker[2:])
        size = min(3000, 12000 // max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1))
        lo = 20000 + k * size
        os.environ[procs.PORT_RANGE_ENV] = f"{lo}-{lo + size - 1}"


def pytest_collection_modifyitems(config, items):
    """Modules marked `exclusive` first, then the others by how many tests they hold, most first (xdist's own
    order, which pyproject's `--no-loadscope-reorder` turns off so that this one stands). An exclusive module
    waits for every running module to end; at the start of a run little is running, while later each one
    idled three workers until the longest module beside it ended."""
    module = [it.nodeid.split("::", 1)[0] for it in items]
    count = Counter(module)
    exclusive = {m for m, it in zip(module, items, strict=True) if it.get_closest_marker("exclusive")}
    order = {id(it): (m not in exclusive, -count[m], m) for m, it in zip(module, items, strict=True)}
    items.sort(key=lambda it: order[id(it)])


@pytest.fixture(scope="module", autouse=True)
def _share_the_machine(request):
    """Under pytest-xdist (the suite's default: workers take whole test files), a module marked `exclusive` runs
    alone on the machine; the others share it. Exclusive modules simulate thousands of clients or measure
    throughput: beside them other tests' timing bounds and free ports are not safe, nor are their own figures.

    A readers-writer lock over two files: `gate` keeps new readers out while a writer waits (no starvation), and
    `run` is held shared by every running module and exclusively by an exclusive one. Module scope, so a
    module's own fixtures (stacks, pods, Envoys) start and stop under the lock too."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run_id:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"mizzen-pytest-{run_id}"
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(f"{base}.gate", "a") as gate, open(f"{base}.run", "a") as run:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if exclusive:
            fcntl.flock(run, fcntl.LOCK_EX)  # waits for the running modules to end; new ones wait at the gate
        else:
            fcntl.flock(run, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(run, fcntl.LOCK_UN)


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
