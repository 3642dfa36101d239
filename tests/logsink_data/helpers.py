"""Small helpers shared by the logsink tests."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2

from mizzen.services.logsink.identity import Source
from mizzen.services.logsink.pipeline import Pipeline
from tests.logsink_data.receiver import FlatSpan, flatten

DATA = Path(__file__).parent
CHAIN = DATA / "chain"
SEED_SAMPLE = DATA / "seed_sample.jsonl"


def ns(ts: str) -> int:
    """Expected timestamps are written out in the tests as the log prints them; this is plain arithmetic on the
    literal (not the parser under test): `2021-02-18T07:08:50.031Z` → Unix ns."""
    import calendar

    date, clock = ts.rstrip("Z").split("T")
    y, mo, d = (int(x) for x in date.split("-"))
    hms, _, frac = clock.partition(".")
    h, mi, s = (int(x) for x in hms.split(":"))
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 10**9 + int(frac.ljust(9, "0"))


class Collected:
    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def __call__(self, body: bytes, count: int, tokens) -> None:
        self.requests.append(body)
        for t in tokens:
            t()

    def spans(self) -> list[FlatSpan]:
        return [s for b in self.requests for s in flatten(ts_pb2.ExportTraceServiceRequest.FromString(b))]


def run_lines(items: list[tuple[bytes, Source]], window: float = 5.0, **kw) -> tuple[list[FlatSpan], Pipeline]:
    """Feed lines (with their sources) one per simulated millisecond of arrival; flush; decode what came out."""
    out = Collected()
    p = Pipeline(out, window=window, **kw)
    for i, (raw, src) in enumerate(items):
        p.feed_line(raw, src, now=i * 0.001)
        p.tick(i * 0.001)
    p.flush()
    return out.spans(), p


def chain_lines() -> dict[str, list[bytes]]:
    out = {}
    for pod in ("a", "b", "c"):
        out[pod] = (CHAIN / f"{pod}.jsonl").read_bytes().splitlines()
    return out


def chain_sources(with_proxy: bool = True) -> dict[str, Source]:
    from tests.logsink_data.meshrig import PODS, node_id

    return {pod: Source("file", node_id(ip, podname) if with_proxy else "") for pod, (ip, podname) in PODS.items()}


def by_end_time(per_pod: dict[str, list[bytes]], sources: dict[str, Source]) -> list[tuple[bytes, Source]]:
    """The order a tailer sees lines written at stream end: by end time, file order breaking ties."""
    import orjson

    items = []
    for pod, lines in per_pod.items():
        for i, raw in enumerate(lines):
            d = orjson.loads(raw)
            end = ns(d["start_time"]) + d["duration"] * 10**6
            items.append((end, pod, i, raw))
    items.sort()
    return [(raw, sources[pod]) for _, pod, _, raw in items]
