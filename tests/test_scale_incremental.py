"""Incremental translation: after random sequences of endpoint, VirtualService, DestinationRule (and other)
changes, snapshots built incrementally (carrying the previous revision's layers or their unchanged parts over)
are byte-identical to a full rebuild."""

from __future__ import annotations

import copy
import random

from mizzen.services.mesh.xds_types import CLUSTER, LISTENER, ROUTE
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.push_context import PushContext
from mizzen.services.translator.snapshot import (
    build_snapshot,
    carry_over,
    endpoint_only_changes,
    reuse_previous,
)

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


def mutate(objs: list[dict], rng: random.Random, step: int) -> set[str]:
    """Change one thing; the kinds changed (what the translator learns from the change event's keys)."""
    eps = [o for o in objs if o["kind"] == "Endpoints"]
    roll = rng.random()
    if roll < 0.65:
        target = rng.choice(eps)
        i = int(target["metadata"]["name"][1:])
        ns = target["metadata"]["namespace"]
        pods = rng.choice([[0, 1], [0], [1], [0, 1], []])  # [] drops the service account: a full rebuild
        extra = [f"10.2.{step % 250}.{k + 1}" for k in range(rng.randint(0, 2))]
        objs[objs.index(target)] = endpoints(target["metadata"]["name"], ns, i, pods, extra)
        return {"Endpoints"}
    if roll < 0.75:  # a DestinationRule change: not endpoint-only
        dr = next(o for o in objs if o["kind"] == "DestinationRule")
        dr["spec"] = copy.deepcopy(dr["spec"])
        dr["spec"]["trafficPolicy"] = {"connectionPool": {"tcp": {"maxConnections": step + 1}}}
        return {"DestinationRule"}
    # a Pod relabelled: its endpoints' labels (subsets, locality) change through targetRef, and so do the
    # proxy's own labels (Service selection, sourceLabels, policy selectors)
    pod = rng.choice([o for o in objs if o["kind"] == "Pod" and o["metadata"]["name"] != "ingress-0"])
    pod["metadata"] = copy.deepcopy(pod["metadata"])
    labels = pod["metadata"]["labels"]
    what = rng.choice(["version", "version", "zone", "app", "team"])
    if what == "version":
        labels["version"] = rng.choice(["v1", "v2", "v3"])
    elif what == "zone":
        labels["topology.kubernetes.io/region"] = "r1"
        labels["topology.kubernetes.io/zone"] = rng.choice(["z1", "z2"])
    elif what == "app":  # out of (or back into) its Service's selector
        labels["app"] = rng.choice([labels["app"], "stray"])
    else:
        labels["team"] = rng.choice(["x", "y"])
    return {"Pod"}


def test_random_change_sequences_match_full_rebuild():
    ids = proxies()
    for seed in range(4):
        rng = random.Random(seed)
        objs = mesh()
        old = PushContext.from_resources(objs, revision=1)
        serialized(old, ids)
        incremental_steps = 0
        pod_steps = 0
        for step in range(25):
            kinds = mutate(objs, rng, step)
            new = PushContext.from_resources(copy.deepcopy(objs), revision=step + 2)
            kind = reuse_previous(old, new, kinds)
            incremental_steps += kind == "endpoints"
            pod_steps += kind == "endpoints" and kinds == {"Pod"}
            got = serialized(new, ids)
            want = serialized(PushContext.from_resources(copy.deepcopy(objs), revision=step + 2), ids)
            for node_id in ids:
                assert got[node_id] == want[node_id], f"seed {seed} step {step} ({kinds}, {kind}): {node_id} differs"
            old = new
        assert incremental_steps >= 6  # the sequence really exercised the incremental path
        assert pod_steps >= 1  # Pod relabels too


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


# ---------------------------------------------------------------- VirtualService / DestinationRule changes
VS, DR = "VirtualService", "DestinationRule"


def _host(rng: random.Random, n: int = 12) -> tuple[str, str]:
    # mostly a few hosts without a DestinationRule of their own, so random rules and routes meet
    i = rng.choice([1, 2, 4, 7]) if rng.random() < 0.7 else rng.randrange(n)
    return f"s{i}", NS[i % 2]


