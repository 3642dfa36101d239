"""Ingest resources from a Kubernetes API server with list + watch, as a controller would.

Per kind: LIST (remember the list's resourceVersion), reconcile (store what is listed, delete what this source
stored earlier and is gone), then WATCH from that resourceVersion. ADDED/MODIFIED are stored, DELETED removed,
BOOKMARK only moves the resourceVersion. A `410 Gone` (the server compacted past our resourceVersion) or a
broken stream leads to a fresh LIST. Objects stored from Kubernetes carry the annotation
`mizzen.io/source: kubernetes`, so a registry that restarts can still tell which ones a relist must delete.
Invalid objects are logged and counted, never stored; they do not block the rest.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from ..mesh.kinds import BY_KIND, Kind
from ..mesh.store import key_of
from ..mesh.validation import check_documents
from ..mesh.yamlio import Document

log = logging.getLogger("mizzen.registry.kube")

SOURCE_ANNOTATION = "mizzen.io/source"
SOURCE = "kubernetes"
DEFAULT_KINDS = ("Namespace", "Service", "EndpointSlice", "Pod", "ServiceEntry", "WorkloadEntry",
                 "VirtualService", "DestinationRule", "Gateway", "Sidecar", "PeerAuthentication",
                 "AuthorizationPolicy", "RequestAuthentication")


class Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


def normalise(obj: dict, kind: Kind) -> dict:
    """What the mesh needs of an API object: drop managedFields and (but for Pods) status; tag the source."""
    obj = dict(obj)
    obj["kind"] = kind.kind
    obj.setdefault("apiVersion", kind.api_version())
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in ("managedFields", "resourceVersion")}
    meta["annotations"] = dict(meta.get("annotations") or {}) | {SOURCE_ANNOTATION: SOURCE}
    obj["metadata"] = meta
    if kind.kind != "Pod":
        obj.pop("status", None)
    return obj


class KubeSource:
    def __init__(self, api_url: str, registry, kinds: tuple[str, ...] = DEFAULT_KINDS, token: str | None = None,
                 backoff: float = 0.5):
        self.api_url = api_url.rstrip("/")
        self.registry = registry  # RegistryAPI
        self.kinds = [BY_KIND[k] for k in kinds]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.backoff = backoff
        self.synced: set[str] = set()
        self.invalid = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as s:
            tasks = [asyncio.create_task(self._run_kind(s, k, stop)) for k in self.kinds]
            await stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _url(self, kind: Kind) -> str:
        return self.api_url + kind.path(version=kind.versions[-1] if kind.group == "networking.istio.io" else None)

    async def _run_kind(self, s: aiohttp.ClientSession, kind: Kind, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                rv = await self._list(s, kind)
                self.synced.add(kind.kind)
                while not stop.is_set():
                    rv = await self._watch(s, kind, rv)
            except Gone:
                log.info("watch expired; relisting", extra={"kind": kind.kind})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the API server or the store is away; back off and relist
                log.warning("kubernetes %s sync failed: %s", kind.kind, e)
                await asyncio.sleep(self.backoff)

    async def _list(self, s: aiohttp.ClientSession, kind: Kind) -> str:
        async with s.get(self._url(kind)) as r:
            if r.status == 404:
                log.info("kind %s not served by the API server", kind.kind)
                await asyncio.sleep(30)
                return "0"
            r.raise_for_status()
            body = orjson.loads(await r.read())
        items = [normalise(i, kind) for i in body.get("items") or []]
        listed = {key_of(o) for o in items if isinstance(o.get("metadata", {}).get("name"), str)}
        await self._store(items)
        # delete what this source stored before and the API server no longer has
        _rev, current = await self.registry.store.list(kind.kind)
        gone = [key_of(o) for o in current
                if (o["metadata"].get("annotations") or {}).get(SOURCE_ANNOTATION) == SOURCE and key_of(o) not in listed]
        if gone:
            await self.registry.delete_keys(gone)
        return body.get("metadata", {}).get("resourceVersion", "0")

    async def _watch(self, s: aiohttp.ClientSession, kind: Kind, rv: str) -> str:
        params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
        async with s.get(self._url(kind), params=params) as r:
            if r.status == 410:
                raise Gone()
            r.raise_for_status()
            async for line in r.content:
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
                    await self._store([normalise(obj, kind)])
                elif typ == "DELETED":
                    meta = obj.get("metadata") or {}
                    ns = meta.get("namespace") if kind.namespaced else None
                    await self.registry.delete_keys([f"{kind.kind}/{ns or ''}/{meta.get('name')}"])
        return rv

    async def _store(self, objects: list[dict]) -> None:
        """Store the valid objects in one apply; invalid ones are logged and skipped (a cluster's bad object
        must not block the rest, unlike a user's apply, which is all or nothing)."""
        valid: list[dict] = []
        for i, o in enumerate(objects):
            ok, errors = check_documents([Document(SOURCE, i, o)])
            for e in errors:
                self.invalid += 1
                log.warning("skipping invalid object from kubernetes: %s", e)
            valid.extend(ok)
        if valid:
            await self.registry.apply_valid(valid)
