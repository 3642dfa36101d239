"""mesh/tracing.py without a stack: off by default (NOOP, nothing imported from the SDK), configuration errors
name the variable, and with a real OTLP receiver a span's `traceparent` continues in the next process's span."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mizzen.services.mesh import tracing
from tests.logsink_data.receiver import SyncReceiver
from tests.logsink_data.service import REPO


def test_off_by_default_is_noop():
    assert tracing.setup("x", environ={}) is False
    assert tracing.start("anything", "00-" + "1" * 32 + "-" + "2" * 16 + "-01") is tracing.NOOP
    assert tracing.NOOP.headers() is None and tracing.header({"traceparent": "x"}) is None


@pytest.mark.parametrize("env, words", [
    ({"MIZZEN_TRACING": "zipkin"}, "MIZZEN_TRACING"),
    ({"MIZZEN_TRACING": "console", "MIZZEN_TRACE_SAMPLE": "half"}, "MIZZEN_TRACE_SAMPLE"),
    ({"MIZZEN_TRACING": "console", "MIZZEN_TRACE_SAMPLE": "2"}, "MIZZEN_TRACE_SAMPLE"),
])
def test_bad_settings_name_the_variable(env, words):
    with pytest.raises(ValueError, match=words):
        tracing.setup("x", environ=env)
    assert not tracing.ENABLED


def test_context_crosses_processes_to_a_real_receiver():
    """Two processes: the first starts a span and prints its traceparent, the second continues it; both export
    to a real OTLP receiver, which sees one trace, parent and child."""
    recv = SyncReceiver()
    prog = textwrap.dedent("""
        import sys
        from mizzen.services.mesh import tracing
        tracing.setup(sys.argv[1])
        s = tracing.start("step", sys.argv[2] or None, {"n": 1})
        print(s.traceparent())
        s.end()
        tracing.shutdown()
    """)
    env = {"MIZZEN_TRACING": "otlp", "MIZZEN_TRACE_ENDPOINT": recv.endpoint, "PYTHONPATH": str(REPO)}
    try:
        first = subprocess.run([sys.executable, "-c", prog, "one", ""], env=env, capture_output=True, text=True,
                               timeout=60, cwd=REPO)
        tp = first.stdout.strip()
        assert tp.startswith("00-") and tp.endswith("-01"), first.stderr
        second = subprocess.run([sys.executable, "-c", prog, "two", tp], env=env, capture_output=True, text=True,
                                timeout=60, cwd=REPO)
        assert second.returncode == 0, second.stderr
        spans = {s.service: s for s in recv.spans()}
        assert set(spans) == {"one", "two"}
        assert spans["two"].trace_id == spans["one"].trace_id == tp.split("-")[1]
        assert spans["two"].parent_span_id == spans["one"].span_id == tp.split("-")[2]
    finally:
        recv.stop()


def test_sampling_zero_keeps_nothing_and_children_follow():
    recv = SyncReceiver()
    prog = textwrap.dedent("""
        from mizzen.services.mesh import tracing
        tracing.setup("s")
        a = tracing.start("root")
        print(a is tracing.NOOP)
        b = tracing.start("child", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        print(b is tracing.NOOP)
        b.end()
        tracing.shutdown()
    """)
    env = {"MIZZEN_TRACING": "otlp", "MIZZEN_TRACE_ENDPOINT": recv.endpoint, "MIZZEN_TRACE_SAMPLE": "0",
           "PYTHONPATH": str(REPO)}
    try:
        r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=60,
                           cwd=REPO)
        assert r.stdout.split() == ["True", "False"], r.stderr  # new traces dropped; a sampled parent is followed
        assert [s.name for s in recv.spans()] == ["child"]
    finally:
        recv.stop()
