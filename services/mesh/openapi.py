"""Kubernetes discovery documents and OpenAPI (v2 and v3), derived from the kinds table and the validation schemas.

Nothing here is written by hand per kind: a kind added to `kinds.KINDS` (with its short names in
`kinds.ALIASES`) and a schema in validation appears in `/apis`, in `kubectl api-resources` and in the OpenAPI
that kubectl reads to validate and to build strategic merge patches.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import orjson

from . import kinds
from .kinds import Kind
from .patches import MERGE_KEYS, MERGE_PRIMITIVE_LISTS
from .validation import schema_for
from .validation.schema import Bool, Duration, Int, IntOrStr, List, Map, Num, Obj, Opaque, Schema, Str

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
GIT_VERSION = "v1.31.0-mizzen"

META = "io.k8s.apimachinery.pkg.apis.meta.v1"


def short_names(kind: Kind) -> list[str]:
    """Aliases other than the singular: `vs`, `dr`, `svc`, … (from kinds.ALIASES)."""
    singular = kind.kind.lower()
    return sorted(a for a, k in kinds.ALIASES.items()
                  if k == kind.kind and a not in (singular, kind.plural) and a + "s" != singular)


def categories(kind: Kind) -> list[str]:
    if kind.group.endswith("istio.io"):
        return ["istio-io", kind.group.replace(".", "-").removesuffix("-io") + "-io"]
    return ["all"] if kind.kind in ("Service", "Pod") else []


def group_versions() -> dict[str, list[str]]:
    """group → its versions, preferred (newest for Istio) first; "" is the core group."""
    out: dict[str, list[str]] = {}
    for k in kinds.KINDS:
        vs = out.setdefault(k.group, [])
        for v in k.versions:
            if v not in vs:
                vs.append(v)
    for g, vs in out.items():
        preferred = next(preferred_version(k) for k in kinds.KINDS if k.group == g)
        order = list(vs)
        vs.sort(key=lambda v, order=order, preferred=preferred: (v != preferred, -order.index(v)))
    return out


def preferred_version(kind: Kind) -> str:
    """Istio's groups prefer their newest version (security.istio.io/v1 over v1beta1), as istiod's CRDs do."""
    return kind.versions[-1] if kind.group.endswith("istio.io") else kind.versions[0]


def kinds_in(group: str, version: str) -> list[Kind]:
    return [k for k in kinds.KINDS if k.group == group and version in k.versions]


def api_versions() -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}


def api_group_list() -> dict:
    groups = []
    for g, vs in group_versions().items():
        if not g:
            continue
        versions = [{"groupVersion": f"{g}/{v}", "version": v} for v in vs]
        groups.append({"name": g, "versions": versions, "preferredVersion": versions[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(group: str) -> dict | None:
    vs = group_versions().get(group)
    if not group or not vs:
        return None
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in vs]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
            "preferredVersion": versions[0]}


def api_resource_list(group: str, version: str) -> dict | None:
    ks = kinds_in(group, version)
    if not ks:
        return None
    resources = []
    for k in ks:
        entry = {"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced, "kind": k.kind,
                 "verbs": VERBS, "storageVersionHash": _hash(f"{k.group}/{k.kind}")[:12]}
        if sn := short_names(k):
            entry["shortNames"] = sn
        if cats := categories(k):
            entry["categories"] = cats
        resources.append(entry)
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources}


def version_info() -> dict:
    return {"major": "1", "minor": "31", "gitVersion": GIT_VERSION, "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "", "goVersion": "", "compiler": "mizzen", "platform": "python"}


# ---- OpenAPI --------------------------------------------------------------------------------------------------

def definition_name(kind: Kind, version: str) -> str:
    if kind.group:
        parts = kind.group.split(".")
        return ".".join(reversed(parts[1:])) + f".{parts[0]}.{version}.{kind.kind}"
    return f"io.k8s.api.core.{version}.{kind.kind}"


def _json_schema(s: Schema, ref: str, kind: str, path: str) -> dict:
    """One validation schema node as an OpenAPI schema (`ref` prefixes `$ref`s: v2 or v3 style)."""
    if isinstance(s, Obj):
        props = {}
        for name, sub in s.fields.items():
            sub_path = f"{path}.{name}" if path else name
            if sub_path == "metadata":
                props[name] = {"$ref": f"{ref}{META}.ObjectMeta"}
            else:
                props[name] = _json_schema(sub, ref, kind, sub_path)
        out: dict = {"type": "object", "properties": props}
        req = [r for r in s._required]  # noqa: SLF001 - the schema's own normalised list
        if req:
            out["required"] = req
        if s.open:
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out
    if isinstance(s, List):
        out = {"type": "array", "items": _json_schema(s.item, ref, kind, path)}
        if s.max_items is not None:
            out["maxItems"] = s.max_items
        if s.min_items:
            out["minItems"] = s.min_items
        key = MERGE_KEYS.get((kind, path))
        if key:
            out |= {"x-kubernetes-patch-merge-key": key, "x-kubernetes-patch-strategy": "merge",
                    "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}
        elif path in MERGE_PRIMITIVE_LISTS:
            out |= {"x-kubernetes-patch-strategy": "merge", "x-kubernetes-list-type": "set"}
        else:
            out["x-kubernetes-list-type"] = "atomic"
        return out
    if isinstance(s, Map):
        return {"type": "object", "additionalProperties": _json_schema(s.value, ref, kind, path)}
    if isinstance(s, Str):
        out = {"type": "string"}
        if s.enum:
            out["enum"] = list(s.enum)
        if s.max_len is not None:
            out["maxLength"] = s.max_len
        return out
    if isinstance(s, Duration):
        return {"type": "string", "format": "duration"}
    if isinstance(s, Bool):
        return {"type": "boolean"}
    if isinstance(s, Int):
        return {"type": "integer", "format": "int32" if s.hi <= 2**31 - 1 and s.lo >= -(2**31) else "int64"}
    if isinstance(s, Num):
        return {"type": "number", "format": "double"}
    if isinstance(s, IntOrStr):
        return {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    if isinstance(s, Opaque):
        return {"x-kubernetes-preserve-unknown-fields": True}
    return {"x-kubernetes-preserve-unknown-fields": True}


def _object_meta(ref: str) -> dict:
    strmap = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "description": "Standard object metadata.", "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "selfLink": {"type": "string"}, "uid": {"type": "string"}, "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "labels": strmap, "annotations": strmap,
        "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            "x-kubernetes-patch-merge-key": "uid", "x-kubernetes-patch-strategy": "merge"},
        "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-patch-strategy": "merge"},
        "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }}


def _status_def() -> dict:
    return {"type": "object", "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Status"}],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "status": {"type": "string"},
                           "message": {"type": "string"}, "reason": {"type": "string"},
                           "code": {"type": "integer", "format": "int32"},
                           "details": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                           "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}


def kind_definition(kind: Kind, version: str, ref: str) -> dict:
    schema = schema_for(kind.kind)
    if schema is None:
        body: dict = {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                      "properties": {"metadata": {"$ref": f"{ref}{META}.ObjectMeta"}}}
    else:
        body = _json_schema(schema, ref, kind.kind, "")
        body["properties"]["metadata"] = {"$ref": f"{ref}{META}.ObjectMeta"}
    body["properties"]["apiVersion"] = {"type": "string"}
    body["properties"]["kind"] = {"type": "string"}
    body["description"] = f"{kind.kind} ({kind.api_version(version)}), as validated by Mizzen."
    body["x-kubernetes-group-version-kind"] = [{"group": kind.group, "version": version, "kind": kind.kind}]
    return body


def _list_definition(kind: Kind, version: str, ref: str) -> dict:
    return {"type": "object", "required": ["items"],
            "x-kubernetes-group-version-kind": [{"group": kind.group, "version": version, "kind": f"{kind.kind}List"}],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                           "items": {"type": "array", "items": {"$ref": ref + definition_name(kind, version)}}}}


_QUERY = ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")


def _operations(kind: Kind, version: str, ref: str, v3: bool) -> dict:
    gvk = {"group": kind.group, "version": version, "kind": kind.kind}
    obj_ref = {"$ref": ref + definition_name(kind, version)}

    def body(schema: dict) -> dict:
        return {"description": "OK", "content": {"application/json": {"schema": schema}}} if v3 else \
               {"description": "OK", "schema": schema}

    def params(*names: str) -> list[dict]:
        if v3:
            return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]
        return [{"name": n, "in": "query", "type": "string"} for n in names]

    def op(action: str, verb: str, response: dict, q: tuple[str, ...] = ()) -> dict:
        return {"operationId": f"{verb}{kind.kind}", "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk, "parameters": params(*q), "responses": {"200": body(response)}}

    list_ref = {"$ref": ref + definition_name(kind, version) + "List"}
    item = {"get": op("get", "read", obj_ref), "put": op("put", "replace", obj_ref, _QUERY),
            "patch": op("patch", "patch", obj_ref, _QUERY), "delete": op("delete", "delete", {"$ref": f"{ref}{META}.Status"})}
    coll = {"get": op("list", "list", list_ref, ("labelSelector", "fieldSelector", "limit", "continue",
                                                  "resourceVersion", "watch")),
            "post": op("post", "create", obj_ref, _QUERY)}
    base = kind.path(version=version).rsplit("/", 1)[0]
    out = {}
    if kind.namespaced:
        out[f"{base}/namespaces/{{namespace}}/{kind.plural}"] = coll
        out[f"{base}/namespaces/{{namespace}}/{kind.plural}/{{name}}"] = item
        out[f"{base}/{kind.plural}"] = {"get": coll["get"]}
    else:
        out[f"{base}/{kind.plural}"] = coll
        out[f"{base}/{kind.plural}/{{name}}"] = item
    return out


def _common_defs(ref: str) -> dict:
    return {f"{META}.ObjectMeta": _object_meta(ref), f"{META}.Status": _status_def()}


@lru_cache(maxsize=64)
def openapi_v3_doc(group: str, version: str) -> bytes | None:
    ks = kinds_in(group, version)
    if not ks:
        return None
    ref = "#/components/schemas/"
    schemas = _common_defs(ref)
    paths: dict = {}
    for k in ks:
        schemas[definition_name(k, version)] = kind_definition(k, version, ref)
        schemas[definition_name(k, version) + "List"] = _list_definition(k, version, ref)
        paths |= _operations(k, version, ref, v3=True)
    doc = {"openapi": "3.0.0", "info": {"title": "Mizzen", "version": GIT_VERSION}, "paths": paths,
           "components": {"schemas": schemas}}
    return orjson.dumps(doc)


def openapi_v3_root() -> dict:
    paths = {}
    for g, vs in group_versions().items():
        for v in vs:
            rel = f"apis/{g}/{v}" if g else f"api/{v}"
            doc = openapi_v3_doc(g, v) or b""
            paths[rel] = {"serverRelativeURL": f"/openapi/v3/{rel}?hash={_hash(doc.decode())[:32].upper()}"}
    return {"paths": paths}


@lru_cache(maxsize=1)
def openapi_v2_doc() -> bytes:
    ref = "#/definitions/"
    defs = _common_defs(ref)
    paths: dict = {}
    for g, vs in group_versions().items():
        for v in vs:
            for k in kinds_in(g, v):
                defs[definition_name(k, v)] = kind_definition(k, v, ref)
                defs[definition_name(k, v) + "List"] = _list_definition(k, v, ref)
                paths |= _operations(k, v, ref, v3=False)
    return orjson.dumps({"swagger": "2.0", "info": {"title": "Mizzen", "version": GIT_VERSION}, "paths": paths,
                         "definitions": defs})


def _hash(text: str) -> str:
    return hashlib.sha512(text.encode()).hexdigest()
