"""The registry's Kubernetes API under load: creates, lists, patches and watch latency.

Starts a registry (with private NATS and Redis) and, over HTTP with aiohttp (one client, sequential requests,
as a controller would do):

- creates N VirtualServices (POST), reporting requests/s and p50/p99 latency;
- lists them (one GET of the collection, JSON), and in pages of 100 (limit/continue);
- patches each once (JSON merge patch) while one watch follows the collection, reporting the time from the
  PATCH request leaving to the MODIFIED event arriving (p50/p99).

    python bench/kubeapi.py [--objects 500]

It prints figures; it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from mizzen.services.mesh.stack import Stack

BASE = "/apis/networking.istio.io/v1/namespaces/bench/virtualservices"


def vs(i: int) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": f"vs-{i}"},
            "spec": {"hosts": [f"svc-{i}"], "http": [{"route": [{"destination": {"host": f"svc-{i}"}}]}]}}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def run(url: str, n: int) -> None:
    async with aiohttp.ClientSession(url) as s:
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            async with s.post(BASE, data=orjson.dumps(vs(i)), headers={"Content-Type": "application/json"}) as r:
                assert r.status == 201, await r.text()
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        print(f"create  {n} VirtualServices: {n / wall:,.0f} req/s, p50 {pct(lat, .5) * 1e3:.1f} ms, "
              f"p99 {pct(lat, .99) * 1e3:.1f} ms")

        t = time.perf_counter()
        async with s.get(BASE) as r:
            body = orjson.loads(await r.read())
        print(f"list    {len(body['items'])} objects in one response: {(time.perf_counter() - t) * 1e3:.1f} ms")
        t, pages, token = time.perf_counter(), 0, ""
        while True:
            async with s.get(BASE, params={"limit": "100", **({"continue": token} if token else {})}) as r:
                page = orjson.loads(await r.read())
            pages += 1
            token = page["metadata"].get("continue", "")
            if not token:
                break
        print(f"list    in {pages} pages of 100: {(time.perf_counter() - t) * 1e3:.1f} ms")

        rv = body["metadata"]["resourceVersion"]
        seen: dict[str, float] = {}
        got_all = asyncio.Event()

        async def watch() -> None:
            async with s.get(BASE, params={"watch": "1", "resourceVersion": rv}, timeout=aiohttp.ClientTimeout()) as r:
                async for line in r.content:
                    ev = orjson.loads(line)
                    if ev["type"] == "MODIFIED":
                        seen[ev["object"]["metadata"]["name"]] = time.perf_counter()
                        if len(seen) == n:
                            got_all.set()
                            return

        w = asyncio.create_task(watch())
        await asyncio.sleep(0.5)
        sent: dict[str, float] = {}
        t0 = time.perf_counter()
        for i in range(n):
            sent[f"vs-{i}"] = time.perf_counter()
            async with s.patch(f"{BASE}/vs-{i}", data=b'{"metadata": {"labels": {"bench": "1"}}}',
                               headers={"Content-Type": "application/merge-patch+json"}) as r:
                assert r.status == 200, await r.text()
        wall = time.perf_counter() - t0
        await asyncio.wait_for(got_all.wait(), timeout=120)
        w.cancel()
        delays = [seen[k] - sent[k] for k in sent]
        print(f"patch   {n / wall:,.0f} req/s; watch event after the PATCH left: p50 "
              f"{statistics.median(delays) * 1e3:.1f} ms, p99 {pct(delays, .99) * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        stack = Stack(Path(d))
        try:
            stack.start(services=("registry",))
            asyncio.run(run(stack.registry_url, args.objects))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
