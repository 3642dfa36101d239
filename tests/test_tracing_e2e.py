"""★ The control plane traces itself (docs/tracing.md): a real stack (registry, translator, xds_gateway with
`MIZZEN_TRACING=otlp`) exporting to a real OTLP receiver (opentelemetry-proto's TraceService), two real
Envoy sidecars in network namespaces (one on SotW ADS, one on delta). Each `mizzen apply` is one trace:
registry apply → registry commit → translator build → translator snapshot (per proxy) → xds push (per proxy
stream) → xds ack <type> from every connected Envoy, linked parent to child; a config Envoy rejects shows
as an `xds nack` span with an error status."""

from __future__ import annotations

import pytest

from mizzen.services.sidecar.netns import unavailable_reason
from tests.conftest import is_root
from tests.logsink_data.receiver import SyncReceiver
from tests.test_e2e_support import E2E, TLS_MODE_LABEL, endpoints, eventually, service

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not is_root(), reason="needs root: network namespaces, iptables, processes as uid 1337"),
    pytest.mark.skipif(is_root() and unavailable_reason() is not None, reason=str(unavailable_reason())),
]

ERROR = 2  # Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    recv = SyncReceiver()
    env = None
    try:
        env = E2E(tmp_path_factory.mktemp("traced"), stack_env={
            "MIZZEN_TRACING": "otlp", "MIZZEN_TRACE_ENDPOINT": recv.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
        pods = {"b1": env.add_pod("b1", {"app": "b", TLS_MODE_LABEL: "istio"}, app_port=8080),
                "client": env.add_pod("client", {"app": "client", TLS_MODE_LABEL: "istio"})}
        cars = {"b1": env.start_sidecar(pods["b1"], delta=True), "client": env.start_sidecar(pods["client"])}
        for car in cars.values():
            env.wait_ready(car)
        yield env, recv, pods, cars
    finally:
        if env is not None:
            env.close()
        recv.stop()


def trace_of_apply(recv: SyncReceiver, revision_keys: set[str]) -> str:
    """The trace id of the registry apply that wrote these resources."""
    for s in recv.spans():
        if s.name == "registry apply" and revision_keys <= set(s.attributes.get("mizzen.resources", [])):
            return s.trace_id
    return ""


def complete(recv: SyncReceiver, trace_id: str, proxies: set[str]) -> list | None:
    """The trace's spans once every proxy's push has ended (all its responses answered)."""
    spans = [s for s in recv.spans() if s.trace_id == trace_id]
    pushes = {s.attributes["mizzen.proxy"].split("~")[2] for s in spans if s.name == "xds push"}
    return spans if proxies <= pushes else None


def whole(recv: SyncReceiver, trace_id: str) -> list | None:
    """The trace's spans once it is whole: every push's responses answered (the ACKs arrive before the push
    span ends) and every span's parent received. Each service exports on its own schedule, so a child can
    arrive before its parent: a translator snapshot span may still be in the translator's export batch
    when the gateway's push and its ACKs have been exported."""
    spans = [s for s in recv.spans() if s.trace_id == trace_id]
    ids = {s.span_id for s in spans}
    acked = {a.parent_span_id for a in spans if a.name.startswith("xds ack")}
    if all(p.span_id in acked for p in spans if p.name == "xds push") and all(
            not s.parent_span_id or s.parent_span_id in ids for s in spans):
        return spans
    return None


def check_tree(spans) -> dict:
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert [r.name for r in roots] == ["registry apply"], [(s.name, s.parent_span_id) for s in spans]
    for s in spans:
        if s.parent_span_id:
            assert s.parent_span_id in by_id, f"{s.name}'s parent is not in the trace"
    parent = {s.span_id: by_id[s.parent_span_id].name if s.parent_span_id else None for s in spans}
    want = {"registry commit": "registry apply", "translator build": "registry commit",
            "translator snapshot": "translator build", "xds push": "translator snapshot"}
    for s in spans:
        if s.name in want:
            assert parent[s.span_id] == want[s.name], (s.name, parent[s.span_id])
        if s.name.startswith("xds ack") or s.name.startswith("xds nack"):
            assert parent[s.span_id] == "xds push"
    services = {s.name: s.service for s in spans}
    assert services["registry apply"] == "mizzen-registry"
    assert services["translator build"] == "mizzen-translator"
    assert services["xds push"] == "mizzen-xds-gateway"
    return parent


def test_each_apply_is_one_trace_reaching_every_envoy(traced):
    env, recv, pods, cars = traced
    proxies = {f"{car.pod_name}.{car.namespace}" for car in cars.values()}
    traces = []
    for i, ip in enumerate(("10.96.7.1", "10.96.7.2")):
        name = f"traced-{i}"
        out = env.apply(service(name, ip, app="b"), endpoints(name, [pods["b1"]]))
        assert "created" in out
        tid = eventually(lambda name=name: trace_of_apply(recv, {f"Service/default/{name}"}), 30,
                         what=f"the trace of applying {name}")
        spans = eventually(lambda tid=tid: complete(recv, tid, proxies), 60,
                           what="an xds push to every connected Envoy")
        spans = eventually(lambda tid=tid: whole(recv, tid), 30,
                           what="ACK spans under every push, and every span's parent exported")
        check_tree(spans)
        acks = [s for s in spans if s.name.startswith("xds ack")]
        acked_by = {s.attributes["mizzen.proxy"].split("~")[2] for s in acks}
        assert acked_by == proxies, acked_by
        apis = {s.attributes["mizzen.xds.api"] for s in spans if s.name == "xds push"}
        assert apis == {"sotw", "delta"}
        assert all(s.status_code != ERROR for s in spans)
        root = next(s for s in spans if s.name == "registry apply")
        rev = root.attributes["mizzen.revision"]
        assert next(s for s in spans if s.name == "translator build").attributes["mizzen.revision"] == rev
        for a in acks:
            assert a.end >= a.start
        traces.append(tid)
    assert len(set(traces)) == 2


def test_a_rejected_config_is_a_nack_span_marked_as_error(traced):
    """The regex route Envoy refuses (program size above its default limit of 100; see test_e2e_traffic)."""
    env, recv, pods, cars = traced
    regex = "/api/v[0-9]+/items/[a-z0-9-]{1,64}(/[a-z0-9-]{1,64}){0,4}"
    env.apply(service("nack-web", "10.96.7.9", app="b"), endpoints("nack-web", [pods["b1"]]))
    host = "nack-web.default.svc.cluster.local"
    vs = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
          "metadata": {"name": "nack-web", "namespace": "default"},
          "spec": {"hosts": [host], "http": [
              {"match": [{"uri": {"regex": regex}}], "route": [{"destination": {"host": host}}]},
              {"route": [{"destination": {"host": host}}]}]}}
    assert "created" in env.apply(vs)
    tid = eventually(lambda: trace_of_apply(recv, {"VirtualService/default/nack-web"}), 30,
                     what="the trace of the VirtualService")
    nacks = eventually(lambda: [s for s in recv.spans() if s.trace_id == tid and s.name.startswith("xds nack")]
                       or None, 60, what="a NACK span")
    for s in nacks:
        assert s.status_code == ERROR and s.status_message, s
        assert "RouteConfiguration" in s.attributes["xds.type_url"]
    pushes = eventually(lambda: [s for s in recv.spans() if s.trace_id == tid and s.name == "xds push"
                                 and s.span_id in {n.parent_span_id for n in nacks}] or None, 30,
                        what="the push spans the NACKs belong to")
    assert all(p.status_code == ERROR for p in pushes)
    env.delete(vs)
