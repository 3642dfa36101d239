"""Done-when check, end to end: the logsink service reads the seed's sample line and the recorded A→B→C chain
(both sidecars' lines of every call, as real Envoy wrote them) and exports to a real OTLP gRPC receiver built on
opentelemetry-proto's TraceService; the spans received are exactly the expected ones."""

from __future__ import annotations

import pytest

from tests.logsink_data.helpers import CHAIN, SEED_SAMPLE
from tests.logsink_data.meshrig import PODS, node_id
from tests.logsink_data.receiver import Receiver
from tests.logsink_data.service import LogsinkProc
from tests.test_logsink_join import check_recorded_chain
from tests.test_logsink_spans import check_seed_span

pytestmark = pytest.mark.timeout(120)


async def test_seed_sample_and_recorded_chain_through_grpc_receiver(tmp_path):
    recv = await Receiver().start()
    files = [f"{node_id(ip, pod)}={CHAIN / (name + '.jsonl')}" for name, (ip, pod) in PODS.items()]
    sink = LogsinkProc(tmp_path, [*sum((["--file", f] for f in files), []), "--file", str(SEED_SAMPLE),
                                  "--otlp-endpoint", recv.endpoint, "--join-window", "1.0"])
    try:
        await sink.start()
        spans = await recv.wait_spans(16)
        assert await sink.stop() == 0
        spans = recv.spans()
        seed = [s for s in spans if s.trace_id == "967f8e1adbc04ccead53ce6a27d5e54c"]
        assert len(seed) == 1
        check_seed_span(seed[0], SEED_SAMPLE.read_bytes().strip())
        check_recorded_chain([s for s in spans if s is not seed[0]])
        # every request arrived as OTLP ExportTraceServiceRequest over gRPC, grouped by resource
        assert recv.requests and all(len(r.resource_spans) >= 1 for r in recv.requests)
    finally:
        await sink.stop()
        await recv.stop()
