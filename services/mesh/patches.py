"""The Kubernetes API's PATCH flavours and server-side apply, as pure functions over JSON objects.

- JSON merge patch (RFC 7386, `application/merge-patch+json`): maps merge, `null` deletes, lists replace.
- JSON patch (RFC 6902, `application/json-patch+json`), through the `jsonpatch` package.
- Strategic merge patch (`application/strategic-merge-patch+json`, core kinds only, as on the API server):
  like a merge patch, but lists with a merge key (a Service's `ports` by `port`, a Pod's `containers` by
  `name`, …) merge element by element, and kubectl's directives are honoured (`$patch: replace|delete`,
  `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`, `$retainKeys`).
- Server-side apply (`application/apply-patch+yaml`): field ownership per manager in `metadata.managedFields`
  (FieldsV1), conflicts when another manager owns a field the applied config sets to a different value, and
  removal of fields a manager applied before and no longer applies. Lists are owned whole (atomic), as for a
  CRD list without `x-kubernetes-list-type`; maps are owned key by key.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import jsonpatch
import orjson


class PatchError(ValueError):
    """A patch that cannot be applied: 400 when the patch itself is malformed, 422 when it does not fit the
    object (a JSON patch `test` that fails, a path that is not there)."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


# ---- JSON merge patch ----------------------------------------------------------------------------------------

def merge_patch(target: object, patch: object) -> object:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: dict, ops: object) -> dict:
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, ops)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as e:
        raise PatchError(f"the JSON patch cannot be applied: {e}", 422) from e


# ---- strategic merge patch -----------------------------------------------------------------------------------

# (kind, path of the list with list indices dropped) → merge key, from the Go types' `patchMergeKey` tags.
MERGE_KEYS: dict[tuple[str, str], str] = {
    ("Service", "spec.ports"): "port",
    ("Pod", "spec.containers"): "name",
    ("Pod", "spec.initContainers"): "name",
    ("Pod", "spec.containers.ports"): "containerPort",
    ("Pod", "spec.initContainers.ports"): "containerPort",
    ("Pod", "spec.containers.env"): "name",
    ("Pod", "spec.initContainers.env"): "name",
    ("Pod", "spec.containers.volumeMounts"): "mountPath",
    ("Pod", "spec.initContainers.volumeMounts"): "mountPath",
    ("Pod", "spec.volumes"): "name",
    ("Pod", "status.podIPs"): "ip",
    ("Pod", "status.conditions"): "type",
}
# lists of scalars whose patch strategy is "merge" (union) instead of replace
MERGE_PRIMITIVE_LISTS = {"metadata.finalizers"}
_META_KEYS: dict[str, str] = {"metadata.ownerReferences": "uid"}


def strategic_merge_patch(kind: str, target: dict, patch: dict) -> dict:
    if not isinstance(patch, dict):
        raise PatchError("a strategic merge patch must be an object")
    return _smp_map(kind, "", target, patch)


def _merge_key(kind: str, path: str) -> str | None:
    return _META_KEYS.get(path) or MERGE_KEYS.get((kind, path))


def _smp_map(kind: str, path: str, target: object, patch: dict) -> dict:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k.startswith("$deleteFromPrimitiveList/") or k in ("$retainKeys", "$patch"):
            continue
        sub = f"{path}.{k}" if path else k
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = _smp_map(kind, sub, out.get(k), v)
        elif isinstance(v, list):
            out[k] = _smp_list(kind, sub, out.get(k), v)
        else:
            out[k] = v
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            if isinstance(out.get(name), list) and isinstance(v, list):
                out[name] = [x for x in out[name] if x not in v]
        elif k.startswith("$setElementOrder/"):
            name = k.split("/", 1)[1]
            if isinstance(out.get(name), list) and isinstance(v, list):
                out[name] = _order_like(out[name], v, _merge_key(kind, f"{path}.{name}" if path else name))
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _smp_list(kind: str, path: str, target: object, patch: list) -> list:
    key = _merge_key(kind, path)
    current = list(target) if isinstance(target, list) else []
    if key is None:
        if path in MERGE_PRIMITIVE_LISTS:
            return current + [x for x in patch if x not in current]
        return [_strip_directives(x) for x in patch]
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return [_strip_directives(x) for x in patch if not (isinstance(x, dict) and x.get("$patch") == "replace")]
    out = current
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"{path}: every element must have the merge key {key!r}")
        pos = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if pos is not None:
                out = out[:pos] + out[pos + 1:]
            continue
        if pos is None:
            out = out + [_strip_directives(item)]
        else:
            out = out[:pos] + [_smp_map(kind, path, out[pos], item)] + out[pos + 1:]
    return out


def _order_like(items: list, order: list, key: str | None) -> list:
    """Put the elements named in `$setElementOrder` first, in that order; the rest keep theirs after them."""
    def ident(x: object) -> object:
        return orjson.dumps(x.get(key)) if key and isinstance(x, dict) else orjson.dumps(x)

    rank = {ident(o): i for i, o in enumerate(order)}
    return sorted(items, key=lambda x: rank.get(ident(x), len(rank)))


