"""The registry's HTTP API: Kubernetes-shaped REST paths over the config store, plus a batch apply.

  GET    /api/v1/{plural}                                   list across namespaces
  GET    /api/v1/namespaces/{ns}/{plural}                   list in a namespace
  GET    /api/v1/namespaces/{ns}/{plural}/{name}            get
  PUT    /api/v1/namespaces/{ns}/{plural}/{name}            create or replace
  POST   /api/v1/namespaces/{ns}/{plural}                   create
  DELETE /api/v1/namespaces/{ns}/{plural}/{name}            delete
  (the same under /apis/{group}/{version}/…, and /api/v1/{plural}/{name} for cluster-scoped kinds)
  POST   /apply    {"documents": [{"source", "index", "object"}]}  validate all, store all or nothing
  POST   /delete   {"keys": ["Kind/ns/name", …]}
  GET    /debug/config_dump?pod=&namespace= | ?proxy=      a proxy's snapshot as an Envoy config_dump
  GET    /debug/syncz                                       xDS sync status per proxy
"""

from __future__ import annotations

import logging
import time

import orjson
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..mesh import kinds, tracing
from ..mesh.bus import CONFIG_CHANGED, Bus
from ..mesh.errors import ApplyError, DocumentError, FieldError
from ..mesh.kinds import Kind, object_key
from ..mesh.secrets import redact
from ..mesh.snapstore import SnapshotStore
from ..mesh.store import ConfigStore, key_of
from ..mesh.validation import check_documents
from ..mesh.yamlio import Document

log = logging.getLogger("mizzen.registry")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.writes = Counter("mizzen_registry_writes", "Committed writes", ["op"], registry=self.registry)
        self.rejected = Counter("mizzen_registry_rejected", "Rejected applies (invalid input)", registry=self.registry)
        self.revision = Gauge("mizzen_registry_revision", "Current config revision", registry=self.registry)
        self.write_seconds = Histogram("mizzen_registry_write_seconds", "Apply latency", registry=self.registry)


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _status(code: int, reason: str, message: str, details: dict | None = None) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
            "message": message, "code": code}
    if details:
        body["details"] = details
    return _json(body, code)


def _same_content(old: dict, new: dict) -> bool:
    """Equal apart from server-set metadata: such an apply is `unchanged` and writes nothing."""

    def strip(o: dict) -> dict:
        o = dict(o)
        meta = {k: v for k, v in o.get("metadata", {}).items()
                if k not in ("resourceVersion", "creationTimestamp", "uid", "generation", "managedFields")}
        o["metadata"] = meta
        o.pop("status", None)
        return o

    return strip(old) == strip(new)


