"""Which proxies the translator builds for: every Pod with an IP (a sidecar), plus proxies that connected."""

from __future__ import annotations

from ..mesh.settings import DOMAIN_SUFFIX


def sidecar_node_id(ip: str, pod: str, namespace: str) -> str:
    return f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.{DOMAIN_SUFFIX}"


def pod_node_ids(objects: list[dict]) -> list[str]:
    out = []
    for o in objects:
        if o.get("kind") != "Pod":
            continue
        ip = (o.get("status") or {}).get("podIP")
        if ip and not (o.get("spec") or {}).get("hostNetwork"):
            meta = o["metadata"]
            out.append(sidecar_node_id(ip, meta["name"], meta.get("namespace", "default")))
    return out
