"""Push benchmark for the xds_gateway: S services to N simulated ADS clients.

    python bench/xds_push.py --services 100,1000 --clients 100,1000,2000 --procs 2

Starts a private NATS, Redis and one gateway (or uses --nats-url/--redis-url/--xds/--gateway-http with
--gateway-pid), writes a snapshot per proxy (a mesh-wide layer with S services: an EDS cluster, an endpoint
assignment with 2 endpoints, a vhost in route "80" under listener 0.0.0.0_80; plus a per-proxy layer with its
inbound cluster), and opens N ADS streams (grpcio, one HTTP/2 connection each, spread over --procs client
processes) that behave like Envoy: wildcard CDS/LDS, EDS and RDS by name, ACK every response.

Then it changes every resource in the mesh-wide layer (a full push of all four types), writes the N new
snapshots and announces them on NATS, and measures:
  - time from the start of the snapshot writes to each stream's ACK of the last changed type (p50/p99/max),
  - bytes the gateway sent per proxy push (from its metrics),
  - gateway CPU seconds per proxy push and in total, RSS in total and per stream.
Goal (Istio's published load test, istiod with 1 vCPU / 1.5 GB for 1,000 services and 2,000 sidecars):
1,000 services to 2,000 streams converged in under 5 s, under 1.5 GB in all.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ("CDS", "EDS", "LDS", "RDS")
# Streams opened per second by default: a fleet of Envoys connecting (a rollout, a scale-up), not a storm.
# All at once, 2,000 grpcio clients overflow the gateway's listen queue and retry; the connections they
# abandon leave gRPC state behind, which then reads as memory per proxy (storms: tests/test_scale_faults.py).
CONNECT_RATE = 250.0
# The HTTP/2 stream receive window Envoy announces on its xds-grpc connection (Http2ProtocolOptions'
# initial_stream_window_size defaults to 256 MiB), and no BDP probing, as Envoy does none. With grpcio's own
# defaults (64 KiB, grown by BDP pings) the gateway waited for about a dozen WINDOW_UPDATEs per 730 KiB push,
# which a real Envoy never asks of it: the full push of 1,000 services to 2,000 streams took ~30% longer.
ENVOY_HTTP2_WINDOWS = [("grpc.http2.lookahead_bytes", 256 << 20), ("grpc.http2.bdp_probe", 0)]


# ---------------------------------------------------------------- snapshot generation
def build_layers(services: int, proxies: int, generation: int):
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import address_pb2, config_source_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
    from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
    from envoy.config.route.v3 import route_components_pb2, route_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from google.protobuf import any_pb2, duration_pb2

    from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

    ads = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                         resource_api_version=config_source_pb2.V3)

    def addr(ip: str, port: int):
        return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))

    def pack(m):
        a = any_pb2.Any()
        a.Pack(m)
        return a

    clusters, clas, vhosts = {}, {}, []
    for i in range(services):
        ns = f"ns-{i % 10}"
        fqdn = f"svc-{i}.{ns}.svc.cluster.local"
        name = f"outbound|80||{fqdn}"
        c = cluster_pb2.Cluster(
            name=name, type=cluster_pb2.Cluster.EDS, connect_timeout=duration_pb2.Duration(seconds=10 + generation),
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads, service_name=name),
            circuit_breakers={"thresholds": [{k: {"value": 4294967295} for k in (
                "max_connections", "max_pending_requests", "max_requests", "max_retries")}]},
            common_lb_config={"locality_weighted_lb_config": {}})
        c.metadata.filter_metadata["istio"].update({"services": [{"host": fqdn, "name": f"svc-{i}",
                                                                   "namespace": ns}]})
        clusters[name] = c.SerializeToString()
        eps = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
            address=addr(f"10.{(i >> 8) & 255}.{i & 255}.{k + 1}", 8080 + generation))) for k in range(2)]
        clas[name] = endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)],
        ).SerializeToString()
        vhosts.append(route_components_pb2.VirtualHost(
            name=f"{fqdn}:80", domains=[fqdn, f"{fqdn}:80", f"svc-{i}", f"svc-{i}:80", f"svc-{i}.{ns}",
                                        f"svc-{i}.{ns}:80", f"svc-{i}.{ns}.svc", f"svc-{i}.{ns}.svc:80"],
            routes=[route_components_pb2.Route(
                name="default", match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster=name,
                                                       timeout=duration_pb2.Duration(seconds=generation)))]))
    manager = hcm.HttpConnectionManager(
        stat_prefix=f"outbound_0.0.0.0_80_g{generation}",
        rds=hcm.Rds(config_source=ads, route_config_name="80"),
        http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))])
    listener = listener_pb2.Listener(name="0.0.0.0_80", address=addr("0.0.0.0", 80), filter_chains=[
        listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))])])
    route = route_pb2.RouteConfiguration(name="80", virtual_hosts=vhosts)
    shared = {CLUSTER: clusters, ENDPOINT: clas, LISTENER: {"0.0.0.0_80": listener.SerializeToString()},
              ROUTE: {"80": route.SerializeToString()}}

    def own(p: int):
        name = f"inbound|8080||app-{p}.bench.svc.cluster.local"
        c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC,
                                connect_timeout=duration_pb2.Duration(seconds=10))
        c.load_assignment.cluster_name = name
        c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.CopyFrom(addr("127.0.0.1", 8080))
        return {CLUSTER: {name: c.SerializeToString()}}

    return shared, own, sorted(clas), ["80"]


MEMO_LAYERS = True  # prepare the shared layer once, as the translator does (False: re-hash it per proxy)
# A proxy's own layer does not change between the versions a case writes; the translator keeps such layers
# prepared from the build before (LayerSerializer), so only the first write of a proxy pays for preparing it.
_OWN_PREPARED: dict[int, object] = {}


def proxy_id(i: int) -> str:
    return f"sidecar~10.1.{i >> 8}.{i & 255}~app-{i}.bench~bench.svc.cluster.local"


def _own_layer(own, i: int):
    from mizzen.services.mesh.snapstore import prepare_layer

    if i not in _OWN_PREPARED:
        _OWN_PREPARED[i] = prepare_layer(own(i))
    return _OWN_PREPARED[i]


async def write_snapshots(redis_url: str, nats_url: str | None, layers, n: int, revision: int):
    """Store the n proxies' snapshots; announce each on NATS when a URL is given. Returns {proxy: versions}."""
    import nats
    import redis.asyncio as aioredis

    from mizzen.services.mesh.bus import snapshot_subject
    from mizzen.services.mesh.snapstore import SnapshotStore, prepare_layer
    from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

    shared, own, _, _ = layers
    if MEMO_LAYERS:
        shared = prepare_layer(shared)
    r = aioredis.from_url(redis_url)
    nc = await nats.connect(nats_url) if nats_url else None
    store = SnapshotStore(r)
    expect, written = {}, {}
    short = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
    batch = 250  # as the translator stores a build: a few round trips per batch of proxies

    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        ids = [proxy_id(i) for i in idx]
        mine = [_own_layer(own, i) for i in idx] if MEMO_LAYERS else [own(i) for i in idx]
        stored = await store.put_many(revision, [(p, [shared, m]) for p, m in zip(ids, mine, strict=True)])
        now = time.time()
        for p, (m, _changed) in zip(ids, stored, strict=True):
            if nc:
                await nc.publish(snapshot_subject(p), m.to_json())
            expect[p] = {short[t]: v for t, v in m.versions.items()}
            written[p] = now

    if nc:
        await nc.flush()
        await nc.close()
    await r.aclose()
    return expect, written


