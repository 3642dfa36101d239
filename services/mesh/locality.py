"""Localities as Istio writes them: `region/zone/subzone`, from a workload's (or its Node's) labels, and Istio's
matching rules (used by the translator for endpoint and proxy localities, and by validation for the label names)."""

from __future__ import annotations

from collections.abc import Mapping

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
ISTIO_LOCALITY_LABEL = "istio-locality"  # Istio's pod label: region.zone.subzone (dots: label values allow no '/')
LOCALITY_LABEL = "topology.istio.io/locality"  # its newer name, read first (istiod's GetLocalityLabel)
TOPOLOGY_LABELS = (REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL)
# The labels Kubernetes set on Nodes before the topology.kubernetes.io ones (istiod still reads them, second).
BETA_REGION_LABEL = "failure-domain.beta.kubernetes.io/region"
BETA_ZONE_LABEL = "failure-domain.beta.kubernetes.io/zone"


def split(locality: str) -> tuple[str, str, str]:
    """`region/zone/subzone` (any part may be missing) → (region, zone, subzone)."""
    parts = (locality.split("/") + ["", "", ""])[:3] if locality else ["", "", ""]
    return parts[0], parts[1], parts[2]


def from_locality_label(labels: Mapping[str, str]) -> str:
    """The locality a workload's locality label names (`topology.istio.io/locality`, else `istio-locality`;
    `region.zone.subzone`, dots for slashes), as `region/zone/subzone`; "" if it has none."""
    value = labels.get(LOCALITY_LABEL) or labels.get(ISTIO_LOCALITY_LABEL) or ""
    if not value or "/" in value:
        return value
    region, zone, subzone = (value.split(".") + ["", "", ""])[:3]
    return f"{region}/{zone}/{subzone}".rstrip("/")


def from_labels(labels: Mapping[str, str]) -> str:
    """A workload's locality from its labels: its locality label wins, else the topology labels; "" if none."""
    return from_locality_label(labels) or _from_topology_labels(labels)


def _from_topology_labels(labels: Mapping[str, str]) -> str:
    region, zone, subzone = labels.get(REGION_LABEL), labels.get(ZONE_LABEL), labels.get(SUBZONE_LABEL)
    if not (region or zone or subzone):
        return ""  # the common case; asked for every endpoint of every push
    return f"{region or ''}/{zone or ''}/{subzone or ''}".rstrip("/")


def from_node_labels(labels: Mapping[str, str]) -> str:
    """A Kubernetes Node's locality, as istiod's getPodLocality reads it: the topology region and zone labels
    (else their failure-domain.beta predecessors) and `topology.istio.io/subzone`; "" if none is set."""
    region = labels.get(REGION_LABEL) or labels.get(BETA_REGION_LABEL) or ""
    zone = labels.get(ZONE_LABEL) or labels.get(BETA_ZONE_LABEL) or ""
    subzone = labels.get(SUBZONE_LABEL) or ""
    return f"{region}/{zone}/{subzone}".rstrip("/") if region or zone or subzone else ""


def pod_locality(pod_labels: Mapping[str, str], node_labels: Mapping[str, str] | None) -> str:
    """A Pod's locality: its locality label, else its Node's topology labels (istiod's order); a Pod whose Node
    is unknown or unlabelled falls back to its own topology labels (Mizzen describes pods without Nodes, e.g.
    outside Kubernetes, and labels them so)."""
    return (from_locality_label(pod_labels) or (from_node_labels(node_labels) if node_labels else "")
            or _from_topology_labels(pod_labels))


def from_node(locality: Mapping[str, str] | None) -> str:
    """An Envoy node.locality (`region`, `zone`, `sub_zone`/`subZone` as JSON gives it) as `region/zone/subzone`."""
    locality = locality or {}
    parts = (locality.get("region") or "", locality.get("zone") or "",
             locality.get("sub_zone") or locality.get("subZone") or "")
    return "/".join(parts).rstrip("/") if any(parts) else ""


def as_node(locality: str) -> dict[str, str]:
    """`region/zone/subzone` as an Envoy node.locality (bootstrap JSON), the empty parts left out."""
    return {k: v for k, v in zip(("region", "zone", "sub_zone"), split(locality), strict=True) if v}


def as_labels(locality: str) -> dict[str, str]:
    """The topology labels a locality stands for (Istio adds them to endpoint and proxy labels)."""
    return {k: v for k, v in zip(TOPOLOGY_LABELS, split(locality), strict=True) if v}


def matches(locality: tuple[str, str, str], rule: str) -> bool:
    """Istio's LocalityMatch: `rule` is `region[/zone[/subzone]]`, `*` matches any value, a missing part too."""
    region, zone, subzone = split(rule)
    return ((region == "*" or locality[0] == region)
            and (zone in ("*", "") or locality[1] == zone)
            and (subzone in ("*", "") or locality[2] == subzone))


def lb_priority(proxy: tuple[str, str, str], endpoint: tuple[str, str, str]) -> int:
    """Istio's LbPriority: 0 same subzone, 1 same zone, 2 same region, 3 elsewhere."""
    if proxy[0] != endpoint[0]:
        return 3
    if proxy[1] != endpoint[1]:
        return 2
    if proxy[2] != endpoint[2]:
        return 1
    return 0
