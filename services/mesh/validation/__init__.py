"""Validation of the resources a user applies, following Istio's `pkg/config/validation` rules.

`check_documents` is the one entry point: it normalises each document (namespace defaulting, apiVersion and
kind checks, metadata) and runs the kind's validator. Per-kind rules live in the modules beside this one and
register themselves in `VALIDATORS`:

- `kube.py`: Namespace, Node, Service, Endpoints, EndpointSlice, Pod (Kubernetes' own rules and wording);
- `istio.py` with `istio_schema.py` (the structural schema of every Istio kind) and one module per kind
  (`virtualservice.py`, `destinationrule.py`, `gateway.py`, `sidecar.py`, `serviceentry.py`);
- `schema.py` (the structural checker) and `common.py` (hosts, ports, labels, IPs, regexes, exportTo).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from ..errors import DocumentError, FieldError
from ..kinds import BY_KIND, kind_for_api_version, unmodelled_reason
from ..yamlio import Document
from .common import (
    Errs,
    check_k8s_labels,
    invalid,
    k8s_label_errors,
    k8s_subdomain_errors,
    qualified_name_errors,
)
from .schema import Map, Str, check, unknown_field
from .security import security_warnings
from .untranslated import untranslated_fields

# kind → validator(obj) → list of field errors (paths relative to the object root, e.g. "spec.hosts[0]").
VALIDATORS: dict[str, Callable[[dict], list[FieldError]]] = {}

_OBJECT_META_FIELDS = (
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers",
    "managedFields",
)
_MAX_ANNOTATIONS_BYTES = 256 * 1024


def register(kind: str):
    def deco(fn: Callable[[dict], list[FieldError]]):
        VALIDATORS[kind] = fn
        return fn

    return deco


def normalize(value: object) -> object:
    """What the Kubernetes API server does before validating: nulls dropped, map keys made strings.

    Dropping nulls (as for non-nullable CRD fields) makes `route:` with nothing after it mean "no route", and
    keeps None out of the stored dicts. Keys become strings the way YAML→JSON conversion makes them (YAML reads
    `8080:` as an integer and `on:` as a boolean; JSON, and so the store, only has string keys).
    """
    if isinstance(value, dict):
        return {_key_str(k): normalize(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def _key_str(k: object) -> object:
    if isinstance(k, bool):
        return "true" if k else "false"
    if isinstance(k, int | float):
        return str(k)
    return k


def _check_metadata(obj: dict, namespaced: bool) -> list[FieldError]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [FieldError("metadata", "Required value" if meta is None else "must be an object")]
    errs = Errs()
    for k in meta:
        if k not in _OBJECT_META_FIELDS:
            errs.add(f"metadata.{k}", unknown_field(str(k), _OBJECT_META_FIELDS))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errs.add("metadata.name", "name is required" if name in (None, "") else "must be a string")
    else:
        for m in k8s_subdomain_errors(name):
            errs.add("metadata.name", invalid(name, m))
    ns = meta.get("namespace")
    if namespaced and ns is not None:
        if not isinstance(ns, str):
            errs.add("metadata.namespace", "must be a string")
        else:
            for m in k8s_label_errors(ns):
                errs.add("metadata.namespace", invalid(ns, m))
    for fld in ("labels", "annotations"):
        if fld not in meta:
            continue
        shape = check(meta[fld], Map(Str()), f"metadata.{fld}")
        if shape:
            errs.items.extend(shape)
            continue
        if fld == "labels":
            check_k8s_labels(meta[fld], "metadata.labels", errs)
        else:
            for k in meta[fld]:
                for m in qualified_name_errors(k):
                    errs.add(f"metadata.annotations[{k}]", invalid(k, m))
            size = sum(len(k) + len(v) for k, v in meta[fld].items())
            if size > _MAX_ANNOTATIONS_BYTES:
                errs.add("metadata.annotations", f"Too long: must have at most {_MAX_ANNOTATIONS_BYTES} bytes")
    return errs.items


def load_validators() -> None:
    """Import every kind's validator (importing registers them). Lazy for the CLI; a service calls it at start
    so its first apply does not pay the imports (about 0.1 s, half of applying 1,000 ServiceEntries)."""
    from . import istio, kube  # noqa: F401


def schema_for(kind: str) -> object | None:
    """The structural schema of a whole object of `kind` (for the registry's OpenAPI), or None."""
    load_validators()  # all of them: importing one module alone would leave the others unregistered
    # validators made from a structural schema carry it (kube.py's and istio.py's _make_validator)
    return getattr(VALIDATORS.get(kind), "schema", None)


def validate_object(obj: dict) -> list[FieldError]:
    """All errors of one (normalised) object; empty when it is valid."""
    if not VALIDATORS:
        load_validators()
    fn = VALIDATORS.get(obj.get("kind", ""))
    return fn(obj) if fn else []


def _unknown_kind(name: str) -> str:
    if not name:
        return "kind is required"
    close = difflib.get_close_matches(name, list(BY_KIND), n=1, cutoff=0.8)
    return f"unknown kind {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def check_documents(
    docs: list[Document | DocumentError], default_namespace: str = "default",
    skipped: list[dict] | None = None, warnings: list[DocumentError] | None = None,
) -> tuple[list[dict], list[DocumentError]]:
    """Normalise and validate documents; returns (objects, errors).

    All or nothing: when any document is invalid, `objects` is empty and `errors` names every bad document
    (file, document index, kind, namespace, name, and each field), so a caller can never store half an apply.
    A document of a kind Mizzen does not model (a Deployment beside its Service; see
    `kinds.unmodelled_reason`) is appended to `skipped` when the caller passes that list, and is an error
    otherwise. Fields Mizzen accepts but does not translate yet are named in `warnings` when given.
    """
    objects: list[dict] = []
    errors: list[DocumentError] = []
    seen: dict[tuple[str, str, str], tuple[str, int]] = {}
    for d in docs:
        if isinstance(d, DocumentError):
            errors.append(d)
            continue
        obj = d.obj
        kind_name = obj.get("kind") if isinstance(obj.get("kind"), str) else ""
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        api_version = obj.get("apiVersion") if isinstance(obj.get("apiVersion"), str) else ""
        kind = BY_KIND.get(kind_name)
        ns = ""
        if kind is None:
            ns = meta.get("namespace") or ""  # as written: the kind is unknown, so is its scope
        elif kind.namespaced:
            ns = meta.get("namespace") or default_namespace
        doc_err = DocumentError(d.source, d.index, kind_name, ns if isinstance(ns, str) else "", name)
        if kind is None and skipped is not None and (why := unmodelled_reason(api_version, kind_name)):
            skipped.append({"source": d.source, "document": d.index, "apiVersion": api_version, "kind": kind_name,
                            "namespace": meta.get("namespace") or "", "name": name, "reason": why})
            continue
        if kind is None:
            doc_err.errors.append(FieldError("kind", _unknown_kind(kind_name)))
            errors.append(doc_err)
            continue
        if kind_for_api_version(api_version, kind_name) is None:
            allowed = ", ".join(kind.api_version(v) for v in kind.versions)
            doc_err.errors.append(FieldError("apiVersion", f"apiVersion {api_version!r} is not served for {kind_name} (use {allowed})"))
        obj = normalize(obj)
        doc_err.errors.extend(_check_metadata(obj, kind.namespaced))
        if not doc_err.errors:
            obj["metadata"] = dict(obj["metadata"])
            if kind.namespaced:
                obj["metadata"]["namespace"] = ns
            else:
                obj["metadata"].pop("namespace", None)
            doc_err.errors.extend(validate_object(obj))
            ident = (kind_name, ns, name)
            if ident in seen:
                src, idx = seen[ident]
                doc_err.errors.append(FieldError("metadata.name", f"duplicate of {src}, document {idx} in the same apply"))
            else:
                seen[ident] = (d.source, d.index)
        if doc_err.errors:
            errors.append(doc_err)
            continue
        objects.append(obj)
        if warnings is not None and (untranslated := untranslated_fields(obj) + security_warnings(obj)):
            warnings.append(DocumentError(d.source, d.index, kind_name, ns, name, untranslated))
    return ([] if errors else objects), errors
