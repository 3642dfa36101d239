"""Kubernetes ingestion: the registry lists and watches a Kubernetes-semantics API server (tests/kubeapi.py)."""

from __future__ import annotations

import asyncio
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
