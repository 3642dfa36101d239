"""A real OTLP receiver for tests: opentelemetry-proto's TraceService over gRPC (and OTLP/HTTP `/v1/traces`),
on a free loopback port, keeping every request it is sent. It can be told to fail the next N calls with a
gRPC status (or HTTP 503) so retries are exercised."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

from mizzen.services.mesh import procs


@dataclass
class FlatSpan:
    service: str
    resource: dict
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start: int
    end: int
    attributes: dict
    status_code: int
    status_message: str
    flags: int
    trace_state: str = ""


def anyvalue(v) -> object:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [anyvalue(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: anyvalue(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def flatten(req: ts_pb2.ExportTraceServiceRequest) -> list[FlatSpan]:
    out = []
    for rs in req.resource_spans:
        res = {kv.key: anyvalue(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(FlatSpan(
                    service=res.get("service.name", ""),
                    resource=res,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(),
                    name=s.name,
                    kind=s.kind,
                    start=s.start_time_unix_nano,
                    end=s.end_time_unix_nano,
                    attributes={kv.key: anyvalue(kv.value) for kv in s.attributes},
                    status_code=s.status.code,
                    status_message=s.status.message,
                    flags=s.flags,
                    trace_state=s.trace_state,
                ))
    return out


@dataclass
class Receiver:
    requests: list[ts_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    fail_next: int = 0
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    calls: int = 0
    port: int = 0
    http_port: int = 0
    _server: grpc.aio.Server | None = None
    _http: web.AppRunner | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def spans(self) -> list[FlatSpan]:
        return [s for r in self.requests for s in flatten(r)]

    async def start(self, http: bool = False) -> Receiver:
        outer = self

        class Service(ts_grpc.TraceServiceServicer):
            async def Export(self, request, context):  # noqa: N802 - gRPC method name
                outer.calls += 1
                if outer.fail_next > 0:
                    outer.fail_next -= 1
                    await context.abort(outer.fail_code, "told to fail")
                outer.requests.append(request)
                outer.changed.set()
                return ts_pb2.ExportTraceServiceResponse()

        self._server = grpc.aio.server()
        ts_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        if http:
            async def traces(req: web.Request) -> web.Response:
                outer.calls += 1
                if outer.fail_next > 0:
                    outer.fail_next -= 1
                    return web.Response(status=503, text="told to fail")
                body = await req.read()
                if req.content_type != "application/x-protobuf":
                    return web.Response(status=415)
                outer.requests.append(ts_pb2.ExportTraceServiceRequest.FromString(body))
                outer.changed.set()
                return web.Response(body=ts_pb2.ExportTraceServiceResponse().SerializeToString(),
                                    content_type="application/x-protobuf")

            app = web.Application(client_max_size=64 << 20)
            app.router.add_post("/v1/traces", traces)
            self._http = web.AppRunner(app, access_log=None)
            await self._http.setup()
            self.http_port = procs.free_port()
            await web.TCPSite(self._http, "127.0.0.1", self.http_port).start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
        if self._http is not None:
            await self._http.cleanup()

    async def wait_spans(self, count: int, timeout: float = 20.0) -> list[FlatSpan]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            spans = self.spans()
            if len(spans) >= count:
                return spans
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"receiver has {len(spans)} spans, wanted {count}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass


class SyncReceiver:
    """The same real OTLP TraceService receiver on a thread pool, for synchronous tests (the e2e meshes)."""

    def __init__(self) -> None:
        import threading
        from concurrent import futures

        self.requests: list[ts_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()
        outer = self

        class Service(ts_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                with outer.lock:
                    outer.requests.append(request)
                return ts_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        ts_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spans(self) -> list[FlatSpan]:
        with self.lock:
            reqs = list(self.requests)
        return [s for r in reqs for s in flatten(r)]

    def stop(self) -> None:
        self._server.stop(None)
