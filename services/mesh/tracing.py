"""The control plane's own traces: one trace per applied change, from the registry's commit through the
translator's build and the gateway's push to every proxy's ACK or NACK, exported over OTLP with
`opentelemetry-sdk` to the same collector the logsink feeds.

Context crosses processes as a W3C `traceparent` string: in HTTP request headers (`mizzen apply` → registry)
and in NATS message headers (`mizzen.config.changed`, `mizzen.snapshot.<proxy>`).

Configuration (environment, read once by `setup`):
- `MIZZEN_TRACING`: `off` (default), `otlp` (gRPC), `otlp-http`, or `console` (stderr, for debugging);
- endpoint: `MIZZEN_TRACE_ENDPOINT`, else `MIZZEN_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_ENDPOINT` (the logsink's settings), else localhost:4317 (gRPC) / :4318 (HTTP);
- `MIZZEN_TRACE_SAMPLE`: the fraction of new traces kept (0..1, default 1); a continued trace follows its
  parent's decision;
- the SDK's own `OTEL_BSP_*` variables tune batching.

Off, nothing is imported and every call returns at its first line (`NOOP`): the hot paths pay one global
check. Call sites never need to know whether tracing is on.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger("mizzen.tracing")

ENABLED = False
_tracer: Any = None
_provider: Any = None
_propagator: Any = None


class _Noop:
    """Stands in for a span when tracing is off or the trace is not sampled."""

    __slots__ = ()
    recording = False

    def set(self, key: str, value: Any) -> None:
        pass

    def error(self, message: str) -> None:
        pass

    def end(self, end_ns: int | None = None) -> None:
        pass

    def traceparent(self) -> str | None:
        return None

    def headers(self) -> dict[str, str] | None:
        return None


NOOP = _Noop()

# The caller's `traceparent` for the request being served (set by `middleware`), so the span a handler starts
# continues the client's trace (`mizzen apply` with tracing on) instead of starting a new one.
incoming: contextvars.ContextVar[str | None] = contextvars.ContextVar("mizzen_traceparent", default=None)


class Span:
    """A thin handle on an SDK span: attributes, error status, end, and its `traceparent` for the next hop."""

    __slots__ = ("_s",)
    recording = True

    def __init__(self, s: Any):
        self._s = s

    def set(self, key: str, value: Any) -> None:
        self._s.set_attribute(key, value)

    def error(self, message: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._s.set_status(Status(StatusCode.ERROR, message))

    def end(self, end_ns: int | None = None) -> None:
        self._s.end(end_time=end_ns)

    def traceparent(self) -> str | None:
        c = self._s.get_span_context()
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags) & 0x01:02x}"  # W3C level 1 flags

    def headers(self) -> dict[str, str] | None:
        return {"traceparent": self.traceparent() or ""}


def setup(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Configure tracing for this process from the environment; True when it is on."""
    global ENABLED, _tracer, _provider, _propagator
    environ = os.environ if environ is None else environ
    mode = (environ.get("MIZZEN_TRACING") or "off").strip().lower()
    if mode in ("", "off", "none", "0", "false"):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    try:
        ratio = float(environ.get("MIZZEN_TRACE_SAMPLE") or "1")
    except ValueError:
        raise ValueError("MIZZEN_TRACE_SAMPLE: expected a number between 0 and 1, got "
                         f"{environ['MIZZEN_TRACE_SAMPLE']!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"MIZZEN_TRACE_SAMPLE: expected a number between 0 and 1, got {ratio}")
    endpoint = (environ.get("MIZZEN_TRACE_ENDPOINT") or environ.get("MIZZEN_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "")
    # Our own wire encoder, not the SDK's OTLP exporters: those import opentelemetry.proto, which xds-protos
    # may have replaced with a stale copy (DESIGN.md's packaging trap).
    if mode == "otlp":
        from .trace_export import WireSpanExporter

        exporter = WireSpanExporter(endpoint or "localhost:4317", "grpc")
    elif mode in ("otlp-http", "http"):
        from .trace_export import WireSpanExporter

        exporter = WireSpanExporter(endpoint or "http://localhost:4318", "http")
    elif mode == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"MIZZEN_TRACING: expected off, otlp, otlp-http or console, got {mode!r}")
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                         "service.namespace": "mizzen"}),
                               sampler=ParentBased(TraceIdRatioBased(ratio)))
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = _provider.get_tracer("mizzen", "1")
    _propagator = TraceContextTextMapPropagator()
    ENABLED = True
    log.info("tracing on", extra={"service": service_name, "exporter": mode, "endpoint": endpoint,
                                  "sample": ratio})
    return True


