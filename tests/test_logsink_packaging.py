"""The packaging trap (DESIGN.md): xds-protos ships stale `opentelemetry/proto` modules under the same import path
as opentelemetry-proto; when they win, the OTLP exporter fails to import. Both must work in this environment,
in either import order, and our hand-written OTLP bytes must decode with the installed opentelemetry-proto."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.logsink_data.service import REPO

ENVOY_FIRST = (
    "from envoy.service.accesslog.v3 import als_pb2\n"
    "from envoy.data.accesslog.v3 import accesslog_pb2\n"
    "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
    "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
    "print('ok')\n"
)
OTLP_FIRST = (
    "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
    "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc\n"
    "from envoy.service.accesslog.v3 import als_pb2_grpc\n"
    "import mizzen.services.logsink.inputs.als, mizzen.services.logsink.export\n"
    "print('ok')\n"
)


@pytest.mark.parametrize("code", [ENVOY_FIRST, OTLP_FIRST], ids=["envoy-first", "otlp-first"])
def test_envoy_protos_and_otlp_exporter_import_together(code):
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == b"ok", r.stderr.decode()


def test_in_process():
    from envoy.service.accesslog.v3 import als_pb2  # noqa: F401
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.trace.v1 import trace_pb2

    assert OTLPSpanExporter is not None
    # the installed Span proto has the fields our wire encoder writes (flags arrived in opentelemetry-proto 1.1)
    assert trace_pb2.Span.DESCRIPTOR.fields_by_name["flags"].number == 16
