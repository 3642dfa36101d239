"""`logsink convert` writes OTLP/JSON that is exactly the protobuf the service would export: parsed back with
protobuf's JSON mapping (ids turned from OTLP's hex back to base64), it equals the spans of the recorded chain."""

from __future__ import annotations

import base64
import io

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2

from mizzen.services.logsink.convert import convert
from tests.logsink_data.helpers import CHAIN, SEED_SAMPLE
from tests.logsink_data.meshrig import PODS, node_id
from tests.logsink_data.receiver import flatten
from tests.test_logsink_join import check_recorded_chain
from tests.test_logsink_spans import check_seed_span


def _hex_to_b64(doc: dict) -> dict:
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for k in ("traceId", "spanId", "parentSpanId"):
                    if span.get(k):
                        span[k] = base64.b64encode(bytes.fromhex(span[k])).decode()
    return doc


def test_convert_json_is_the_otlp_request(tmp_path):
    specs = [f"{node_id(ip, pod)}={CHAIN / (name + '.jsonl')}" for name, (ip, pod) in PODS.items()]
    out = io.BytesIO()
    summary = convert([*specs, str(SEED_SAMPLE)], out, window=1.0)
    assert str(summary) == "lines: 16, spans: 16, traces: 6, bad lines: 0"
    doc = orjson.loads(out.getvalue())
    # OTLP/JSON specifics: hex ids, integer enums, 64-bit integers as strings
    first = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(first["traceId"]) == 32 and len(first["spanId"]) == 16
    assert isinstance(first["kind"], int) and isinstance(first["startTimeUnixNano"], str)
    req = json_format.ParseDict(_hex_to_b64(doc), ts_pb2.ExportTraceServiceRequest())
    spans = flatten(req)
    seed = [s for s in spans if s.trace_id == "967f8e1adbc04ccead53ce6a27d5e54c"]
    check_seed_span(seed[0], SEED_SAMPLE.read_bytes().strip())
    check_recorded_chain([s for s in spans if s is not seed[0]])