def random_vs(rng: random.Random, name: str, ns: str) -> dict:
    """A VirtualService in `ns` with random hosts, routes, matches, exportTo and gateways."""
    host, hns = _host(rng)
    fq = f"{host}.{hns}.svc.cluster.local"
    hosts = rng.choice([[fq], [fq, f"s{rng.randrange(12)}.{hns}.svc.cluster.local"], [f"*.{hns}.svc.cluster.local"],
                        [host] if hns == ns else [fq]])
    other, ons = _host(rng)
    dest = rng.choice([fq, f"{other}.{ons}.svc.cluster.local"])
    w = rng.choice([0, 10, 50, 100])
    http = [{"route": [{"destination": {"host": dest, "subset": "v1"}, "weight": w},
                       {"destination": {"host": dest, "subset": "v2"}, "weight": 100 - w}]}]
    if rng.random() < 0.4:
        match = rng.choice([{"headers": {"x-canary": {"exact": "1"}}}, {"sourceLabels": {"version": "v1"}},
                            {"uri": {"prefix": "/api"}}, {"port": 80}])
        http.insert(0, {"match": [match], "route": [{"destination": {"host": dest}}], "timeout": "3s"})
    spec: dict = {"hosts": hosts, "http": http}
    if rng.random() < 0.3:  # tcp routes reach the listeners
        spec["tcp"] = [{"match": [{"port": 9000}], "route": [{"destination": {"host": dest, "port": {"number": 9000}}}]}]
    if rng.random() < 0.3:
        spec["exportTo"] = [rng.choice([".", "*", "a", "b"])]
    if rng.random() < 0.2:
        spec["gateways"] = rng.choice([["gw"], ["gw", "mesh"], ["mesh"]])
    if rng.random() < 0.15:  # a root delegating to a VirtualService without hosts
        spec["http"] = [{"match": [{"uri": {"prefix": "/d"}}], "delegate": {"name": "delegate", "namespace": "a"}}]
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": VS, "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def random_dr(rng: random.Random, name: str, ns: str) -> dict:
    host, hns = _host(rng)
    spec: dict = {"host": f"{host}.{hns}.svc.cluster.local" if hns != ns or rng.random() < 0.5 else host,
                  "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
    if rng.random() < 0.5:
        spec["subsets"].append({"name": "v2", "labels": {"version": "v2"},
                                "trafficPolicy": {"loadBalancer": rng.choice([
                                    {"simple": "LEAST_CONN"}, {"consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"}}}])}})
    tp: dict = {}
    if rng.random() < 0.4:
        tp["tls"] = {"mode": rng.choice(["ISTIO_MUTUAL", "DISABLE", "SIMPLE"])}
    if rng.random() < 0.3:
        tp["loadBalancer"] = {"consistentHash": {"httpHeaderName": "x-user"}}
    if rng.random() < 0.3:
        tp["connectionPool"] = {"tcp": {"maxConnections": rng.randint(1, 99)}}
    if tp:
        spec["trafficPolicy"] = tp
    if rng.random() < 0.3:
        spec["exportTo"] = [rng.choice([".", "*", "a", "b"])]
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": DR, "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def delegate_vs(rng: random.Random) -> dict:
    host, hns = _host(rng)
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": VS, "metadata": {"name": "delegate", "namespace": "a"},
            "spec": {"http": [{"match": [{"uri": {"prefix": "/d/x"}}],
                               "route": [{"destination": {"host": f"{host}.{hns}.svc.cluster.local"}}]}]}}


