"""What the control plane's own tracing (services/mesh/tracing.py) costs.

Off (the default), each instrumented point is one call that returns the shared NOOP span, plus `.headers()` /
`.end()` on it. On, each span is an opentelemetry-sdk span (sampled, batched, exported in the background).
This prints the cost per instrumented point both ways and what that means for one `mizzen apply` reaching N
proxies (registry apply + commit, translator build, then per proxy: snapshot event, push, ~4 ACKs).

    python bench/tracing.py [--proxies 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mizzen.services.mesh import tracing  # noqa: E402

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def per_point(n: int) -> float:
    """µs per instrumented point: start a span under a remote parent, read its headers, end it."""
    t0 = time.perf_counter()
    for _ in range(n):
        s = tracing.start("xds push", TP, None, kind="producer")
        s.headers()
        s.end()
    return (time.perf_counter() - t0) / n * 1e6


def baseline(n: int) -> float:
    def f(*a, **k):
        return None

    t0 = time.perf_counter()
    for _ in range(n):
        f("xds push", TP, None, kind="producer")
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxies", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200_000)
    a = ap.parse_args()
    points = 3 + a.proxies * 6
    base = min(baseline(a.n) for _ in range(3))
    off = min(per_point(a.n) for _ in range(3))
    print(f"tracing off: {off:.3f} µs per instrumented point (an empty Python call: {base:.3f} µs)")
    print(f"             one apply reaching {a.proxies:,} proxies ≈ {points:,} points ≈ {off * points / 1000:.2f} ms "
          "of CPU in total, spread over the registry, translator and gateway")
    import opentelemetry.sdk.trace.export as export
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()

    class Batch(export.BatchSpanProcessor):  # measure the SDK, not a network or a console
        def __init__(self, _exporter):
            super().__init__(exporter)

    export.BatchSpanProcessor = Batch
    tracing.setup("bench", environ={"MIZZEN_TRACING": "console"})
    n = a.n // 10
    on = min(per_point(n) for _ in range(3))
    tracing.shutdown()
    print(f"tracing on:  {on:.1f} µs per span (opentelemetry-sdk, batched export) → ≈ {on * points / 1000:.1f} ms "
          f"of CPU per apply reaching {a.proxies:,} proxies")


if __name__ == "__main__":
    main()
