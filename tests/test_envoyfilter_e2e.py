"""EnvoyFilter through real sidecars: a Lua HTTP filter that adds headers, a cluster MERGE that changes where
traffic may go, and a patch Envoy rejects (a NACK, not a crash; traffic keeps flowing). Every change goes
through `mizzen apply` / `mizzen delete` into the running stack; nothing restarts.

Pods `client` and `b1` (echo app on 8080) with sidecars from `mizzen bootstrap`, the real control plane as
processes (tests/test_e2e_support.py)."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import NETNS_E2E
from tests.test_e2e_support import E2E, TLS_MODE_LABEL, call, endpoints, eventually, served_by, service

pytestmark = NETNS_E2E

WEB_IP = "10.96.7.1"
WEB = "web.default.svc.cluster.local"
HCM_ROUTER = {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager",
                                         "subFilter": {"name": "envoy.filters.http.router"}}}}
LUA_CODE = """
function envoy_on_request(handle)
  handle:headers():add("x-lua-request", "seen-by-b")
end
function envoy_on_response(handle)
  handle:headers():add("x-lua-response", "from-b-sidecar")
end
"""


def envoy_filter(name: str, selector: dict, patches: list[dict]) -> dict:
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"workloadSelector": {"labels": selector}, "configPatches": patches}}


LUA_FILTER = envoy_filter("b-lua", {"app": "b"}, [{
    "applyTo": "HTTP_FILTER",
    "match": {"context": "SIDECAR_INBOUND", "listener": HCM_ROUTER},
    "patch": {"operation": "INSERT_BEFORE", "value": {
        "name": "envoy.lua",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                         "inline_code": LUA_CODE}}}}])

# An active health check that wants a status the echo app never answers, and no panic routing: once Envoy
# has checked b1, the client's sidecar has no healthy host for `web` and answers 503 itself (flag UH).
UNHEALTHY_MERGE = envoy_filter("client-hc", {"app": "client"}, [{
    "applyTo": "CLUSTER",
    "match": {"context": "SIDECAR_OUTBOUND", "cluster": {"service": WEB, "portNumber": 80}},
    "patch": {"operation": "MERGE", "value": {
        "health_checks": [{"timeout": "1s", "interval": "0.5s", "unhealthy_threshold": 1, "healthy_threshold": 1,
                           "http_health_check": {"path": "/healthz", "expected_statuses": [
                               {"start": 500, "end": 501}]}}],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}}}}}])

# The router must be the last HTTP filter: Envoy rejects a listener with one after it.
REJECTED = envoy_filter("client-bad", {"app": "client"}, [{
    "applyTo": "HTTP_FILTER",
    "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": 80, **HCM_ROUTER}},
    "patch": {"operation": "ADD", "value": {"name": "envoy.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua", "inline_code": LUA_CODE}}}}])


class Mesh:
    def __init__(self, env: E2E):
        self.env = env
        self.b1 = env.add_pod("b1", {"app": "b", TLS_MODE_LABEL: "istio"}, app_port=8080)
        self.client = env.add_pod("client", {"app": "client", TLS_MODE_LABEL: "istio"})
        env.register([service("web", WEB_IP, app="b"), endpoints("web", [self.b1])])
        self.cars = {p.name: env.start_sidecar(p) for p in (self.b1, self.client)}
        for car in self.cars.values():
            env.wait_ready(car)
        eventually(lambda: self.cars["client"].serves(f"outbound|80||{WEB}", {f"{self.b1.ip}:8080"}),
                   what="web in the client's Envoy")

    def get(self) -> tuple[str, dict]:
        rid = f"ef-{uuid.uuid4().hex[:24]}"
        return rid, call(self.client, f"http://{WEB_IP}/", rid)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("envoyfilter"))
    try:
        yield Mesh(env)
    finally:
        env.close()


def test_lua_filter_adds_headers_on_the_server_sidecar_and_goes_away_on_delete(mesh):
    _, res = mesh.get()
    assert served_by(res) == "b1", res
    assert "x-lua-response" not in res["headers"] and "x-lua-request" not in res["body"]["headers"]

    assert "envoyfilter.networking.istio.io/b-lua created" in mesh.env.apply(LUA_FILTER)
    res = eventually(lambda: (r := mesh.get()[1]).get("headers", {}).get("x-lua-response") and r,
                     what="the Lua filter's response header")
    assert res["headers"]["x-lua-response"] == "from-b-sidecar"
    assert res["body"]["headers"]["x-lua-request"] == "seen-by-b"  # the app behind b1's sidecar saw it
    assert served_by(res) == "b1"
    # only b's sidecar runs it: the client's outbound chain has no Lua filter
    assert "envoy.lua" not in str(mesh.cars["client"].section("ListenersConfigDump"))

    mesh.env.delete(LUA_FILTER)
    eventually(lambda: "x-lua-response" not in (r := mesh.get()[1]).get("headers", {"x-lua-response": 1})
               and served_by(r) == "b1", what="the Lua filter removed")


def test_cluster_merge_changes_what_the_client_sidecar_does(mesh):
    assert served_by(mesh.get()[1]) == "b1"
    mesh.env.apply(UNHEALTHY_MERGE)
    rid, res = eventually(lambda: (x := mesh.get())[1].get("status") == 503 and x, timeout=30,
                          what="503 once b1 fails the merged health check")
    entry = mesh.cars["client"].wait_entry(request_id=rid)
    assert entry["response_flags"] == "UH", entry  # no healthy upstream
    assert entry["upstream_cluster"] == f"outbound|80||{WEB}"
    mesh.env.delete(UNHEALTHY_MERGE)
    eventually(lambda: served_by(mesh.get()[1]) == "b1", timeout=30, what="traffic back once the MERGE is gone")


def test_a_patch_envoy_rejects_is_a_nack_and_traffic_keeps_flowing(mesh):
    car = mesh.cars["client"]
    name = car.proxy_name
    try:
        mesh.env.apply(REJECTED)
        row = eventually(lambda: (r := mesh.env.proxy_status().get(name)) and r[1] == "NACKed" and r,
                         what=f"{name} LDS NACKed")
        assert row[0] == "SYNCED", row  # CDS is fine; only the listener was rejected
        for _ in range(5):
            assert served_by(mesh.get()[1]) == "b1"  # the last good listener still serves
        assert car.alive()
    finally:
        mesh.env.delete(REJECTED)
    eventually(lambda: mesh.env.proxy_status().get(name, [""])[1] == "SYNCED", what=f"{name} LDS SYNCED again")
    assert served_by(mesh.get()[1]) == "b1"
