"""Bad input never stops the stream: a table of 40 bad lines, each counted (by kind, in /metrics), dead-lettered
with its reason, and the good lines around them exported — in the pipeline, in `convert`, and in the running
service reading a file and exporting to a real OTLP receiver."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import orjson
import pytest

from mizzen.services.logsink.deadletter import DeadLetters
from mizzen.services.logsink.identity import Source
from mizzen.services.logsink.pipeline import Pipeline
from tests.logsink_data.bad_lines import BAD_LINES, MAX_LINE, interleaved
from tests.logsink_data.helpers import Collected
from tests.logsink_data.receiver import Receiver
from tests.logsink_data.service import REPO, LogsinkProc


def test_table_is_big_enough():
    assert len(BAD_LINES) >= 30
    assert len({raw for raw, _, _ in BAD_LINES}) == len(BAD_LINES)


def _check_dead_letters(entries: list[dict]):
    assert len(entries) == len(BAD_LINES)
    for entry, (raw, kind, words) in zip(entries, BAD_LINES, strict=True):
        assert entry["kind"] == kind, (entry, raw[:80])
        assert words in entry["reason"], (entry["reason"], words)
        assert entry["line_bytes"] == len(raw)
        if len(raw) <= 16384:
            assert entry["line"] == raw.decode("utf-8", errors="replace")
        else:
            assert entry["truncated"] is True and len(entry["line"]) == 16384


def test_pipeline_counts_dead_letters_and_keeps_going(tmp_path):
    lines, good = interleaved()
    out = Collected()
    dl = tmp_path / "dead.jsonl"
    p = Pipeline(out, dead=DeadLetters(dl), window=0.01, max_line_bytes=MAX_LINE)
    src = Source("test")
    results = [p.feed_line(raw, src, now=i * 0.001) for i, raw in enumerate(lines)]
    p.flush()
    assert results.count(False) == len(BAD_LINES)
    assert p.stats.bad_total == len(BAD_LINES)
    by_kind = Counter()
    for (_input, kind, _field), n in p.stats.bad.items():
        by_kind[kind] += n
    assert by_kind == Counter(k for _, k, _ in BAD_LINES)
    _check_dead_letters([orjson.loads(x) for x in dl.read_bytes().splitlines()])
    spans = out.spans()
    assert sorted(s.span_id for s in spans) == sorted(hashlib.blake2b(g, digest_size=8).hexdigest() for g in good)


def test_bad_line_field_labels(tmp_path):
    p = Pipeline(Collected(), window=0.01)
    for raw, _kind, _words in BAD_LINES:
        p.feed_line(raw, Source("x"), now=0.0)
    fields = {f for (_i, _k, f) in p.stats.bad}
    assert {"start_time", "duration", "response_code", "bytes_sent", "method", "path"} <= fields


def test_convert_dead_letters(tmp_path):
    lines, good = interleaved()
    src = tmp_path / "mixed.log"
    src.write_bytes(b"\n".join(lines) + b"\n")
    dl = tmp_path / "dead.jsonl"
    out = tmp_path / "traces.json"
    r = subprocess.run([sys.executable, "-m", "mizzen.services.logsink", "convert", str(src), "-o", str(out),
                        "--dead-letter", str(dl), "--max-line-bytes", str(MAX_LINE)],
                       cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode().strip().splitlines()[-1] == (
        f"lines: {len(lines)}, spans: {len(good)}, traces: {len(good)}, bad lines: {len(BAD_LINES)}")
    _check_dead_letters([orjson.loads(x) for x in dl.read_bytes().splitlines()])
    doc = orjson.loads(out.read_bytes())
    ids = sorted(s["spanId"] for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"])
    assert ids == sorted(hashlib.blake2b(g, digest_size=8).hexdigest() for g in good)


@pytest.mark.timeout(120)
async def test_service_file_input_bad_lines(tmp_path):
    lines, good = interleaved()
    recv = await Receiver().start()
    log = tmp_path / "envoy.log"
    dl = tmp_path / "dead.jsonl"
    sink = LogsinkProc(tmp_path, ["--file", str(log), "--otlp-endpoint", recv.endpoint, "--join-window", "0.2",
                                  "--dead-letter", str(dl), "--max-line-bytes", str(MAX_LINE)])
    try:
        await sink.start()
        with open(log, "wb") as fh:
            for raw in lines:
                fh.write(raw + b"\n")
                fh.flush()
        spans = await recv.wait_spans(len(good))
        m = await sink.metrics()
        by_kind = Counter()
        for key, value in m.items():
            if key.startswith("mizzen_logsink_bad_lines_total{"):
                kind = key.split('reason="')[1].split('"')[0]
                by_kind[kind] += int(value)
        assert by_kind == Counter(k for _, k, _ in BAD_LINES)
        assert m["mizzen_logsink_dead_letters_total"] == len(BAD_LINES)
        assert m['mizzen_logsink_lines_total{input="file"}'] == len(lines)
        assert await sink.stop() == 0
        assert sorted(s.span_id for s in recv.spans()) == sorted(
            hashlib.blake2b(g, digest_size=8).hexdigest() for g in good)
        assert len(spans) == len(good)
        _check_dead_letters([orjson.loads(x) for x in dl.read_bytes().splitlines()])
        for entry in (orjson.loads(x) for x in dl.read_bytes().splitlines()):
            assert entry["input"] == "file"
    finally:
        await sink.stop()
        await recv.stop()


# Envoy's all-strings format writes "-" for numbers it has no value for (no response, no body), and logs may
# carry connection_id as a number; both once crashed the pipeline instead of becoming spans.
ABSENT_NUMBERS = orjson.dumps({
    "start_time": "2021-02-18T07:08:50.031Z", "method": "GET", "path": "/", "protocol": "HTTP/1.1",
    "response_code": "-", "response_flags": "UF", "bytes_received": "-", "bytes_sent": "-", "duration": "-",
    "upstream_cluster": "outbound|80||webserverv1.default.svc.cluster.local",
    "downstream_remote_address": "10.200.0.131:44728", "downstream_local_address": "10.200.1.246:80",
    "request_id": "967f8e1a-dbc0-4cce-ad53-ce6a27d5e54c", "authority": "webserverv1"})
CONNECTION_ID = orjson.dumps({
    "start_time": "2021-02-18T07:08:50.031Z", "method": "GET", "path": "/", "protocol": "HTTP/1.1",
    "response_code": 200, "duration": 1, "connection_id": 7,
    "upstream_cluster": "outbound|80||webserverv1.default.svc.cluster.local",
    "downstream_remote_address": "10.200.0.131:44729", "downstream_local_address": "10.200.1.246:80",
    "request_id": "967f8e1a-dbc0-4cce-ad53-ce6a27d5e54d", "authority": "webserverv1"})


def test_absent_numbers_and_connection_id_become_spans_with_istio_metrics_on(tmp_path):
    from mizzen.services.logsink.metrics import IstioMetrics

    out = Collected()
    p = Pipeline(out, dead=DeadLetters(tmp_path / "dead.jsonl"), window=0.01, istio=IstioMetrics())
    assert p.feed_line(ABSENT_NUMBERS, Source("x"), now=0.0)
    assert p.feed_line(CONNECTION_ID, Source("x"), now=0.0)
    p.flush()
    assert p.stats.bad_total == 0
    spans = {s.attributes["envoy.request_id"]: s for s in out.spans()}
    failed = spans["967f8e1a-dbc0-4cce-ad53-ce6a27d5e54c"]
    assert "http.response.status_code" not in failed.attributes and failed.status_code == 2  # UF: an error
    assert spans["967f8e1a-dbc0-4cce-ad53-ce6a27d5e54d"].attributes["envoy.connection_id"] == 7