def mutate_routing(objs: list[dict], rng: random.Random, step: int) -> set[str]:
    """Change one thing (mostly VirtualServices and DestinationRules); the kinds changed."""
    roll = rng.random()
    if roll < 0.1:  # an endpoint change, or a Pod relabel / DR policy tweak (those build `full`)
        return mutate(objs, rng, step)
    kind = VS if roll < 0.6 else DR
    mine = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] != "via-gw"]
    action = rng.choice(["create", "update", "delete"]) if mine else "create"
    if kind == VS and rng.random() < 0.1:
        d = delegate_vs(rng)
        objs[:] = [o for o in objs if not (o["kind"] == VS and o["metadata"]["name"] == "delegate")] + [d]
        return {VS}
    if action == "delete":
        objs.remove(rng.choice(mine))
    elif action == "update":
        target = rng.choice(mine)
        meta = target["metadata"]
        make = random_vs if kind == VS else random_dr
        obj = {**make(rng, meta["name"], meta["namespace"]), "metadata": meta}
        if kind == DR and rng.random() < 0.6:  # same host, other policy or subsets
            obj["spec"]["host"] = target["spec"]["host"]
        objs[objs.index(target)] = obj
    else:
        ns = rng.choice(NS)
        make = random_vs if kind == VS else random_dr
        obj = make(rng, f"r{step}", ns)
        obj["metadata"]["creationTimestamp"] = f"2024-02-01T00:{step // 60:02d}:{step % 60:02d}Z"
        objs.append(obj)
    return {kind}


def test_random_routing_changes_match_full_rebuild():
    ids = proxies()
    kinds_seen: dict[str, int] = {}
    for seed in range(5):
        rng = random.Random(100 + seed)
        objs = mesh()
        old = PushContext.from_resources(copy.deepcopy(objs), revision=1)
        serialized(old, ids)
        for step in range(30):
            kinds = mutate_routing(objs, rng, step)
            new = PushContext.from_resources(copy.deepcopy(objs), revision=step + 2)
            kind = reuse_previous(old, new, kinds)
            kinds_seen[kind] = kinds_seen.get(kind, 0) + 1
            got = serialized(new, ids)
            want = serialized(PushContext.from_resources(copy.deepcopy(objs), revision=step + 2), ids)
            for node_id in ids:
                assert got[node_id] == want[node_id], f"seed {seed} step {step} ({kinds}, {kind}): {node_id} differs"
            old = new
    assert kinds_seen.get("routing", 0) >= 100, kinds_seen


def _vs(name: str, ts: str, spec: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": VS,
            "metadata": {"name": name, "namespace": "a", "creationTimestamp": ts}, "spec": spec}


def test_source_label_selectors_shifting_under_one_view_key_rebuild_listeners():
    """Views are keyed by which `sourceLabels` selectors a proxy matches, by position: when a change reorders
    the selectors, one key can name other proxies than before, so nothing built under it may be reused."""
    http_v1 = _vs("http-v1", "2024-03-01T00:00:01Z", {"hosts": ["s2"], "http": [
        {"match": [{"sourceLabels": {"version": "v1"}}], "route": [{"destination": {"host": "s4"}}]},
        {"route": [{"destination": {"host": "s2"}}]}]})
    tcp_v2 = _vs("tcp-v2", "2024-03-01T00:00:02Z", {"hosts": ["s2"], "tcp": [
        {"match": [{"sourceLabels": {"version": "v2"}}], "route": [{"destination": {"host": "s4"}}]}]})
    http_s0 = _vs("http-s0", "2024-03-01T00:00:03Z", {"hosts": ["s4"], "http": [
        {"match": [{"sourceLabels": {"app": "s0"}}], "route": [{"destination": {"host": "s2"}}]},
        {"route": [{"destination": {"host": "s4"}}]}]})
    ids = proxies()
    before = mesh() + [http_v1, tcp_v2]
    after = mesh() + [tcp_v2, http_s0]  # selectors [v1, v2] → [v2, app=s0]: (True, False) changes meaning
    old = PushContext.from_resources(copy.deepcopy(before), revision=1)
    serialized(old, ids)
    new = PushContext.from_resources(copy.deepcopy(after), revision=2)
    assert reuse_previous(old, new, {VS}) == "routing"
    got = serialized(new, ids)
    want = serialized(PushContext.from_resources(copy.deepcopy(after), revision=2), ids)
    for node_id in ids:
        assert got[node_id] == want[node_id], node_id


