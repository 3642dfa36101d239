"""Prometheus metrics: the logsink's own counters, and Istio's standard request metrics derived from the logs.

Per-line `prometheus_client` label lookups cost about a microsecond each, so counts live in plain dicts and a
custom collector turns them into metric families at scrape time.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .identity import Identity
from .parse import KIND_SERVER

# Istio's default buckets for istio_request_duration_milliseconds and the byte-size histograms.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                       600000, 1800000, 3600000)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)


class Stats:
    """The logsink's own counters (lines, bad lines by kind and field, spans, joins, export outcomes)."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = defaultdict(int)  # by input
        self.bad: dict[tuple[str, str, str], int] = defaultdict(int)  # (input, kind, field)
        self.dead_letters = 0
        self.spans = 0
        self.exported = 0
        self.rejected = 0
        self.export_errors: dict[str, int] = defaultdict(int)
        self.retries = 0
        self.gauges: dict[str, float] = {}
        self.joins: dict[str, int] = {}  # points at Joiner.stats

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def lines_total(self) -> int:
        return sum(self.lines.values())


class StatsCollector(Collector):
    def __init__(self, stats: Stats):
        self.s = stats

    def collect(self) -> Iterator:
        s = self.s
        c = CounterMetricFamily("mizzen_logsink_lines", "Access-log lines read, by input", labels=["input"])
        for k, v in s.lines.items():
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily(
            "mizzen_logsink_bad_lines", "Lines that could not become spans", labels=["input", "reason", "field"]
        )
        for (inp, kind, field), v in s.bad.items():
            c.add_metric([inp, kind, field], v)
        yield c
        yield CounterMetricFamily("mizzen_logsink_dead_letters", "Bad lines written to the dead letters", value=s.dead_letters)
        yield CounterMetricFamily("mizzen_logsink_spans", "Spans built", value=s.spans)
        yield CounterMetricFamily("mizzen_logsink_spans_exported", "Spans the OTLP receiver accepted", value=s.exported)
        yield CounterMetricFamily(
            "mizzen_logsink_spans_rejected", "Spans the OTLP receiver reported as rejected", value=s.rejected
        )
        yield CounterMetricFamily("mizzen_logsink_export_retries", "OTLP export attempts retried", value=s.retries)
        c = CounterMetricFamily("mizzen_logsink_export_errors", "Failed OTLP export attempts", labels=["error"])
        for k, v in s.export_errors.items():
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("mizzen_logsink_joins", "How spans found their parent", labels=["how"])
        for k, v in s.joins.items():
            c.add_metric([k], v)
        yield c
        for name, v in s.gauges.items():
            yield GaugeMetricFamily(f"mizzen_logsink_{name}", name.replace("_", " "), value=v)


_REQ_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
)
_TCP_LABELS = _REQ_LABELS[:8] + ("response_flags",)


