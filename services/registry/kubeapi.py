"""The registry's Kubernetes API: what kubectl, client-go and the official client libraries expect of a server.

  GET  /version /api /apis /api/v1 /apis/{g} /apis/{g}/{v}          version and discovery
  GET  /openapi/v2  /openapi/v3  /openapi/v3/{api/v1|apis/g/v}       OpenAPI from the validation schemas
  GET  …/{plural}[?labelSelector&fieldSelector&limit&continue]       list (across namespaces without /namespaces/)
  GET  …/{plural}?watch=1[&resourceVersion&allowWatchBookmarks&timeoutSeconds]   watch
  GET | PUT | PATCH | DELETE …/{plural}/{name}; POST …/{plural}       get, update, patch, delete, create

Every write goes through RegistryAPI's validated store path (all or nothing, one revision, one NATS event);
errors are `Status` objects with the API server's codes and reasons (422 Invalid names each field in
`details.causes`). Istio kinds get a `status` (observedGeneration and a Reconciled condition) computed from the
stored object, so it always describes the generation being served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import yaml
from aiohttp import web

from ..mesh import kinds, locality, openapi
from ..mesh.errors import ApplyError
from ..mesh.kinds import Kind, object_key
from ..mesh.patches import (
    PatchError,
    json_patch,
    merge_patch,
    record_update,
    server_side_apply,
    strategic_merge_patch,
)
from ..mesh.secrets import REDACTED, redact
from ..mesh.selectors import SelectorError, parse_field_selector, parse_label_selector
from ..mesh.store import Conflict, key_of
from ..mesh.yamlio import Document
from .watch import LogFollower, WatchView

log = logging.getLogger("mizzen.registry.kubeapi")

BOOKMARK_SECONDS = 5.0
DEFAULT_WATCH_SECONDS = 1800


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def status(code: int, reason: str, message: str, details: dict | None = None) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return _json(body, code)


def _kind_ref(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def invalid_status(kind: Kind, name: str, err: ApplyError) -> web.Response:
    causes, parts = [], []
    for d in err.documents:
        for e in d.errors:
            causes.append({"reason": "FieldValueInvalid", "message": e.message, "field": e.path})
            parts.append(f"{e.path}: {e.message}" if e.path else e.message)
    what = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    msg = f'{what} "{name}" is invalid: ' + ", ".join(parts) if len(parts) < 2 else \
        f'{what} "{name}" is invalid: [' + ", ".join(parts) + "]"
    return status(422, "Invalid", msg, {"name": name, "group": kind.group, "kind": kind.kind, "causes": causes})


def conflict_status(kind: Kind, name: str, c: Conflict) -> web.Response:
    details = {"name": name, "group": kind.group, "kind": kind.plural}
    if c.reason == "AlreadyExists":
        return status(409, "AlreadyExists", f'{_kind_ref(kind)} "{name}" already exists', details)
    if c.reason == "NotFound":
        return status(404, "NotFound", f'{_kind_ref(kind)} "{name}" not found', details)
    return status(409, "Conflict", f'Operation cannot be fulfilled on {_kind_ref(kind)} "{name}": {c}', details)


def add_warnings(resp: web.Response, warnings: list[dict]) -> None:
    """Stored-with-a-warning fields as `Warning: 299` headers, which kubectl and client-go print."""
    for w in warnings:
        for e in w.get("errors") or []:
            text = (f"[{e['code']}] " if e.get("code") else "") + e["message"]
            text = f"{e['field']}: {text}" if e.get("field") else text
            resp.headers.add("Warning", '299 - "' + text.replace('"', "'").replace("\n", " ") + '"')


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def redact_secret(obj: dict) -> dict:
    """A copy fit to show: a Secret's values redacted (`secrets.redact`), also inside the copy of the applied
    configuration kubectl keeps in an annotation."""
    out = dict(redact(obj))
    if out.get("kind") != "Secret":
        return out
    meta = dict(out.get("metadata") or {})
    notes = dict(meta.get("annotations") or {})
    if LAST_APPLIED in notes:
        try:
            applied = orjson.loads(notes[LAST_APPLIED])
            notes[LAST_APPLIED] = orjson.dumps(redact(applied)).decode() if isinstance(applied, dict) else REDACTED
        except orjson.JSONDecodeError:
            notes[LAST_APPLIED] = REDACTED
        meta["annotations"] = notes
        out["metadata"] = meta
    return out


def with_status(obj: dict, kind: Kind) -> dict:
    """What the API serves: Istio kinds carry a status saying the served generation was validated and accepted."""
    if not kind.group.endswith("istio.io"):
        return obj
    meta = obj.get("metadata") or {}
    gen = meta.get("generation", 1)
    out = dict(obj)
    out["status"] = {
        "observedGeneration": gen,
        "conditions": [{"type": "Reconciled", "status": "True", "reason": "Accepted",
                        "lastTransitionTime": meta.get("creationTimestamp", ""),
                        "message": f"validated and stored at resourceVersion {meta.get('resourceVersion', '')}"}],
        # warnings found when it was written (fields stored but not translated yet); errors are never stored
        "validationMessages": (obj.get("status") or {}).get("validationMessages") or [],
    }
    return out


def _manager(req: web.Request, default: str) -> str:
    m = req.query.get("fieldManager")
    if m:
        return m
    agent = req.headers.get("User-Agent", "")
    return agent.split("/", 1)[0] if agent else default


def _age(ts: str) -> str:
    try:
        secs = int(time.time() - datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    except (TypeError, ValueError):
        return "<unknown>"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{secs // n}{unit}"
    return f"{max(secs, 0)}s"


def _dig(obj: object, *path: str) -> object:
    for p in path:
        obj = obj.get(p) if isinstance(obj, dict) else None
    return obj


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]" if v else "<none>"
    return str(v)


# Table columns beside NAME and AGE: Istio's CRD additionalPrinterColumns and kubectl's for core kinds.
COLUMNS: dict[str, list[tuple[str, str, Callable[[dict], object]]]] = {
    "VirtualService": [("Gateways", "string", lambda o: _dig(o, "spec", "gateways")),
                       ("Hosts", "string", lambda o: _dig(o, "spec", "hosts"))],
    "DestinationRule": [("Host", "string", lambda o: _dig(o, "spec", "host"))],
    "ServiceEntry": [("Hosts", "string", lambda o: _dig(o, "spec", "hosts")),
                     ("Location", "string", lambda o: _dig(o, "spec", "location")),
                     ("Resolution", "string", lambda o: _dig(o, "spec", "resolution"))],
    "WorkloadEntry": [("Address", "string", lambda o: _dig(o, "spec", "address"))],
    "PeerAuthentication": [("Mode", "string", lambda o: _dig(o, "spec", "mtls", "mode"))],
    "Service": [("Type", "string", lambda o: _dig(o, "spec", "type") or "ClusterIP"),
                ("Cluster-IP", "string", lambda o: _dig(o, "spec", "clusterIP") or "<none>"),
                ("Ports", "string", lambda o: ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}"
                                                      for p in _dig(o, "spec", "ports") or []) or "<none>")],
    "Pod": [("IP", "string", lambda o: _dig(o, "status", "podIP") or "<none>")],
    # kubectl's Status and Version come from the kubelet's status, which the registry does not keep.
    "Node": [("Roles", "string", lambda o: kinds.node_roles(_dig(o, "metadata", "labels") or {})),
             ("Locality", "string", lambda o: locality.from_node_labels(_dig(o, "metadata", "labels") or {})
              or "<none>")],
}


def table(kind: Kind, objects: list[dict], list_meta: dict | None) -> dict:
    cols = COLUMNS.get(kind.kind, [])
    defs = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    defs += [{"name": n, "type": t, "format": "", "description": n, "priority": 0} for n, t, _ in cols]
    defs.append({"name": "Age", "type": "date", "format": "", "description": "Age", "priority": 0})
    rows = []
    for o in objects:
        meta = o.get("metadata") or {}
        partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                   "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
        cells = [meta.get("name", "")] + [_fmt(fn(o)) for _, _, fn in cols] + [_age(meta.get("creationTimestamp", ""))]
        rows.append({"cells": cells, "object": partial})
    out = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta or {}, "columnDefinitions": defs,
           "rows": rows}
    return out


def wants_table(req: web.Request) -> bool:
    return "as=Table" in req.headers.get("Accept", "")


def _encode_continue(ns: str, name: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"after": [ns, name]})).decode()


def _decode_continue(token: str) -> tuple[str, str]:
    try:
        ns, name = orjson.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        return str(ns), str(name)
    except (ValueError, KeyError, TypeError) as e:
        raise SelectorError(f"invalid continue token: {e}") from e


class KubeAPI:
    def __init__(self, registry):  # RegistryAPI
        self.registry = registry
        self.store = registry.store
        self.follower = LogFollower(registry.store.r)
        self.closing = asyncio.Event()  # set at shutdown: open watches end so the server can stop

    # ---- discovery and OpenAPI ----
    async def handle_version(self, _req: web.Request) -> web.Response:
        return _json(openapi.version_info() | {"revision": await self.store.revision(), "time": time.time()})

    async def handle_api(self, _req: web.Request) -> web.Response:
        return _json(openapi.api_versions())

    async def handle_apis(self, _req: web.Request) -> web.Response:
        return _json(openapi.api_group_list())

    async def handle_group(self, req: web.Request) -> web.Response:
        g = openapi.api_group(req.match_info["group"])
        return _json(g) if g else status(404, "NotFound", "the server could not find the requested resource")

    async def handle_resources(self, req: web.Request) -> web.Response:
        rl = openapi.api_resource_list(req.match_info.get("group", ""), req.match_info["version"])
        return _json(rl) if rl else status(404, "NotFound", "the server could not find the requested resource")

    async def handle_openapi_v2(self, req: web.Request) -> web.Response:
        if "protobuf" in req.headers.get("Accept", "") and "json" not in req.headers.get("Accept", ""):
            return status(406, "NotAcceptable", "only application/json is served for /openapi/v2")
        return web.Response(body=openapi.openapi_v2_doc(), content_type="application/json")

    async def handle_openapi_v3_root(self, _req: web.Request) -> web.Response:
        return _json(openapi.openapi_v3_root())

    async def handle_openapi_v3(self, req: web.Request) -> web.Response:
        path = req.match_info["path"]
        parts = path.split("/")
        if parts[0] == "api" and len(parts) == 2:
            doc = openapi.openapi_v3_doc("", parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            doc = openapi.openapi_v3_doc(parts[1], parts[2])
        else:
            doc = None
        if doc is None:
            return status(404, "NotFound", f"no OpenAPI document for {path}")
        return web.Response(body=doc, content_type="application/json")

    # ---- resources ----
    def _resolve(self, req: web.Request) -> tuple[Kind, str, str | None, str | None] | web.Response:
        group = req.match_info.get("group", "")
        version = req.match_info.get("version", "v1")
        plural = req.match_info["plural"]
        kind = kinds.BY_PLURAL.get(plural)
        if kind is None or kind.group != group or version not in kind.versions:
            return status(404, "NotFound", "the server could not find the requested resource",
                          {"group": group, "kind": plural})
        ns = req.match_info.get("namespace")
        name = req.match_info.get("name")
        if not kind.namespaced and ns:
            return status(404, "NotFound", f"{kind.kind} is not namespaced")
        return kind, version, ns, name

    def _view(self, obj: dict, kind: Kind, version: str) -> dict:
        obj = redact_secret(obj)
        obj["apiVersion"] = kind.api_version(version)
        return with_status(obj, kind)

    async def handle_list(self, req: web.Request) -> web.StreamResponse:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, version, ns, _ = r
        try:
            match = self._matcher(req)
        except SelectorError as e:
            return status(400, "BadRequest", str(e))
        if req.query.get("watch") in ("1", "true", "True"):
            return await self._watch(req, kind, version, ns, match)
        rev, items = await self.store.list(kind.kind, ns if kind.namespaced else None)
        items = [o for o in items if match(o)]
        meta: dict = {"resourceVersion": str(rev)}
        try:
            if token := req.query.get("continue"):
                after = _decode_continue(token)
                items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > after]
            limit = int(req.query.get("limit") or 0)
        except (SelectorError, ValueError) as e:
            return status(400, "BadRequest", str(e))
        if limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = _encode_continue(last.get("namespace", ""), last["name"])
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        views = [self._view(o, kind, version) for o in items]
        if wants_table(req):
            return _json(table(kind, views, meta))
        return _json({"kind": f"{kind.kind}List", "apiVersion": kind.api_version(version), "metadata": meta,
                      "items": views})

    def _matcher(self, req: web.Request) -> Callable[[dict], bool]:
        labels = parse_label_selector(req.query.get("labelSelector"))
        fields = parse_field_selector(req.query.get("fieldSelector"))
        return lambda o: labels(o) and fields(o)

    async def handle_get(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, version, ns, name = r
        obj = await self.store.get(object_key(kind.kind, ns if kind.namespaced else None, name))
        if obj is None:
            return status(404, "NotFound", f'{_kind_ref(kind)} "{name}" not found',
                          {"name": name, "group": kind.group, "kind": kind.plural})
        view = self._view(obj, kind, version)
        if wants_table(req):
            return _json(table(kind, [view], {"resourceVersion": view["metadata"].get("resourceVersion", "")}))
        return _json(view)

    async def _read_body(self, req: web.Request) -> object | web.Response:
        if "protobuf" in req.content_type or "cbor" in req.content_type:
            # client-go switches to JSON after a 415 for protobuf (kubectl's typed clients send it for core kinds)
            return status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                       f"{req.content_type} is not supported; send JSON or YAML (for kubectl's create generators: "
                                                       f"kubectl create … --dry-run=client -o yaml | kubectl apply -f -)")
        raw = await req.read()
        try:
            if req.content_type.endswith("json") or req.content_type == "application/json":
                return orjson.loads(raw)
            return yaml.safe_load(raw)
        except (orjson.JSONDecodeError, yaml.YAMLError) as e:
            return status(400, "BadRequest", f"cannot parse the request body: {e}")

    def _fit_to_url(self, obj: object, kind: Kind, version: str, ns: str | None, name: str | None
                    ) -> dict | web.Response:
        """Check a body against its URL (name, namespace, kind) and fill what the URL implies."""
        if not isinstance(obj, dict):
            return status(400, "BadRequest", "the request body must be one object")
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            return status(400, "BadRequest", "metadata must be an object")
        if obj.get("kind", kind.kind) != kind.kind:
            return status(400, "BadRequest", f"the body's kind {obj.get('kind')!r} does not match {kind.kind} of the URL")
        if name and meta.get("name", name) != name:
            return status(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the name on "
                                             f"the URL ({name})")
        if kind.namespaced and ns and meta.get("namespace", ns) != ns:
            return status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent "
                                             "on the request")
        if name:
            meta["name"] = name
        if kind.namespaced:
            meta["namespace"] = ns or meta.get("namespace") or "default"
        obj.setdefault("kind", kind.kind)
        obj.setdefault("apiVersion", kind.api_version(version))
        if kind.group.endswith("istio.io"):
            obj.pop("status", None)  # the registry computes it
        return obj

    async def _write(self, kind: Kind, name: str, obj: dict, expect: str | None | bool, created_code: int = 201
                     ) -> web.Response:
        """Validate and store one object; `expect`: a resourceVersion, None (must not exist) or False (no check)."""
        key = key_of({"kind": kind.kind, "metadata": obj["metadata"]})
        try:
            result = await self.registry.apply_documents(
                [Document("request", 0, obj)], obj["metadata"].get("namespace") or "default",
                expect=None if expect is False else {key: expect})
        except ApplyError as e:
            return invalid_status(kind, name, e)
        except Conflict as c:
            return conflict_status(kind, name, c)
        stored = await self.store.get(key)
        code = created_code if result["results"][0]["action"] == "created" else 200
        resp = _json(self._view(stored or obj, kind, obj["apiVersion"].rsplit("/", 1)[-1]), code)
        add_warnings(resp, result.get("warnings") or [])
        return resp

    async def handle_create(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, version, ns, _ = r
        body = await self._read_body(req)
        if isinstance(body, web.Response):
            return body
        obj = self._fit_to_url(body, kind, version, ns, None)
        if isinstance(obj, web.Response):
            return obj
        name = obj["metadata"].get("name")
        if not name and obj["metadata"].get("generateName"):
            name = obj["metadata"]["generateName"] + secrets.token_hex(3)[:5]
            obj["metadata"]["name"] = name
        obj["metadata"].pop("resourceVersion", None)
        obj = record_update(None, obj, _manager(req, "unknown"), obj["apiVersion"])
        if req.query.get("dryRun"):
            return await self._dry_run(kind, obj, 201)
        return await self._write(kind, str(name), obj, None)

    async def _dry_run(self, kind: Kind, obj: dict, code: int) -> web.Response:
        from ..mesh.validation import check_documents

        _ok, errors = check_documents([Document("request", 0, obj)], obj["metadata"].get("namespace") or "default")
        if errors:
            return invalid_status(kind, obj["metadata"].get("name", ""), ApplyError(errors))
        return _json(with_status(redact_secret(obj), kind), code)

    async def handle_update(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, version, ns, name = r
        body = await self._read_body(req)
        if isinstance(body, web.Response):
            return body
        obj = self._fit_to_url(body, kind, version, ns, name)
        if isinstance(obj, web.Response):
            return obj
        key = key_of(obj)
        old = await self.store.get(key)
        rv = obj["metadata"].get("resourceVersion")
        if old is not None and "managedFields" not in obj["metadata"]:
            obj["metadata"]["managedFields"] = old["metadata"].get("managedFields") or []
        obj = record_update(old, obj, _manager(req, "unknown"), obj["apiVersion"])
        if req.query.get("dryRun"):
            return await self._dry_run(kind, obj, 200)
        # with a resourceVersion the update is conditional (409 when stale); without, create or replace
        return await self._write(kind, name or "", obj, str(rv) if rv else False)

    async def handle_patch(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, version, ns, name = r
        ctype = req.content_type
        body = await self._read_body(req)
        if isinstance(body, web.Response):
            return body
        key = object_key(kind.kind, ns if kind.namespaced else None, name or "")
        api_version = kind.api_version(version)
        for _attempt in range(5):  # a patch without a resourceVersion retries when a writer came between
            live = await self.store.get(key)
            if ctype == "application/apply-patch+yaml":
                resp = self._server_side_apply(req, kind, version, ns, name or "", live, body)
            else:
                resp = self._patched(ctype, kind, live, body, name or "")
            if isinstance(resp, web.Response):
                return resp
            new = resp
            new = self._fit_to_url(new, kind, version, ns, name)
            if isinstance(new, web.Response):
                return new
            new["apiVersion"] = api_version if ctype != "application/apply-patch+yaml" else new["apiVersion"]
            if ctype != "application/apply-patch+yaml":
                new = record_update(live, new, _manager(req, "unknown"), api_version)
            if req.query.get("dryRun"):
                return await self._dry_run(kind, new, 200)
            want = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
            expect = str(want) if want else (live["metadata"]["resourceVersion"] if live else None)
            new["metadata"].pop("resourceVersion", None)
            resp = await self._write(kind, name or "", new, expect)
            if resp.status == 409 and not want and b'"Conflict"' in resp.body:
                continue
            return resp
        return status(409, "Conflict", f'{_kind_ref(kind)} "{name}": too many concurrent writers, try again')

    def _patched(self, ctype: str, kind: Kind, live: dict | None, body: object, name: str) -> dict | web.Response:
        if live is None:
            return status(404, "NotFound", f'{_kind_ref(kind)} "{name}" not found',
                          {"name": name, "group": kind.group, "kind": kind.plural})
        base = {k: v for k, v in live.items() if k != "status"}
        try:
            if ctype == "application/merge-patch+json":
                out = merge_patch(base, body)
            elif ctype == "application/json-patch+json":
                out = json_patch(base, body)
            elif ctype == "application/strategic-merge-patch+json":
                if kind.group.endswith("istio.io"):
                    return status(415, "UnsupportedMediaType",
                                  "strategic merge patch is not supported for custom resources; use a JSON merge patch")
                out = strategic_merge_patch(kind.kind, base, body)  # type: ignore[arg-type]
            else:
                return status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                              f"- accepted media types include: application/json-patch+json, application/merge-patch+"
                              f"json, application/apply-patch+yaml{', application/strategic-merge-patch+json' if not kind.group.endswith('istio.io') else ''}")
        except PatchError as e:
            return status(e.code, "Invalid" if e.code == 422 else "BadRequest", str(e))
        if not isinstance(out, dict):
            return status(400, "BadRequest", "the patch did not produce an object")
        return out

    def _server_side_apply(self, req: web.Request, kind: Kind, version: str, ns: str | None, name: str,
                           live: dict | None, body: object) -> dict | web.Response:
        manager = req.query.get("fieldManager")
        if not manager:
            return status(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: "
                                          "is required for apply patch")
        applied = self._fit_to_url(body, kind, version, ns, name)
        if isinstance(applied, web.Response):
            return applied
        force = req.query.get("force") in ("true", "1", "True")
        merged, conflicts = server_side_apply(live, applied, manager, force, applied["apiVersion"])
        if conflicts:
            causes = [{"reason": "FieldManagerConflict", "field": c.field,
                       "message": f'conflict with "{c.manager}": {c.field}'} for c in conflicts]
            msg = f"Apply failed with {len(causes)} conflict{'s' if len(causes) > 1 else ''}: " + \
                "; ".join(c["message"] for c in causes)
            return status(409, "Conflict", msg, {"name": name, "group": kind.group, "kind": kind.plural,
                                                 "causes": causes})
        merged["apiVersion"] = applied["apiVersion"]
        merged["kind"] = kind.kind
        return merged

    async def handle_delete(self, req: web.Request) -> web.Response:
        r = self._resolve(req)
        if isinstance(r, web.Response):
            return r
        kind, version, ns, name = r
        key = object_key(kind.kind, ns if kind.namespaced else None, name or "")
        obj = await self.store.get(key)
        if obj is None:
            return status(404, "NotFound", f'{_kind_ref(kind)} "{name}" not found',
                          {"name": name, "group": kind.group, "kind": kind.plural})
        pre = await self._delete_preconditions(req)
        if isinstance(pre, web.Response):
            return pre
        meta = obj["metadata"]
        if (pre.get("uid") and pre["uid"] != meta.get("uid")) or \
                (pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion")):
            return status(409, "Conflict", f'Operation cannot be fulfilled on {_kind_ref(kind)} "{name}": '
                                           f"the precondition (uid/resourceVersion) does not match the object",
                          {"name": name, "group": kind.group, "kind": kind.plural})
        if req.query.get("dryRun"):
            return _json(self._view(obj, kind, version))
        try:
            # conditional on the version checked above only when the client gave preconditions
            result = await self.registry.delete_keys([key], {key: meta.get("resourceVersion")} if pre else None)
        except Conflict as c:
            return conflict_status(kind, name or "", c)
        if not result["deleted"]:
            return status(404, "NotFound", f'{_kind_ref(kind)} "{name}" not found')
        # the API server answers a completed delete of these kinds with the deleted object (typed clients such
        # as CoreV1Api.delete_namespaced_service decode it as such); failures are Status objects
        return _json(self._view(obj, kind, version))

    async def _delete_preconditions(self, req: web.Request) -> dict | web.Response:
        """DeleteOptions.preconditions from the body (kubectl and the clients send DeleteOptions)."""
        raw = await req.read()
        if not raw.strip():
            return {}
        try:
            opts = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return status(400, "BadRequest", f"DeleteOptions must be JSON: {e}")
        pre = opts.get("preconditions") if isinstance(opts, dict) else None
        return {k: str(v) for k, v in pre.items() if v} if isinstance(pre, dict) else {}

    # ---- watch ----
    async def _watch(self, req: web.Request, kind: Kind, version: str, ns: str | None,
                     match: Callable[[dict], bool]) -> web.StreamResponse:
        bookmarks = req.query.get("allowWatchBookmarks") in ("true", "1", "True")
        try:
            timeout = float(req.query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
            since = req.query.get("resourceVersion") or ""
            since_rev = int(since) if since not in ("", "0") else None
        except ValueError as e:
            return status(400, "BadRequest", f"invalid watch parameter: {e}")
        table_mode = wants_table(req)
        q = self.follower.subscribe()
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        try:
            await resp.prepare(req)

            def wanted(obj: dict) -> bool:
                meta = obj.get("metadata") or {}
                return obj.get("kind") == kind.kind and (not kind.namespaced or ns is None or
                                                         meta.get("namespace") == ns) and match(obj)

            async def send(typ: str, obj: dict) -> None:
                shown = self._view(obj, kind, version)
                if table_mode:
                    shown = table(kind, [shown], {"resourceVersion": shown["metadata"].get("resourceVersion", "")})
                await resp.write(orjson.dumps({"type": typ, "object": shown}) + b"\n")

            initial = req.query.get("sendInitialEvents") in ("true", "1", "True")
            complete = since_rev is None or initial
            if complete:
                # the current state as ADDED events, then changes after it (also client-go's watch-list mode,
                # which ends the initial events with a bookmark annotated k8s.io/initial-events-end)
                last, items = await self.store.list(kind.kind, ns if kind.namespaced else None)
                view = WatchView(kind.kind, wanted, True, last)
                for o in items:
                    if match(o):
                        await send("ADDED", o)
                        view.listed(o)
                if initial:
                    await resp.write(orjson.dumps({"type": "BOOKMARK", "object": {
                        "kind": kind.kind, "apiVersion": kind.api_version(version),
                        "metadata": {"resourceVersion": str(last),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}}) + b"\n")
                backlog: list[dict] = []
            else:
                view = WatchView(kind.kind, wanted, False, since_rev)
                found = await self.store.log_since(since_rev)
                if found is None:
                    await resp.write(orjson.dumps({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": f"too old resource version: {since_rev}", "reason": "Expired", "code": 410}})
                        + b"\n")
                    return resp
                backlog = found
            deadline = time.monotonic() + timeout
            idle_since = time.monotonic()

            async def play(entry: dict) -> None:
                keys = view.live_keys(entry)
                live = await self.store.get_many(keys) if keys else {}
                for typ, obj in view.events(entry, live):
                    await send(typ, obj)

            for entry in backlog:
                await play(entry)
            while time.monotonic() < deadline and not self.closing.is_set():
                try:
                    entry = await asyncio.wait_for(q.get(), timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                except TimeoutError:
                    if bookmarks and time.monotonic() - idle_since >= BOOKMARK_SECONDS:
                        idle_since = time.monotonic()
                        await resp.write(orjson.dumps({"type": "BOOKMARK", "object": {
                            "kind": kind.kind, "apiVersion": kind.api_version(version),
                            "metadata": {"resourceVersion": str(view.last)}}}) + b"\n")
                    continue
                if entry is None:
                    break  # fell too far behind: the client watches again from its resourceVersion
                await play(entry)
                idle_since = time.monotonic()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.follower.unsubscribe(q)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp

    @web.middleware
    async def errors_as_status(self, req: web.Request, handler):
        """Under /api and /apis, routing errors are Status objects too (kubectl prints their message)."""
        try:
            return await handler(req)
        except web.HTTPMethodNotAllowed as e:
            if not req.path.startswith("/api"):
                raise
            return status(405, "MethodNotAllowed", f"the server does not allow this method on the requested "
                                                   f"resource ({req.method} {req.path}; allowed: "
                                                   f"{', '.join(sorted(e.allowed_methods))})")
        except web.HTTPNotFound:
            if not req.path.startswith("/api"):
                raise
            return status(404, "NotFound", f"the server could not find the requested resource ({req.path})")

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self.errors_as_status)
        r = app.router
        r.add_get("/version", self.handle_version)
        r.add_get("/api", self.handle_api)
        r.add_get("/apis", self.handle_apis)
        r.add_get("/openapi/v2", self.handle_openapi_v2)
        r.add_get("/openapi/v3", self.handle_openapi_v3_root)
        r.add_get("/openapi/v3/{path:.+}", self.handle_openapi_v3)
        r.add_get("/api/{version}", self.handle_resources)
        r.add_get("/apis/{group}", self.handle_group)
        r.add_get("/apis/{group}/{version}", self.handle_resources)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            for coll in (prefix + "/namespaces/{namespace}/{plural}", prefix + "/{plural}"):
                r.add_get(coll, self.handle_list)
                r.add_post(coll, self.handle_create)
                r.add_get(coll + "/{name}", self.handle_get)
                r.add_put(coll + "/{name}", self.handle_update)
                r.add_patch(coll + "/{name}", self.handle_patch)
                r.add_delete(coll + "/{name}", self.handle_delete)

    async def close(self) -> None:
        self.closing.set()
        if self.follower.subscribers:
            await asyncio.sleep(1.1)  # one watch poll: the open watches see `closing` and end their streams
        await self.follower.close()