def test_virtual_service_change_rebuilds_only_routes_where_seen():
    """An HTTP route change in namespace a: a's sidecars keep their cluster and listener objects and get new
    routes; b's sidecars (their Sidecar hides a's services) keep the whole outbound layer object."""
    objs = mesh()
    ids = [i for i in proxies() if i.startswith("sidecar~")]
    old = PushContext.from_resources(copy.deepcopy(objs), revision=1)
    before = {i: build_snapshot(old, Proxy.from_node_id(i, old)).layers for i in ids}
    objs.append(_vs("canary", "2024-03-01T00:00:01Z", {"hosts": ["s0"], "http": [
        {"route": [{"destination": {"host": "s0", "subset": "v1"}, "weight": 0},
                   {"destination": {"host": "s0", "subset": "v2"}, "weight": 100}]}]}))
    new = PushContext.from_resources(copy.deepcopy(objs), revision=2)
    assert reuse_previous(old, new, {VS}) == "routing"
    for i in ids:
        after = build_snapshot(new, Proxy.from_node_id(i, new)).layers
        if ".b~" in i:
            assert after[0] is before[i][0], i
        else:
            assert after[0] is not before[i][0], i
            assert after[0][CLUSTER] is before[i][0][CLUSTER] and after[0][LISTENER] is before[i][0][LISTENER], i
            assert after[0][ROUTE] != before[i][0][ROUTE], i
        assert after[1] is before[i][1], i  # endpoints layer carried
        if "~s0-" not in i:  # s0's inbound layer is keyed by its AuthorizationPolicy's id: rebuilt
            assert after[2] is before[i][2], i


def test_destination_rule_policy_change_keeps_routes_and_listeners():
    """A connection-pool change reaches the clusters (outbound and, for the host's own pods, inbound) only."""
    objs = mesh()
    ids = [i for i in proxies() if i.startswith("sidecar~")]
    old = PushContext.from_resources(copy.deepcopy(objs), revision=1)
    before = {i: build_snapshot(old, Proxy.from_node_id(i, old)).layers for i in ids}
    dr = next(o for o in objs if o["kind"] == DR and o["metadata"]["name"] == "s6")
    dr["spec"]["trafficPolicy"] = {"connectionPool": {"tcp": {"maxConnections": 7}}}
    new = PushContext.from_resources(copy.deepcopy(objs), revision=2)
    assert reuse_previous(old, new, {DR}) == "routing"
    for i in ids:
        after = build_snapshot(new, Proxy.from_node_id(i, new)).layers
        assert after[0][LISTENER] is before[i][0][LISTENER] and after[0][ROUTE] is before[i][0][ROUTE], i
        assert (after[0][CLUSTER] is before[i][0][CLUSTER]) == (".b~" in i), i  # b's Sidecar hides a/s6
        assert (after[2] is before[i][2]) == ("~s6-" not in i and "~s0-" not in i), i


def test_subset_consistent_hash_change_reaches_routes():
    """Routes read a subset's consistent-hash key (Istio's hash policy per destination): a rule change that
    touches only that must rebuild the routes of the proxies that see the host, and nothing else."""
    def rule(header: str) -> dict:
        return {"apiVersion": "networking.istio.io/v1beta1", "kind": DR,
                "metadata": {"name": "s1", "namespace": "b"},
                "spec": {"host": "s1", "subsets": [
                    {"name": "v2", "labels": {"version": "v2"},
                     "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": header}}}}]}}
    route = {"apiVersion": "networking.istio.io/v1beta1", "kind": VS, "metadata": {"name": "s1", "namespace": "b"},
             "spec": {"hosts": ["s1"], "http": [{"route": [{"destination": {"host": "s1", "subset": "v2"}}]}]}}
    ids = proxies()
    old = PushContext.from_resources(mesh() + [route, rule("x-a")], revision=1)
    before = {i: build_snapshot(old, Proxy.from_node_id(i, old)).layers for i in ids}
    new = PushContext.from_resources(mesh() + [route, rule("x-b")], revision=2)
    assert reuse_previous(old, new, {DR}) == "routing"
    got = serialized(new, ids)
    assert got == serialized(PushContext.from_resources(mesh() + [route, rule("x-b")], revision=2), ids)
    for i in ids:
        if i.startswith("sidecar~"):
            after = build_snapshot(new, Proxy.from_node_id(i, new)).layers
            assert after[0][LISTENER] is before[i][0][LISTENER], i
            assert after[0][ROUTE] != before[i][0][ROUTE], i  # both namespaces see b/s1
