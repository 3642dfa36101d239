"""`mizzen proxy-status`: istioctl's table layout, and reading the status over HTTP (the registry's
/debug/syncz) and straight from Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from aiohttp import web

from mizzen.services.cli.proxy_status import table
from mizzen.services.mesh import procs

from .test_xds_support import REPO

# istioctl's own expected output for three proxies (istioctl/pkg/writer/pilot/testdata/multiStatusMultiPilot.txt)
ISTIOCTL = """\
NAME       CDS                            LDS          EDS                            RDS          ISTIOD      VERSION
proxy1     STALE                          SYNCED       SYNCED                         NOT SENT     istiod1     1.1
proxy2     STALE                          SYNCED       STALE                          SYNCED       istiod2     1.1
proxy3     STALE (Never Acknowledged)     NOT SENT     STALE (Never Acknowledged)     SYNCED       istiod3     1.1
"""


def entry(name, cds, lds, eds, rds, istiod, version="1.1"):
    return {"proxy": name, "name": name, "istiod": istiod, "version": version,
            "status": {"CDS": cds, "LDS": lds, "EDS": eds, "RDS": rds}}


STATUSES = [
    entry("proxy1", "STALE", "SYNCED", "SYNCED", "NOT SENT", "istiod1"),
    entry("proxy2", "STALE", "SYNCED", "STALE", "SYNCED", "istiod2"),
    entry("proxy3", "STALE (Never Acknowledged)", "NOT SENT", "STALE (Never Acknowledged)", "SYNCED", "istiod3"),
]


def test_table_matches_istioctl_layout():
    assert table(STATUSES) == ISTIOCTL


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mizzen.services.cli.main", "proxy-status", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


async def test_reads_registry_syncz_over_http():
    """The registry's GET /debug/syncz returns load_statuses() as JSON; a stand-in route serves the same shape."""
    seen = []

    async def syncz(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response(STATUSES)

    app = web.Application()
    app.router.add_get("/debug/syncz", syncz)
    runner = web.AppRunner(app)
    await runner.setup()
    port = procs.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        by_flag = await asyncio.to_thread(run_cli, "--server", f"http://127.0.0.1:{port}")
        assert by_flag.returncode == 0, by_flag.stderr
        assert by_flag.stdout == ISTIOCTL
        by_env = await asyncio.to_thread(run_cli, "proxy2", env={"MIZZEN_SERVER": f"http://127.0.0.1:{port}"})
        assert by_env.returncode == 0, by_env.stderr
        assert by_env.stdout.splitlines()[1].split()[:2] == ["proxy2", "STALE"]
        assert len(by_env.stdout.splitlines()) == 2
        as_json = await asyncio.to_thread(run_cli, "-o", "json", "--server", f"http://127.0.0.1:{port}")
        assert json.loads(as_json.stdout)[2]["status"]["CDS"] == "STALE (Never Acknowledged)"
    finally:
        await runner.cleanup()
    assert seen == ["/debug/syncz"] * 3


def test_unreachable_server_is_a_clear_error():
    port = procs.free_port()
    r = run_cli("--server", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr and r.stdout == ""


class _FakeStream:
    """What StatusRecorder reads off a stream."""

    def __init__(self, i: int):
        self.conn_id, self.proxy, self.node_info, self.acked = f"c{i}", f"sidecar~10.0.0.{i}~p{i}.ns~ns.svc", {}, ""

    def status_doc(self) -> dict:
        return {"proxy": self.proxy, "conn": self.conn_id, "acked": self.acked}


async def test_heartbeat_refreshes_unchanged_records_and_rewrites_lost_ones(redis_server):
    """The heartbeat renews an unchanged record's expiry without rewriting it, writes a changed one, and
    writes again a record Redis lost (as after a Redis restart), so proxy-status never loses a live proxy."""
    import orjson
    import redis.asyncio as aioredis

    from mizzen.services.xds_gateway.status import STATUS, StatusRecorder

    r = aioredis.from_url(redis_server.meta["url"])
    rec = StatusRecorder(r, "replica-a", ttl=30.0)
    streams = [_FakeStream(i) for i in range(3)]
    try:
        for s in streams:
            await rec.connected(s)
        unchanged, changed, lost = streams
        # a marker with a short expiry: renewed, not rewritten, if the heartbeat leaves unchanged records alone
        await r.set(STATUS + unchanged.proxy, b'{"marker": 1}', ex=5)
        changed.acked = "v2"
        rec.changed(changed)
        await r.delete(STATUS + lost.proxy)

        await rec.refresh()

        assert await r.get(STATUS + unchanged.proxy) == b'{"marker": 1}'
        assert 25 <= await r.ttl(STATUS + unchanged.proxy) <= 30
        assert orjson.loads(await r.get(STATUS + changed.proxy))["acked"] == "v2"
        assert orjson.loads(await r.get(STATUS + lost.proxy)) == lost.status_doc()
        assert 25 <= await r.ttl(STATUS + lost.proxy) <= 30
    finally:
        await r.aclose()