class _HttpAgg:
    """Everything the HTTP metrics need for one label set."""

    __slots__ = ("n", "dur", "dur_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self) -> None:
        self.n = 0
        self.dur = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.dur_sum = 0
        self.req = [0] * (len(BYTES_BUCKETS) + 1)
        self.req_sum = 0
        self.resp = [0] * (len(BYTES_BUCKETS) + 1)
        self.resp_sum = 0


def _workload(ident: Identity | None) -> tuple[str, str]:
    if ident is None or ident.service.startswith("unknown_service"):
        return "unknown", "unknown"
    ns = ident.namespace
    name = ident.service[: -len(ns) - 1] if ns and ident.service.endswith("." + ns) else ident.service
    return name, ns or "unknown"


def _base_labels(kind: int, own: Identity, peer: Identity | None, dest_service: str) -> tuple[str, ...]:
    if kind == KIND_SERVER:
        reporter, src, dst = "destination", peer, own
    else:
        reporter, src, dst = "source", own, peer
    sw, sns = _workload(src)
    dw, dns = _workload(dst)
    svc = dest_service or "unknown"
    parts = svc.split(".")
    svc_name = parts[0] if dest_service else "unknown"
    svc_ns = parts[1] if dest_service and len(parts) > 2 and parts[2] == "svc" else "unknown"
    return (reporter, sw, sns, dw, dns, svc, svc_name, svc_ns)


class IstioMetrics(Collector):
    """istio_requests_total, istio_request_duration_milliseconds, istio_request_bytes, istio_response_bytes
    (HTTP) and istio_tcp_{sent,received}_bytes_total, istio_tcp_connections_{opened,closed}_total (TCP), with
    Istio's label names; `reporter` is `source` for client-side lines and `destination` for server-side ones.
    Byte histograms count body bytes only (the log has no header sizes)."""

    def __init__(self) -> None:
        self._bases: dict[tuple, tuple[str, ...]] = {}
        self.http: dict[tuple, _HttpAgg] = {}
        self.tcp: dict[tuple, list[int]] = {}  # labels → [sent, received, connections]

    def observe(self, kind: int, http: bool, own: Identity, peer: Identity | None, dest_service: str,
                mvals: tuple) -> None:
        bkey = (kind, own, peer, dest_service)
        base = self._bases.get(bkey)
        if base is None:
            if len(self._bases) > 100_000:
                self._bases.clear()
            base = self._bases[bkey] = _base_labels(kind, own, peer, dest_service)
        code, flags, duration_ms, bytes_in, bytes_out, proto, _authority = mvals
        if http:
            key = (base, proto, code, flags)
            agg = self.http.get(key)
            if agg is None:
                agg = self.http[key] = _HttpAgg()
            agg.n += 1
            agg.dur[bisect.bisect_left(DURATION_BUCKETS_MS, duration_ms)] += 1
            agg.dur_sum += duration_ms
            agg.req[bisect.bisect_left(BYTES_BUCKETS, bytes_in)] += 1
            agg.req_sum += bytes_in
            agg.resp[bisect.bisect_left(BYTES_BUCKETS, bytes_out)] += 1
            agg.resp_sum += bytes_out
        else:
            key = (base, flags)
            t = self.tcp.get(key)
            if t is None:
                t = self.tcp[key] = [0, 0, 0]
            t[0] += bytes_out
            t[1] += bytes_in
            t[2] += 1

    def collect(self) -> Iterator:
        http = [(list(base) + [_protocol(proto), str(code), flags or "-"], agg)
                for (base, proto, code, flags), agg in list(self.http.items())]
        c = CounterMetricFamily("istio_requests", "Requests, from the access logs", labels=_REQ_LABELS)
        for labels, agg in http:
            c.add_metric(labels, agg.n)
        yield c
        for name, text, buckets, counts, total in (
            ("istio_request_duration_milliseconds", "Request duration", DURATION_BUCKETS_MS, "dur", "dur_sum"),
            ("istio_request_bytes", "Request body size", BYTES_BUCKETS, "req", "req_sum"),
            ("istio_response_bytes", "Response body size", BYTES_BUCKETS, "resp", "resp_sum"),
        ):
            h = HistogramMetricFamily(name, text, labels=_REQ_LABELS)
            for labels, agg in http:
                cum, out = 0, []
                for b, n in zip(buckets, getattr(agg, counts), strict=False):
                    cum += n
                    out.append((_fmt(b), cum))
                out.append(("+Inf", agg.n))
                h.add_metric(labels, out, getattr(agg, total))
            yield h
        tcp = [(list(base) + [flags or "-"], v) for (base, flags), v in list(self.tcp.items())]
        for name, idx, text in (
            ("istio_tcp_sent_bytes", 0, "Bytes sent to the downstream on TCP connections"),
            ("istio_tcp_received_bytes", 1, "Bytes received from the downstream on TCP connections"),
            ("istio_tcp_connections_opened", 2, "TCP connections opened"),
            ("istio_tcp_connections_closed", 2, "TCP connections closed"),
        ):
            c = CounterMetricFamily(name, text, labels=_TCP_LABELS)
            for labels, v in tcp:
                c.add_metric(labels, v[idx])
            yield c


def _fmt(b: float) -> str:
    return floatToGoString(b)


def _protocol(proto: str | None) -> str:
    # Istio's request_protocol is http or grpc; a log line without a gRPC status is plain http.
    return proto or "http"


def registry_for(stats: Stats, istio: IstioMetrics | None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(stats))
    if istio is not None:
        reg.register(istio)
    return reg
