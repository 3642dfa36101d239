"""The registry's HTTP API: the validated write path, a batch apply and debug views.

The Kubernetes API (discovery, OpenAPI, list/get/watch, create/update/patch/delete under /api and /apis) is in
kubeapi.py and writes through `apply_documents` / `delete_keys` here.
  POST   /apply    {"documents": [{"source", "index", "object"}]}  validate all, store all or nothing
  POST   /delete   {"keys": ["Kind/ns/name", …]}
  GET    /debug/config_dump?pod=&namespace= | ?proxy=      a proxy's snapshot as an Envoy config_dump
  GET    /debug/syncz                                       xDS sync status per proxy
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..mesh import kinds, tracing
from ..mesh.bus import CONFIG_CHANGED, Bus
from ..mesh.errors import ApplyError, DocumentError, FieldError
from ..mesh.snapstore import SnapshotStore
from ..mesh.store import ConfigStore, Conflict, key_of
from ..mesh.validation import analysis, check_documents
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

    # managedFields count (minus their timestamps) only when the writer sent them: a Kubernetes API write
    # that changes field ownership alone is stored, a `mizzen apply` of the same content is not
    with_fields = "managedFields" in new.get("metadata", {})

    def strip(o: dict) -> dict:
        o = dict(o)
        meta = {k: v for k, v in o.get("metadata", {}).items()
                if k not in ("resourceVersion", "creationTimestamp", "uid", "generation", "managedFields")}
        if with_fields:
            meta["managedFields"] = [{k: v for k, v in e.items() if k != "time"} if isinstance(e, dict) else e
                                     for e in o.get("metadata", {}).get("managedFields") or []]
        o["metadata"] = meta
        o.pop("status", None)
        return o

    return strip(old) == strip(new)


# Mizzen's own analyzer message type for a field it stores but does not translate yet (Istio's are IST0xxx).
UNTRANSLATED_MESSAGE = {"code": "MZN0001", "name": "UntranslatedField"}


def _record_warnings(objects: list[dict], warnings: list[DocumentError]) -> None:
    """Put each Istio object's warnings in its status.validationMessages (Istio's format, level WARNING), where
    `kubectl get -o yaml` and the Kubernetes API show them next to the object."""
    by_ident = {(w.kind, w.namespace, w.name): w for w in warnings}
    for obj in objects:
        meta = obj.get("metadata") or {}
        w = by_ident.get((obj.get("kind"), meta.get("namespace") or "", meta.get("name")))
        if w is None or not str(obj.get("apiVersion", "")).split("/")[0].endswith("istio.io"):
            continue
        obj["status"] = {"validationMessages": [
            {"type": _message_type(e), "level": "WARNING", "description": str(e)} for e in w.errors]}


def _message_type(e: FieldError) -> dict:
    if isinstance(e, analysis.Finding):
        return {"code": e.code, "name": e.type_name}
    return UNTRANSLATED_MESSAGE


def _add_findings(docs: list[Document | DocumentError], skipped: list[dict], objects: list[dict],
                  findings: dict[tuple[str, str, str], list[analysis.Finding]],
                  warnings: list[DocumentError]) -> None:
    """Hang each object's analysis findings on the document that carried it, beside its other warnings.

    check_documents returns the objects of an error-free apply in document order, less the skipped documents,
    which is how an object finds its document here."""
    if not findings:
        return
    gone = {(s["source"], s["document"]) for s in skipped}
    carried = [d for d in docs if isinstance(d, Document) and (d.source, d.index) not in gone]
    by_ident = {(w.kind, w.namespace, w.name): w for w in warnings}
    for obj, doc in zip(objects, carried, strict=True):
        ident = analysis.ident(obj)
        if ident not in findings:
            continue
        w = by_ident.get(ident)
        if w is None:
            w = by_ident[ident] = DocumentError(doc.source, doc.index, *ident)
            warnings.append(w)
        w.errors.extend(findings[ident])
    warnings.sort(key=lambda w: (w.source, w.index))


class RegistryAPI:
    def __init__(self, store: ConfigStore, bus: Bus, snapshots: SnapshotStore, metrics: Metrics):
        self.store = store
        self.bus = bus
        self.snapshots = snapshots
        self.metrics = metrics

    # ---- the write path: validate everything, then one transaction, then one event ----
    async def apply_documents(self, docs: list[Document | DocumentError], default_ns: str = "default",
                              expect: dict[str, str | None] | None = None) -> dict:
        skipped: list[dict] = []
        warnings: list[DocumentError] = []
        objects, errors = check_documents(docs, default_ns, skipped, warnings)
        if errors:
            self.metrics.rejected.inc()
            raise ApplyError(errors)
        _add_findings(docs, skipped, objects, await self.analyze(objects), warnings)
        if warnings:
            _record_warnings(objects, warnings)
        result = await self.apply_valid(objects, expect)
        if skipped:
            result["skipped"] = skipped
        if warnings:
            result["warnings"] = [w.to_json() for w in warnings]
        return result

    async def analyze(self, objects: list[dict]) -> dict[tuple[str, str, str], list[analysis.Finding]]:
        """istioctl-analyze-like findings for the applied objects against the stored config (never an error)."""
        needed = analysis.needed_kinds(objects)
        if not needed:
            return {}
        _, stored = await self.store.snapshot()
        return analysis.analyze(objects, [o for o in stored if o.get("kind") in needed])

    async def apply_valid(self, objects: list[dict], expect: dict[str, str | None] | None = None) -> dict:
        """Store objects check_documents already accepted: skip the unchanged, commit the rest, announce.
        Each call is one trace when tracing is on (an apply, a Kubernetes event): see mesh/tracing.py.

        `expect` (key → resourceVersion, or None for "must not exist") makes the write conditional; a failed
        condition raises store.Conflict and nothing is written."""
        keys = [key_of(o) for o in objects]
        span = tracing.start("registry apply", tracing.incoming.get(), {"mizzen.resources": keys[:100],
                                                                         "mizzen.resource_count": len(keys)},
                             kind="server")
        try:
            result = await self._apply_valid(objects, keys, span, expect)
        except Exception as e:
            span.error(repr(e))
            raise
        finally:
            span.end()
        return result

    async def _apply_valid(self, objects: list[dict], keys: list[str], span,
                           expect: dict[str, str | None] | None) -> dict:
        current = await self.store.get_many(keys)
        results, changed = [], []
        for k, want in (expect or {}).items():
            have = current.get(k)
            if want is None and have is not None:
                raise Conflict(k, "AlreadyExists", f"{k} already exists")
            if want is not None and have is None:
                raise Conflict(k, "NotFound", f"{k} not found")
            if want and have is not None and have["metadata"].get("resourceVersion") != want:
                raise Conflict(k, "Conflict", "the object has been modified; please apply your changes to the "
                                              "latest version and try again")
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
                changed_keys = {key_of(o) for o in changed}
                change = await self.store.apply(changed, {k: v for k, v in (expect or {}).items() if k in changed_keys})
            revision = change.revision
            self.metrics.writes.labels("apply").inc()
            self.metrics.revision.set(revision)
            commit.set("mizzen.revision", revision)
            await self.bus.publish(CONFIG_CHANGED, change.to_json(), headers=commit.headers())
            commit.end()
        span.set("mizzen.revision", revision)
        return {"revision": revision, "results": results}

    async def delete_keys(self, keys: list[str], expect: dict[str, str | None] | None = None) -> dict:
        """Delete what exists of `keys` in one revision; `expect` (key → resourceVersion) makes it conditional
        (store.Conflict when an object changed meanwhile)."""
        present = await self.store.existing(keys)
        missing = [k for k in keys if k not in present]
        revision = await self.store.revision()
        if present:
            span = tracing.start("registry delete", tracing.incoming.get(), {"mizzen.resources": present[:100]},
                                 kind="server")
            try:
                change = await self.store.delete(present, {k: v for k, v in (expect or {}).items() if k in present})
            except Exception as e:
                span.error(repr(e))
                span.end()
                raise
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
            if not isinstance(items, list):
                raise TypeError("documents must be a list")
            docs: list[Document | DocumentError] = []
            for i, d in enumerate(items):
                if not isinstance(d, dict):
                    raise TypeError(f"documents[{i}] must be an object {{\"object\": {{...}}}}")
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
        from ..mesh.proxystatus import load_statuses

        return _json(await load_statuses(self.store.r))

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/apply", self.handle_apply)
        r.add_post("/delete", self.handle_delete)
        r.add_get("/debug/config_dump", self.handle_config_dump)
        r.add_get("/debug/syncz", self.handle_syncz)
