"""Locality from Kubernetes Nodes (issue 10 item 4): the Node kind (validation, paths, kubectl columns), a Pod's
locality as istiod's getPodLocality computes it (`istio-locality`, else its Node's topology labels), the proxy's
own locality (the registry's first, Envoy's node.locality only without it), and a Node change as an
endpoints-only build. The traffic proof is tests/test_traffic_node_locality.py."""

from __future__ import annotations

import copy

import pytest

from mizzen.services.mesh import kinds
from mizzen.services.mesh import locality as loc
from mizzen.services.mesh.validation import check_documents
from mizzen.services.mesh.yamlio import Document
from mizzen.services.registry.kubeapi import table
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.push_context import PushContext
from mizzen.services.translator.snapshot import build_snapshot, carry_over, endpoint_only_changes
from tests.translator_helpers import ENDPOINT

HOST = "web.default.svc.cluster.local"
CLUSTER = f"outbound|80||{HOST}"
CLIENT = "sidecar~10.1.0.9~client.default~default.svc.cluster.local"


def node(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels)}}


def zone(region: str, zone_: str, subzone: str = "") -> dict[str, str]:
    out = {loc.REGION_LABEL: region, loc.ZONE_LABEL: zone_}
    if subzone:
        out[loc.SUBZONE_LABEL] = subzone
    return out


def pod(name: str, ip: str, node_name: str | None, **labels: str) -> dict:
    spec = {"nodeName": node_name} if node_name else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web", **labels}},
            "spec": spec, "status": {"podIP": ip}}


