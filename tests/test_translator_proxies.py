"""Which proxies get a snapshot: injected Pods as sidecars, gateway Pods as routers, opted-out Pods none."""

from mizzen.services.translator.proxies import pod_node_ids


def pod(name, ip, labels=None, annotations=None, host_network=False):
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "ns", "labels": labels or {},
                                         "annotations": annotations or {}},
            "spec": {"hostNetwork": host_network}, "status": {"podIP": ip} if ip else {}}


def test_node_ids_per_pod_kind():
    objs = [
        pod("app", "10.0.0.1"),
        pod("istiod", "10.0.0.2", annotations={"sidecar.istio.io/inject": "false"}),
        pod("ingress", "10.0.0.3", labels={"istio": "ingressgateway"}),
        pod("custom-gw", "10.0.0.4", labels={"app": "edge"}),
        pod("pending", None),
        pod("node-agent", "10.0.0.6", host_network=True),
        {"kind": "Gateway", "metadata": {"name": "g", "namespace": "ns"}, "spec": {"selector": {"app": "edge"}}},
    ]
    assert pod_node_ids(objs) == [
        "sidecar~10.0.0.1~app.ns~ns.svc.cluster.local",
        "router~10.0.0.3~ingress.ns~ns.svc.cluster.local",
        "router~10.0.0.4~custom-gw.ns~ns.svc.cluster.local",
    ]
