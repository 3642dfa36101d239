"""The registry as a real process against real NATS and Redis: apply, get, delete, revisions, events, errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import nats
import pytest
import redis

from mizzen.services.cli.http import RegistryError, request
from mizzen.services.mesh.stack import Stack

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
BAD_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: default}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
      weight: 30
    - destination: {host: web}
      weight: 30
"""


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    try:
        s.start(services=("registry",))
        yield s
    finally:
        s.stop()


def mizzen(*args: str, stdin: str | None = None, server: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mizzen.services.cli.main", *args, "--server", server],
                          input=stdin, capture_output=True, text=True, timeout=60)


def revision(stack: Stack) -> int:
    return request("GET", stack.registry_url + "/version")["revision"]


def test_apply_get_delete_round_trip(stack, tmp_path):
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICE)
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "service/web created"
    assert revision(stack) == 1
    # applying the same content again changes nothing and bumps no revision
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.stdout.strip() == "service/web unchanged"
    assert revision(stack) == 1
    obj = request("GET", stack.registry_url + "/api/v1/namespaces/default/services/web")
    assert obj["spec"]["clusterIP"] == "10.96.0.10"
    assert obj["metadata"]["resourceVersion"] == "1"
    r = mizzen("get", "svc", "-o", "json", server=stack.registry_url)
    assert [i["metadata"]["name"] for i in json.loads(r.stdout)["items"]] == ["web"]
    r = mizzen("get", "services", server=stack.registry_url)
    assert "web" in r.stdout and "10.96.0.10" in r.stdout and "80/TCP" in r.stdout
    r = mizzen("delete", "svc", "web", server=stack.registry_url)
    assert r.returncode == 0 and 'service "web" deleted' in r.stdout
    assert revision(stack) == 2
    with pytest.raises(RegistryError) as e:
        request("GET", stack.registry_url + "/api/v1/namespaces/default/services/web")
    assert e.value.status == 404


def test_invalid_apply_stores_nothing(stack, tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text(SERVICE + "---\n" + BAD_VS)
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 1
    # the error names the file, the document index, the resource and the field
    assert f"{f}, document 1: VirtualService default/bad: spec.http[0].route" in r.stderr, r.stderr
    assert "nothing was applied" in r.stderr
    assert revision(stack) == 0
    assert request("GET", stack.registry_url + "/api/v1/services")["items"] == []


def test_kubernetes_paths_put_and_list(stack):
    url = stack.registry_url + "/apis/networking.istio.io/v1alpha3/namespaces/default/destinationrules/web"
    dr = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "DestinationRule",
          "metadata": {"name": "web"}, "spec": {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}
    created = request("PUT", url, dr)
    assert created["metadata"]["namespace"] == "default"
    listed = request("GET", stack.registry_url + "/apis/networking.istio.io/v1/namespaces/default/destinationrules")
    assert listed["metadata"]["resourceVersion"] == "1"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web"]
    with pytest.raises(RegistryError) as e:
        request("PUT", url.replace("/web", "/other"), dr)
    assert e.value.status == 400


def test_every_write_is_announced_with_its_revision(stack, tmp_path):
    async def run() -> list[dict]:
        nc = await nats.connect(stack.nats_url)
        got: list[dict] = []
        sub = await nc.subscribe("mizzen.config.changed")
        await nc.flush()  # subscribed before anything is published
        f = tmp_path / "svc.yaml"
        f.write_text(SERVICE)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mizzen.services.cli.main", "apply", "-f", str(f),
                                                    "--server", stack.registry_url)
        await proc.wait()
        msg = await sub.next_msg(timeout=10)
        got.append(json.loads(msg.data))
        await nc.close()
        return got

    events = asyncio.run(run())
    assert events == [{"revision": 1, "keys": ["Service/default/web"]}]


def test_registry_restart_loses_nothing(stack, tmp_path):
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICE)
    assert mizzen("apply", "-f", str(f), server=stack.registry_url).returncode == 0
    stack.restart_service("registry")
    assert request("GET", stack.registry_url + "/api/v1/namespaces/default/services/web")["metadata"]["name"] == "web"
    # and Redis itself restarting (AOF on) keeps the state too
    stack.restart_infra("redis")
    r = redis.Redis.from_url(stack.redis_url)
    assert r.hexists("config:objects", "Service/default/web")
    assert int(r.get("config:rev")) == 1
    r.close()


MIXED = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec: {replicas: 1}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: default}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: web-cert, namespace: default}
---
""" + SERVICE + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}]}]
"""


def test_apply_skips_kinds_mizzen_does_not_model_and_reports_them(stack, tmp_path):
    f = tmp_path / "app.yaml"
    f.write_text(MIXED)
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[:2] == ["service/web created", "virtualservice.networking.istio.io/web created"]
    assert lines[2] == f"deployment.apps/web skipped (Mizzen does not model Deployment; {f}, document 0)"
    assert lines[3] == f"serviceaccount/web skipped (Mizzen does not model ServiceAccount; {f}, document 1)"
    assert lines[4] == (f"certificate.cert-manager.io/web-cert skipped (Mizzen does not model cert-manager.io kinds; "
                        f"{f}, document 2)")
    assert len(lines) == 5
    assert revision(stack) == 1
    with pytest.raises(RegistryError) as e:
        request("GET", stack.registry_url + "/apis/apps/v1/namespaces/default/deployments/web")
    assert e.value.status == 404


