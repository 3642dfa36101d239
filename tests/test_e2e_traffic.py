"""Issue 4, end to end: traffic through real sidecars follows live config, over SotW and delta ADS; a config
Envoy rejects shows as NACKed in `mizzen proxy-status` while traffic keeps flowing on the last good config.

One mesh for the module: the real control plane as processes (private NATS and Redis, registry, translator,
xds_gateway), and pods in network namespaces, each with `mizzen iptables` (the seed's flags) and a real Envoy
(uid 1337) from `mizzen bootstrap` — `client-sotw` (ADS state of the world), `client-delta` (`--delta`,
DELTA_GRPC), and the echo apps' pods b1, b2 and c1 (b2 on delta). mTLS stays on: the mesh's defaults
(PeerAuthentication PERMISSIVE, auto mTLS for pods labelled `security.istio.io/tlsMode: istio`) with
tests/sds_fixture.py serving every sidecar the `default` certificate (spiffe://cluster.local/ns/default/sa/default)
and `ROOTCA`; the server side's access log shows the TLS connection (Istio's SNI for the client's cluster).

Every change goes through the `mizzen apply` / `mizzen delete` CLI into the running stack; no Envoy restarts.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import NETNS_E2E
from tests.test_e2e_support import (
    E2E,
    TLS_MODE_LABEL,
    call,
    endpoints,
    eventually,
    mizzen,
    served_by,
    service,
)

pytestmark = NETNS_E2E

# per API: (the service that gets a second endpoint and loses the first, the service added then deleted)
CLUSTER_IPS = {"sotw": ("10.96.1.1", "10.96.2.1"), "delta": ("10.96.1.2", "10.96.2.2")}
NACK_IP = "10.96.3.1"
RDS = 3  # column of a proxy-status row after NAME: CDS LDS EDS RDS ISTIOD VERSION


class Mesh:
    def __init__(self, env: E2E):
        self.env = env
        self.pods = {}
        for name, app, port in (("b1", "b", 8080), ("b2", "b", 8080), ("c1", "c", 8080),
                                ("client-sotw", "client", None), ("client-delta", "client", None)):
            self.pods[name] = env.add_pod(name, {"app": app, TLS_MODE_LABEL: "istio"}, app_port=port)
        self.cars = {name: env.start_sidecar(pod, delta=name in ("b2", "client-delta"))
                     for name, pod in self.pods.items()}
        for car in self.cars.values():
            env.wait_ready(car)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("e2e-traffic"))
    try:
        yield Mesh(env)
    finally:
        env.close()


def fqdn(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def outbound(name: str) -> str:
    return f"outbound|80||{fqdn(name)}"


def get(mesh: Mesh, client: str, ip: str, timeout: float = 5.0) -> tuple[str, dict]:
    # Not 36 characters: Envoy rewrites a UUID-length x-request-id's 15th character to record its tracing
    # decision (9 when sampled, 1% of requests here), so a UUID would not always come back unchanged.
    rid = f"e2e-{uuid.uuid4().hex[:24]}"
    return rid, call(mesh.pods[client], f"http://{ip}/", rid, timeout)


@pytest.mark.parametrize("api", ["sotw", "delta"])
def test_traffic_follows_apply_and_delete_without_restart(mesh, api):
    env = mesh.env
    client = mesh.cars[f"client-{api}"]
    b1, b2, c1 = (mesh.pods[n] for n in ("b1", "b2", "c1"))
    web, new = f"web-{api}", f"new-{api}"
    web_ip, new_ip = CLUSTER_IPS[api]
    envoy_pid = client.proc.pid
    status = json.loads(mizzen("proxy-status", "client", "-o", "json", "--server", env.server).stdout)
    assert {s["name"]: s["api"] for s in status}[client.proxy_name] == api

    # 1. a service with one endpoint: the client's request to its ClusterIP reaches the pod EDS named
    env.apply(service(web, web_ip, app="b"), endpoints(web, [b1]))
    eventually(lambda: client.serves(outbound(web), {f"{b1.ip}:8080"}), what=f"{web} in {client.pod_name}'s Envoy")
    rid, res = get(mesh, client.pod_name, web_ip)
    assert served_by(res) == "b1", res
    assert res["peer"] == f"{web_ip}:80"  # the app talked to the ClusterIP; iptables sent it to Envoy
    out = client.wait_entry(request_id=rid)
    assert out["upstream_cluster"] == outbound(web) and out["upstream_host"] == f"{b1.ip}:8080"
    assert out["downstream_local_address"] == f"{web_ip}:80"
    # auto mTLS to b1's sidecar: b1's Envoy took it on a TLS chain, with Istio's SNI for the cluster
    inbound = mesh.cars["b1"].wait_entry(request_id=rid)
    assert inbound["requested_server_name"] == f"outbound_.80_._.{fqdn(web)}"
    assert inbound["upstream_host"] == "127.0.0.1:8080" and inbound["response_code"] == 200

    # 2. a new endpoint (a second pod behind the service): requests start reaching it
    env.apply(endpoints(web, [b1, b2]))
    eventually(lambda: client.serves(outbound(web), {f"{b1.ip}:8080", f"{b2.ip}:8080"}), what="EDS with b1 and b2")
    seen: dict[str, int] = {}
    for _ in range(40):
        name = served_by(get(mesh, client.pod_name, web_ip)[1])
        assert name in ("b1", "b2"), name
        seen[name] = seen.get(name, 0) + 1
        if len(seen) == 2:
            break
    assert set(seen) == {"b1", "b2"}, seen

    # 3. a new service: requests to its ClusterIP start working, the old one keeps working
    env.apply(service(new, new_ip, app="c"), endpoints(new, [c1]))
    eventually(lambda: client.serves(outbound(new), {f"{c1.ip}:8080"}), what=f"new service {new} in Envoy")
    rid, res = get(mesh, client.pod_name, new_ip)
    assert served_by(res) == "c1", res
    assert client.wait_entry(request_id=rid)["upstream_host"] == f"{c1.ip}:8080"
    assert served_by(get(mesh, client.pod_name, web_ip)[1]) in ("b1", "b2")

    # 4a. an endpoint deleted: it gets no more requests
    env.apply(endpoints(web, [b2]))
    eventually(lambda: client.serves(outbound(web), {f"{b2.ip}:8080"}), what="EDS without b1")
    answers = [served_by(get(mesh, client.pod_name, web_ip)[1]) for _ in range(20)]
    assert answers == ["b2"] * 20

    # 4b. a service deleted: its ClusterIP is no longer routed to its pod
    assert "deleted" in env.delete(service(new, new_ip, app="c"), endpoints(new, [c1]))
    eventually(lambda: outbound(new) not in client.clusters() and not client.routes_to(outbound(new)),
               what=f"{outbound(new)} removed from Envoy")
    rid, res = get(mesh, client.pod_name, new_ip, timeout=1.0)  # the passthrough to a ClusterIP goes nowhere
    assert served_by(res) is None, res
    gone = client.wait_entry(request_id=rid)  # Envoy took it, and had only the passthrough for it
    assert gone["upstream_cluster"] == "PassthroughCluster"
    assert not [e for e in mesh.cars["c1"].log_entries() if e.get("request_id") == rid]
    assert served_by(get(mesh, client.pod_name, web_ip)[1]) == "b2"

    # all of it reached the Envoy that was running from the start
    assert client.alive() and client.proc.pid == envoy_pid
    assert client.server_info()["state"] == "LIVE"
    eventually(lambda: env.proxy_status()[client.proxy_name][:4] == ["SYNCED"] * 4,
               what=f"{client.proxy_name} SYNCED on the last config")


def test_rejected_config_is_nacked_and_traffic_keeps_flowing(mesh):
    """A VirtualService that passes validation (its regex is valid RE2 and under Istio's 1024 characters) but
    whose compiled RE2 program is larger than the 1024 the route's matcher allows (Istio 1.7's
    `max_program_size`): Envoy rejects the route configuration. That is a real-world Istio failure, injected
    here through the normal pipeline: `mizzen apply` → registry → translator → xds_gateway → Envoy."""
    import re2

    env = mesh.env
    b1 = mesh.pods["b1"]
    clients = [mesh.cars["client-sotw"], mesh.cars["client-delta"]]
    regex = "/api/v[0-9]+/items/[a-z0-9-]{1,64}(/[a-z0-9-]{1,64}){0,4}"
    assert len(regex) <= 1024 and re2.compile(regex).programsize > 1024
    env.apply(service("nack-web", NACK_IP, app="b"), endpoints("nack-web", [b1]))
    for car in clients:
        eventually(lambda car=car: car.serves(outbound("nack-web"), {f"{b1.ip}:8080"}),
                   what=f"nack-web in {car.pod_name}'s Envoy")
        assert served_by(get(mesh, car.pod_name, NACK_IP)[1]) == "b1"
        eventually(lambda car=car: env.proxy_status()[car.proxy_name][:4] == ["SYNCED"] * 4,
                   what=f"{car.proxy_name} SYNCED")
    vs = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
          "metadata": {"name": "nack-web", "namespace": "default"},
          "spec": {"hosts": [fqdn("nack-web")], "http": [
              {"match": [{"uri": {"regex": regex}}], "route": [{"destination": {"host": fqdn("nack-web")}}]},
              {"route": [{"destination": {"host": fqdn("nack-web")}}]}]}}
    try:
        assert "virtualservice.networking.istio.io/nack-web created" in env.apply(vs)
        for car in clients:
            row = eventually(lambda car=car: (r := env.proxy_status()[car.proxy_name])[RDS] == "NACKed" and r,
                             what=f"{car.proxy_name} RDS NACKed")
            assert row[:4] == ["SYNCED", "SYNCED", "SYNCED", "NACKed"], row  # CDS LDS EDS RDS
            detail = {s["name"]: s for s in json.loads(
                mizzen("proxy-status", car.proxy_name, "-o", "json", "--server", env.server).stdout)}
            assert "program size" in detail[car.proxy_name]["errors"]["RDS"], detail
            # the last good config keeps serving: Envoy's routes are the ones from before the VirtualService
            assert regex not in json.dumps(car.section("RoutesConfigDump"))
            for _ in range(10):
                assert served_by(get(mesh, car.pod_name, NACK_IP)[1]) == "b1"
            assert car.alive()
    finally:
        env.delete(vs)
    for car in clients:
        eventually(lambda car=car: env.proxy_status()[car.proxy_name][:4] == ["SYNCED"] * 4,
                   what=f"{car.proxy_name} SYNCED again once the VirtualService is gone")
