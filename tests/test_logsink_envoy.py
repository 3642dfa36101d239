"""End to end with real Envoy sidecars (three pods on loopback addresses, see logsink_data/meshrig.py): live
traffic A→B→C, the sidecars' logs reaching two logsinks — one tailing their JSON access-log files, one fed by
Envoy's gRPC Access Log Service — each exporting to its own real OTLP receiver. Both must build the same
traces: one per request, client and server sides joined, the chain linked through B's application."""

from __future__ import annotations

import asyncio

import pytest

from mizzen.services.mesh import procs
from tests.logsink_data.meshrig import PODS, MeshRig, node_id
from tests.logsink_data.receiver import Receiver
from tests.logsink_data.service import LogsinkProc

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

CLIENT, SERVER = 3, 2


def check_chain(spans, rid: str, path: str, code: int) -> None:
    trace = [s for s in spans if s.trace_id == rid.replace("-", "")]
    assert len(trace) == 4, [(s.service, s.kind, s.name) for s in trace]
    by_id = {s.span_id: s for s in trace}
    roles = {(s.service, s.kind): s for s in trace}
    assert set(roles) == {("a.default", CLIENT), ("b.default", SERVER), ("b.default", CLIENT), ("c.default", SERVER)}
    a, bs, bc, cs = (roles[k] for k in (("a.default", CLIENT), ("b.default", SERVER), ("b.default", CLIENT),
                                         ("c.default", SERVER)))
    assert a.parent_span_id == ""
    assert by_id[bs.parent_span_id] is a and by_id[bc.parent_span_id] is bs and by_id[cs.parent_span_id] is bc
    for s in trace:
        assert s.attributes["http.response.status_code"] == code
        assert s.end >= s.start
    # the server side of each call lies within its client side (one host, one clock)
    assert a.start <= bs.start and bs.end <= a.end + 2_000_000
    assert bc.attributes["url.full"] == f"http://c.default.svc.cluster.local{path}"
    assert cs.attributes["url.path"] == path
    assert a.status_code == (2 if code >= 400 else 0) and cs.status_code == (2 if code >= 500 else 0)


async def test_live_mesh_files_and_access_log_service(tmp_path):
    als_port = procs.free_port()
    rig = MeshRig(tmp_path / "mesh", als=f"127.0.0.1:{als_port}")
    recv_files = await Receiver().start()
    recv_als = await Receiver().start()
    files = [f"{node_id(ip, pod)}={rig.log_path(name)}" for name, (ip, pod) in PODS.items()]
    by_file = LogsinkProc(tmp_path / "files", [*sum((["--file", f] for f in files), []),
                                               "--otlp-endpoint", recv_files.endpoint, "--join-window", "0.5",
                                               "--poll-interval", "0.05"])
    by_als = LogsinkProc(tmp_path / "als", ["--als", f"127.0.0.1:{als_port}", "--otlp-endpoint", recv_als.endpoint,
                                            "--join-window", "0.5"])
    try:
        (tmp_path / "files").mkdir()
        (tmp_path / "als").mkdir()
        await by_file.start()
        await by_als.start()
        await rig.start()
        results = {}
        for method, path in (("GET", "/ok"), ("GET", "/missing"), ("POST", "/fail")):
            rid = f"{len(results):08d}-1111-4222-8333-444455556666"
            status, _ = await rig.call_b(method, path, b"data" if method == "POST" else None,
                                         headers={"x-request-id": rid})
            results[path] = (rid, status)
        assert [s for _, s in results.values()] == [200, 404, 503]
        assert await rig.call_down() == 503
        assert await rig.tcp_echo(b"hello\n") == b"hello\n"
        # 3 chains x 4 + the failed call + TCP client and server
        want = 15
        spans_f = await recv_files.wait_spans(want, timeout=60)
        spans_a = await recv_als.wait_spans(want, timeout=60)
        await asyncio.sleep(1.0)  # nothing more may arrive
        for spans in (recv_files.spans(), recv_als.spans()):
            assert len(spans) == want
            for path, (rid, status) in results.items():
                check_chain(spans, rid, path, status)
            down = [s for s in spans if s.attributes.get("server.address") == "down.default.svc.cluster.local"]
            assert len(down) == 1 and down[0].status_code == 2
            assert down[0].attributes["envoy.response_flags"] in ("URX,UF", "UF,URX")
            tcp = sorted((s for s in spans if s.attributes.get("network.transport") == "tcp"), key=lambda s: s.kind)
            assert [(s.service, s.kind) for s in tcp] == [("c.default", SERVER), ("a.default", CLIENT)]
            assert tcp[0].parent_span_id == tcp[1].span_id and tcp[0].trace_id == tcp[1].trace_id
        # the Access Log Service carries nanosecond times; the JSON log has milliseconds
        assert any(s.start % 1_000_000 for s in spans_a)
        assert not any(s.start % 1_000_000 for s in spans_f)
        # both logsinks agree on the shape: same services, kinds, names, parents' roles
        def shape(spans):
            ids = {s.span_id: s for s in spans}
            return sorted((s.service, s.kind, s.name, s.trace_id if s.attributes.get("envoy.request_id") else "",
                           (ids[s.parent_span_id].service, ids[s.parent_span_id].kind) if s.parent_span_id else None)
                          for s in spans)
        assert shape(spans_f) == shape(spans_a)
    finally:
        await rig.stop()
        await by_file.stop()
        await by_als.stop()
        await recv_files.stop()
        await recv_als.stop()