def shutdown() -> None:
    """Export what is buffered (called when the service stops)."""
    global ENABLED
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as e:  # noqa: BLE001 - a collector that is gone must not hang the shutdown
            log.warning("tracing shutdown: %s", e)
    ENABLED = False


_KINDS = {"internal": 0, "server": 1, "client": 2, "producer": 3, "consumer": 4}


def start(name: str, parent: str | Span | None = None, attributes: Mapping[str, Any] | None = None,
          kind: str = "internal", links: Iterable[str] = (), start_ns: int | None = None) -> Span | _Noop:
    """A span under `parent` (a `traceparent` string from another process, or a Span here); a new trace when
    there is none. Returns NOOP when tracing is off or the trace is not sampled."""
    if not ENABLED:
        return NOOP
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind

    ctx = None
    if isinstance(parent, Span):
        ctx = trace.set_span_in_context(parent._s)
    elif parent:
        ctx = _propagator.extract({"traceparent": parent})
    link_list = []
    for tp in links:
        sc = trace.get_current_span(_propagator.extract({"traceparent": tp})).get_span_context()
        if sc.is_valid:
            link_list.append(Link(sc))
    s = _tracer.start_span(name, context=ctx, kind=SpanKind(_KINDS[kind]), attributes=dict(attributes or {}),
                           links=link_list or None, start_time=start_ns)
    if not s.is_recording():
        return NOOP
    return Span(s)


def middleware():
    """An aiohttp middleware that puts each request's `traceparent` header into `incoming`."""
    from aiohttp import web

    @web.middleware
    async def mw(request, handler):
        if ENABLED:
            tp = request.headers.get("traceparent")
            if tp:
                incoming.set(tp)
        return await handler(request)

    return mw


def header(headers: Mapping[str, str] | None) -> str | None:
    """The `traceparent` of NATS message / HTTP headers, when tracing is on."""
    if not ENABLED or not headers:
        return None
    return headers.get("traceparent") or headers.get("Traceparent")


def now_ns() -> int:
    return time.time_ns()


class PushTrace:
    """One config push to one proxy stream, from the snapshot the gateway learned about to the proxy's answer for
    every type sent: a `xds push` span with one `xds ack <type>` / `xds nack <type>` child per response."""

    __slots__ = ("span", "outstanding", "proxy", "nacked")

    def __init__(self, span: Span, proxy: str):
        self.span = span
        self.proxy = proxy
        self.outstanding: dict[tuple[str, str], tuple[int, str]] = {}  # (type, nonce) → (sent ns, version)
        self.nacked = False

    @staticmethod
    def begin(parent: str | None, proxy: str, version: str, api: str, replica: str) -> PushTrace | None:
        if not ENABLED or not parent:
            return None
        span = start("xds push", parent, {"mizzen.proxy": proxy, "mizzen.snapshot.version": version,
                                          "mizzen.xds.api": api, "mizzen.xds.replica": replica}, kind="producer")
        return PushTrace(span, proxy) if isinstance(span, Span) else None

    def sent(self, type_url: str, nonce: str, version: str) -> None:
        self.outstanding[(type_url, nonce)] = (now_ns(), version)

    def answered(self, type_url: str, nonce: str, error: str | None) -> None:
        hit = self.outstanding.pop((type_url, nonce), None)
        if hit is None or self.span is None:
            return
        sent_ns, version = hit
        short = type_url.rsplit(".", 1)[-1]
        child = start(f"xds {'nack' if error is not None else 'ack'} {short}", self.span,
                      {"mizzen.proxy": self.proxy, "xds.type_url": type_url, "xds.nonce": nonce,
                       "xds.version": version}, kind="consumer", start_ns=sent_ns)
        if error is not None:
            child.set("xds.error_detail", error)
            child.error(error)
            self.span.error(f"{short} rejected: {error}")
            self.nacked = True
        child.end()

    def idle(self) -> bool:
        """After the stream handled one event: when no response awaits an answer, the push is over (a push
        that sent nothing — the change did not touch this proxy — ends at once). True when finished."""
        if not self.outstanding:
            self.finish()
            return True
        return False

    def finish(self, why: str = "") -> None:
        if self.span is None:
            return
        if why:
            self.span.set("mizzen.push.ended", why)
        self.span.end()
        self.span = None
