"""Helpers for the xds_gateway tests (no tests here): small real Envoy resources, snapshot writing, a test
upstream, an Envoy bootstrap, and starting the gateway and Envoy as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2

from mizzen.services.mesh import procs
from mizzen.services.mesh.bus import snapshot_subject
from mizzen.services.mesh.snapstore import SnapshotStore
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

REPO = Path(__file__).resolve().parents[1]


def node_id(pod: str = "app-1", ns: str = "default", ip: str = "127.0.0.1") -> str:
    return f"sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"


# ---- Envoy resources ----
def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS, connect_timeout=duration_pb2.Duration(seconds=1),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()))


def load_assignment(cluster: str, ports: list[int], host: str = "127.0.0.1") -> endpoint_pb2.ClusterLoadAssignment:
    eps = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=p))))
        for p in ports]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)])


def _any(msg, type_url: str | None = None) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    if type_url:
        a.type_url = type_url
    return a


def rds_listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name, rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))])
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm))])])


def bad_listener(name: str, port: int) -> listener_pb2.Listener:
    """A listener Envoy rejects: its HTTP connection manager breaks a proto constraint (empty stat_prefix)."""
    lst = rds_listener(name, port, "web")
    hcm = hcm_pb2.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.stat_prefix = ""
    lst.filter_chains[0].filters[0].typed_config.Pack(hcm)
    return lst


def route_config(name: str, routes: list[tuple[str, str]]) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[route_components_pb2.VirtualHost(
        name="all", domains=["*"],
        routes=[route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix=prefix),
                                           route=route_components_pb2.RouteAction(cluster=cluster))
                for prefix, cluster in routes])])


class Mesh:
    """A tiny mesh description that becomes one snapshot: clusters → upstream ports, listeners, routes."""

    def __init__(self) -> None:
        self.clusters: dict[str, list[int]] = {}
        self.listeners: dict[str, tuple[int, str]] = {}
        self.routes: dict[str, list[tuple[str, str]]] = {}
        self.extra_listeners: dict[str, listener_pb2.Listener] = {}
        self.cluster_merges: dict[str, cluster_pb2.Cluster] = {}  # merged into the named EDS cluster

    def layer(self) -> dict[str, dict[str, bytes]]:
        layer: dict[str, dict[str, bytes]] = {CLUSTER: {}, ENDPOINT: {}, LISTENER: {}, ROUTE: {}}
        for name, ports in self.clusters.items():
            c = eds_cluster(name)
            if name in self.cluster_merges:
                c.MergeFrom(self.cluster_merges[name])
            layer[CLUSTER][name] = c.SerializeToString()
            layer[ENDPOINT][name] = load_assignment(name, ports).SerializeToString()
        for name, (port, route) in self.listeners.items():
            layer[LISTENER][name] = rds_listener(name, port, route).SerializeToString()
        for name, lst in self.extra_listeners.items():
            layer[LISTENER][name] = lst.SerializeToString()
        for name, routes in self.routes.items():
            layer[ROUTE][name] = route_config(name, routes).SerializeToString()
        return layer


async def publish(nats_url: str, proxy: str, payload: bytes = b"{}") -> None:
    import nats

    nc = await nats.connect(nats_url)
    try:
        await nc.publish(snapshot_subject(proxy), payload)
        await nc.flush()
    finally:
        await nc.close()


async def write_snapshot(store: SnapshotStore, proxy: str, revision: int, mesh: Mesh,
                         nats_url: str | None = None) -> None:
    manifest, _changed = await store.put(proxy, revision, [mesh.layer()])
    if nats_url:
        await publish(nats_url, proxy, manifest.to_json())


# ---- a test upstream ----
class Upstream:
    """An HTTP server on 127.0.0.1 that answers every request with its own name."""

    def __init__(self, name: str):
        self.name = name
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 65536  # one write per response: no Nagle/delayed-ACK stall between headers and body
            disable_nagle_algorithm = True

            def do_GET(self):  # noqa: N802 - http.server's naming
                outer.hits += 1
                body = outer.name.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- processes ----
def start_gateway(tmp: Path, nats_url: str, redis_url: str, port: int | None = None, replica: str = "gw-1",
                  extra: list[str] | None = None) -> procs.Proc:
    port = port or procs.free_port()
    http_port = procs.free_port()
    argv = [sys.executable, "-m", "mizzen.services.xds_gateway", "--port", str(port), "--http-port", str(http_port),
            "--nats-url", nats_url, "--redis-url", redis_url, "--replica-id", replica, "--log-level", "debug",
            "--status-ttl", "10", *(extra or [])]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = procs.spawn(f"xds-gateway-{replica}-{port}", argv, tmp / "logs", env=env, cwd=str(REPO))
    p.meta.update(port=port, http_port=http_port, replica=replica)
    try:
        wait_ready(http_port, p, timeout=30)
    except Exception:
        p.kill()
        raise
    return p


def wait_ready(http_port: int, p: procs.Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not p.alive():
            raise RuntimeError(f"gateway exited: {p.log_text()[-3000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError), \
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz/ready", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"gateway not ready: {p.log_text()[-3000:]}")


def bootstrap(node: str, admin_port: int, xds_port: int, delta: bool) -> dict:
    return {
        "node": {"id": node, "cluster": "app.default",
                 "metadata": {"ISTIO_VERSION": "1.7.0", "NAMESPACE": "default"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC" if delta else "GRPC", "transport_api_version": "V3",
                           "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]},
        }]},
    }


def start_envoy(tmp: Path, node: str, xds_port: int, delta: bool = False) -> procs.Proc:
    admin = procs.free_port()
    cfg = tmp / f"envoy-{admin}.json"
    cfg.write_text(json.dumps(bootstrap(node, admin, xds_port, delta)))
    argv = [procs.envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
            "-l", "info", "--drain-time-s", "1"]
    p = procs.spawn(f"envoy-{admin}", argv, tmp / "logs")
    p.meta["admin"] = admin
    try:
        procs.wait_port("127.0.0.1", admin, timeout=20, proc=p.popen)
    except Exception:
        p.kill()
        raise
    return p


# ---- talking to things ----
def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as e:
        return 0, str(e)


def config_dump(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump?include_eds", timeout=5) as r:
        return json.loads(r.read())


def dump_section(dump: dict, suffix: str) -> dict:
    for c in dump["configs"]:
        if c["@type"].rsplit(".", 1)[-1] == suffix:
            return c
    return {}


def dynamic_clusters(admin: int) -> dict[str, dict]:
    sec = dump_section(config_dump(admin), "ClustersConfigDump")
    return {c["cluster"]["name"]: c for c in sec.get("dynamic_active_clusters", [])}


def dynamic_listeners(admin: int) -> dict[str, dict]:
    sec = dump_section(config_dump(admin), "ListenersConfigDump")
    return {lst["active_state"]["listener"]["name"]: lst for lst in sec.get("dynamic_listeners", [])
            if "active_state" in lst}


def rejected_listeners(admin: int) -> list[dict]:
    """Envoy's record of listener updates it rejected (error_state in config_dump)."""
    sec = dump_section(config_dump(admin), "ListenersConfigDump")
    return [lst["error_state"] for lst in sec.get("dynamic_listeners", []) if "error_state" in lst]


def dynamic_routes(admin: int) -> dict[str, dict]:
    sec = dump_section(config_dump(admin), "RoutesConfigDump")
    return {r["route_config"]["name"]: r for r in sec.get("dynamic_route_configs", [])}


def endpoint_ports(admin: int) -> dict[str, list[int]]:
    sec = dump_section(config_dump(admin), "EndpointsConfigDump")
    out: dict[str, list[int]] = {}
    for e in sec.get("dynamic_endpoint_configs", []):
        cla = e["endpoint_config"]
        ports = [lb["endpoint"]["address"]["socket_address"]["port_value"]
                 for loc in cla.get("endpoints", []) for lb in loc.get("lb_endpoints", [])]
        out[cla["cluster_name"]] = sorted(ports)
    return out


async def eventually(check, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll `check()` (sync or async) until it returns a truthy value; return it, or fail with the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
        except Exception as e:  # noqa: BLE001 - keep polling; report the last failure
            last = e
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


async def get_async(port: int, path: str = "/") -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)
