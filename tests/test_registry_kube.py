"""Kubernetes ingestion: the registry lists and watches a Kubernetes-semantics API server (tests/kubeapi.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from mizzen.services.cli.http import RegistryError, request
from mizzen.services.mesh.stack import Stack
from tests.kubeapi import FakeKubeAPI


def svc(name: str, ip: str, port: int = 80) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [{"name": "http", "port": port}]},
            "status": {"loadBalancer": {}}}


async def get_service(stack: Stack, name: str) -> dict | None:
    try:
        return await asyncio.to_thread(request, "GET", f"{stack.registry_url}/api/v1/namespaces/default/services/{name}")
    except RegistryError as e:
        if e.status == 404:
            return None
        raise


async def eventually(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


@pytest.fixture
async def kube():
    api = FakeKubeAPI()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


async def test_list_watch_relist_and_restart(kube, tmp_path):
    await kube.put(svc("alpha", "10.96.0.1"))
    stack = Stack(tmp_path)
    try:
        await asyncio.to_thread(stack.start_infra)
        await asyncio.to_thread(stack.start_service, "registry", True,
                                ["--kube-api", f"http://127.0.0.1:{kube.port}"])
        # listed objects arrive, normalised (no managedFields, no status, tagged with their source)
        alpha = await eventually(lambda: get_service(stack, "alpha"))
        assert "managedFields" not in alpha["metadata"] and "status" not in alpha
        assert alpha["metadata"]["annotations"]["mizzen.io/source"] == "kubernetes"
        # watched additions, modifications and deletions follow
        await kube.put(svc("beta", "10.96.0.2"))
        await eventually(lambda: get_service(stack, "beta"))
        await kube.put(svc("beta", "10.96.0.2", port=8080))

        async def beta_port():
            b = await get_service(stack, "beta")
            return b and b["spec"]["ports"][0]["port"] == 8080

        await eventually(beta_port)
        await kube.delete("Service", "default", "alpha")

        async def alpha_gone():
            return await get_service(stack, "alpha") is None

        await eventually(alpha_gone)
        # an invalid object is skipped, not stored, and does not stop the watch
        bad = svc("gamma", "not-an-ip")
        await kube.put(bad)
        await kube.put(svc("delta", "10.96.0.4"))
        await eventually(lambda: get_service(stack, "delta"))
        assert await get_service(stack, "gamma") is None
        # history compacted (410 Gone) while an object is deleted: the relist notices the deletion
        await kube.delete("Service", "default", "delta")
        await kube.compact()
        await kube.put(svc("epsilon", "10.96.0.5"))

        async def relisted():
            return await get_service(stack, "epsilon") is not None and await get_service(stack, "delta") is None

        await eventually(relisted)
        # objects applied by users (not from kubernetes) are never deleted by a relist
        user = svc("user-owned", "10.96.0.9")
        user["metadata"].pop("managedFields")
        await asyncio.to_thread(request, "PUT", f"{stack.registry_url}/api/v1/namespaces/default/services/user-owned", user)
        # registry restarts while a deletion happens: the relist after restart removes it
        await asyncio.to_thread(stack.stop_service, "registry", True)
        await kube.delete("Service", "default", "beta")
        await asyncio.to_thread(stack.start_service, "registry", True,
                                ["--kube-api", f"http://127.0.0.1:{kube.port}"])

        async def beta_gone():
            return await get_service(stack, "beta") is None

        await eventually(beta_gone)
        assert await get_service(stack, "user-owned") is not None
        assert await get_service(stack, "epsilon") is not None
    finally:
        await asyncio.to_thread(stack.stop)


def write_kubeconfig(path, contexts: dict[str, tuple[str, dict]], current: str) -> str:
    """A kubeconfig with one cluster and user per context: name → (server URL, user entry)."""
    import yaml

    doc = {"apiVersion": "v1", "kind": "Config", "current-context": current,
           "clusters": [{"name": n, "cluster": {"server": url}} for n, (url, _u) in contexts.items()],
           "users": [{"name": n, "user": user} for n, (_url, user) in contexts.items()],
           "contexts": [{"name": n, "context": {"cluster": n, "user": n}} for n in contexts]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def vs(name: str, w1: int, w2: int) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "default", "generation": 1},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web", "subset": "a"}, "weight": w1},
                                                           {"destination": {"host": "web", "subset": "b"}, "weight": w2}]}]}}


async def test_kubeconfig_context_exec_credentials_and_status_write_back(tmp_path):
    kube = FakeKubeAPI(token="s3cret-token")
    await kube.start()
    # the context's user gets its token from an exec credential plugin, as cloud clusters do
    plugin = tmp_path / "cred.py"
    plugin.write_text('import json\nprint(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", '
                      '"kind": "ExecCredential", "status": {"token": "s3cret-token"}}))\n')
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                          "args": [str(plugin)], "interactiveMode": "Never"}}
    config = write_kubeconfig(tmp_path / "kubeconfig", {
        "elsewhere": ("http://127.0.0.1:9", {"token": "wrong"}),  # the current context: never contacted
        "fake": (f"http://127.0.0.1:{kube.port}", exec_user),
    }, current="elsewhere")
    await kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    await kube.put(vs("good", 50, 50))
    await kube.put(vs("bad", 30, 30))
    stack = Stack(tmp_path / "stack")
    try:
        await asyncio.to_thread(stack.start_infra)
        await asyncio.to_thread(stack.start_service, "registry", True, ["--kubeconfig", config, "--context", "fake"])

        async def get(path: str) -> dict | None:
            try:
                return await asyncio.to_thread(request, "GET", stack.registry_url + path)
            except RegistryError as e:
                if e.status == 404:
                    return None
                raise

        vs_path = "/apis/networking.istio.io/v1/namespaces/default/virtualservices/"
        assert await eventually(lambda: get("/api/v1/namespaces/shop"))
        assert await eventually(lambda: get(vs_path + "good"))

        # the invalid one is not stored; its errors are written to the cluster object's status, Istio-style
        async def bad_status():
            obj = kube.objects.get(("VirtualService", "default", "bad"))
            return obj and (obj.get("status") or {}).get("validationMessages")

        messages = await eventually(bad_status)
        assert messages[0]["level"] == "ERROR" and messages[0]["type"]["code"] == "IST0106"
        assert "spec.http[0].route: total destination weight 60 != 100" in messages[0]["description"]
        assert await get(vs_path + "bad") is None
        # fixed in the cluster (the status subresource keeps the old status): stored, and the status is cleared
        fixed = vs("bad", 40, 60) | {"status": kube.objects[("VirtualService", "default", "bad")]["status"]}
        await kube.put(fixed)
        assert await eventually(lambda: get(vs_path + "bad"))

        async def cleared():
            obj = kube.objects[("VirtualService", "default", "bad")]
            return "validationMessages" not in (obj.get("status") or {})

        await eventually(cleared)
        # every request carried the plugin's token
        assert kube.seen_auth and set(kube.seen_auth) == {"Bearer s3cret-token"}
    finally:
        await asyncio.to_thread(stack.stop)
        await kube.stop()


async def test_registry_ingests_from_another_registrys_kubernetes_api(tmp_path):
    upstream, downstream = Stack(tmp_path / "up"), Stack(tmp_path / "down")
    try:
        await asyncio.to_thread(upstream.start, ("registry",))
        config = write_kubeconfig(tmp_path / "kubeconfig", {"up": (upstream.registry_url, {})}, current="up")
        await asyncio.to_thread(downstream.start_infra)
        await asyncio.to_thread(downstream.start_service, "registry", True, ["--kubeconfig", config])
        base = "/apis/networking.istio.io/v1/namespaces/default/virtualservices"
        await asyncio.to_thread(request, "POST", upstream.registry_url + base, vs("web", 90, 10))
        await asyncio.to_thread(request, "PUT", upstream.registry_url + "/api/v1/namespaces/default/services/web",
                                svc("web", "10.96.0.10"))

        async def down(path: str) -> dict | None:
            try:
                return await asyncio.to_thread(request, "GET", downstream.registry_url + path)
            except RegistryError as e:
                if e.status == 404:
                    return None
                raise

        got = await eventually(lambda: down(base + "/web"))
        assert got["metadata"]["annotations"]["mizzen.io/source"] == "kubernetes"
        assert await eventually(lambda: down("/api/v1/namespaces/default/services/web"))
        # a merge patch upstream arrives through the watch
        await asyncio.to_thread(request, "PATCH", upstream.registry_url + base + "/web",
                                {"spec": {"http": [{"route": [{"destination": {"host": "web"}}]}]}},
                                content_type="application/merge-patch+json")

        async def patched():
            o = await down(base + "/web")
            return o and len(o["spec"]["http"][0]["route"]) == 1

        await eventually(patched)
        await asyncio.to_thread(request, "DELETE", upstream.registry_url + base + "/web")

        async def gone():
            return await down(base + "/web") is None

        await eventually(gone)
        assert await down("/api/v1/namespaces/default/services/web") is not None
    finally:
        await asyncio.to_thread(downstream.stop)
        await asyncio.to_thread(upstream.stop)


async def test_in_cluster_service_account_credentials_by_default(tmp_path, monkeypatch):
    """Inside a pod (KUBERNETES_SERVICE_HOST set, a service-account token and CA mounted) the registry ingests
    with no flag at all, over TLS verified against the mounted CA, authenticating with the token."""
    kube = FakeKubeAPI(token="pod-sa-token")
    sa = tmp_path / "serviceaccount"
    await kube.start(tls_dir=sa)
    (sa / "token").write_text("pod-sa-token")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
    monkeypatch.setenv("MIZZEN_KUBE_SA_DIR", str(sa))  # where a pod has /var/run/secrets/kubernetes.io/serviceaccount
    await kube.put(svc("incluster", "10.96.0.7"))
    stack = Stack(tmp_path / "stack")
    try:
        await asyncio.to_thread(stack.start, ("registry",))
        got = await eventually(lambda: get_service(stack, "incluster"))
        assert got["metadata"]["annotations"]["mizzen.io/source"] == "kubernetes"
        assert set(kube.seen_auth) == {"Bearer pod-sa-token"}
        await asyncio.to_thread(stack.stop_service, "registry")
        # --no-kube turns it off even in a pod: a fresh registry makes no request to the API server
        seen = len(kube.seen_auth)
        await asyncio.to_thread(stack.start_service, "registry", True, ["--no-kube"])
        await asyncio.sleep(1.5)
        assert len(kube.seen_auth) == seen
    finally:
        await asyncio.to_thread(stack.stop)
        await kube.stop()


async def test_kubeconfig_with_client_certificate_and_cluster_ca(tmp_path):
    """A cluster that authenticates clients by certificate (mutual TLS), its CA named in the kubeconfig."""
    kube = FakeKubeAPI()
    tls = tmp_path / "tls"
    await kube.start(tls_dir=tls, client_certs=True)
    config = write_kubeconfig(tmp_path / "kubeconfig", {"mtls": (f"https://127.0.0.1:{kube.port}", {
        "client-certificate": str(tls / "client.crt"), "client-key": str(tls / "client.key")})}, current="mtls")
    # the cluster's CA is named by the cluster entry, as kubeadm's kubeconfigs do
    import yaml

    doc = yaml.safe_load((tmp_path / "kubeconfig").read_text())
    doc["clusters"][0]["cluster"]["certificate-authority"] = str(tls / "ca.crt")
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(doc))
    await kube.put(svc("mtls", "10.96.0.8"))
    stack = Stack(tmp_path / "stack")
    try:
        await asyncio.to_thread(stack.start_infra)
        await asyncio.to_thread(stack.start_service, "registry", True, ["--kubeconfig", config])
        assert await eventually(lambda: get_service(stack, "mtls"))
    finally:
        await asyncio.to_thread(stack.stop)
        await kube.stop()


def test_unusable_kubeconfig_stops_the_registry_naming_it(tmp_path):
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\ncurrent-context: nowhere\n")
    for args, named in ((["--kubeconfig", str(tmp_path / "absent")], str(tmp_path / "absent")),
                        (["--kubeconfig", str(bad), "--context", "prod"], "--context prod")):
        p = subprocess.run([sys.executable, "-m", "mizzen.services.registry", "--port", "0", *args],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "mizzen registry: cannot use --kubeconfig" in p.stderr and named in p.stderr, \
            p.stderr


def kube_node(zone: str, heartbeat: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "worker-1", "labels": {"topology.kubernetes.io/region": "r1",
                                                        "topology.kubernetes.io/zone": zone}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]}}


async def test_nodes_are_ingested_without_their_status(kube, tmp_path):
    """Nodes are listed and watched (their labels are their pods' locality); their status, which the kubelet
    rewrites all the time, is dropped, so a heartbeat is no change at all."""
    await kube.put(kube_node("z1", "2026-01-01T00:00:00Z"))
    stack = Stack(tmp_path)

    async def get_node() -> dict | None:
        try:
            return await asyncio.to_thread(request, "GET", f"{stack.registry_url}/api/v1/nodes/worker-1")
        except RegistryError as e:
            if e.status == 404:
                return None
            raise

    async def revision() -> int:
        return (await asyncio.to_thread(request, "GET", stack.registry_url + "/version"))["revision"]

    try:
        await asyncio.to_thread(stack.start_infra)
        await asyncio.to_thread(stack.start_service, "registry", True, ["--kube-api", f"http://127.0.0.1:{kube.port}"])
        node = await eventually(get_node)
        assert "status" not in node and node["metadata"]["annotations"]["mizzen.io/source"] == "kubernetes"
        rev = await revision()
        await kube.put(kube_node("z1", "2026-01-01T00:00:10Z"))  # a heartbeat only
        await kube.put(kube_node("z2", "2026-01-01T00:00:20Z"))  # relabelled (and a heartbeat)

        async def relabelled():
            n = await get_node()
            return n and n["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z2"

        await eventually(relabelled)
        assert await revision() == rev + 1  # the relabel is the one change
        await kube.delete("Node", "", "worker-1")

        async def gone():
            return await get_node() is None

        await eventually(gone)
    finally:
        await asyncio.to_thread(stack.stop)
