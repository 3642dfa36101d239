"""Localities as Istio writes them: `region/zone/subzone`, from a workload's labels, and Istio's matching rules
(used by the translator for endpoint and proxy localities, and by validation for the label names)."""

from __future__ import annotations

from collections.abc import Mapping

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
ISTIO_LOCALITY_LABEL = "istio-locality"  # Istio's pod label: region.zone.subzone (dots: label values allow no '/')
TOPOLOGY_LABELS = (REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL)


def split(locality: str) -> tuple[str, str, str]:
    """`region/zone/subzone` (any part may be missing) → (region, zone, subzone)."""
    parts = (locality.split("/") + ["", "", ""])[:3] if locality else ["", "", ""]
    return parts[0], parts[1], parts[2]


def from_labels(labels: Mapping[str, str]) -> str:
    """A workload's locality from its labels: `istio-locality` wins, else the topology labels; "" if none."""
    istio = labels.get(ISTIO_LOCALITY_LABEL)
    if istio:
        region, zone, subzone = (istio.split(".") + ["", "", ""])[:3]
    else:
        region = labels.get(REGION_LABEL)
        zone = labels.get(ZONE_LABEL)
        subzone = labels.get(SUBZONE_LABEL)
        if not (region or zone or subzone):
            return ""  # the common case; called for every endpoint of every push
    return f"{region or ''}/{zone or ''}/{subzone or ''}".rstrip("/")


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
