"""Auto mTLS follows workload-level PeerAuthentication DISABLE (Istio's EDS mtls checker): an endpoint whose
workload refuses mTLS on that port is marked `tlsMode: disabled` in EDS, so the client's transport socket
match picks plaintext for it; the traffic test is test_e2e_mtls.py::test_peer_authentication_modes_switch_live."""

from __future__ import annotations

from google.protobuf import json_format

from mizzen.services.mesh.validation import Document, check_documents
from mizzen.services.mesh.xds_types import ENDPOINT
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.push_context import PushContext
from mizzen.services.translator.snapshot import build_snapshot

CLUSTER = "outbound|80||server.default.svc.cluster.local"


def _pod(name: str, ip: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"app": app, "security.istio.io/tlsMode": "istio"}},
            "spec": {"serviceAccountName": app, "containers": [{"name": "app", "image": "x",
                                                               "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _modes(extra: list[dict]) -> dict[str, str]:
    objs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": "default"},
         "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "server"},
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "server", "namespace": "default"},
         "subsets": [{"addresses": [{"ip": ip, "targetRef": {"kind": "Pod", "name": n, "namespace": "default"}}
                                    for n, ip in (("s1", "10.0.0.1"), ("s2", "10.0.0.2"))],
                      "ports": [{"name": "http", "port": 8080}]}]},
        _pod("s1", "10.0.0.1", "server"), {**_pod("s2", "10.0.0.2", "server"),
                                           "metadata": {"name": "s2", "namespace": "default",
                                                        "labels": {"app": "server", "tier": "legacy",
                                                                   "security.istio.io/tlsMode": "istio"}}},
        _pod("client", "10.0.0.3", "client"), *extra,
    ]
    valid, errors = check_documents([Document("t", i, o) for i, o in enumerate(objs)])
    assert not errors, errors
    push = PushContext.from_resources(valid)
    proxy = Proxy.from_node_id("sidecar~10.0.0.3~client.default~default.svc.cluster.local", push)
    cla = json_format.MessageToDict(build_snapshot(push, proxy).merged()[ENDPOINT][CLUSTER])
    return {lb["endpoint"]["address"]["socketAddress"]["address"]:
            lb["metadata"]["filterMetadata"]["envoy.transport_socket_match"]["tlsMode"]
            for group in cla["endpoints"] for lb in group["lbEndpoints"]}


def _pa(name: str, spec: dict) -> dict:
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def test_workload_disable_marks_only_its_endpoints_plaintext() -> None:
    assert _modes([]) == {"10.0.0.1": "istio", "10.0.0.2": "istio"}
    legacy_off = _pa("legacy", {"selector": {"matchLabels": {"tier": "legacy"}}, "mtls": {"mode": "DISABLE"}})
    assert _modes([legacy_off]) == {"10.0.0.1": "istio", "10.0.0.2": "disabled"}
    port_off = _pa("legacy", {"selector": {"matchLabels": {"tier": "legacy"}}, "mtls": {"mode": "STRICT"},
                              "portLevelMtls": {"8080": {"mode": "DISABLE"}}})
    assert _modes([port_off]) == {"10.0.0.1": "istio", "10.0.0.2": "disabled"}
    other_port = _pa("legacy", {"selector": {"matchLabels": {"tier": "legacy"}}, "mtls": {"mode": "STRICT"},
                                "portLevelMtls": {"9090": {"mode": "DISABLE"}}})
    assert _modes([other_port]) == {"10.0.0.1": "istio", "10.0.0.2": "istio"}
