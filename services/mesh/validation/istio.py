"""Validators for the Istio kinds, after Istio's `pkg/config/validation`.

Every kind runs in two steps, as the Kubernetes API server does for a CRD: the structural schema
(`istio_schema`: types, unknown fields, enums, required fields, oneofs), then — only when the structure is
sound — Istio's semantic rules (the admission webhook), which live in one module per kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import FieldError
from . import register
from .common import Errs, check_workload_selector
from .destinationrule import check_destination_rule
from .envoyfilter import check_envoy_filter
from .gateway import check_gateway
from .istio_schema import SPECS, top_level
from .schema import check, key
from .security import check_authorization_policy, check_request_authentication
from .serviceentry import check_service_entry, check_workload_entry_object
from .sidecar import check_sidecar
from .virtualservice import check_virtual_service

DRY_RUN_ANNOTATION = "istio.io/dry-run"


def check_peer_authentication(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    selector = spec.get("selector")
    labels = selector.get("matchLabels", {}) if selector is not None else {}
    port_level = spec.get("portLevelMtls")
    if port_level is not None:
        if not labels and port_level:
            errs.add("spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS")
        if not port_level:
            errs.add("spec.portLevelMtls", "port level mTLS, if defined, must have at least one element")
        for port in port_level:
            at = key("spec.portLevelMtls", port)
            if not re.fullmatch(r"[0-9]+", str(port)):
                errs.add(at, f'invalid port "{port}": must be an integer')
            elif not 1 <= int(port) <= 65535:
                errs.add(at, "port must be in range 1..65535")
    if selector is not None:
        check_workload_selector(labels, "spec.selector.matchLabels", errs)


RULES: dict[str, Callable[[dict, Errs], None]] = {
    "VirtualService": check_virtual_service,
    "DestinationRule": check_destination_rule,
    "Gateway": check_gateway,
    "Sidecar": check_sidecar,
    "ServiceEntry": check_service_entry,
    "WorkloadEntry": check_workload_entry_object,
    "PeerAuthentication": check_peer_authentication,
    "AuthorizationPolicy": check_authorization_policy,
    "RequestAuthentication": check_request_authentication,
    "EnvoyFilter": check_envoy_filter,
}
# Kinds that honour `istio.io/dry-run` (an AuthorizationPolicy then becomes shadow rules); others reject it.
DRY_RUN_KINDS = {"AuthorizationPolicy"}


def _make_validator(kind: str) -> Callable[[dict], list[FieldError]]:
    schema = top_level(kind)
    rules = RULES[kind]

    def validate(obj: dict) -> list[FieldError]:
        structural = check(obj, schema)
        if structural:
            return structural
        errs = Errs()
        annotations = obj["metadata"].get("annotations", {})
        if DRY_RUN_ANNOTATION in annotations and kind in DRY_RUN_KINDS:
            if annotations[DRY_RUN_ANNOTATION].lower() not in ("true", "false", "1", "0", "t", "f"):
                errs.add(key("metadata.annotations", DRY_RUN_ANNOTATION),
                         f"invalid annotation {DRY_RUN_ANNOTATION}={annotations[DRY_RUN_ANNOTATION]!r}: must be a "
                         "boolean (true/false)")
        elif DRY_RUN_ANNOTATION in annotations:
            meta = obj["metadata"]
            errs.add(key("metadata.annotations", DRY_RUN_ANNOTATION),
                     f"{meta['namespace']}/{meta['name']} has unsupported annotation {DRY_RUN_ANNOTATION}, "
                     "please remove the annotation")
        rules(obj, errs)
        return errs.items

    validate.__name__ = f"validate_{kind.lower()}"
    validate.schema = schema  # type: ignore[attr-defined] - published as the registry's OpenAPI (schema_for)
    return validate


for _kind in SPECS:
    register(_kind)(_make_validator(_kind))
