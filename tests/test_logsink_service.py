"""The running logsink: HTTP NDJSON input, OTLP over HTTP, export retries and backpressure against a real
receiver that fails on purpose, permanent refusals, Istio metrics derived from the logs, health, the `mizzen`
dispatcher."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import subprocess
import sys

import grpc
import orjson
import pytest
from aiohttp import ClientSession

from mizzen.services.mesh import procs
from tests.logsink_data.helpers import CHAIN, SEED_SAMPLE
from tests.logsink_data.meshrig import PODS, node_id
from tests.logsink_data.receiver import Receiver
from tests.logsink_data.service import REPO, LogsinkProc, parse_key
from tests.test_logsink_file import pair

pytestmark = pytest.mark.timeout(180)


def span_id(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


async def post(url: str, body: bytes, **kw) -> tuple[int, dict]:
    async with ClientSession() as s, s.post(url, data=body, **kw) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else {})


async def test_http_input_and_otlp_http_export(tmp_path):
    recv = await Receiver().start(http=True)
    http_port = procs.free_port()
    sink = LogsinkProc(tmp_path, ["--http", f"127.0.0.1:{http_port}", "--otlp-protocol", "http",
                                  "--otlp-endpoint", recv.http_endpoint, "--join-window", "0.2"])
    try:
        await sink.start()
        url = f"http://127.0.0.1:{http_port}/v1/accesslog"
        lines = [pair(i)[0] for i in range(30)]
        body = gzip.compress(b"not json\n" + b"\n".join(lines[:20]) + b"\n")  # a bad line first: done at once
        # wait=true: the answer comes once the spans were exported
        status, resp = await post(url + "?wait=true", body, headers={
            "Content-Encoding": "gzip", "X-Mizzen-Proxy": "front.shop"})
        assert (status, resp) == (200, {"lines": 21, "bad": 1})
        assert sorted(s.span_id for s in recv.spans()) == sorted(span_id(x) for x in lines[:20])
        status, resp = await post(url + "?proxy=sidecar~10.7.0.1~front-6d4cf56db6-x2k4p.shop~shop.svc.cluster.local",
                                  b"\r\n".join(lines[20:]) + b"\r\n")
        assert (status, resp) == (200, {"lines": 10, "bad": 0})
        spans = await recv.wait_spans(30)
        assert {s.service for s in spans} == {"front.shop"}
        assert {s.resource.get("k8s.pod.name") for s in spans} == {None, "front-6d4cf56db6-x2k4p"}
        # health and metrics are served on the ingest port too
        async with ClientSession() as s, s.get(f"http://127.0.0.1:{http_port}/healthz/ready") as r:
            assert r.status == 200
    finally:
        await sink.stop()
        await recv.stop()


async def test_export_retries_until_the_receiver_accepts(tmp_path):
    recv = await Receiver().start()
    recv.fail_next = 4  # UNAVAILABLE four times
    log = tmp_path / "a.log"
    lines = [pair(i)[0] for i in range(50)]
    log.write_bytes(b"\n".join(lines) + b"\n")
    sink = LogsinkProc(tmp_path, ["--file", str(log), "--otlp-endpoint", recv.endpoint, "--join-window", "0.1"])
    try:
        await sink.start()
        spans = await recv.wait_spans(50, timeout=60)
        await asyncio.sleep(0.5)
        assert len(recv.spans()) == 50 and len({s.span_id for s in spans}) == 50
        m = await sink.metrics()
        assert m["mizzen_logsink_export_retries_total"] >= 4
        assert m['mizzen_logsink_export_errors_total{error="unavailable"}'] >= 4
        assert m["mizzen_logsink_spans_exported_total"] == 50
    finally:
        await sink.stop()
        await recv.stop()


async def test_permanent_refusal_is_counted_not_retried_forever(tmp_path):
    recv = await Receiver().start()
    recv.fail_next = 1
    recv.fail_code = grpc.StatusCode.INVALID_ARGUMENT
    log = tmp_path / "a.log"
    log.write_bytes(SEED_SAMPLE.read_bytes())
    sink = LogsinkProc(tmp_path, ["--file", str(log), "--otlp-endpoint", recv.endpoint, "--join-window", "0.1"])
    try:
        await sink.start()
        for _ in range(100):
            m = await sink.metrics()
            if m.get("mizzen_logsink_spans_rejected_total"):
                break
            await asyncio.sleep(0.1)
        assert m["mizzen_logsink_spans_rejected_total"] == 1
        assert m['mizzen_logsink_export_errors_total{error="invalid_argument"}'] == 1
        log.write_bytes(log.read_bytes() + pair(7)[0] + b"\n")  # the stream goes on
        spans = await recv.wait_spans(1)
        assert [s.span_id for s in spans] == [span_id(pair(7)[0])]
        assert recv.calls == 2
    finally:
        await sink.stop()
        await recv.stop()


async def test_backpressure_holds_inputs_while_the_receiver_is_down(tmp_path):
    """With the receiver failing, the export queue fills and the HTTP input answers 503 instead of buffering
    without bound; once the receiver is back, everything accepted is exported, once."""
    recv = await Receiver().start()
    recv.fail_next = 10**9
    port = procs.free_port()
    sink = LogsinkProc(tmp_path, ["--http", f"127.0.0.1:{port}", "--otlp-endpoint", recv.endpoint,
                                  "--join-window", "0.05", "--batch-size", "10", "--export-queue", "2",
                                  "--http-room-timeout", "0.3"])
    accepted: list[bytes] = []
    try:
        await sink.start()
        url = f"http://127.0.0.1:{port}/v1/accesslog"
        refused = 0
        for i in range(40):
            batch = [pair(1000 + i * 10 + k)[0] for k in range(10)]
            status, _ = await post(url, b"\n".join(batch))
            if status == 200:
                accepted += batch
            else:
                assert status == 503
                refused += 1
            await asyncio.sleep(0.02)
        assert refused > 0 and len(accepted) < 400
        m = await sink.metrics()
        assert m["mizzen_logsink_export_queue_batches"] >= 2
        recv.fail_next = 0
        await recv.wait_spans(len(accepted), timeout=60)
        await asyncio.sleep(0.5)
        assert sorted(s.span_id for s in recv.spans()) == sorted(span_id(x) for x in accepted)
    finally:
        await sink.stop()
        await recv.stop()


async def test_istio_metrics_from_the_logs(tmp_path):
    """istio_requests_total and the duration histogram, with Istio's labels, from the recorded chain."""
    recv = await Receiver().start()
    files = [f"{node_id(ip, pod)}={CHAIN / (name + '.jsonl')}" for name, (ip, pod) in PODS.items()]
    sink = LogsinkProc(tmp_path, [*sum((["--file", f] for f in files), []), "--otlp-endpoint", recv.endpoint,
                                  "--join-window", "0.2"])
    try:
        await sink.start()
        await recv.wait_spans(15)
        await asyncio.sleep(0.3)
        m = await sink.metrics()
        labels = dict(reporter="source", source_workload="a", source_workload_namespace="default",
                      destination_workload="b", destination_workload_namespace="default",
                      destination_service="b.default.svc.cluster.local", destination_service_name="b",
                      destination_service_namespace="default", request_protocol="http", response_code="404",
                      response_flags="-")
        assert await sink.metric("istio_requests_total", **labels) == 1
        # the server side's view of B calling C (destination service from the request's authority)
        server = dict(labels, reporter="destination", source_workload="b", destination_workload="c",
                      destination_service="c.default.svc.cluster.local", destination_service_name="c",
                      response_code="503")
        assert await sink.metric("istio_requests_total", **server) == 1
        samples = [(parse_key(k), v) for k, v in m.items()]
        total = sum(v for (n, _), v in samples if n == "istio_requests_total")
        assert total == 13  # every HTTP line, both sides
        down = [ls for (n, ls), _ in samples if n == "istio_requests_total" and ls["response_flags"] == "URX,UF"]
        assert len(down) == 1 and down[0]["destination_service"] == "down.default.svc.cluster.local"
        down_hist = {ls["le"]: v for (n, ls), v in samples if n == "istio_request_duration_milliseconds_bucket"
                     and ls["response_flags"] == "URX,UF"}
        assert down_hist["25.0"] == 0 and down_hist["50.0"] == 1 and down_hist["+Inf"] == 1  # 36 ms
        tcp = [k for k in m if k.startswith("istio_tcp_sent_bytes_total{")]
        assert sum(m[k] for k in tcp) == 10  # 5 bytes echoed, seen by both sidecars
    finally:
        await sink.stop()
        await recv.stop()


def test_mizzen_dispatcher_runs_convert(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "mizzen.services.cli.main", "logsink", "convert",
                        str(CHAIN / "a.jsonl"), str(CHAIN / "b.jsonl"), str(CHAIN / "c.jsonl"), "-o", str(out)],
                       cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode().strip().splitlines()[-1] == "lines: 15, spans: 15, traces: 5, bad lines: 0"
    doc = orjson.loads(out.read_bytes())
    spans = [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert len(spans) == 15


def test_service_needs_an_input():
    r = subprocess.run([sys.executable, "-m", "mizzen.services.logsink", "--admin", "off"], cwd=REPO,
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"no input" in r.stderr
