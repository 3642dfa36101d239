"""The bootstrap of a proxyless gRPC application (the GRPC_XDS_BOOTSTRAP file), shaped like the one Istio's
agent writes for proxyless pods (pkg/istio-agent/grpcxds): the control plane to ask, plaintext, xDS v3, and a
node whose id is the sidecar-style id and whose metadata says `GENERATOR: grpc`, which makes the translator
build gRPC-shaped resources for it (services/translator/grpcgen.py) instead of a sidecar's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mizzen.services.mesh import settings

from .bootstrap import ISTIO_VERSION, node_id

# gRPC servers ask LDS for this name with their listening address filled in (Istio's template).
SERVER_LISTENER_TEMPLATE = "xds.istio.io/grpc/lds/inbound/%s"


def build_grpc_bootstrap(pod: str, namespace: str, ip: str, xds: str, *,
                         labels: Mapping[str, str] | None = None, service_account: str = "default",
                         cluster_id: str = "Kubernetes", domain_suffix: str = settings.DOMAIN_SUFFIX,
                         istio_version: str = ISTIO_VERSION) -> dict[str, Any]:
    metadata = {
        "GENERATOR": "grpc",
        "NAME": pod,
        "POD_NAME": pod,
        "NAMESPACE": namespace,
        "INSTANCE_IPS": ip,
        "LABELS": dict(labels or {}),
        "SERVICE_ACCOUNT": service_account,
        "CLUSTER_ID": cluster_id,
        "ISTIO_VERSION": istio_version,
    }
    return {
        "xds_servers": [{
            "server_uri": xds,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": node_id(pod, namespace, ip, domain_suffix=domain_suffix),
            "cluster": f"{(labels or {}).get('app') or pod}.{namespace}",
            "metadata": metadata,
            "locality": {},
        },
        "server_listener_resource_name_template": SERVER_LISTENER_TEMPLATE,
    }