def mesh(nodes: list[dict], pods: list[dict]) -> list[dict]:
    """Service `web` over `pods` (Endpoints with targetRefs), a client pod, and failover on (outlier detection)."""
    client = pod("client", "10.1.0.9", "node-client")
    client["metadata"]["labels"] = {"app": "client"}
    return [*nodes, client, *pods,
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
            {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web", "namespace": "default"},
             "subsets": [{"addresses": [{"ip": p["status"]["podIP"], "targetRef": {"kind": "Pod",
                                                                                    "name": p["metadata"]["name"]}}
                                        for p in pods],
                          "ports": [{"name": "http", "port": 8080}]}]},
            {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
             "metadata": {"name": "web", "namespace": "default"},
             "spec": {"host": HOST, "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1}}}}]


def assignment(push: PushContext, node_id: str = CLIENT, node_locality: str = "") -> dict[str, tuple[str, int]]:
    """address → (endpoint locality, priority) in the client's assignment of `web`."""
    snap = build_snapshot(push, Proxy.from_node_id(node_id, push, node_locality=node_locality)).merged()
    cla = snap[ENDPOINT][CLUSTER]
    return {lb.endpoint.address.socket_address.address:
            ("/".join((lle.locality.region, lle.locality.zone, lle.locality.sub_zone)).rstrip("/"), lle.priority)
            for lle in cla.endpoints for lb in lle.lb_endpoints}


# ---- the rules -------------------------------------------------------------------------------------------------

def test_pod_locality_order():
    node_labels = zone("r1", "z1", "s1")
    assert loc.pod_locality({}, node_labels) == "r1/z1/s1"
    # the pod's istio-locality label wins over its Node (istiod skips the Node lookup then)
    assert loc.pod_locality({loc.ISTIO_LOCALITY_LABEL: "r9.z9"}, node_labels) == "r9/z9"
    # the Node wins over the pod's own topology labels (istiod reads only the Node's)
    assert loc.pod_locality(zone("r5", "z5"), node_labels) == "r1/z1/s1"
    # no Node, or an unlabelled one: the pod's own topology labels (Mizzen's pods without Nodes)
    assert loc.pod_locality(zone("r5", "z5"), None) == "r5/z5"
    assert loc.pod_locality(zone("r5", "z5"), {"kubernetes.io/hostname": "n"}) == "r5/z5"
    assert loc.pod_locality({}, {}) == ""


def test_locality_labels():
    """istiod's GetLocalityLabel: `topology.istio.io/locality` first, then `istio-locality`; dots for slashes."""
    assert loc.from_locality_label({loc.LOCALITY_LABEL: "r1.z1.s1", loc.ISTIO_LOCALITY_LABEL: "r2.z2"}) == "r1/z1/s1"
    assert loc.from_locality_label({loc.ISTIO_LOCALITY_LABEL: "r2.z2"}) == "r2/z2"
    assert loc.from_locality_label(zone("r1", "z1")) == ""  # topology labels are no locality label
    assert loc.pod_locality({loc.LOCALITY_LABEL: "r3.z3"}, zone("r1", "z1")) == "r3/z3"


def test_workload_entry_locality_label_when_no_locality_field():
    objs = [{"apiVersion": "networking.istio.io/v1beta1", "kind": "WorkloadEntry",
             "metadata": {"name": name, "namespace": "default", "labels": {"app": "vm", **labels}},
             "spec": {"address": addr, **spec}}
            for name, addr, labels, spec in (
                ("vm-1", "10.0.0.1", {loc.ISTIO_LOCALITY_LABEL: "r1.z1"}, {}),
                ("vm-2", "10.0.0.2", {loc.ISTIO_LOCALITY_LABEL: "r1.z1"}, {"locality": "r2/z2"}),  # the field wins
                ("vm-3", "10.0.0.3", zone("r3", "z3"), {}))]  # topology labels alone: no locality (istiod)
    objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry",
                 "metadata": {"name": "vms", "namespace": "default"},
                 "spec": {"hosts": ["vm.example"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                          "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                          "workloadSelector": {"labels": {"app": "vm"}}}})
    (svc,) = [s for s in PushContext.from_resources(objs).services if s.hostname == "vm.example"]
    assert {e.address: e.locality for e in svc.endpoints[80]} == {"10.0.0.1": "r1/z1", "10.0.0.2": "r2/z2",
                                                                  "10.0.0.3": ""}


def test_node_labels_and_their_beta_predecessors():
    assert loc.from_node_labels({loc.BETA_REGION_LABEL: "old-r", loc.BETA_ZONE_LABEL: "old-z"}) == "old-r/old-z"
    assert loc.from_node_labels({loc.BETA_REGION_LABEL: "old-r", **zone("r1", "z1")}) == "r1/z1"  # GA first
    assert loc.from_node_labels({loc.SUBZONE_LABEL: "s1"}) == "//s1"
    # a Node's istio-locality label means nothing to istiod
    assert loc.from_node_labels({loc.ISTIO_LOCALITY_LABEL: "r1.z1"}) == ""


def test_envoy_node_locality_both_spellings():
    assert loc.from_node({"region": "r1", "zone": "z1", "subZone": "s1"}) == "r1/z1/s1"  # MessageToDict
    assert loc.from_node({"region": "r1", "sub_zone": "s1"}) == "r1//s1"  # bootstrap JSON
    assert loc.from_node(None) == "" and loc.from_node({}) == ""
    assert loc.as_node("r1/z1") == {"region": "r1", "zone": "z1"}
    assert loc.as_node("") == {}


# ---- endpoints -------------------------------------------------------------------------------------------------

def test_endpoint_locality_from_the_pods_node():
    nodes = [node("node-client", **zone("r1", "z1")), node("node-a", **zone("r1", "z1")),
             node("node-b", **zone("r1", "z2", "s3"))]
    pods = [pod("a", "10.0.0.1", "node-a"), pod("b", "10.0.0.2", "node-b"),
            pod("c", "10.0.0.3", "node-b", **{loc.ISTIO_LOCALITY_LABEL: "r2.z4"}),  # its label beats its Node
            pod("d", "10.0.0.4", "node-missing", **zone("r3", "z1")),  # unknown Node: its own labels
            pod("e", "10.0.0.5", "node-missing")]  # unknown Node and no labels: no locality
    got = assignment(PushContext.from_resources(mesh(nodes, pods)))
    # priorities as Envoy gets them: same zone, same region, elsewhere (the levels present, numbered from 0)
    assert got == {"10.0.0.1": ("r1/z1", 0), "10.0.0.2": ("r1/z2/s3", 1), "10.0.0.3": ("r2/z4", 2),
                   "10.0.0.4": ("r3/z1", 2), "10.0.0.5": ("", 2)}, got


def test_service_entry_selected_pods_take_their_nodes_locality():
    objs = [node("node-a", **zone("r7", "z7")), pod("a", "10.0.0.1", "node-a"),
            {"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry",
             "metadata": {"name": "se", "namespace": "default"},
             "spec": {"hosts": ["se.example"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                      "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                      "workloadSelector": {"labels": {"app": "web"}}}}]
    push = PushContext.from_resources(objs)
    (svc,) = [s for s in push.services if s.hostname == "se.example"]
    assert [e.locality for e in svc.endpoints[80]] == ["r7/z7"]


# ---- the proxy's own locality ----------------------------------------------------------------------------------

def test_proxy_locality_registry_first_then_envoys_node_locality():
    nodes = [node("node-client", **zone("r1", "z1")), node("node-a", **zone("r1", "z1")),
             node("node-b", **zone("r2", "z1"))]
    pods = [pod("a", "10.0.0.1", "node-a"), pod("b", "10.0.0.2", "node-b")]
    push = PushContext.from_resources(mesh(nodes, pods))
    # the client pod's Node says r1/z1; what its Envoy announces does not override the registry
    assert Proxy.from_node_id(CLIENT, push, node_locality="r2/z1").locality == "r1/z1"
    assert assignment(push, node_locality="r2/z1") == {"10.0.0.1": ("r1/z1", 0), "10.0.0.2": ("r2/z1", 1)}
    # a proxy the registry knows nothing about: its node.locality decides
    stranger = "sidecar~10.7.7.7~vm-1.default~default.svc.cluster.local"
    assert Proxy.from_node_id(stranger, push, node_locality="r2/z1").locality == "r2/z1"
    assert assignment(push, stranger, node_locality="r2/z1") == {"10.0.0.1": ("r1/z1", 1), "10.0.0.2": ("r2/z1", 0)}
    # its announced labels come before its node.locality (istiod reads the proxy's labels first)
    labelled = Proxy.from_node_id(stranger, push, metadata={"LABELS": zone("r5", "z5")}, node_locality="r2/z1")
    assert labelled.locality == "r5/z5"
    assert Proxy.from_node_id(stranger, push).locality == ""


def test_node_relabel_is_an_exact_endpoints_only_build():
    """A Node change re-localises its pods' endpoints and its pods' proxies; it reaches no further than EDS, so
    the incremental build (layers carried over) gives what a full build gives."""
    nodes = [node("node-client", **zone("r1", "z1")), node("node-a", **zone("r1", "z1")),
             node("node-b", **zone("r1", "z2"))]
    pods = [pod("a", "10.0.0.1", "node-a"), pod("b", "10.0.0.2", "node-b")]
    objs = mesh(nodes, pods)
    old = PushContext.from_resources(objs, revision=1)
    before = build_snapshot(old, Proxy.from_node_id(CLIENT, old))
    assert assignment(old) == {"10.0.0.1": ("r1/z1", 0), "10.0.0.2": ("r1/z2", 1)}

    def relabel(objects: list[dict], name: str, labels: dict) -> list[dict]:
        out = copy.deepcopy(objects)
        for o in out:
            if o["kind"] == "Node" and o["metadata"]["name"] == name:
                o["metadata"]["labels"] = labels
        return out

    # node-a moves to another region: endpoint a is re-localised
    objs2 = relabel(objs, "node-a", zone("r2", "z1"))
    new = PushContext.from_resources(objs2, revision=2)
    changed = endpoint_only_changes(old, new)
    assert changed == {("Service", "default", "web", HOST)}
    carry_over(old, new, changed)
    after = build_snapshot(new, Proxy.from_node_id(CLIENT, new))
    assert after.layers[0] is before.layers[0]  # outbound layer carried over
    full = PushContext.from_resources(copy.deepcopy(objs2), revision=2)
    assert after.merged() == build_snapshot(full, Proxy.from_node_id(CLIENT, full)).merged()
    assert assignment(new) == {"10.0.0.1": ("r2/z1", 1), "10.0.0.2": ("r1/z2", 0)}  # same region first

    # the client's own Node moves: no endpoint changes, its priorities do
    objs3 = relabel(objs2, "node-client", zone("r2", "z1"))
    newer = PushContext.from_resources(objs3, revision=3)
    assert endpoint_only_changes(new, newer) == set()
    carry_over(new, newer, set())
    assert assignment(newer) == {"10.0.0.1": ("r2/z1", 0), "10.0.0.2": ("r1/z2", 1)}
    full = PushContext.from_resources(copy.deepcopy(objs3), revision=3)
    assert (build_snapshot(newer, Proxy.from_node_id(CLIENT, newer)).merged()
            == build_snapshot(full, Proxy.from_node_id(CLIENT, full)).merged())


# ---- the Node kind ---------------------------------------------------------------------------------------------

def test_node_kind_is_cluster_scoped_core_v1():
    k = kinds.lookup("nodes")
    assert k is kinds.lookup("no") is kinds.lookup("Node") is kinds.BY_KIND["Node"]
    assert not k.namespaced and k.path(name="n1") == "/api/v1/nodes/n1"
    assert kinds.unmodelled_reason("v1", "Node") is None  # modelled now: never skipped


def test_node_validation_names_file_document_and_field():
    docs = [Document("nodes.yaml", 0, node("node-a", **zone("r1", "z1"))),
            Document("nodes.yaml", 1, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"},
                                       "spec": {"podCIDR": "10.0.0.0/24", "podCIDRs": ["10.1.0.0/24", "bogus"],
                                                "taints": [{"key": "k", "effect": "NoSchedule"}, {"value": "x"},
                                                           {"key": "k", "effect": "NoSchedule"}]}}),
            Document("nodes.yaml", 2, node("node-c", **{loc.ZONE_LABEL: "us/east"})),
            Document("nodes.yaml", 3, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "Node_D"}}),
            Document("nodes.yaml", 4, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-e"},
                                       "spec": {"unschedulabel": True}}),
            Document("nodes.yaml", 5, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-f"},
                                       "spec": {"taints": [{"key": "k", "effect": "Sometimes"}]}})]
    ok, errors = check_documents(docs)
    assert ok == []  # an apply is all or nothing
    text = {e.index: str(e) for e in errors}
    assert set(text) == {1, 2, 3, 4, 5}
    assert all(t.startswith(f"nodes.yaml, document {i}: Node ") for i, t in text.items())
    assert 'spec.podCIDRs[1]: Invalid value: "bogus": must be a valid CIDR' in text[1]
    assert 'spec.podCIDRs[0]: Invalid value: "10.1.0.0/24": must be the same as spec.podCIDR' in text[1]
    assert "spec.taints[1].key: Required value" in text[1] and "spec.taints[1].effect: Required value" in text[1]
    assert 'spec.taints[2]: Duplicate value: "k:NoSchedule"' in text[1]
    assert f'metadata.labels[{loc.ZONE_LABEL}]: Invalid value: "us/east"' in text[2]
    assert 'metadata.name: Invalid value: "Node_D"' in text[3]
    assert 'spec.taints[0].effect: Unsupported value: "Sometimes"' in text[5]
    assert 'unknown field "unschedulabel" (did you mean "unschedulable"?)' in text[4]


def test_node_namespace_is_dropped_like_kubectls():
    ok, errors = check_documents([Document("n.yaml", 0, {**node("node-a"), "metadata": {"name": "node-a",
                                                                                       "namespace": "x"}})])
    assert not errors and "namespace" not in ok[0]["metadata"]


@pytest.mark.parametrize(("labels", "roles", "where"), [
    ({**zone("r1", "z1", "s1"), "node-role.kubernetes.io/control-plane": ""}, "control-plane", "r1/z1/s1"),
    ({}, "<none>", "<none>"),
])
def test_kubectl_get_nodes_columns(labels, roles, where):
    t = table(kinds.BY_KIND["Node"], [node("node-a", **labels)], None)
    assert [c["name"] for c in t["columnDefinitions"]] == ["Name", "Roles", "Locality", "Age"]
    assert t["rows"][0]["cells"][:3] == ["node-a", roles, where]


def test_failover_priority_sees_the_nodes_topology_labels():
    """failoverPriority compares labels; istiod adds the locality's topology labels to endpoint and proxy labels,
    so a Node's zone counts though no pod carries it."""
    nodes = [node("node-client", **zone("r1", "z2")), node("node-a", **zone("r1", "z1")),
             node("node-b", **zone("r2", "z2"))]
    objs = mesh(nodes, [pod("a", "10.0.0.1", "node-a"), pod("b", "10.0.0.2", "node-b")])
    objs[-1]["spec"]["trafficPolicy"]["loadBalancer"] = {"localityLbSetting": {"failoverPriority": [loc.ZONE_LABEL]}}
    got = assignment(PushContext.from_resources(objs))
    assert {addr: prio for addr, (_, prio) in got.items()} == {"10.0.0.2": 0, "10.0.0.1": 1}  # same zone first
