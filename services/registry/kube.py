"""Ingest resources from a Kubernetes API server with list + watch, as a controller would.

Connection and credentials come from `kubernetes_asyncio`, a maintained client: a kubeconfig with contexts
(client certificates, bearer tokens, exec credential plugins, CA bundles), in-cluster service-account
credentials (KUBERNETES_SERVICE_HOST and the mounted token and CA), or a bare URL with an optional token.

Per kind: LIST (remember the list's resourceVersion), reconcile (store what is listed, delete what this source
stored earlier and is gone), then WATCH from that resourceVersion. ADDED/MODIFIED are stored, DELETED removed,
BOOKMARK only moves the resourceVersion. A `410 Gone` (the server compacted past our resourceVersion) or a
broken stream leads to a fresh LIST. Objects stored from Kubernetes carry the annotation
`mizzen.io/source: kubernetes`, so a registry that restarts can still tell which ones a relist must delete.
Invalid objects are logged and counted, never stored; they do not block the rest. For Istio kinds their errors
are written back to the cluster object's `status.validationMessages` (Istio's format) through the status
subresource, where the API server has one, and cleared once the object is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import orjson
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig

from ..mesh.errors import DocumentError
from ..mesh.kinds import BY_KIND, KINDS, Kind
from ..mesh.store import key_of
from ..mesh.validation import check_documents
from ..mesh.yamlio import Document

log = logging.getLogger("mizzen.registry.kube")

SOURCE_ANNOTATION = "mizzen.io/source"
SOURCE = "kubernetes"
# Every kind Mizzen models (a kind added to kinds.KINDS is ingested too), but Endpoints (EndpointSlices carry the
# same addresses, as istiod reads them), Secret and ConfigMap (a cluster's Secrets and ConfigMaps are not copied
# wholesale into Redis; the mesh config ConfigMap is applied with `mizzen apply` for now).
DEFAULT_KINDS = tuple(k.kind for k in KINDS if k.kind not in ("Endpoints", "Secret", "ConfigMap"))
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Istio's analyzer code for a configuration the control plane refused (IST0xxx messages in status).
INVALID_CODE = {"code": "IST0106", "name": "SchemaValidationError"}


class Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


class NotServed(Exception):
    """The API server does not serve this kind (404: its CRD is not installed) or does not let us read it
    (401/403: RBAC); try again much later, quietly."""


RETRY_NOT_SERVED = 60.0


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path(os.environ.get("MIZZEN_KUBE_SA_DIR", SA_DIR),
                                                                    "token").exists()


async def api_client(kube_api: str = "", token: str | None = None, kubeconfig: str = "", context: str | None = None
                     ) -> kclient.ApiClient:
    """A configured client: an explicit kubeconfig (and context), else a bare URL, else in-cluster credentials."""
    cfg = kclient.Configuration()
    if kubeconfig:
        await kconfig.load_kube_config(config_file=kubeconfig, context=context or None, client_configuration=cfg,
                                       persist_config=False)
    elif kube_api:
        cfg.host = kube_api.rstrip("/")
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
    else:
        sa = Path(os.environ.get("MIZZEN_KUBE_SA_DIR", SA_DIR))
        loader = kconfig.incluster_config.InClusterConfigLoader(token_filename=str(sa / "token"),
                                                                cert_filename=str(sa / "ca.crt"))
        loader.load_and_set(cfg)
    return kclient.ApiClient(configuration=cfg)


def normalise(obj: dict, kind: Kind) -> dict:
    """What the mesh needs of an API object: drop managedFields and (but for Pods) status; tag the source.
    (A Node's status is the kubelet's heartbeat: dropping it makes a heartbeat no change at all.)"""
    obj = dict(obj)
    obj["kind"] = kind.kind
    obj.setdefault("apiVersion", kind.api_version())
    meta = {k: v for k, v in (obj.get("metadata") or {}).items()
            if k not in ("managedFields", "resourceVersion", "generation")}
    meta["annotations"] = dict(meta.get("annotations") or {}) | {SOURCE_ANNOTATION: SOURCE}
    obj["metadata"] = meta
    if kind.kind != "Pod":
        obj.pop("status", None)
    return obj


class KubeSource:
    def __init__(self, api: kclient.ApiClient, registry, kinds: tuple[str, ...] = DEFAULT_KINDS,
                 backoff: float = 0.5, write_status: bool = True):
        self.api = api
        self.registry = registry  # RegistryAPI
        self.kinds = [BY_KIND[k] for k in kinds if k in BY_KIND]
        self.backoff = backoff
        self.write_status = write_status
        self.synced: set[str] = set()
        self.invalid = 0
        self.no_status: set[str] = set()  # kinds whose status subresource the server lacks or forbids us
        self.not_served: set[str] = set()  # kinds the server does not serve or lets us read

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._run_kind(k, stop)) for k in self.kinds]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.api.close()

    def _path(self, kind: Kind, namespace: str | None = None, name: str | None = None) -> str:
        version = kind.versions[-1] if kind.group.endswith("istio.io") else None
        return kind.path(namespace, name, version=version)

    async def _get(self, path: str, query: list[tuple[str, str]], timeout: float | None):
        return await self.api.call_api(path, "GET", query_params=query, header_params={"Accept": "application/json"},
                                       auth_settings=["BearerToken"], _preload_content=False,
                                       _request_timeout=timeout)

    async def _run_kind(self, kind: Kind, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                rv = await self._list(kind)
                self.synced.add(kind.kind)
                while not stop.is_set():
                    rv = await self._watch(kind, rv)
            except Gone:
                log.info("watch expired; relisting", extra={"kind": kind.kind})
            except NotServed as e:
                if kind.kind not in self.not_served:
                    log.info("not ingesting %s: %s (retrying every %.0f s)", kind.kind, e, RETRY_NOT_SERVED)
                self.not_served.add(kind.kind)
                await asyncio.sleep(RETRY_NOT_SERVED)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the API server or the store is away; back off and relist
                log.warning("kubernetes %s sync failed: %s", kind.kind, e)
                await asyncio.sleep(self.backoff)

    async def _list(self, kind: Kind) -> str:
        r = await self._get(self._path(kind), [], 60)
        async with r:
            if r.status in (401, 403, 404):
                raise NotServed(f"HTTP {r.status} listing {self._path(kind)}")
            if r.status >= 300:
                raise RuntimeError(f"list {kind.plural}: HTTP {r.status}: {(await r.read())[:300]!r}")
            body = orjson.loads(await r.read())
        raw = [i for i in body.get("items") or [] if isinstance(i, dict)]
        items = [normalise(i, kind) for i in raw]
        listed = {key_of(o) for o in items if isinstance(o.get("metadata", {}).get("name"), str)}
        await self._store(items, raw, kind)
        # delete what this source stored before and the API server no longer has
        _rev, current = await self.registry.store.list(kind.kind)
        gone = [key_of(o) for o in current
                if (o["metadata"].get("annotations") or {}).get(SOURCE_ANNOTATION) == SOURCE and key_of(o) not in listed]
        if gone:
            await self.registry.delete_keys(gone)
        return body.get("metadata", {}).get("resourceVersion", "0")

    async def _watch(self, kind: Kind, rv: str) -> str:
        query = [("watch", "1"), ("resourceVersion", rv), ("allowWatchBookmarks", "true"), ("timeoutSeconds", "300")]
        r = await self._get(self._path(kind), query, None)
        async with r:
            if r.status == 410:
                raise Gone()
            if r.status >= 300:
                raise RuntimeError(f"watch {kind.plural}: HTTP {r.status}")
            while True:
                line = await r.content.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                ev = orjson.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                if typ in ("ADDED", "MODIFIED"):
                    await self._store([normalise(obj, kind)], [obj], kind)
                elif typ == "DELETED":
                    meta = obj.get("metadata") or {}
                    ns = meta.get("namespace") if kind.namespaced else None
                    await self.registry.delete_keys([f"{kind.kind}/{ns or ''}/{meta.get('name')}"])
        return rv

    async def _store(self, objects: list[dict], raw: list[dict], kind: Kind) -> None:
        """Store the valid objects in one apply; invalid ones are logged and skipped (a cluster's bad object
        must not block the rest, unlike a user's apply, which is all or nothing)."""
        valid: list[dict] = []
        for i, (o, orig) in enumerate(zip(objects, raw, strict=True)):
            ok, errors = check_documents([Document(SOURCE, i, o)])
            for e in errors:
                self.invalid += 1
                log.warning("skipping invalid object from kubernetes: %s", e)
            valid.extend(ok)
            if self.write_status and kind.group.endswith("istio.io"):
                await self._write_status(kind, orig, errors[0] if errors else None)
        if valid:
            await self.registry.apply_valid(valid)

    async def _write_status(self, kind: Kind, obj: dict, error: DocumentError | None) -> None:
        """Istio-style validation status on the cluster object: messages while invalid, cleared once fixed.
        Written only when it would change, so our own status write (a MODIFIED event) does not loop."""
        if kind.kind in self.no_status:
            return
        meta = obj.get("metadata") or {}
        have = (obj.get("status") or {}).get("validationMessages") or []
        want = [{"type": INVALID_CODE, "level": "ERROR", "description": str(e)} for e in error.errors] if error else []
        if have == want:
            return
        status = {"validationMessages": want or None, "observedGeneration": meta.get("generation")}
        path = self._path(kind, meta.get("namespace"), meta.get("name")) + "/status"
        try:
            r = await self.api.call_api(path, "PATCH", body=orjson.loads(orjson.dumps({"status": status})),
                                        header_params={"Content-Type": "application/merge-patch+json",
                                                       "Accept": "application/json"},
                                        auth_settings=["BearerToken"], _preload_content=False, _request_timeout=30)
            async with r:
                if r.status in (403, 404, 405):
                    log.info("no writable status subresource for %s (HTTP %s); not writing status", kind.kind, r.status)
                    self.no_status.add(kind.kind)
                elif r.status >= 300:
                    log.warning("writing status of %s %s failed: HTTP %s", kind.kind, meta.get("name"), r.status)
        except Exception as e:  # noqa: BLE001 - status is advice to the user; ingestion goes on without it
            log.warning("writing status of %s %s failed: %s", kind.kind, meta.get("name"), e)