def _strip_directives(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


# ---- server-side apply ---------------------------------------------------------------------------------------

# metadata the server owns: never part of a manager's field set
_SERVER_META = {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
                "selfLink", "deletionTimestamp"}
FieldSet = frozenset  # of paths, each a tuple of field names (lists are leaves)


def field_set(obj: dict) -> frozenset[tuple[str, ...]]:
    """The leaf paths an object sets (apiVersion/kind, server metadata and status excluded)."""
    out: set[tuple[str, ...]] = set()

    def walk(value: object, path: tuple[str, ...]) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, path + (k,))
        else:
            out.add(path)

    for k, v in obj.items():
        if k in ("apiVersion", "kind", "status"):
            continue
        if k == "metadata" and isinstance(v, dict):
            for mk, mv in v.items():
                if mk not in _SERVER_META:
                    walk(mv, ("metadata", mk))
        else:
            walk(v, (k,))
    return frozenset(out)


def to_fields_v1(paths: frozenset[tuple[str, ...]]) -> dict:
    root: dict = {}
    for p in sorted(paths):
        node = root
        for part in p:
            node = node.setdefault(f"f:{part}", {})
    return root


def from_fields_v1(fields: dict) -> frozenset[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()

    def walk(node: dict, path: tuple[str, ...]) -> None:
        children = [k for k in node if k.startswith("f:")]
        if not children and path:
            out.add(path)
        for k in children:
            walk(node[k] or {}, path + (k[2:],))

    walk(fields or {}, ())
    return frozenset(out)


def _get(obj: object, path: tuple[str, ...]) -> tuple[bool, object]:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def _delete(obj: dict, path: tuple[str, ...]) -> None:
    parents = []
    node: object = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        parents.append((node, part))
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    # drop maps the removal left empty (a field set never names an empty map it did not apply)
    for parent, part in reversed(parents):
        if parent[part] == {}:
            parent.pop(part)
        else:
            break


def _overlaps(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


@dataclass
class ManagerConflict:
    manager: str
    path: tuple[str, ...]

    @property
    def field(self) -> str:
        return "." + ".".join(self.path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def managed_sets(obj: dict | None) -> list[dict]:
    """The object's managedFields entries with their field sets decoded (key `_set`)."""
    out = []
    for e in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        if isinstance(e, dict) and isinstance(e.get("manager"), str):
            out.append(dict(e) | {"_set": from_fields_v1(e.get("fieldsV1") or {})})
    return out


def _encode(entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        if not e["_set"]:
            continue
        e = {k: v for k, v in e.items() if k != "_set"} | {"fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(e["_set"])}
        out.append(e)
    return out


def server_side_apply(live: dict | None, applied: dict, manager: str, force: bool, api_version: str
                      ) -> tuple[dict, list[ManagerConflict]]:
    """Merge an applied configuration into the live object for `manager`.

    Returns (new object, conflicts); when conflicts is non-empty and not forced, the caller answers 409 and
    stores nothing."""
    new_set = field_set(applied)
    entries = managed_sets(live)
    mine = next((e for e in entries if e["manager"] == manager and e.get("operation") == "Apply"), None)
    old_mine = mine["_set"] if mine else frozenset()
    conflicts: list[ManagerConflict] = []
    for e in entries:
        if e is mine:
            continue
        for p in e["_set"]:
            for q in new_set:
                if _overlaps(p, q) and _get(live, q) != _get(applied, q):
                    conflicts.append(ManagerConflict(e["manager"], min(p, q, key=len)))
    conflicts = sorted({(c.manager, c.path): c for c in conflicts}.values(), key=lambda c: (c.manager, c.path))
    if conflicts and not force:
        return live or {}, conflicts
    obj = copy.deepcopy(live) if live else {}
    others = set().union(*(e["_set"] for e in entries if e is not mine)) if entries else set()
    for p in old_mine - new_set:
        if not any(_overlaps(p, o) for o in others):
            _delete(obj, p)
    merged = _apply_merge(obj, applied)
    # the applying manager now owns what it applied; others keep the fields they agree on (shared ownership)
    # and lose, when forced, the ones whose values this apply changed
    for e in entries:
        if e is not mine:
            e["_set"] = frozenset(p for p in e["_set"]
                                  if not any(_overlaps(p, q) and _get(live, q) != _get(applied, q) for q in new_set))
    entry = {"manager": manager, "operation": "Apply", "apiVersion": api_version, "time": _now(), "_set": new_set}
    entries = [e for e in entries if e is not mine] + [entry]
    merged.setdefault("metadata", {})["managedFields"] = _encode(entries)
    return merged, []


def _apply_merge(live: object, applied: object) -> object:
    if isinstance(live, dict) and isinstance(applied, dict):
        out = dict(live)
        for k, v in applied.items():
            out[k] = _apply_merge(live.get(k), v)
        return out
    return copy.deepcopy(applied)


def record_update(old: dict | None, new: dict, manager: str, api_version: str) -> dict:
    """managedFields after a non-apply write (create, update, patch) by `manager`: it takes the fields it
    changed (all of them on create); other managers lose those."""
    entries = managed_sets(old) if old else []
    before = field_set(old) if old else frozenset()
    after = field_set(new)
    changed = frozenset(p for p in after if p not in before or _get(old, p) != _get(new, p))
    removed = before - after
    for e in entries:
        if e["manager"] != manager or e.get("operation") != "Update":
            e["_set"] = frozenset(p for p in e["_set"] if p not in changed and p not in removed)
    mine = next((e for e in entries if e["manager"] == manager and e.get("operation") == "Update"), None)
    if mine is None:
        mine = {"manager": manager, "operation": "Update", "apiVersion": api_version, "_set": frozenset()}
        entries.append(mine)
    mine["_set"] = frozenset((mine["_set"] - removed) | changed)
    mine["time"] = _now()
    out = dict(new)
    out["metadata"] = dict(new.get("metadata") or {}) | {"managedFields": _encode(entries)}
    return out
