"""The proxy a snapshot is built for, parsed from its Envoy node id like istiod's model.Proxy."""

from __future__ import annotations

from dataclasses import dataclass, field

from mizzen.services.mesh import locality as loc

SIDECAR = "sidecar"
INJECT_TEMPLATES = "inject.istio.io/templates"
ROUTER = "router"


class NodeIdError(ValueError):
    pass


@dataclass
class Proxy:
    type: str  # "sidecar" or "router"
    ip: str
    pod: str
    namespace: str
    id: str  # the full node id
    labels: dict = field(default_factory=dict)
    dns_domain: str = ""
    metadata: dict = field(default_factory=dict)  # node metadata (e.g. ACCESS_LOG path, INTERCEPTION_MODE)
    locality: str = ""  # `region/zone/subzone`: the registry's (Pod, Node), else Envoy's node.locality

    @property
    def locality_parts(self) -> tuple[str, str, str]:
        return loc.split(self.locality)

    @property
    def is_router(self) -> bool:
        return self.type == ROUTER

    @property
    def pod_id(self) -> str:
        """`<pod>.<namespace>`, the id part of the node id (what istioctl takes as `<pod>[.<ns>]`)."""
        return f"{self.pod}.{self.namespace}"

    @classmethod
    def parse_node_id(cls, node_id: str) -> Proxy:
        """`sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (or `router~…`), without looking anything up."""
        parts = node_id.split("~")
        if len(parts) != 4:
            raise NodeIdError(f"node id {node_id!r} is not <type>~<ip>~<pod>.<ns>~<dns domain>")
        ptype, ip, pod_id, domain = parts
        if ptype not in (SIDECAR, ROUTER):
            raise NodeIdError(f"node id {node_id!r}: type must be sidecar or router, not {ptype!r}")
        if not ip:
            raise NodeIdError(f"node id {node_id!r} has no IP address")
        pod, dot, ns = pod_id.partition(".")
        if not dot:
            ns = domain.split(".", 1)[0] if domain else "default"
        return cls(ptype, ip, pod, ns or "default", node_id, {}, domain or f"{ns}.svc.cluster.local")

    @classmethod
    def from_node_id(cls, node_id: str, push=None, metadata: dict | None = None, node_locality: str = "") -> Proxy:
        """Parse a node id and fill the labels from the registry's Pod (by name, else by IP).

        The locality follows istiod: what the registry knows (the Pod's `istio-locality` label, else its Node's
        topology labels; else the topology labels the proxy announces), and only without that the
        `node_locality` Envoy sent (its bootstrap's node.locality, `region/zone/subzone`)."""
        proxy = cls.parse_node_id(node_id)
        proxy.metadata = dict(metadata or {})
        registry = ""
        if push is not None:
            pod = push.pods.get((proxy.namespace, proxy.pod)) or push.pods_by_ip.get(proxy.ip)
            if pod is not None:
                proxy.labels = dict(pod["metadata"].get("labels") or {})
                registry = push.pod_locality(pod)
                # Istio's proxyless pods (`inject.istio.io/templates: grpc-agent`) are gRPC clients before
                # they connect: build their first snapshot in gRPC shapes, not a sidecar's.
                templates = (pod["metadata"].get("annotations") or {}).get(INJECT_TEMPLATES, "")
                if "GENERATOR" not in proxy.metadata and "grpc-agent" in templates.split(","):
                    proxy.metadata["GENERATOR"] = "grpc"
        if isinstance(proxy.metadata.get("LABELS"), dict):
            proxy.labels.update(proxy.metadata["LABELS"])
        proxy.locality = registry or loc.from_labels(proxy.labels) or node_locality
        return proxy

    @classmethod
    def for_pod(cls, pod: dict, push=None, router: bool = False, domain_suffix: str = "cluster.local") -> Proxy:
        """The proxy of a stored Pod object (its node id built the way the bootstrap builds it)."""
        meta = pod["metadata"]
        ns = meta.get("namespace") or "default"
        ip = (pod.get("status") or {}).get("podIP") or "127.0.0.1"
        node_id = f"{ROUTER if router else SIDECAR}~{ip}~{meta['name']}.{ns}~{ns}.svc.{domain_suffix}"
        return cls.from_node_id(node_id, push)