# ---------------------------------------------------------------- simulated clients
def _own_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def client_process(port: int, proxies: list[str], eds_names: list[str], rds_names: list[str], conn,
                   api: str = "sotw", gateway_down: bool = False, per_connection: int = 1,
                   connect_rate: float = 0.0) -> None:
    """N Envoy-like streams in this process. `gateway_down`: nothing listens yet; once every stream has failed to
    connect (and is retrying) it says ("started", codes), so the gateway the caller starts next meets them all.
    `per_connection`: streams sharing one HTTP/2 connection (1, as Envoy: its own connection each; more costs
    this process less CPU per stream, so one machine can simulate more of them). `connect_rate`: streams this
    process opens per second (0: all at once, a connection storm)."""
    asyncio.run(_client_main(port, proxies, eds_names, rds_names, conn, api, gateway_down, per_connection,
                             connect_rate))


async def _client_main(port, proxies, eds_names, rds_names, conn, api, gateway_down=False,
                       per_connection=1, connect_rate=0.0) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

    short = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
    names = {CLUSTER: [], LISTENER: [], ENDPOINT: eds_names, ROUTE: rds_names}
    acked: dict[str, dict[str, tuple[str, float]]] = {p: {} for p in proxies}
    synced = asyncio.Event()
    remaining = {"n": len(proxies)}
    channels, calls, errors = {}, [], []
    codes: collections.Counter = collections.Counter()  # failed stream attempts by gRPC status (or exception)
    failed: set[str] = set()

    shared: dict[int, grpc.aio.Channel] = {}
    # a shared connection that failed reconnects by itself: retry soon, as the streams on it do
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20),
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 1000), *ENVOY_HTTP2_WINDOWS]

    def channel(i: int, proxy: str) -> grpc.aio.Channel:
        if per_connection == 1:
            ch = channels[proxy] = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
            return ch
        g = i // per_connection
        if g not in shared:
            shared[g] = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        return shared[g]

    async def stream(i: int, proxy: str) -> None:
        """One Envoy-like ADS stream; reconnects (as Envoy does) if the stream fails: for about 15 minutes, longer
        than any caller waits, so a slow machine shows up as a late stream, never as one that stopped trying."""
        if connect_rate:
            await asyncio.sleep(i / connect_rate)
        for attempt in range(1000):
            try:
                await one_stream(i, proxy)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - count it and retry, as Envoy would
                code = e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
                codes[code] += 1
                dbg = e.debug_error_string() if hasattr(e, "debug_error_string") else ""
                errors.append(f"{type(e).__name__} after {time.time() - t0:.1f}s, {len(acked[proxy])} types "
                              f"acked: {code} {dbg}"[:300])
                del errors[:-100]  # a sample is enough; `codes` counts them all
                failed.add(proxy)
                if proxy in channels:
                    await channels.pop(proxy).close()  # a failed attempt's channel would keep reconnecting
                await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))

    async def one_stream(i: int, proxy: str) -> None:
        ch = channel(i, proxy)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        delta = api == "delta"
        call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        calls.append(call)
        node = base_pb2.Node(id=proxy)
        for i, t in enumerate((CLUSTER, ENDPOINT, LISTENER, ROUTE)):
            if delta:
                req = discovery_pb2.DeltaDiscoveryRequest(node=node if i == 0 else None, type_url=t,
                                                          resource_names_subscribe=names[t])
            else:
                req = discovery_pb2.DiscoveryRequest(node=node if i == 0 else None, type_url=t,
                                                     resource_names=names[t])
            await call.write(req)
        mine = acked[proxy]
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                return
            if delta:
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url,
                                                                     response_nonce=resp.nonce))
                version = resp.system_version_info
            else:
                await call.write(discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce,
                    resource_names=names[resp.type_url]))
                version = resp.version_info
            first = len(mine) < 4
            mine[short[resp.type_url]] = (version, time.time())
            if first and len(mine) == 4:
                remaining["n"] -= 1
                if remaining["n"] == 0:
                    synced.set()

    t0 = time.time()
    tasks = [asyncio.create_task(stream(i, p)) for i, p in enumerate(proxies)]
    if gateway_down:
        while len(failed) < len(proxies):
            await asyncio.sleep(0.05)
        conn.send(("started", dict(codes)))
    await synced.wait()
    conn.send(("synced", time.time() - t0, errors, dict(codes)))
    loop = asyncio.get_running_loop()
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] == "stop":
            break
        _, expect, deadline = msg  # {proxy: {type: version}}: wait until every stream ACKed them
        cpu0 = sum(os.times()[:2])
        while time.time() < deadline:
            if all(acked[p].get(t, ("",))[0] == v for p in proxies for t, v in expect[p].items()):
                break
            await asyncio.sleep(0.05)
        done = {p: max(acked[p][t][1] for t in expect[p]) for p in proxies
                if all(acked[p].get(t, ("",))[0] == v for t, v in expect[p].items())}
        conn.send(("converged", done, _own_rss(), dict(codes), sum(os.times()[:2]) - cpu0))
    for c in calls:
        c.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in [*channels.values(), *shared.values()]:
        await ch.close()
    conn.send(("stopped",))


