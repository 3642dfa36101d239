"""Validation of the resources a user applies, following Istio's `pkg/config/validation` rules.

`check_documents` is the one entry point: it normalises each document (namespace defaulting, apiVersion and
kind checks, metadata) and runs the kind's validator. Per-kind rules live in the modules beside this one and
register themselves in `VALIDATORS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import DocumentError, FieldError
from ..kinds import BY_KIND, kind_for_api_version
from ..yamlio import Document

# kind → validator(obj) → list of field errors (paths relative to the object root, e.g. "spec.hosts[0]").
VALIDATORS: dict[str, Callable[[dict], list[FieldError]]] = {}

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def register(kind: str):
    def deco(fn: Callable[[dict], list[FieldError]]):
        VALIDATORS[kind] = fn
        return fn

    return deco


def _check_metadata(obj: dict, namespaced: bool) -> list[FieldError]:
    errs: list[FieldError] = []
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [FieldError("metadata", "metadata is required")]
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errs.append(FieldError("metadata.name", "name is required"))
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        errs.append(FieldError("metadata.name", f"invalid name {name!r}: must be a lowercase RFC 1123 subdomain"))
    ns = meta.get("namespace")
    if namespaced and ns is not None and (not isinstance(ns, str) or not _DNS1123_LABEL.match(ns)):
        errs.append(FieldError("metadata.namespace", f"invalid namespace {ns!r}: must be a DNS-1123 label"))
    for fld in ("labels", "annotations"):
        v = meta.get(fld)
        if v is not None and (not isinstance(v, dict) or not all(isinstance(k, str) for k in v)):
            errs.append(FieldError(f"metadata.{fld}", f"{fld} must be a map of strings"))
    return errs


def _load_kind_modules() -> None:
    # Importing the modules registers their validators.
    from . import istio, kube  # noqa: F401


def validate_object(obj: dict) -> list[FieldError]:
    """All errors of one (normalised) object; empty when it is valid."""
    if not VALIDATORS:
        _load_kind_modules()
    fn = VALIDATORS.get(obj.get("kind", ""))
    return fn(obj) if fn else []


def check_documents(
    docs: list[Document | DocumentError], default_namespace: str = "default"
) -> tuple[list[dict], list[DocumentError]]:
    """Normalise and validate documents; returns (objects, errors). Callers store nothing if errors is non-empty."""
    objects: list[dict] = []
    errors: list[DocumentError] = []
    seen: dict[tuple[str, str, str], int] = {}
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
        if kind is not None and kind.namespaced:
            ns = meta.get("namespace") or default_namespace
        doc_err = DocumentError(d.source, d.index, kind_name, ns if isinstance(ns, str) else "", name)
        if kind is None:
            field = "kind" if kind_name else "kind"
            doc_err.errors.append(FieldError(field, f"unknown kind {kind_name!r}" if kind_name else "kind is required"))
            errors.append(doc_err)
            continue
        if kind_for_api_version(api_version, kind_name) is None:
            allowed = ", ".join(kind.api_version(v) for v in kind.versions)
            doc_err.errors.append(FieldError("apiVersion", f"apiVersion {api_version!r} is not served for {kind_name} (use {allowed})"))
        doc_err.errors.extend(_check_metadata(obj, kind.namespaced))
        if not doc_err.errors:
            obj = dict(obj)
            obj["metadata"] = dict(obj["metadata"])
            if kind.namespaced:
                obj["metadata"]["namespace"] = ns
            else:
                obj["metadata"].pop("namespace", None)
            doc_err.errors.extend(validate_object(obj))
            ident = (kind_name, ns, name)
            if ident in seen:
                doc_err.errors.append(FieldError("metadata.name", f"duplicate of document {seen[ident]} in the same apply"))
            seen[ident] = d.index
        if doc_err.errors:
            errors.append(doc_err)
        else:
            objects.append(obj)
    return objects, errors
