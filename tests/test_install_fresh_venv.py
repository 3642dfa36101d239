"""One-command install (DESIGN.md "Known packaging trap"): in a fresh venv with only the package installed — and
with xds-protos' stale `opentelemetry/proto` copy installed last, so it owns those files — the logsink still
exports OTLP to a real receiver over gRPC and converts logs to OTLP/JSON that the real opentelemetry-proto
classes parse. pip reuses the machine's wheels (find-links / cache), so this takes seconds, not minutes."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2

from mizzen.services.logsink.convert import convert
from tests.logsink_data.helpers import SEED_SAMPLE
from tests.logsink_data.receiver import Receiver, flatten
from tests.logsink_data.service import LogsinkProc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROXY = "sidecar~10.7.0.1~front-6d4cf56db6-x2k4p.shop~shop.svc.cluster.local"


# the venv must see only what it installed: no PYTHONPATH pointing at a checkout
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV)
    assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fresh")
    wheels = tmp / "wheels"
    # build from a clean copy: setuptools never empties build/, so a checkout's old build/ could leak files
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", ".ruff_cache", ".venv"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(src)], cwd=tmp)
    run([sys.executable, "-m", "venv", str(tmp / "venv")], cwd=tmp)
    py = tmp / "venv" / "bin" / "python"
    wheel = next(wheels.glob("mizzen-*.whl"))
    run([str(py), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp)  # the one command
    # make the trap certain whatever order pip chose: xds-protos' stale copy goes in last
    version = run([str(py), "-c", "import importlib.metadata as m; print(m.version('xds-protos'))"], cwd=tmp).strip()
    run([str(py), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", f"xds-protos=={version}"], cwd=tmp)
    stale = run([str(py), "-c", "from opentelemetry.proto.trace.v1 import trace_pb2 as t; "
                 "print('scope_spans' in t.ResourceSpans.DESCRIPTOR.fields_by_name)"], cwd=tmp).strip()
    assert stale == "False", "xds-protos no longer ships the stale OTLP modules: this test proves nothing now"
    return py


def test_the_installed_package_imports_everywhere(venv):
    code = ("import mizzen, mizzen.services.logsink.app, mizzen.services.logsink.export, mizzen.services.logsink.cli,"
            " mizzen.services.registry.app, mizzen.services.translator.app, mizzen.services.xds_gateway.app,"
            " mizzen.services.cli.watch, mizzen.services.cli.up; print(mizzen.__file__)")
    out = run([str(venv), "-c", code], cwd=venv.parent)
    assert out.strip().startswith(str(venv.parent.parent)), out  # the venv's copy, not the checkout
    run([str(venv.parent / "mizzen"), "--help"], cwd=venv.parent)
    # the distribution installs no generic top-level package
    r = subprocess.run([str(venv), "-c", "import services"], cwd=venv.parent, capture_output=True, env=CLEAN_ENV)
    assert r.returncode != 0


async def test_logsink_exports_otlp_over_grpc(venv, tmp_path):
    recv = await Receiver().start()
    log = tmp_path / "front.log"
    log.write_bytes(SEED_SAMPLE.read_bytes())
    sink = LogsinkProc(tmp_path, ["--file", f"{PROXY}={log}", "--otlp-endpoint", recv.endpoint,
                                  "--join-window", "0.2", "--poll-interval", "0.05"], python=str(venv))
    try:
        await sink.start(timeout=60)
        spans = await recv.wait_spans(1, timeout=60)
        assert spans[0].trace_id == "967f8e1adbc04ccead53ce6a27d5e54c"
        assert spans[0].service and spans[0].attributes
    finally:
        rc = await sink.stop()
        await recv.stop()
    assert rc == 0, sink.log_text()
    assert "Traceback" not in sink.log_text()


def test_logsink_convert_writes_otlp_json(venv, tmp_path):
    out = tmp_path / "traces.json"
    r = subprocess.run([str(venv.parent / "mizzen"), "logsink", "convert", str(SEED_SAMPLE), "-o", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=CLEAN_ENV)
    assert r.returncode == 0, r.stderr
    assert "lines: 1, spans: 1" in r.stderr
    doc = orjson.loads(out.read_bytes())
    # the real opentelemetry-proto (this interpreter's, which is current) parses it ...
    req = json_format.ParseDict(_b64(doc), ts_pb2.ExportTraceServiceRequest())
    # ... and it is what this checkout's convert makes
    mine = io.BytesIO()
    convert([str(SEED_SAMPLE)], mine, window=5.0)
    ref = json_format.ParseDict(_b64(orjson.loads(mine.getvalue())), ts_pb2.ExportTraceServiceRequest())
    assert [(s.trace_id, s.span_id, s.name, s.attributes) for s in flatten(req)] == \
        [(s.trace_id, s.span_id, s.name, s.attributes) for s in flatten(ref)]


def _b64(doc: dict) -> dict:
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for k in ("traceId", "spanId", "parentSpanId"):
                    if span.get(k):
                        span[k] = base64.b64encode(bytes.fromhex(span[k])).decode()
    return doc


def test_mizzen_up_demo_runs_and_the_control_plane_traces_itself(venv, tmp_path):
    """`mizzen up --demo` from the fresh venv (stale OTLP modules installed): traffic flows through the demo's
    gateway, and with tracing on the control plane's spans reach a real OTLP receiver."""
    from mizzen.services.mesh import procs
    from tests.test_demo import SyncOTLPReceiver

    otlp = SyncOTLPReceiver()
    ports = {flag: procs.free_port() for flag in ("--registry-port", "--xds-port", "--xds-tls-port", "--ca-port",
                                                   "--gateway-port")}
    argv = [str(venv.parent / "mizzen"), "up", "--demo", "--for", "15", "--data-dir", str(tmp_path / "data"),
            "--otlp-endpoint", otlp.endpoint, *(x for kv in ports.items() for x in (kv[0], str(kv[1])))]
    env = dict(CLEAN_ENV, PYTHONUNBUFFERED="1", MIZZEN_TRACING="otlp", MIZZEN_TRACE_ENDPOINT=otlp.endpoint)
    env.pop("MIZZEN_SERVER", None)
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        otlp.stop()
    assert proc.returncode == 0, out[-4000:]
    traffic = [line for line in out.splitlines() if line.startswith("demo: ingress")]
    assert traffic and any(" 200 x" in line for line in traffic), out[-4000:]
    services = {name for name, _span in otlp.spans()}
    assert "mizzen-registry" in services, services  # the apply of the demo mesh, traced by the venv's code
