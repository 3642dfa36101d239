"""Which proxies the translator builds for: Pods with an IP (sidecars, or routers for gateway Pods), plus
proxies that connected with a node id the registry does not know."""

from __future__ import annotations

from ..mesh.settings import DOMAIN_SUFFIX

INJECT = "sidecar.istio.io/inject"


def sidecar_node_id(ip: str, pod: str, namespace: str) -> str:
    return f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.{DOMAIN_SUFFIX}"


def router_node_id(ip: str, pod: str, namespace: str) -> str:
    return f"router~{ip}~{pod}.{namespace}~{namespace}.svc.{DOMAIN_SUFFIX}"


def _gateway_selectors(objects: list[dict]) -> list[dict]:
    return [sel for o in objects if o.get("kind") == "Gateway"
            for sel in [(o.get("spec") or {}).get("selector") or {}] if sel]


def _is_gateway_pod(labels: dict, selectors: list[dict]) -> bool:
    # Istio's gateway deployments carry `istio: ingressgateway|egressgateway`; custom ones are found through
    # the Gateways that select them.
    if str(labels.get("istio", "")).endswith("gateway"):
        return True
    return any(all(labels.get(k) == v for k, v in sel.items()) for sel in selectors)


def _injected(meta: dict) -> bool:
    for source in (meta.get("annotations") or {}, meta.get("labels") or {}):
        if str(source.get(INJECT, "")).lower() == "false":
            return False
    return True


def pod_node_ids(objects: list[dict]) -> list[str]:
    selectors = _gateway_selectors(objects)
    out = []
    for o in objects:
        if o.get("kind") != "Pod":
            continue
        ip = (o.get("status") or {}).get("podIP")
        meta = o["metadata"]
        if not ip or (o.get("spec") or {}).get("hostNetwork"):
            continue
        ns = meta.get("namespace", "default")
        if _is_gateway_pod(meta.get("labels") or {}, selectors):
            out.append(router_node_id(ip, meta["name"], ns))
        elif _injected(meta):
            out.append(sidecar_node_id(ip, meta["name"], ns))
    return out