@pytest.mark.parametrize("api_version, kind, hint", [
    ("networking.istio.io/v1", "VirtualServce", "did you mean 'VirtualService'?"),
    ("security.istio.io/v1", "PeerAuthentcation", "did you mean 'PeerAuthentication'?"),
    ("v1", "Servce", "did you mean 'Service'?"),
])
def test_a_typo_in_a_mesh_kind_is_still_an_error_and_nothing_is_stored(stack, tmp_path, api_version, kind, hint):
    f = tmp_path / "typo.yaml"
    f.write_text(MIXED + f"---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x, namespace: default}}\n")
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 1
    assert f"typo.yaml, document 5: {kind} default/x: kind: unknown kind '{kind}' ({hint})" in r.stderr
    assert "nothing was applied" in r.stderr
    assert revision(stack) == 0


UNTRANSLATED_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 10s}}
    tls: {mode: SIMPLE, insecureSkipVerify: true}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {retryBudget: {percent: 20}}
"""


def test_apply_stores_current_istio_fields_it_does_not_translate_and_warns_naming_each(stack, tmp_path):
    f = tmp_path / "dr.yaml"
    f.write_text(UNTRANSLATED_DR)
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "destinationrule.networking.istio.io/web created"
    head = f"warning: {f}, document 0: DestinationRule default/web: "
    tail = ": accepted but not translated by Mizzen yet: Envoy will not apply it"
    assert r.stderr.splitlines() == [head + p + tail for p in (
        "spec.trafficPolicy.loadBalancer.warmup", "spec.trafficPolicy.tls.insecureSkipVerify",
        "spec.subsets[0].trafficPolicy.retryBudget")]
    stored = request("GET", stack.registry_url + "/apis/networking.istio.io/v1/namespaces/default/destinationrules/web")
    assert stored["spec"]["trafficPolicy"]["loadBalancer"]["warmup"] == {"duration": "10s"}
    # an unknown field is still an error
    f.write_text(UNTRANSLATED_DR.replace("insecureSkipVerify", "insecureSkipVerfy"))
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 1 and 'spec.trafficPolicy.tls.insecureSkipVerfy: unknown field "insecureSkipVerfy"' in r.stderr


ANALYSED = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: web, image: web}]}
status: {podIP: 10.1.0.5}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec:
  selector: {matchLabels: {app: wbe}}
  rules: [{from: [{source: {namespaces: [shop, frontent]}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-old, namespace: shop}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}]}]
"""
SECOND = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec: {rules: [{}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-web-new, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  http: [{route: [{destination: {host: web}}]}]
"""


def test_apply_prints_analysis_warnings_and_stores_the_objects(stack, tmp_path):
    f = tmp_path / "first.yaml"
    f.write_text(ANALYSED)
    r = mizzen("apply", "-f", str(f), server=stack.registry_url)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"warning: {f}, document 2: AuthorizationPolicy shop/typo: spec.selector.matchLabels: [IST0127] No matching "
        "workloads for this resource with the following labels: app=wbe (in namespace 'shop')",
        f"warning: {f}, document 2: AuthorizationPolicy shop/typo: spec.rules[0].from[0].source.namespaces[1]: "
        '[IST0101] Referenced namespace not found: "frontent"']
    time.sleep(1.1)  # creation times have whole seconds: the second apply is younger even though `a-…` sorts first
    g = tmp_path / "second.yaml"
    g.write_text(SECOND)
    r = mizzen("apply", "-f", str(g), server=stack.registry_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["authorizationpolicy.security.istio.io/allow-all created",
                                     "virtualservice.networking.istio.io/a-web-new created"]
    assert r.stderr.splitlines() == [
        f"warning: {g}, document 0: AuthorizationPolicy shop/allow-all: spec.rules[0]: [MZN0002] a second ALLOW-all "
        "policy: AuthorizationPolicy shop/allow-web already allows every request to workloads {app=web}; this "
        "empty rule adds nothing",
        f"warning: {g}, document 1: VirtualService shop/a-web-new: spec.hosts[0]: [IST0109] The VirtualServices "
        "shop/a-web-new,shop/web-old associated with mesh gateway define the same host web.shop.svc.cluster.local "
        "which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a "
        "single resource. The oldest, shop/web-old, serves the host; shop/a-web-new's routes for it are ignored."]
    # stored, with the findings in status.validationMessages as Istio's analysis writes them
    vs = request("GET", stack.registry_url + "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/a-web-new")
    msg = vs["status"]["validationMessages"]
    assert [(m["type"], m["level"]) for m in msg] == [
        ({"code": "IST0109", "name": "ConflictingMeshGatewayVirtualServiceHosts"}, "WARNING")]
    assert msg[0]["description"].startswith("spec.hosts[0]: The VirtualServices shop/a-web-new,shop/web-old")
    assert revision(stack) == 2
