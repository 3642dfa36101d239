"""The resource kinds Mizzen accepts, and where each lives in the Kubernetes-shaped API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str  # "" for the core group
    versions: tuple[str, ...]
    plural: str
    namespaced: bool = True

    @property
    def preferred_version(self) -> str:
        return self.versions[-1] if self.group == "networking.istio.io" else self.versions[0]

    def api_version(self, version: str | None = None) -> str:
        v = version or self.preferred_version
        return f"{self.group}/{v}" if self.group else v

    def path(self, namespace: str | None = None, name: str | None = None, version: str | None = None) -> str:
        """The Kubernetes REST path of a collection or an object."""
        v = version or self.preferred_version
        base = f"/apis/{self.group}/{v}" if self.group else f"/api/{v}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        return base


_NET = "networking.istio.io"
_NET_VERSIONS = ("v1alpha3", "v1beta1", "v1")

KINDS: tuple[Kind, ...] = (
    Kind("Namespace", "", ("v1",), "namespaces", namespaced=False),
    Kind("Node", "", ("v1",), "nodes", namespaced=False),  # its topology labels are its pods' locality
    Kind("Service", "", ("v1",), "services"),
    Kind("Endpoints", "", ("v1",), "endpoints"),
    Kind("Pod", "", ("v1",), "pods"),
    Kind("Secret", "", ("v1",), "secrets"),  # gateway credentials (credentialName); values never printed
    Kind("ConfigMap", "", ("v1",), "configmaps"),  # istio-system/istio key `mesh`: the mesh config
    Kind("EndpointSlice", "discovery.k8s.io", ("v1",), "endpointslices"),
    Kind("ServiceEntry", _NET, _NET_VERSIONS, "serviceentries"),
    Kind("WorkloadEntry", _NET, _NET_VERSIONS, "workloadentries"),
    Kind("VirtualService", _NET, _NET_VERSIONS, "virtualservices"),
    Kind("DestinationRule", _NET, _NET_VERSIONS, "destinationrules"),
    Kind("Gateway", _NET, _NET_VERSIONS, "gateways"),
    Kind("Sidecar", _NET, _NET_VERSIONS, "sidecars"),
    Kind("PeerAuthentication", "security.istio.io", ("v1beta1", "v1"), "peerauthentications"),
    Kind("AuthorizationPolicy", "security.istio.io", ("v1beta1", "v1"), "authorizationpolicies"),
    Kind("RequestAuthentication", "security.istio.io", ("v1beta1", "v1"), "requestauthentications"),
    Kind("EnvoyFilter", _NET, ("v1alpha3",), "envoyfilters"),
)

BY_KIND: dict[str, Kind] = {k.kind: k for k in KINDS}
BY_PLURAL: dict[str, Kind] = {k.plural: k for k in KINDS}

# Short names and singulars accepted by `mizzen get`, as kubectl does.
ALIASES: dict[str, str] = {
    "ns": "Namespace", "namespace": "Namespace",
    "no": "Node", "node": "Node",
    "svc": "Service", "service": "Service",
    "ep": "Endpoints", "endpoint": "Endpoints",
    "po": "Pod", "pod": "Pod",
    "secret": "Secret",
    "cm": "ConfigMap", "configmap": "ConfigMap",
    "endpointslice": "EndpointSlice",
    "se": "ServiceEntry", "serviceentry": "ServiceEntry",
    "we": "WorkloadEntry", "workloadentry": "WorkloadEntry",
    "vs": "VirtualService", "virtualservice": "VirtualService",
    "dr": "DestinationRule", "destinationrule": "DestinationRule",
    "gw": "Gateway", "gateway": "Gateway",
    "sidecar": "Sidecar",
    "pa": "PeerAuthentication", "peerauthentication": "PeerAuthentication",
    "ap": "AuthorizationPolicy", "authorizationpolicy": "AuthorizationPolicy",
    "ra": "RequestAuthentication", "requestauthentication": "RequestAuthentication",
    "envoyfilter": "EnvoyFilter",
}


def lookup(name: str) -> Kind | None:
    """Find a kind by its Kind, plural, singular or short name (case-insensitive)."""
    if name in BY_KIND:
        return BY_KIND[name]
    low = name.lower()
    if low in BY_PLURAL:
        return BY_PLURAL[low]
    for k in KINDS:
        if k.kind.lower() == low:
            return k
    alias = ALIASES.get(low)
    return BY_KIND[alias] if alias else None


def node_roles(labels: dict) -> str:
    """kubectl's ROLES of a Node: its `node-role.kubernetes.io/<role>` labels."""
    prefix = "node-role.kubernetes.io/"
    return ",".join(sorted(k[len(prefix):] for k in labels if k.startswith(prefix) and k != prefix)) or "<none>"


def kind_for_api_version(api_version: str, kind: str) -> Kind | None:
    k = BY_KIND.get(kind)
    if k is None:
        return None
    group, _, version = api_version.rpartition("/")
    if group != k.group or version not in k.versions:
        return None
    return k


def object_key(kind: str, namespace: str | None, name: str) -> str:
    """The store key of one object: `Kind/namespace/name` (`Kind//name` when cluster-scoped)."""
    return f"{kind}/{namespace or ''}/{name}"


def split_key(key: str) -> tuple[str, str, str]:
    kind, ns, name = key.split("/", 2)
    return kind, ns, name


# Groups whose kinds Mizzen must know: a kind it does not know there is a typo (`VirtualServce`), an error.
MESH_GROUP_SUFFIX = "istio.io"

# Kubernetes' built-in kinds that mesh YAML often carries beside the mesh kinds (a Deployment next to its
# Service). Mizzen does not model them: an apply skips and reports them. A core-group (`v1`) kind outside
# this list is treated as a typo, as kubectl would fail on it.
KUBERNETES_BUILTIN = frozenset({
    "Binding", "ComponentStatus", "Event", "LimitRange", "PersistentVolume",
    "PersistentVolumeClaim", "PodTemplate", "ReplicationController", "ResourceQuota", "ServiceAccount",
    "ControllerRevision", "DaemonSet", "Deployment", "ReplicaSet", "StatefulSet", "CronJob", "Job",
    "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "IngressClass", "NetworkPolicy",
    "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "StorageClass", "PriorityClass",
    "CustomResourceDefinition", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "Lease", "RuntimeClass", "CSIDriver", "VolumeAttachment", "CertificateSigningRequest",
    "List",
})


def unmodelled_reason(api_version: str, kind: str) -> str | None:
    """Why a document of a kind Mizzen does not model may be skipped, or None when it must be an error.

    Skipped: Kubernetes' built-in kinds and kinds of other projects' API groups (cert-manager, Argo, …).
    Errors: unknown kinds in Istio's groups and in the core group, which are typos of kinds Mizzen serves."""
    if not kind or kind in BY_KIND:
        return None
    group = api_version.rpartition("/")[0]
    if group == MESH_GROUP_SUFFIX or group.endswith("." + MESH_GROUP_SUFFIX):
        return None
    if kind in KUBERNETES_BUILTIN:
        return f"Mizzen does not model {kind}"
    if group and "." in group:
        return f"Mizzen does not model {group} kinds"
    return None
