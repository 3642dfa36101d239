"""The demo mesh `mizzen up --demo` applies: plain Kubernetes and Istio objects in the namespace `demo`.

- Service `hello` (ClusterIP 10.96.100.10, port 80 `http` → 8080) with two pods, hello-v1 and hello-v2
  (labels app=hello, version=v1|v2), and their Endpoints;
- DestinationRule `hello`: subsets v1/v2 by the version label; ISTIO_MUTUAL when the pods run sidecars
  (`--netns`), plaintext to the loopback demo's bare apps;
- VirtualService `hello-ingress` bound to Gateway `hello-gateway`: every host, 80 % to v1 and 20 % to v2,
  with retries — what `curl` to the ingress gateway sees;
- VirtualService `hello` for the mesh (the same split for sidecars that call `hello`);
- Gateway `hello-gateway`: one HTTP server on the gateway port, bound to 127.0.0.1 (`bind`), selecting the
  demo's ingress gateway pod (`istio: ingressgateway`, `app: demo-ingressgateway`);
- PeerAuthentication `demo/default`: STRICT with sidecars (`--netns`: every call is mTLS with certificates the
  pods' agents got from certauth), DISABLE for the loopback demo; and the Namespace.

Pod addresses are parameters: loopback addresses for the default demo, pod-network addresses with --netns.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..mesh.kinds import object_key

NAMESPACE = "demo"
SERVICE = "hello"
CLUSTER_IP = "10.96.100.10"
SERVICE_PORT = 80
APP_PORT = 8080
GATEWAY_NAME = "hello-gateway"
GATEWAY_BIND = "127.0.0.1"
GATEWAY_LABELS = {"istio": "ingressgateway", "app": "demo-ingressgateway"}
DEFAULT_GATEWAY_PORT = 18080
SPLIT = {"v1": 80, "v2": 20}

# Pod names in the Deployment-ReplicaSet style (`<deployment>-<template hash>-<suffix>`), so the workload
# name the bootstrap derives is the Deployment's.
POD_NAMES = {
    "hello-v1": "hello-v1-7c9d8b5f4-k2x8p",
    "hello-v2": "hello-v2-5f6b7d8c9-m7q2w",
    "gateway": "demo-ingressgateway-6b7c8d9f5-x4z2k",
    "sleep": "sleep-8f9d7c6b5-q3w4e",
}
TEMPLATE_HASH = {"hello-v1": "7c9d8b5f4", "hello-v2": "5f6b7d8c9", "gateway": "6b7c8d9f5", "sleep": "8f9d7c6b5"}


TLS_MODE_LABEL = "security.istio.io/tlsMode"  # what Istio's injector adds to a pod with a sidecar
SERVICE_ACCOUNTS = {"hello-v1": "hello", "hello-v2": "hello", "sleep": "sleep", "gateway": "demo-ingressgateway"}


@dataclass(frozen=True)
class DemoPod:
    role: str  # hello-v1, hello-v2, gateway, sleep
    ip: str
    sidecar: bool = False  # runs an Envoy sidecar (the --netns demo); the ingress gateway is no sidecar

    @property
    def service_account(self) -> str:
        return SERVICE_ACCOUNTS[self.role]

    @property
    def name(self) -> str:
        return POD_NAMES[self.role]

    @property
    def version(self) -> str | None:
        return self.role.split("-", 1)[1] if self.role.startswith(f"{SERVICE}-") else None

    @property
    def labels(self) -> dict[str, str]:
        if self.role == "gateway":
            base = dict(GATEWAY_LABELS)
        elif self.version:
            base = {"app": SERVICE, "version": self.version}
        else:
            base = {"app": self.role, "version": "v1"}
        tls = {TLS_MODE_LABEL: "istio"} if self.sidecar and self.role != "gateway" else {}
        return {**base, "pod-template-hash": TEMPLATE_HASH[self.role], **tls}


def _meta(name: str, **extra: object) -> dict:
    return {"name": name, "namespace": NAMESPACE, **extra}


def pod_object(pod: DemoPod) -> dict:
    ports = [{"containerPort": APP_PORT, "protocol": "TCP"}] if pod.version else []
    container = {"name": "app" if pod.role != "gateway" else "istio-proxy", "image": "mizzen/demo-echo:latest",
                 **({"ports": ports} if ports else {})}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _meta(pod.name, labels=pod.labels),
        "spec": {"serviceAccountName": pod.service_account, "containers": [container]},
        "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
    }


def _http_route() -> list[dict]:
    return [{
        "route": [{"destination": {"host": SERVICE, "subset": subset, "port": {"number": SERVICE_PORT}},
                   "weight": weight} for subset, weight in SPLIT.items()],
        "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "gateway-error,connect-failure,refused-stream"},
        "timeout": "10s",
    }]


def objects(pods: list[DemoPod], gateway_port: int = DEFAULT_GATEWAY_PORT, mtls: bool = False) -> list[dict]:
    """Every object of the demo mesh, in an order a registry can apply at once. `mtls`: the pods run sidecars
    with certificates from certauth, so the namespace is STRICT and `hello` is ISTIO_MUTUAL; without it (the
    loopback demo: the hello apps have no sidecar) plaintext."""
    hello = [p for p in pods if p.version]
    mode = "ISTIO_MUTUAL" if mtls else "DISABLE"
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NAMESPACE, "labels": {"istio-injection": "enabled"}}},
        {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
         "metadata": _meta("default"), "spec": {"mtls": {"mode": "STRICT" if mtls else "DISABLE"}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(SERVICE, labels={"app": SERVICE}),
         "spec": {"clusterIP": CLUSTER_IP, "selector": {"app": SERVICE},
                  "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": APP_PORT, "protocol": "TCP"}]}},
        *[pod_object(p) for p in pods],
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": _meta(SERVICE),
         "subsets": [{"addresses": [{"ip": p.ip, "targetRef": {"kind": "Pod", "name": p.name,
                                                               "namespace": NAMESPACE}} for p in hello],
                      "ports": [{"name": "http", "port": APP_PORT, "protocol": "TCP"}]}]},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule", "metadata": _meta(SERVICE),
         "spec": {"host": SERVICE, "trafficPolicy": {"tls": {"mode": mode}},
                  "subsets": [{"name": v, "labels": {"version": v}} for v in SPLIT]}},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway", "metadata": _meta(GATEWAY_NAME),
         "spec": {"selector": dict(GATEWAY_LABELS),
                  "servers": [{"port": {"number": gateway_port, "name": "http", "protocol": "HTTP"},
                               "bind": GATEWAY_BIND, "hosts": ["*"]}]}},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService", "metadata": _meta(f"{SERVICE}-ingress"),
         "spec": {"hosts": ["*"], "gateways": [GATEWAY_NAME], "http": _http_route()}},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService", "metadata": _meta(SERVICE),
         "spec": {"hosts": [SERVICE], "http": _http_route()}},
    ]


def key(obj: dict) -> str:
    """The registry's store key (`Kind/namespace/name`)."""
    meta = obj["metadata"]
    return object_key(obj["kind"], meta.get("namespace"), meta["name"])


def all_pod_keys() -> set[str]:
    """Every Pod key either variant of the demo may have stored (to remove the other variant's pods)."""
    return {object_key("Pod", NAMESPACE, name) for name in POD_NAMES.values()}