class RegistryAPI:
    def __init__(self, store: ConfigStore, bus: Bus, snapshots: SnapshotStore, metrics: Metrics):
        self.store = store
        self.bus = bus
        self.snapshots = snapshots
        self.metrics = metrics

    # ---- the write path: validate everything, then one transaction, then one event ----
    async def apply_documents(self, docs: list[Document | DocumentError], default_ns: str = "default") -> dict:
        skipped: list[dict] = []
        warnings: list[DocumentError] = []
        objects, errors = check_documents(docs, default_ns, skipped, warnings)
        if errors:
            self.metrics.rejected.inc()
            raise ApplyError(errors)
        result = await self.apply_valid(objects)
        if skipped:
            result["skipped"] = skipped
        if warnings:
            result["warnings"] = [w.to_json() for w in warnings]
        return result

    async def apply_valid(self, objects: list[dict]) -> dict:
        """Store objects check_documents already accepted: skip the unchanged, commit the rest, announce.
        Each call is one trace when tracing is on (an apply, a Kubernetes event): see mesh/tracing.py."""
        keys = [key_of(o) for o in objects]
        span = tracing.start("registry apply", tracing.incoming.get(), {"mizzen.resources": keys[:100],
                                                                         "mizzen.resource_count": len(keys)},
                             kind="server")
        try:
            result = await self._apply_valid(objects, keys, span)
        except Exception as e:
            span.error(repr(e))
            raise
        finally:
            span.end()
        return result

    async def _apply_valid(self, objects: list[dict], keys: list[str], span) -> dict:
        current = await self.store.get_many(keys)
        results, changed = [], []
        for k, obj in zip(keys, objects, strict=True):
            old = current.get(k)
            if old is not None and _same_content(old, obj):
                action = "unchanged"
            else:
                action = "configured" if old is not None else "created"
                changed.append(obj)
            kind, ns, name = kinds.split_key(k)
            results.append({"kind": kind, "namespace": ns, "name": name, "action": action})
        revision = await self.store.revision()
        if changed:
            commit = tracing.start("registry commit", span, {"mizzen.changed": [key_of(o) for o in changed][:100]})
            with self.metrics.write_seconds.time():
                change = await self.store.apply(changed)
            revision = change.revision
            self.metrics.writes.labels("apply").inc()
            self.metrics.revision.set(revision)
            commit.set("mizzen.revision", revision)
            await self.bus.publish(CONFIG_CHANGED, change.to_json(), headers=commit.headers())
            commit.end()
        span.set("mizzen.revision", revision)
        return {"revision": revision, "results": results}

    async def delete_keys(self, keys: list[str]) -> dict:
        present = await self.store.existing(keys)
        missing = [k for k in keys if k not in present]
        revision = await self.store.revision()
        if present:
            span = tracing.start("registry delete", tracing.incoming.get(), {"mizzen.resources": present[:100]},
                                 kind="server")
            change = await self.store.delete(present)
            revision = change.revision
            self.metrics.writes.labels("delete").inc()
            self.metrics.revision.set(revision)
            span.set("mizzen.revision", revision)
            await self.bus.publish(CONFIG_CHANGED, change.to_json(), headers=span.headers())
            span.end()
        return {"revision": revision, "deleted": present, "notFound": missing}

    # ---- HTTP handlers ----
    async def handle_apply(self, req: web.Request) -> web.Response:
        try:
            body = orjson.loads(await req.read())
            items = body["documents"]
            docs: list[Document | DocumentError] = []
            for i, d in enumerate(items):
                obj = d.get("object")
                src, idx = str(d.get("source", "request")), int(d.get("index", i))
                if isinstance(obj, dict):
                    docs.append(Document(src, idx, obj))
                else:
                    docs.append(DocumentError(src, idx, "", "", "", [FieldError("", "document is not a mapping")]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            return _status(400, "BadRequest", f"body must be JSON {{\"documents\": [...]}}: {e}")
        try:
            result = await self.apply_documents(docs, req.query.get("namespace", "default"))
        except ApplyError as e:
            return _json(e.to_json() | {"code": 422, "apiVersion": "v1"}, 422)
        return _json(result)

    async def handle_delete(self, req: web.Request) -> web.Response:
        try:
            keys = [str(k) for k in orjson.loads(await req.read())["keys"]]
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            return _status(400, "BadRequest", f"body must be JSON {{\"keys\": [...]}}: {e}")
        return _json(await self.delete_keys(keys))

    def _resolve(self, req: web.Request) -> tuple[Kind, str | None, str | None] | web.Response:
        group = req.match_info.get("group", "")
        version = req.match_info.get("version", "v1")
        plural = req.match_info["plural"]
        kind = kinds.BY_PLURAL.get(plural)
        if kind is None or kind.group != group or version not in kind.versions:
            return _status(404, "NotFound", f"the server could not find the requested resource ({group or 'core'}/{version} {plural})")
        ns = req.match_info.get("namespace")
        name = req.match_info.get("name")
        if not kind.namespaced and ns:
            return _status(404, "NotFound", f"{kind.kind} is not namespaced")
        return kind, ns, name

    async def handle_list(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, ns, _ = r
        rev, items = await self.store.list(kind.kind, ns if kind.namespaced else None)
        return _json({"kind": f"{kind.kind}List", "apiVersion": kind.api_version(),
                      "metadata": {"resourceVersion": str(rev)}, "items": [redact(o) for o in items]})

    async def handle_get(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, ns, name = r
        obj = await self.store.get(object_key(kind.kind, ns if kind.namespaced else None, name))
        if obj is None:
            return _status(404, "NotFound", f'{kind.plural} "{name}" not found')
        return _json(redact(obj))

    async def _body_object(self, req: web.Request) -> dict | web.Response:
        raw = await req.read()
        try:
            obj = orjson.loads(raw) if req.content_type == "application/json" else yaml.safe_load(raw)
        except (orjson.JSONDecodeError, yaml.YAMLError) as e:
            return _status(400, "BadRequest", f"cannot parse body: {e}")
        if not isinstance(obj, dict):
            return _status(400, "BadRequest", "body must be one object")
        return obj

    async def handle_put(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, ns, name = r
        obj = await self._body_object(req)
        if isinstance(obj, web.Response):
            return obj
        meta = obj.setdefault("metadata", {}) if isinstance(obj.get("metadata", {}), dict) else obj["metadata"]
        if isinstance(meta, dict):
            if name and meta.get("name", name) != name:
                return _status(400, "BadRequest", f"metadata.name {meta.get('name')!r} does not match the URL name {name!r}")
            if kind.namespaced and ns and meta.get("namespace", ns) != ns:
                return _status(400, "BadRequest", f"metadata.namespace {meta.get('namespace')!r} does not match the URL namespace {ns!r}")
            if name:
                meta["name"] = name
            if kind.namespaced and ns:
                meta["namespace"] = ns
        obj.setdefault("kind", kind.kind)
        obj.setdefault("apiVersion", kind.api_version(req.match_info.get("version")))
        try:
            result = await self.apply_documents([Document("request", 0, obj)], ns or "default")
        except ApplyError as e:
            return _json(e.to_json() | {"code": 422, "apiVersion": "v1"}, 422)
        stored = await self.store.get(key_of({"kind": kind.kind, "metadata": obj["metadata"]}))
        created = result["results"][0]["action"] == "created"
        return _json(redact(stored), 201 if created else 200)

    async def handle_delete_one(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, ns, name = r
        key = object_key(kind.kind, ns if kind.namespaced else None, name)
        result = await self.delete_keys([key])
        if not result["deleted"]:
            return _status(404, "NotFound", f'{kind.plural} "{name}" not found')
        return _json({"kind": "Status", "apiVersion": "v1", "status": "Success",
                      "details": {"name": name, "kind": kind.plural}, "metadata": {"resourceVersion": str(result["revision"])}})

    async def handle_config_dump(self, req: web.Request) -> web.Response:
        proxy = req.query.get("proxy")
        if not proxy:
            pod, ns = req.query.get("pod"), req.query.get("namespace", "default")
            if not pod:
                return _status(400, "BadRequest", "give ?proxy=<node id> or ?pod=<name>&namespace=<ns>")
            suffix = f"~{pod}.{ns}~"
            matches = [p for p in await self.snapshots.proxies() if suffix in p]
            if not matches:
                return _status(404, "NotFound", f"no snapshot for pod {pod}.{ns}")
            proxy = matches[0]
        manifest = await self.snapshots.manifest(proxy)
        resources = await self.snapshots.load_messages(proxy)
        if resources is None or manifest is None:
            return _status(404, "NotFound", f"no snapshot for proxy {proxy}")
        from ..mesh.configdump import config_dump_for_snapshot

        dump = config_dump_for_snapshot(resources, version=manifest.version)
        return web.Response(body=orjson.dumps(dump), content_type="application/json",
                            headers={"X-Mizzen-Proxy": proxy})

    async def handle_syncz(self, _req: web.Request) -> web.Response:
        from ..xds_gateway.status import load_statuses

        return _json(await load_statuses(self.store.r))

    async def handle_version(self, _req: web.Request) -> web.Response:
        return _json({"revision": await self.store.revision(), "time": time.time()})

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/apply", self.handle_apply)
        r.add_post("/delete", self.handle_delete)
        r.add_get("/version", self.handle_version)
        r.add_get("/debug/config_dump", self.handle_config_dump)
        r.add_get("/debug/syncz", self.handle_syncz)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            coll_ns = prefix + "/namespaces/{namespace}/{plural}"
            coll = prefix + "/{plural}"
            r.add_get(coll_ns, self.handle_list)
            r.add_post(coll_ns, self.handle_put)
            r.add_get(coll_ns + "/{name}", self.handle_get)
            r.add_put(coll_ns + "/{name}", self.handle_put)
            r.add_delete(coll_ns + "/{name}", self.handle_delete_one)
            r.add_get(coll, self.handle_list)
            r.add_post(coll, self.handle_put)
            r.add_get(coll + "/{name}", self.handle_get)
            r.add_put(coll + "/{name}", self.handle_put)
            r.add_delete(coll + "/{name}", self.handle_delete_one)