# ---------------------------------------------------------------- gateway observation
def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def metric_sum(http: str, name: str) -> float:
    """Sum of a metric over every gateway (http is HOST:PORT, or several joined with commas for workers)."""
    total = 0.0
    for addr in http.split(","):
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            text = r.read().decode()
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith(name + "{") or line.startswith(name + " "))
    return total


def gateway_pids(pid: int) -> list[int]:
    """The gateway process, or its worker processes when it runs several."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    return kids or [pid]


def gateway_stats(pid: int) -> tuple[float, int]:
    cpu = rss = 0
    for p in gateway_pids(pid):
        c, r = proc_stats(p)
        cpu += c
        rss += r
    return cpu, rss


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------- the run
_REVISIONS = itertools.count(1)


class Clients:
    """Simulated proxies in `procs` client processes (client_process); `workers` are (process, pipe) pairs,
    `parts` the proxies of each. `connect_rate`: streams opened per second in all (0: all at once)."""

    def __init__(self, port: int, proxies: list[str], eds_names: list[str], rds_names: list[str], *,
                 api: str = "sotw", procs: int = 2, per_connection: int = 1, gateway_down: bool = False,
                 timeout: float = 120.0, connect_rate: float = 0.0):
        self.parts = [proxies[i::procs] for i in range(procs)]
        self.timeout = timeout
        self.cpu_s = 0.0
        self.workers = []
        ctx = mp.get_context("spawn")
        for part in self.parts:
            a, b = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(port, part, eds_names, rds_names, b, api,
                                                            gateway_down, per_connection, connect_rate / procs),
                               daemon=True)
            proc.start()
            self.workers.append((proc, a))

    @classmethod
    def for_case(cls, args, port: int, proxies: list[str], layers) -> Clients:
        """The clients of a bench case (args: --procs, --api, --per-connection, --timeout, --connect-rate)."""
        return cls(port, proxies, layers[2], layers[3], api=args.api, procs=args.procs,
                   per_connection=args.per_connection, timeout=args.timeout, connect_rate=args.connect_rate)

    def synced(self) -> None:
        """Wait until every stream holds its first config."""
        for _proc, a in self.workers:
            if not a.poll(self.timeout):
                raise TimeoutError("clients did not sync")
            msg = a.recv()
            if msg[2]:
                print(f"  client stream errors (retried): {len(msg[2])}, e.g. {msg[2][0]}", flush=True)

    def converged(self, expect: dict[str, dict[str, str]]) -> tuple[dict[str, float], int]:
        """({proxy: time it ACKed the last of `expect`'s versions}, clients' RSS). `cpu_s` then holds the CPU
        seconds the client processes spent until then: on one machine they compete with the gateway."""
        deadline = time.time() + self.timeout
        for (_proc, a), part in zip(self.workers, self.parts, strict=True):
            a.send(("expect", {p: expect[p] for p in part}, deadline))
        done: dict[str, float] = {}
        rss = 0
        self.cpu_s = 0.0
        for _proc, a in self.workers:
            _, acked, proc_rss, _codes, cpu = a.recv()
            done.update(acked)
            rss += proc_rss
            self.cpu_s += cpu
        return done, rss

    def stop(self) -> None:
        for _proc, a in self.workers:
            try:
                a.send(("stop",))
            except OSError:
                pass
        for proc, _a in self.workers:
            proc.join(20)
            if proc.is_alive():
                proc.kill()


def latencies(services: int, clients: int, per_connection: int, t0: float, done: dict[str, float]) -> dict:
    lat = [t - t0 for t in done.values()]
    return {"S": services, "N": clients, "streams_per_connection": per_connection, "converged": len(done),
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat) if lat else float("nan")}


def run_case(args, stack, services: int, clients: int, layers_v1, layers_v2) -> dict:
    port, http, pid = stack["port"], stack["http"], stack["pid"]
    # revisions only grow (the store keeps a newer snapshot over an older one), also across cases
    rev1, rev2 = next(_REVISIONS), next(_REVISIONS)
    asyncio.run(write_snapshots(stack["redis"], None, layers_v1, clients, rev1))
    time.sleep(0.5)
    cpu0, rss0 = gateway_stats(pid)
    t_connect = time.time()
    group = Clients.for_case(args, port, [proxy_id(i) for i in range(clients)], layers_v1)
    try:
        group.synced()
        connect_s = time.time() - t_connect
        time.sleep(2.5)  # settled: the gateway hands freed buffers back on its next idle tick (every 2 s)
        cpu1, rss1 = gateway_stats(pid)
        bytes0 = metric_sum(http, "mizzen_xds_push_bytes_total")
        print(f"  {clients} streams connected in {connect_s:.1f}s; pushing", flush=True)
        t0 = time.time()
        expect, written_at = asyncio.run(write_snapshots(stack["redis"], stack["nats"], layers_v2, clients, rev2))
        written = time.time() - t0
        done, clients_rss = group.converged(expect)
        cpu2, rss2 = gateway_stats(pid)
        bytes1 = metric_sum(http, "mizzen_xds_push_bytes_total")
        own = [t - written_at[p] for p, t in done.items()]
        return {
            **latencies(services, clients, args.per_connection, t0, done),
            "connect_s": connect_s, "write_s": written,
            "own_p50": pct(own, 0.5), "own_p99": pct(own, 0.99), "own_max": max(own) if own else float("nan"),
            "bytes_per_push": (bytes1 - bytes0) / clients, "cpu_per_push_ms": (cpu2 - cpu1) / clients * 1000,
            "cpu_push_s": cpu2 - cpu1, "cpu_connect_s": cpu1 - cpu0,
            "rss_mb": rss2 / 2**20, "rss_per_stream_kb": (rss1 - rss0) / clients / 1024,
            "clients_rss_mb": clients_rss / 2**20, "clients_cpu_push_s": group.cpu_s,
        }
    finally:
        group.stop()
        # let the gateway notice the closed streams before the next case
        end = time.time() + 20
        while time.time() < end and metric_sum(http, "mizzen_xds_connected_proxies") > 0:
            time.sleep(0.2)


def run_floor_case(args, tmp: Path, services: int, clients: int, layers_v1) -> dict:
    """The same case against bench/xds_floor.py: gRPC fan-out of the same bytes and nothing else."""
    from mizzen.services.mesh import procs

    port = procs.free_port()
    floor = procs.spawn("xds-floor", [sys.executable, str(Path(__file__).with_name("xds_floor.py")),
                                      "--port", str(port), "--services", str(services), "--api", args.api],
                        tmp / "logs")
    group = None
    try:
        procs.wait_port("127.0.0.1", port, timeout=120, proc=floor.popen)
        _, rss0 = proc_stats(floor.pid)  # its snapshot bytes are built before it listens
        t_connect = time.time()
        proxies = [proxy_id(i) for i in range(clients)]
        group = Clients.for_case(args, port, proxies, layers_v1)
        group.synced()
        connect_s = time.time() - t_connect
        time.sleep(2.5)  # as run_case waits before it reads the gateway's memory
        cpu1, rss1 = proc_stats(floor.pid)
        t0 = time.time()
        os.kill(floor.pid, signal.SIGUSR1)  # generation 2 of every type to every stream
        done, clients_rss = group.converged({p: {t: "g2" for t in TYPES} for p in proxies})
        cpu2, rss = proc_stats(floor.pid)
        return {**latencies(services, clients, args.per_connection, t0, done), "connect_s": connect_s,
                "cpu_per_push_ms": (cpu2 - cpu1) / clients * 1000, "cpu_push_s": cpu2 - cpu1,
                "rss_mb": rss / 2**20, "rss_per_stream_kb": (rss1 - rss0) / clients / 1024,
                "clients_rss_mb": clients_rss / 2**20, "clients_cpu_push_s": group.cpu_s}
    finally:
        if group is not None:
            group.stop()
        floor.stop()


def start_stack(tmp: Path, workers: int = 1) -> tuple[dict, list]:
    from mizzen.services.mesh import procs

    started: list = []
    try:
        nats = procs.start_nats(tmp / "logs", jetstream=False)
        started.append(nats)
        redis = procs.start_redis(tmp / "logs")
        started.append(redis)
        port, http_port = procs.free_port(), procs.free_port()
        gw = procs.spawn("xds-gateway", [sys.executable, "-m", "mizzen.services.xds_gateway", "--port", str(port),
                                         "--http-port", str(http_port), "--nats-url", nats.meta["url"],
                                         "--redis-url", redis.meta["url"], "--replica-id", "bench",
                                         "--resync-interval", "600", "--log-level", "warning",
                                         "--workers", str(workers)],
                         tmp / "logs", env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        started.insert(0, gw)
        for w in range(workers):
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http_port + w}/healthz/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.2)
            else:
                raise RuntimeError("gateway not ready: " + gw.log_text()[-2000:])
    except BaseException:
        for p in started:  # nothing this bench started outlives a failed start
            p.stop()
        raise
    stack = {"nats": nats.meta["url"], "redis": redis.meta["url"], "port": port,
             "http": ",".join(f"127.0.0.1:{http_port + w}" for w in range(workers)), "pid": gw.pid}
    return stack, started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", default="100,1000")
    ap.add_argument("--clients", default="100,1000,2000")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--api", choices=("sotw", "delta"), default="sotw", help="StreamAggregatedResources or "
                    "DeltaAggregatedResources")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--per-connection", type=int, default=1,
                    help="ADS streams sharing one client HTTP/2 connection (1: one each, as Envoy)")
    ap.add_argument("--connect-rate", type=float, default=CONNECT_RATE,
                    help="streams the clients open per second (0: all at once, a connection storm)")
    ap.add_argument("--no-memo-layers", action="store_true",
                    help="hand SnapshotStore.put the raw shared layer, so it re-hashes it for every proxy")
    ap.add_argument("--floor", action="store_true",
                    help="after each case, the same case against bench/xds_floor.py (gRPC fan-out alone)")
    ap.add_argument("--nats-url")
    ap.add_argument("--redis-url")
    ap.add_argument("--xds", help="HOST:PORT of a running gateway (with --gateway-http and --gateway-pid)")
    ap.add_argument("--gateway-http")
    ap.add_argument("--gateway-pid", type=int)
    args = ap.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds through the `finally` below, which stops what the bench started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global MEMO_LAYERS
    MEMO_LAYERS = not args.no_memo_layers
    owned: list = []
    tmp = Path(tempfile.mkdtemp(prefix="xds-bench-"))
    if args.xds:
        stack = {"nats": args.nats_url, "redis": args.redis_url, "port": int(args.xds.rsplit(":", 1)[1]),
                 "http": args.gateway_http, "pid": args.gateway_pid}
    else:
        stack, owned = start_stack(tmp)
    rows = []
    try:
        for s in [int(x) for x in args.services.split(",")]:
            n_max = max(int(x) for x in args.clients.split(","))
            v1 = build_layers(s, n_max, 1)
            v2 = build_layers(s, n_max, 2)
            for n in [int(x) for x in args.clients.split(",")]:
                row = run_case(args, stack, s, n, v1, v2)
                rows.append(row)
                print(f"{args.api} S={row['S']:>5} N={row['N']:>5}  connect {row['connect_s']:6.2f}s  "
                      f"push p50 {row['p50']:6.2f}s p99 {row['p99']:6.2f}s max {row['max']:6.2f}s "
                      f"(writes {row['write_s']:.2f}s, {row['converged']}/{n} converged; from each proxy's own "
                      f"write p50 {row['own_p50']:.2f}s p99 {row['own_p99']:.2f}s max {row['own_max']:.2f}s)  "
                      f"{row['bytes_per_push'] / 1024:8.1f} KiB/push  cpu {row['cpu_per_push_ms']:6.2f} ms/push "
                      f"({row['cpu_push_s']:.1f}s; clients {row['clients_cpu_push_s']:.1f}s)  rss {row['rss_mb']:7.1f} MiB "
                      f"({row['rss_per_stream_kb']:.1f} KiB/stream)", flush=True)
                if args.floor:
                    f = run_floor_case(args, tmp, s, n, v1)
                    row["floor"] = f
                    print(f"{args.api} S={s:>5} N={n:>5}  floor: connect {f['connect_s']:6.2f}s  push p50 "
                          f"{f['p50']:6.2f}s p99 {f['p99']:6.2f}s ({f['converged']}/{n} converged)  cpu "
                          f"{f['cpu_per_push_ms']:6.2f} ms/push, {f['rss_per_stream_kb']:.1f} KiB/stream; gateway p99 / floor p99 = "
                          f"{row['p99'] / f['p99']:.2f}", flush=True)
    finally:
        for p in owned:
            p.stop()
    print("\n| S | N | connect s | writes s | p50 s | p99 s | max s | own-write p99 s | KiB/push | CPU ms/push |"
          " gateway RSS MiB | KiB/stream |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['S']} | {r['N']} | {r['connect_s']:.2f} | {r['write_s']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['max']:.2f} | {r['own_p99']:.2f} | "
              f"{r['bytes_per_push'] / 1024:.1f} | {r['cpu_per_push_ms']:.2f} | {r['rss_mb']:.0f} | "
              f"{r['rss_per_stream_kb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
