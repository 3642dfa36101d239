"""Analysis warnings (validation/analysis.py): each finding, its code, field and wording, and when it stays quiet."""

from __future__ import annotations

import yaml

from mizzen.services.mesh.validation.analysis import analyze, needed_kinds


def objs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def found(applied: str, stored: str = "", now: str = "2026-01-02T00:00:00Z") -> list[tuple[str, str, str]]:
    """(code, field, message) of every finding for the applied objects."""
    out = analyze(objs(applied), objs(stored), now=now)
    return [(f.code, f.path, f.message) for fs in out.values() for f in fs]


PODS = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: legacy}
spec: {address: 10.0.0.9, labels: {app: billing}}
---
apiVersion: v1
kind: Namespace
metadata: {name: empty}
"""


def ap(name: str, ns: str, spec: str, created: str = "") -> str:
    ts = f", creationTimestamp: '{created}'" if created else ""
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}{ts}}}\nspec: {spec}\n---\n")


def test_only_the_kinds_analysed_read_the_store():
    assert needed_kinds(objs(PODS)) == set()
    assert "Pod" in needed_kinds(objs(ap("a", "shop", "{}")))
    assert needed_kinds(objs("kind: VirtualService\nmetadata: {name: v}")) == {"VirtualService"}


# ------------------------------------------------------------------------------------ IST0127
def test_selector_matching_no_workload_warns_with_istios_message():
    assert found(ap("p", "shop", "{selector: {matchLabels: {app: web, version: v2}}}"), PODS) == [
        ("IST0127", "spec.selector.matchLabels",
         "No matching workloads for this resource with the following labels: app=web,version=v2 "
         "(in namespace 'shop')")]


def test_selector_matching_a_pod_or_a_workload_entry_is_quiet():
    assert found(ap("p", "shop", "{selector: {matchLabels: {app: web}}}"), PODS) == []
    assert found(ap("p", "legacy", "{selector: {matchLabels: {app: billing}}}"), PODS) == []


def test_selector_matches_only_in_the_policy_namespace():
    assert [c for c, _, _ in found(ap("p", "legacy", "{selector: {matchLabels: {app: web}}}"), PODS)] == ["IST0127"]


def test_namespace_wide_policy_in_a_namespace_without_workloads_warns():
    assert found(ap("p", "empty", "{action: DENY, rules: [{}]}"), PODS) == [
        ("IST0127", "metadata.namespace", "No matching workloads for this resource with the following labels: "
                                          "(none: no workload in namespace 'empty')")]
    assert found(ap("p", "shop", "{action: DENY, rules: [{}]}"), PODS) == []


def test_root_namespace_policy_is_mesh_wide():
    assert found(ap("p", "istio-system", "{}"), PODS) == []  # selectorless: every workload of the mesh
    assert found(ap("p", "istio-system", "{selector: {matchLabels: {app: billing}}}"), PODS) == []
    assert [c for c, _, _ in found(ap("p", "istio-system", "{selector: {matchLabels: {app: nope}}}"), PODS)] == [
        "IST0127"]


def test_a_pod_applied_with_its_policy_counts():
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: new, labels: {app: api}}\n---\n"
    assert found(pod + ap("p", "new", "{selector: {matchLabels: {app: api}}}")) == []


def test_gateway_targeted_policy_is_not_checked_against_pods():
    assert found(ap("p", "empty", "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]}"),
                 PODS) == []


# ------------------------------------------------------------------------------------ IST0101
def test_source_namespace_that_does_not_exist_warns_naming_the_entry():
    spec = ("{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [a]}}, "
            "{source: {namespaces: [shop, shpo, 'leg*', '*acy'], notNamespaces: [gone]}}]}]}")
    assert found(ap("p", "shop", spec), PODS) == [
        ("IST0101", "spec.rules[0].from[1].source.namespaces[1]", 'Referenced namespace not found: "shpo"'),
        ("IST0101", "spec.rules[0].from[1].source.notNamespaces[0]", 'Referenced namespace not found: "gone"')]


def test_namespace_object_without_workloads_exists():
    spec = "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [empty, '*']}}]}]}"
    assert found(ap("p", "shop", spec), PODS) == []


# ------------------------------------------------------------------------------------ MZN0002
def test_second_allow_all_policy_on_the_same_workload_warns_naming_the_first():
    first = ap("allow-web", "shop", "{selector: {matchLabels: {app: web}}, rules: [{}]}", "2026-01-01T00:00:00Z")
    second = ap("allow-all", "shop", "{rules: [{to: [{operation: {methods: [GET]}}]}, {}]}")
    assert found(second, PODS + first) == [
        ("MZN0002", "spec.rules[1]", "a second ALLOW-all policy: AuthorizationPolicy shop/allow-web already allows "
                                     "every request to workloads {app=web,version=v1}; this empty rule adds nothing")]


def test_allow_all_policies_with_the_same_scope_conflict_without_workloads():
    first = ap("one", "new", "{selector: {matchLabels: {app: x}}, rules: [{}]}", "2026-01-01T00:00:00Z")
    got = found(ap("two", "new", "{selector: {matchLabels: {app: x}}, rules: [{}]}"), first)
    assert [(c, p) for c, p, _ in got] == [("IST0127", "spec.selector.matchLabels"), ("MZN0002", "spec.rules[0]")]
    assert "AuthorizationPolicy new/one already allows every request to the same workloads" in got[1][2]


def test_allow_all_beside_other_policies_is_quiet():
    others = (ap("deny-all", "shop", "{action: DENY, rules: [{}]}")  # DENY, not ALLOW
              + ap("allow-get", "shop", "{rules: [{to: [{operation: {methods: [GET]}}]}]}")  # not all
              + ap("allow-nothing", "shop", "{}")  # no rules: allows nothing
              + ap("allow-other", "shop", "{selector: {matchLabels: {app: other}}, rules: [{}]}")  # other workload
              + ap("allow-legacy", "legacy", "{rules: [{}]}"))  # other namespace
    assert found(ap("allow-all", "shop", "{rules: [{}]}"), PODS + others) == []


def test_mesh_wide_allow_all_overlaps_a_namespace_one():
    root = ap("root-allow", "istio-system", "{rules: [{}]}", "2026-01-01T00:00:00Z")
    assert [c for c, _, _ in found(ap("ns-allow", "legacy", "{rules: [{}]}"), PODS + root)] == ["MZN0002"]


# ------------------------------------------------------------------------------------ IST0109 / MZN0003
def vs(name: str, ns: str, spec: str, created: str = "") -> str:
    ts = f", creationTimestamp: '{created}'" if created else ""
    return (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: {name}, namespace: {ns}{ts}}}\nspec: {spec}\n---\n")


def test_two_mesh_virtual_services_for_one_host_name_the_older_as_winner():
    older = vs("z-old", "shop", "{hosts: [web.shop.svc.cluster.local], http: [{route: [{destination: {host: web}}]}]}",
               "2026-01-01T00:00:00Z")
    newer = vs("a-new", "shop", "{hosts: [api, web], http: [{route: [{destination: {host: web}}]}]}")
    got = found(newer, older)
    assert got == [("IST0109", "spec.hosts[1]",
                    "The VirtualServices shop/a-new,shop/z-old associated with mesh gateway define the same host "
                    "web.shop.svc.cluster.local which can lead to undefined behavior. This can be fixed by merging "
                    "the conflicting VirtualServices into a single resource. The oldest, shop/z-old, serves the "
                    "host; shop/a-new's routes for it are ignored.")]
    # re-applying the older one (it keeps its creation time) names the same winner
    again = found(older, newer.replace("shop}", "shop, creationTimestamp: '2026-01-01T00:00:05Z'}"))
    assert "The oldest, shop/z-old, serves the host; shop/a-new's routes" in again[0][2]


def test_same_creation_time_is_decided_by_name():
    a = vs("a", "shop", "{hosts: [web]}", "2026-01-01T00:00:00Z")
    b = vs("b", "shop", "{hosts: [web]}", "2026-01-01T00:00:00Z")
    assert "The oldest, shop/a, serves the host; shop/b's" in found(b, a)[0][2]


def test_virtual_services_that_do_not_share_a_proxy_are_quiet():
    a = vs("a", "shop", "{hosts: [web], exportTo: ['.']}", "2026-01-01T00:00:00Z")
    assert found(vs("b", "other", "{hosts: [web.shop.svc.cluster.local], exportTo: ['.']}"), a) == []
    assert found(vs("b", "shop", "{hosts: [api]}"), a) == []  # other host
    assert found(vs("b", "shop", "{hosts: [web], gateways: [edge/gw]}"), a) == []  # other gateway
    # exported to everyone: it meets a's host in shop
    assert [c for c, _, _ in found(vs("b", "other", "{hosts: [web.shop.svc.cluster.local]}"), a)] == ["IST0109"]


def test_two_virtual_services_for_one_host_on_a_named_gateway_say_routes_merge():
    a = vs("a", "edge", "{hosts: [shop.example.com], gateways: [gw, mesh]}", "2026-01-01T00:00:00Z")
    got = found(vs("b", "edge", "{hosts: [shop.example.com], gateways: [edge/gw]}"), a)
    assert got == [("MZN0003", "spec.hosts[0]",
                    "VirtualServices edge/a,edge/b both bind host shop.example.com to gateway edge/gw: their routes "
                    "are merged, edge/a's (the oldest) first, so a route of edge/b matching the same requests is "
                    "never used.")]


# ------------------------------------------------------------------------------------ MZN0004
def dr(name: str, ns: str, spec: str, created: str = "") -> str:
    ts = f", creationTimestamp: '{created}'" if created else ""
    return (f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: {name}, namespace: {ns}{ts}}}\nspec: {spec}\n---\n")


def test_second_destination_rule_for_a_host_names_what_the_merge_ignores():
    a = dr("a", "shop", "{host: web, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}, subsets: [{name: v1, labels: {v: '1'}}]}",
           "2026-01-01T00:00:00Z")
    b = dr("b", "shop", "{host: web.shop.svc.cluster.local, trafficPolicy: {tls: {mode: DISABLE}}, "
                        "subsets: [{name: v2, labels: {v: '2'}}, {name: v1, labels: {v: x}}]}")
    assert found(b, a) == [
        ("MZN0004", "spec.host", "DestinationRules shop/a, shop/b (oldest first) all set host "
                                 "web.shop.svc.cluster.local: they are merged into one (also defined by shop/a)"),
        ("MZN0004", "spec.trafficPolicy", "ignored: the older DestinationRule shop/a for host "
                                          "web.shop.svc.cluster.local sets trafficPolicy"),
        ("MZN0004", "spec.subsets[1]", "ignored: subset 'v1' of host web.shop.svc.cluster.local is already defined "
                                       "by the older DestinationRule shop/a")]
    # the older one, re-applied, hears only of the merge
    assert [(c, p) for c, p, _ in found(a, b.replace("shop}", "shop, creationTimestamp: '2026-01-01T00:00:09Z'}"))] == [
        ("MZN0004", "spec.host")]


def test_destination_rules_in_other_namespaces_or_with_selectors_are_not_merged():
    a = dr("a", "shop", "{host: web.shop.svc.cluster.local}", "2026-01-01T00:00:00Z")
    assert found(dr("b", "other", "{host: web.shop.svc.cluster.local}"), a) == []
    assert found(dr("b", "shop", "{host: web, workloadSelector: {matchLabels: {app: x}}}"), a) == []
    assert found(dr("b", "shop", "{host: api}"), a) == []
