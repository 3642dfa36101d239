"""HTTP input: `POST /v1/accesslog` with an NDJSON body (one access-log JSON object per line; gzip
or deflate Content-Encoding allowed).

The sidecar is named by `?proxy=<id>` or the `X-Mizzen-Proxy` header. The answer, `{"lines": N, "bad": M}`,
comes once the lines are in the pipeline; with `?wait=true` it comes only after their spans were exported
(or dead-lettered), so a shipper that retries on failure loses nothing. When the exporter is behind, the
request waits for room (backpressure) and gets 503 with Retry-After if there is none within `room_timeout`.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..identity import Source
from ..pipeline import Pipeline

PATH = "/v1/accesslog"


class _Countdown:
    """One token per line of a request; the event fires when all of them are done."""

    __slots__ = ("left", "event")

    def __init__(self) -> None:
        self.left = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()


class HttpInput:
    def __init__(self, pipeline: Pipeline, shipper, room_timeout: float = 5.0, max_body: int = 64 << 20):
        self.pipeline = pipeline
        self.shipper = shipper
        self.room_timeout = room_timeout
        self.max_body = max_body
        self._sources: dict[str, Source] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    def _source(self, proxy: str) -> Source:
        src = self._sources.get(proxy)
        if src is None:
            if len(self._sources) > 10000:
                self._sources.clear()
            src = self._sources[proxy] = Source("http", proxy)
        return src

    async def handle(self, req: web.Request) -> web.Response:
        body = await req.read()  # aiohttp undoes Content-Encoding: gzip/deflate itself
        if not self.shipper.has_room():
            try:
                await asyncio.wait_for(self.shipper.wait_room(), self.room_timeout)
            except TimeoutError:
                return web.json_response({"error": "exporter is behind; retry later"}, status=503,
                                         headers={"Retry-After": "1"})
        src = self._source(req.query.get("proxy") or req.headers.get("X-Mizzen-Proxy", ""))
        wait = req.query.get("wait", "").lower() in ("1", "true", "yes")
        lines = [raw.rstrip(b"\r") for raw in body.split(b"\n") if raw.strip()]
        countdown = None
        if wait:
            countdown = _Countdown()
            countdown.left = len(lines)  # all of them before feeding: bad lines finish at once
        bad = 0
        feed = self.pipeline.feed_line
        for raw in lines:
            if not feed(raw, src, countdown):
                bad += 1
        if countdown is not None and countdown.left > 0:
            await countdown.event.wait()
        return web.json_response({"lines": len(lines), "bad": bad})
