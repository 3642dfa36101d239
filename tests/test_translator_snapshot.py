"""Snapshots: layers shared by identity between equal proxies, complete RDS/EDS, endpoints content."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb

from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.snapshot import build_all, build_snapshot
from tests.translator_helpers import FEATURES, SEED_MESH, SEED_PROXY, load, push_of

WEBSERVER_V2 = "sidecar~10.200.0.148~webserverv2-7d8b4c5f9d-m6lqt.default~default.svc.cluster.local"
ISTIOD = "sidecar~10.200.0.137~istiod-5d4dfc8d8b-2jzbq.istio-system~istio-system.svc.cluster.local"


@pytest.fixture(scope="module")
def seed_push():
    return push_of(load(SEED_MESH))


def snap(push, node_id):
    return build_snapshot(push, Proxy.from_node_id(node_id, push))


def test_layers_are_shared_by_identity(seed_push):
    a, b = snap(seed_push, SEED_PROXY), snap(seed_push, WEBSERVER_V2)
    assert len(a.layers) == 3
    assert a.layers[0] is b.layers[0] and a.layers[1] is b.layers[1]  # same namespace and scope
    assert a.layers[2] is not b.layers[2]                            # each sidecar's own inbound side
    assert set(a.layers[2][CLUSTER]) == {"inbound|80|http-web|webserver.default.svc.cluster.local",
                                         "inbound|80|http-web|webserverv1.default.svc.cluster.local",
                                         "InboundPassthroughClusterIpv4"}
    assert "inbound|80|http-web|webserverv2.default.svc.cluster.local" in b.layers[2][CLUSTER]
    other = snap(seed_push, ISTIOD)
    assert other.layers[0] is not a.layers[0]  # another namespace: other vhost domains
    assert other.layers[1] is a.layers[1]      # ... but the same endpoints, shared


def test_layer_contents_by_type(seed_push):
    outbound, eds, own = snap(seed_push, SEED_PROXY).layers
    assert set(outbound) == {CLUSTER, LISTENER, ROUTE} and set(eds) == {ENDPOINT} and set(own) == {CLUSTER, LISTENER}
    assert set(own[LISTENER]) == {"virtualInbound"}
    assert set(PUSH_ORDER) == {CLUSTER, ENDPOINT, LISTENER, ROUTE}
    for layer in (outbound, eds, own):
        for t, res in layer.items():
            assert all(m.DESCRIPTOR.full_name == t.rsplit("/", 1)[1] for m in res.values())
    # names never clash between layers
    for t in (CLUSTER, LISTENER):
        assert not set(outbound.get(t, {})) & set(own.get(t, {}))


@pytest.mark.parametrize("mesh,node_id", [
    (SEED_MESH, SEED_PROXY), (SEED_MESH, ISTIOD),
    (FEATURES, "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local"),
    (FEATURES, "sidecar~10.2.0.10~toolbox-1.tools~tools.svc.cluster.local"),
    (FEATURES, "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local"),
])
def test_snapshot_is_complete(mesh, node_id):
    push = push_of(load(mesh))
    res = snap(push, node_id).merged()
    eds_needed = {c.eds_cluster_config.service_name for c in res[CLUSTER].values() if c.HasField("eds_cluster_config")}
    assert eds_needed and eds_needed == set(res[ENDPOINT])
    rds_needed = set()
    for lst in res[LISTENER].values():
        for fc in lst.filter_chains:
            for f in fc.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    h = hcm_pb.HttpConnectionManager()
                    f.typed_config.Unpack(h)
                    if h.HasField("rds"):
                        rds_needed.add(h.rds.route_config_name)
    assert rds_needed == set(res[ROUTE])


def test_router_snapshot_has_no_inbound_side():
    push = push_of(load(FEATURES))
    s = snap(push, "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local")
    assert s.layers[2] == {}
    assert "virtualOutbound" not in s.resources(LISTENER)


def test_build_all_and_determinism(seed_push):
    proxies = [Proxy.from_node_id(n, seed_push) for n in (SEED_PROXY, WEBSERVER_V2, ISTIOD)]
    snaps = build_all(seed_push, proxies)
    assert list(snaps) == [p.id for p in proxies]
    again = push_of(load(SEED_MESH))
    s1 = snaps[SEED_PROXY].merged()
    s2 = snap(again, SEED_PROXY).merged()
    for t in PUSH_ORDER:
        assert list(s1[t]) == list(s2[t])
        for name in s1[t]:
            assert s1[t][name].SerializeToString(deterministic=True) == \
                s2[t][name].SerializeToString(deterministic=True), name


def test_endpoints(seed_push):
    res = snap(seed_push, SEED_PROXY).resources(ENDPOINT)

    def eps(name):
        cla = res[name]
        assert cla.cluster_name == name
        return sorted((e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                      for lle in cla.endpoints for e in lle.lb_endpoints)

    # the seed's endpoint table rows (EDS part)
    assert eps("outbound|80||webserver.default.svc.cluster.local") == [("10.200.0.135", 3030), ("10.200.0.148", 3030)]
    assert eps("outbound|80|v1|webserver.default.svc.cluster.local") == [("10.200.0.135", 3030)]
    assert eps("outbound|80|v2|webserver.default.svc.cluster.local") == [("10.200.0.148", 3030)]
    assert eps("outbound|443||istiod.istio-system.svc.cluster.local") == [("10.200.0.137", 15017)]
    assert eps("outbound|853||istiod.istio-system.svc.cluster.local") == [("10.200.0.137", 15053)]
    assert eps("outbound|443||kubernetes.default.svc.cluster.local") == [("9.134.236.162", 6443)]
    assert eps("outbound|53||kube-dns.kube-system.svc.cluster.local") == [("10.200.0.139", 53)]
    cla = res["outbound|80||webserver.default.svc.cluster.local"]
    [lle] = cla.endpoints
    assert lle.load_balancing_weight.value == 2
    assert all(e.load_balancing_weight.value == 1 for e in lle.lb_endpoints)
    md = lle.lb_endpoints[0].metadata.filter_metadata["envoy.transport_socket_match"]
    assert md["tlsMode"] == "disabled"  # the seed's pods carry no security.istio.io/tlsMode label


def test_endpoint_tls_mode_from_pod_label():
    push = push_of(load(FEATURES))
    res = snap(push, "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local").resources(ENDPOINT)
    [lle] = res["outbound|80|v1|frontend.shop.svc.cluster.local"].endpoints
    [ep] = lle.lb_endpoints
    assert ep.endpoint.address.socket_address.address == "10.1.0.10"
    assert ep.metadata.filter_metadata["envoy.transport_socket_match"]["tlsMode"] == "istio"
    # a STATIC ServiceEntry's endpoints come from its WorkloadEntry
    [lle] = res["outbound|8080||billing.shop.internal"].endpoints
    assert [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for e in lle.lb_endpoints] == [("192.168.10.5", 18080)]


MALFORMED = """
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec: {clusterIP: 10.0.0.2, ports: [{name: http, port: eighty}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: good, namespace: default}
spec: {host: good, trafficPolicy: {connectionPool: {tcp: {maxConnections: lots}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: good, namespace: default}
spec: {hosts: [good], http: [{route: [{destination: {host: good}, weight: heavy}, {destination: {host: good}}]}]}
"""


def test_unreadable_objects_are_reported_not_fatal():
    push = push_of(MALFORMED)
    res = snap(push, "sidecar~10.0.0.9~x.default~default.svc.cluster.local").merged()
    good = res[CLUSTER]["outbound|80||good.default.svc.cluster.local"]
    assert good.circuit_breakers.thresholds[0].max_connections.value == 4294967295  # built without the bad DR
    assert not any("broken" in n for n in res[CLUSTER])
    vh = [v for v in res[ROUTE]["80"].virtual_hosts if v.name == "good.default.svc.cluster.local:80"][0]
    assert [r.name for r in vh.routes] == ["default"]  # the unreadable VirtualService is skipped
    assert any(e.startswith("Service default/broken") for e in push.errors)
    assert any(e.startswith("DestinationRule default/good") for e in push.errors)
    assert any(e.startswith("VirtualService default/good") for e in push.errors)


REPLICAS = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec: {clusterIP: 10.0.0.1, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: default, labels: {app: api, pod-template-hash: abc}}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: default, labels: {app: api, pod-template-hash: abc}}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-strict, namespace: default, labels: {app: api, strict: "yes"}}
status: {podIP: 10.1.0.3}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict-one, namespace: default}
spec: {selector: {matchLabels: {strict: "yes"}}, mtls: {mode: STRICT}}
"""


def test_replicas_share_their_inbound_layer():
    push = push_of(REPLICAS)
    one, two, strict = (snap(push, f"sidecar~10.1.0.{i}~{name}.default~default.svc.cluster.local")
                        for i, name in ((1, "api-1"), (2, "api-2"), (3, "api-strict")))
    assert one.layers[2] is two.layers[2]          # identical inbound side: one object
    assert strict.layers[2] is not one.layers[2]   # another mTLS mode: its own
    assert set(one.layers[2][CLUSTER]) == set(strict.layers[2][CLUSTER])


_DIGEST_SCRIPT = """
import hashlib, sys
from tests.translator_helpers import FEATURES, SEED_MESH, SEED_PROXY, load, push_of, snapshot_of
h = hashlib.sha256()
for mesh, node in ((SEED_MESH, SEED_PROXY), (FEATURES, "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local"),
                   (FEATURES, "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local")):
    for t, res in sorted(snapshot_of(push_of(load(mesh)), node).items()):
        for name, msg in sorted(res.items()):
            h.update(t.encode() + name.encode() + msg.SerializeToString(deterministic=True))
print(h.hexdigest())
"""


def test_output_is_byte_identical_across_processes():
    """A restarted translator must produce the same bytes (content-addressed snapshots depend on it),
    whatever the interpreter's hash seed: packed Any payloads must serialise maps deterministically."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    digests = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], cwd=root, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1
