"""EnvoyFilter rules, after Istio's `pkg/config/validation/envoyfilter`: applyTo, match and patch must line up,
and every patch value must be the Envoy object its applyTo names (checked against Envoy's own protos)."""

from __future__ import annotations

import re

from ..xds_json import XdsValueError, parse
from .common import Errs, check_workload_selector
from .security import check_target_ref_patterns

_LISTENER_CLASS = ("LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER")
_ROUTE_CLASS = ("ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE")
_HCM = ("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager")
# applyTo kinds whose values Mizzen converts; BOOTSTRAP and EXTENSION_CONFIG have no xDS object here.
_CONVERTIBLE = (*_LISTENER_CLASS, *_ROUTE_CLASS, "CLUSTER", "LISTENER_FILTER")


def check_envoy_filter(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    selector = spec.get("workloadSelector")
    if selector is not None:
        check_workload_selector(selector.get("labels", {}), "spec.workloadSelector.labels", errs)
    # the CRD's CEL rules (the webhook has none for targetRefs)
    if selector is not None and "targetRefs" in spec:
        errs.add("spec", "only one of targetRefs or workloadSelector can be set")
    for i, ref in enumerate(spec.get("targetRefs") or []):
        if ref.get("namespace"):
            errs.add(f"spec.targetRefs[{i}].namespace", "cross namespace referencing is not currently supported")
        check_target_ref_patterns(ref, f"spec.targetRefs[{i}]", errs)
    for i, cp in enumerate(spec.get("configPatches") or []):
        at = f"spec.configPatches[{i}]"
        match = cp.get("match") or {}
        if match.get("context") == "WAYPOINT":
            continue
        apply_to = cp.get("applyTo", "INVALID")
        if apply_to == "INVALID":
            errs.add(f"{at}.applyTo", "Envoy filter: missing applyTo")
            continue
        patch = cp.get("patch")
        if patch is None:
            errs.add(f"{at}.patch", "Envoy filter: missing patch")
            continue
        operation = patch.get("operation", "INVALID")
        if operation == "INVALID":
            errs.add(f"{at}.patch.operation", "Envoy filter: missing patch operation")
            continue
        if operation != "REMOVE" and patch.get("value") is None:
            errs.add(f"{at}.patch.value", "Envoy filter: missing patch value for non-remove operation")
            continue
        version = (match.get("proxy") or {}).get("proxyVersion")
        if version:
            try:
                re.compile(version)
            except re.error as e:
                errs.add(f"{at}.match.proxy.proxyVersion", f"Envoy filter: invalid regex for proxy version, [{e}]")
                continue
        objects = [k for k in ("listener", "routeConfiguration", "cluster") if k in match]
        if apply_to in _LISTENER_CLASS and objects:
            if objects != ["listener"]:
                errs.add(f"{at}.match", "Envoy filter: applyTo for listener class objects cannot have non listener match")
                continue
            flt = ((match["listener"].get("filterChain") or {}).get("filter"))
            if flt is not None:
                fat = f"{at}.match.listener.filterChain.filter"
                if not flt.get("name"):
                    errs.add(f"{fat}.name", "Envoy filter: filter match has no name to match on")
                    continue
                sub = flt.get("subFilter")
                if sub is not None:
                    if apply_to != "HTTP_FILTER":
                        errs.add(f"{fat}.subFilter", "Envoy filter: subfilter match can be used with applyTo HTTP_FILTER only")
                        continue
                    if flt["name"] not in _HCM:
                        errs.add(f"{fat}.name", f"Envoy filter: subfilter match requires filter match with {_HCM[0]}")
                        continue
                    if not sub.get("name"):
                        errs.add(f"{fat}.subFilter.name", "Envoy filter: subfilter match has no name to match on")
                        continue
        elif apply_to in _ROUTE_CLASS and objects and objects != ["routeConfiguration"]:
            errs.add(f"{at}.match", "Envoy filter: applyTo for http route class objects cannot have non route "
                                    "configuration match")
        elif apply_to == "CLUSTER" and objects and objects != ["cluster"]:
            errs.add(f"{at}.match", "Envoy filter: applyTo for cluster class objects cannot have non cluster match")
        if apply_to in _CONVERTIBLE and patch.get("value") is not None:
            try:
                parse(apply_to, patch["value"])
            except XdsValueError as e:
                errs.add(f"{at}.patch.value", str(e).split("\n", 1)[0])
