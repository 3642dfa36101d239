"""The proxyless-gRPC shapes (services/translator/grpcgen.py, istiod's grpcgen) for a node with GENERATOR grpc:
ApiListeners per host:port naming RDS `outbound|port||fqdn`, the service's virtual host with the
VirtualService's weighted subsets, plain EDS clusters over ADS, endpoints with a locality on every group.
The behaviour through a real grpcio client is tests/test_proxyless_grpc.py."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb

from mizzen.services.translator.grpcgen import is_proxyless
from mizzen.services.translator.snapshot import build_snapshot
from tests.test_proxyless_grpc import mesh, weights
from tests.translator_helpers import CLUSTER, ENDPOINT, LISTENER, ROUTE, Proxy, push_of

NODE = "sidecar~10.9.9.9~client.default~default.svc.cluster.local"
HOST = "greeter.default.svc.cluster.local"


def snapshot(grpc: bool = True):
    push = push_of(mesh(7070) + "---" + weights(80, 20))
    proxy = Proxy.from_node_id(NODE, push, metadata={"GENERATOR": "grpc"} if grpc else {})
    return proxy, build_snapshot(push, proxy).merged()


def test_only_grpc_generator_nodes_are_proxyless():
    assert is_proxyless(snapshot()[0]) and not is_proxyless(snapshot(grpc=False)[0])
    _p, envoy = snapshot(grpc=False)
    assert "virtualOutbound" in envoy[LISTENER]  # an Envoy sidecar's shapes otherwise


def test_listeners_are_api_listeners_with_rds():
    _p, snap = snapshot()
    assert "virtualOutbound" not in snap[LISTENER] and "BlackHoleCluster" not in snap[CLUSTER]
    for name in (f"{HOST}:7070", "greeter:7070", "greeter.default:7070", "greeter.default.svc:7070"):
        ln = snap[LISTENER][name]
        assert ln.address.socket_address.address == "10.96.7.7" and ln.address.socket_address.port_value == 7070
        assert not ln.filter_chains
        h = hcm_pb.HttpConnectionManager()
        assert ln.api_listener.api_listener.Unpack(h)
        assert h.rds.route_config_name == f"outbound|7070||{HOST}" and h.rds.config_source.HasField("ads")
        assert [f.name for f in h.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]


def test_route_carries_the_virtual_service_weights():
    _p, snap = snapshot()
    rc = snap[ROUTE][f"outbound|7070||{HOST}"]
    assert len(rc.virtual_hosts) == 1 and f"{HOST}:7070" in rc.virtual_hosts[0].domains
    wc = rc.virtual_hosts[0].routes[0].route.weighted_clusters
    assert [(c.name, c.weight.value) for c in wc.clusters] == [
        (f"outbound|7070|v1|{HOST}", 80), (f"outbound|7070|v2|{HOST}", 20)]


def test_clusters_are_plain_eds_over_ads_and_endpoints_have_localities():
    _p, snap = snapshot()
    names = {f"outbound|7070||{HOST}", f"outbound|7070|v1|{HOST}", f"outbound|7070|v2|{HOST}"}
    assert names <= set(snap[CLUSTER])
    for name in names:
        c = snap[CLUSTER][name]
        assert c.type == cluster_pb2.Cluster.EDS and c.eds_cluster_config.service_name == name
        assert c.eds_cluster_config.eds_config.HasField("ads")
        assert not c.HasField("transport_socket") and not c.transport_socket_matches
        cla = snap[ENDPOINT][name]
        assert cla.endpoints and all(g.HasField("locality") for g in cla.endpoints)
    v1 = snap[ENDPOINT][f"outbound|7070|v1|{HOST}"]
    assert [e.endpoint.address.socket_address.address for g in v1.endpoints for e in g.lb_endpoints] == ["127.0.0.2"]


def test_a_grpc_agent_pod_is_proxyless_before_it_connects():
    pod = """
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
  labels: {app: client}
  annotations: {inject.istio.io/templates: grpc-agent}
spec: {containers: [{name: c, image: c}]}
status: {podIP: 10.9.9.9}
"""
    push = push_of(mesh(7070) + "---" + pod)
    proxy = Proxy.from_node_id(NODE, push)  # no node metadata yet
    assert is_proxyless(proxy) and f"{HOST}:7070" in build_snapshot(push, proxy).merged()[LISTENER]
    assert not is_proxyless(Proxy.from_node_id("sidecar~127.0.0.2~greeter-v1.default~default.svc.cluster.local",
                                               push))
