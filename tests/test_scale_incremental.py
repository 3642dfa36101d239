"""Incremental translation: after random sequences of endpoint (and other) changes, snapshots built
incrementally (carrying the previous revision's layers over) are byte-identical to a full rebuild."""

from __future__ import annotations

import copy
import random

from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.push_context import PushContext
from mizzen.services.translator.snapshot import build_snapshot, carry_over, endpoint_only_changes

NS = ("a", "b")


def mesh(n: int = 12) -> list[dict]:
    objs: list[dict] = [{"kind": "Namespace", "metadata": {"name": ns}} for ns in NS]
    # namespace b sees only its own services (Sidecar egress scope)
    objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "Sidecar",
                 "metadata": {"name": "default", "namespace": "b"},
                 "spec": {"egress": [{"hosts": ["./*"]}]}})
    for i in range(n):
        ns = NS[i % 2]
        name = f"s{i}"
        headless = i == 5
        objs.append({"kind": "Service", "metadata": {"name": name, "namespace": ns,
                                                     "creationTimestamp": f"2024-01-01T00:00:{i:02d}Z"},
                     "spec": {"clusterIP": "None" if headless else f"10.96.0.{i + 1}", "selector": {"app": name},
                              "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                        {"name": "tcp", "port": 9000, "targetPort": 9000}]}})
        for j in range(2):
            objs.append({"kind": "Pod", "metadata": {"name": f"{name}-{j}", "namespace": ns,
                                                     "labels": {"app": name, "version": f"v{j + 1}",
                                                                "security.istio.io/tlsMode": "istio"}},
                         "spec": {"serviceAccountName": name}, "status": {"podIP": f"10.1.{i}.{j + 1}"}})
        objs.append(endpoints(name, ns, i, [0, 1]))
        if i % 3 == 0:
            objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
                         "metadata": {"name": name, "namespace": ns},
                         "spec": {"host": name, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                            {"name": "v2", "labels": {"version": "v2"}}]}})
    # security policies (inbound layers keyed by policy ids) and an ingress gateway (router views keyed by
    # gateway ids): the incremental path must rebuild those, never reuse a layer under a stale id
    objs.append({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "allow-a", "namespace": "a"},
                 "spec": {"selector": {"matchLabels": {"app": "s0"}},
                          "rules": [{"from": [{"source": {"namespaces": ["a"]}}]}]}})
    objs.append({"kind": "Pod", "metadata": {"name": "ingress-0", "namespace": "a",
                                             "labels": {"istio": "ingressgateway"}},
                 "status": {"podIP": "10.3.0.1"}})
    objs.append({"kind": "Service", "metadata": {"name": "ingress", "namespace": "a"},
                 "spec": {"clusterIP": "10.96.9.9", "selector": {"istio": "ingressgateway"},
                          "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
                 "metadata": {"name": "gw", "namespace": "a"},
                 "spec": {"selector": {"istio": "ingressgateway"},
                          "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}})
    objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
                 "metadata": {"name": "via-gw", "namespace": "a"},
                 "spec": {"hosts": ["*"], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": "s0"}}]}]}})
    objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry",
                 "metadata": {"name": "ext", "namespace": "a"},
                 "spec": {"hosts": ["ext.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                          "resolution": "STATIC", "endpoints": [{"address": "192.0.2.1"}]}})
    return objs


def endpoints(name: str, ns: str, i: int, pods: list[int], extra_ips: list[str] = ()) -> dict:
    addrs = [{"ip": f"10.1.{i}.{j + 1}", "targetRef": {"kind": "Pod", "name": f"{name}-{j}", "namespace": ns}}
             for j in pods]
    addrs += [{"ip": ip} for ip in extra_ips]
    return {"kind": "Endpoints", "metadata": {"name": name, "namespace": ns},
            "subsets": [{"addresses": addrs, "ports": [{"name": "http", "port": 8080},
                                                       {"name": "tcp", "port": 9000}]}] if addrs else []}


def proxies(n: int = 12) -> list[str]:
    return [f"sidecar~10.1.{i}.{j + 1}~s{i}-{j}.{NS[i % 2]}~{NS[i % 2]}.svc.cluster.local"
            for i in range(n) for j in range(2)] + ["router~10.3.0.1~ingress-0.a~a.svc.cluster.local"]


def serialized(push: PushContext, ids: list[str]) -> dict[str, list]:
    out = {}
    for node_id in ids:
        snap = build_snapshot(push, Proxy.from_node_id(node_id, push))
        out[node_id] = [{t: {name: m.SerializeToString(deterministic=True) for name, m in res.items()}
                         for t, res in layer.items()} for layer in snap.layers]
    return out


def mutate(objs: list[dict], rng: random.Random, step: int) -> bool:
    """Change one thing; True if only Endpoints changed."""
    eps = [o for o in objs if o["kind"] == "Endpoints"]
    roll = rng.random()
    if roll < 0.8:
        target = rng.choice(eps)
        i = int(target["metadata"]["name"][1:])
        ns = target["metadata"]["namespace"]
        pods = rng.choice([[0, 1], [0], [1], [0, 1], []])  # [] drops the service account: a full rebuild
        extra = [f"10.2.{step % 250}.{k + 1}" for k in range(rng.randint(0, 2))]
        objs[objs.index(target)] = endpoints(target["metadata"]["name"], ns, i, pods, extra)
        return True
    if roll < 0.9:  # a DestinationRule change: not endpoint-only
        dr = next(o for o in objs if o["kind"] == "DestinationRule")
        dr["spec"] = copy.deepcopy(dr["spec"])
        dr["spec"]["trafficPolicy"] = {"connectionPool": {"tcp": {"maxConnections": step + 1}}}
        return False
    # a Pod relabelled: endpoint labels change through targetRef, not endpoint-only
    pod = rng.choice([o for o in objs if o["kind"] == "Pod"])
    pod["metadata"] = copy.deepcopy(pod["metadata"])
    pod["metadata"]["labels"]["version"] = rng.choice(["v1", "v2", "v3"])
    return False


def test_random_change_sequences_match_full_rebuild():
    ids = proxies()
    for seed in range(4):
        rng = random.Random(seed)
        objs = mesh()
        old = PushContext.from_resources(objs, revision=1)
        serialized(old, ids)
        incremental_steps = 0
        for step in range(25):
            endpoint_only = mutate(objs, rng, step)
            new = PushContext.from_resources(copy.deepcopy(objs), revision=step + 2)
            changed = endpoint_only_changes(old, new) if endpoint_only else None
            if changed is not None:
                carry_over(old, new, changed)
                incremental_steps += 1
            got = serialized(new, ids)
            want = serialized(PushContext.from_resources(copy.deepcopy(objs), revision=step + 2), ids)
            for node_id in ids:
                assert got[node_id] == want[node_id], f"seed {seed} step {step}: {node_id} differs"
            old = new
        assert incremental_steps >= 6  # the sequence really exercised the incremental path


def test_endpoint_change_reuses_layers_and_scopes_eds():
    objs = mesh()
    ids = proxies()
    old = PushContext.from_resources(objs, revision=1)
    before = {i: build_snapshot(old, Proxy.from_node_id(i, old)).layers for i in ids}
    objs2 = [endpoints("s2", "a", 2, [0], ["10.9.9.9"]) if o["kind"] == "Endpoints" and o["metadata"]["name"] == "s2"
             else o for o in objs]
    new = PushContext.from_resources(objs2, revision=2)
    changed = endpoint_only_changes(old, new)
    assert changed == {("Service", "a", "s2", "s2.a.svc.cluster.local")}
    carry_over(old, new, changed)
    for i in ids:
        if i.startswith("router~"):
            continue  # gateway views are keyed by Gateway object ids: always rebuilt
        after = build_snapshot(new, Proxy.from_node_id(i, new)).layers
        assert after[0] is before[i][0]  # outbound layer object carried over, not rebuilt
        if "~s0-" not in i:  # s0's inbound layer is keyed by its AuthorizationPolicy's id: rebuilt
            assert after[2] is before[i][2]  # own (inbound) layer too
        eds_changed = after[1] != before[i][1]
        # namespace a sees s2; namespace b's Sidecar scope hides it: its endpoints layer is untouched
        assert eds_changed == (".a~" in i), i


def test_headless_and_service_account_changes_need_a_full_rebuild():
    objs = mesh()
    old = PushContext.from_resources(objs, revision=1)
    headless = [endpoints("s5", "b", 5, [0]) if o["kind"] == "Endpoints" and o["metadata"]["name"] == "s5" else o
                for o in objs]
    assert endpoint_only_changes(old, PushContext.from_resources(headless, revision=2)) is None
    # an endpoint without targetRef drops the service account: cluster SANs change
    no_sa = [endpoints("s1", "b", 1, [], ["10.1.1.1"]) if o["kind"] == "Endpoints" and o["metadata"]["name"] == "s1"
             else o for o in objs]
    assert endpoint_only_changes(old, PushContext.from_resources(no_sa, revision=2)) is None
