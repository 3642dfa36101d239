"""Helpers for the scale tests: an Envoy-like ADS client (grpcio) that follows its clusters' EDS and its
listeners' RDS names and ACKs everything (or stops ACKing on demand), a small generated mesh, and metric
readers. Everything talks to real processes started by services/mesh/stack.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mizzen.services.cli.http import apply_objects
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .test_xds_support import eventually as _eventually

TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _rds_names(listeners: list[listener_pb2.Listener]) -> list[str]:
    out = set()
    for lis in listeners:
        for fc in list(lis.filter_chains) + ([lis.default_filter_chain] if lis.HasField("default_filter_chain") else []):
            for f in fc.filters:
                if f.typed_config.type_url == HCM:
                    h = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    if h.HasField("rds"):
                        out.add(h.rds.route_config_name)
    return sorted(out)


class EnvoyLikeClient:
    """One SotW ADS stream behaving like Envoy: CDS/LDS wildcard, EDS for its EDS clusters, RDS for the route
    configs its listeners name, every response ACKed (unless `ack` is False: then it reads but never ACKs)."""

    def __init__(self, port: int | list[int], node_id: str, ack: bool = True, keepalive: bool = False):
        self.ports = port if isinstance(port, list) else [port]
        self.port = self.ports[0]  # the gateway it is connected to (or trying)
        self.keepalive = keepalive  # ping every 2 s: notice a silent (partitioned) gateway and fail over
        self.node_id = node_id
        self.ack = ack
        self.versions: dict[str, str] = {}
        self.resources: dict[str, dict[str, bytes]] = {t: {} for t in TYPES}
        self.responses: dict[str, int] = {SHORT[t]: 0 for t in TYPES}
        self.received_at: dict[str, float] = {}
        self.names: dict[str, list[str]] = {t: [] for t in TYPES}
        self.errors: list[str] = []
        self._nonces: dict[str, str] = {}
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> EnvoyLikeClient:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        for attempt in range(100):
            self.port = self.ports[attempt % len(self.ports)]
            try:
                await self._stream()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect as Envoy does
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
                await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))

    async def _stream(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
        if self.keepalive:
            options += [("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000),
                        ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                        ("grpc.http2.min_time_between_pings_ms", 1000),
                        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                        # one ping in flight at a time: an unanswered BDP probe would block the keepalive ping
                        ("grpc.http2.bdp_probe", 0), ("grpc.http2.ping_timeout_ms", 2000)]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=options)
        try:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources()
            node = base_pb2.Node(id=self.node_id)
            await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
            await call.write(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
            opened = {CLUSTER, LISTENER}
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ConnectionError("stream ended")
                t = resp.type_url
                self.responses[SHORT[t]] += 1
                self.received_at[SHORT[t]] = time.monotonic()
                self.versions[t] = resp.version_info
                self.resources[t] = {self._name(t, a.value): a.value for a in resp.resources}
                if not self.ack:
                    continue
                await call.write(discovery_pb2.DiscoveryRequest(type_url=t, version_info=resp.version_info,
                                                                response_nonce=resp.nonce,
                                                                resource_names=self.names[t]))
                follow = None
                if t == CLUSTER:
                    eds = sorted(n for n, b in self.resources[t].items()
                                 if cluster_pb2.Cluster.FromString(b).type == cluster_pb2.Cluster.EDS)
                    follow = (ENDPOINT, eds)
                elif t == LISTENER:
                    follow = (ROUTE, _rds_names([listener_pb2.Listener.FromString(b)
                                                 for b in self.resources[t].values()]))
                if follow is not None and (follow[1] != self.names[follow[0]] or follow[0] not in opened):
                    ft, names = follow
                    self.names[ft] = names
                    if ft in opened:  # a changed subscription rides on a request with the latest nonce
                        continue_nonce = self._nonces.get(ft, "")
                        await call.write(discovery_pb2.DiscoveryRequest(
                            type_url=ft, version_info=self.versions.get(ft, ""), response_nonce=continue_nonce,
                            resource_names=names))
                    else:
                        opened.add(ft)
                        await call.write(discovery_pb2.DiscoveryRequest(type_url=ft, resource_names=names))
                self._nonces[t] = resp.nonce
        finally:
            await self.channel.close()

    @staticmethod
    def _name(t: str, value: bytes) -> str:
        from mizzen.services.mesh.xds_types import message_class

        m = message_class(t).FromString(value)
        return m.cluster_name if t == ENDPOINT else m.name

    def synced_with(self, versions: dict[str, str]) -> bool:
        return all(self.versions.get(t) == v for t, v in versions.items())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


def new_client(port: int | list[int], node_id: str, ack: bool = True, keepalive: bool = False) -> EnvoyLikeClient:
    return EnvoyLikeClient(port, node_id, ack, keepalive)


async def eventually(check, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """test_xds_support.eventually with this module's longer default budget and shorter poll interval."""
    return await _eventually(check, timeout, interval, what)


def metrics(port: int) -> dict[str, float]:
    """Prometheus text of a service's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def pushes(port: int) -> dict[str, float]:
    """Gateway pushes per type (summed over APIs)."""
    out = {s: 0.0 for s in SHORT.values()}
    for k, v in metrics(port).items():
        if k.startswith("mizzen_xds_pushes_total{"):
            for s in out:
                if f'type="{s}"' in k:
                    out[s] += v
    return out


# ---- a small generated mesh ----
def node_id(pod: str, ns: str, ip: str) -> str:
    return f"sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"


def service_objects(name: str, ns: str, i: int, pods: int = 2) -> list[dict]:
    objs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
             "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}", "selector": {"app": name},
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}]
    for j in range(pods):
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"{name}-{j}", "namespace": ns, "labels": {"app": name}},
                     "spec": {"serviceAccountName": name}, "status": {"podIP": pod_ip(i, j)}})
    objs.append(endpoints_object(name, ns, i, list(range(pods))))
    return objs


def pod_ip(i: int, j: int) -> str:
    return f"10.{100 + i // 250}.{i % 250}.{j + 1}"


def endpoints_object(name: str, ns: str, i: int, pods: list[int], extra: list[str] = ()) -> dict:
    addrs = [{"ip": pod_ip(i, j), "targetRef": {"kind": "Pod", "name": f"{name}-{j}", "namespace": ns}}
             for j in pods] + [{"ip": ip} for ip in extra]
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": ns},
            "subsets": [{"addresses": addrs, "ports": [{"name": "http", "port": 8080}]}]}


def scoped_namespace(ns: str) -> list[dict]:
    """A namespace whose sidecars see only its own services (Sidecar egress `./*`)."""
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {"apiVersion": "networking.istio.io/v1beta1", "kind": "Sidecar",
             "metadata": {"name": "default", "namespace": ns}, "spec": {"egress": [{"hosts": ["./*"]}]}}]


def apply(server: str, objects: list[dict]) -> int:
    return int(apply_objects(server, objects)["revision"])
