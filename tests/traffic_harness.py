"""One shared harness for the traffic tests (no tests here): a real control plane, one gateway-style Envoy it
configures, and echo upstreams on 127.0.0.x loopback addresses.

- `Stack`: private NATS and Redis, registry, translator, xds_gateway as processes (tests/stack.py).
- The Envoy: `mizzen bootstrap --router` (a gateway proxy, node `router~127.0.0.1~traffic-gw.default~…`,
  labels `istio=ingressgateway` plus the locality labels it was given), run with `--concurrency 1` (one worker:
  connection pools and outlier detection are per worker, so one worker makes the counts exact).
- A Gateway `traffic-gw` on a free port bound to 127.0.0.1 with hosts `*`: every VirtualService bound to it
  (`gateways: [traffic-gw]`) is reachable at `http://127.0.0.1:<port>/` with its host in the Host header.
- An SDS server (tests/sds_fixture.py) gives the gateway the mesh certificate, as the agent does.
- `Upstream`s are echo.py's HTTP server in this process (threads), so a test can count the requests that
  reached each one (`seen`), and make one slow or failing at run time (`status`, `delay`).

Config goes in through the registry's HTTP API; `wait_*` helpers poll Envoy's admin until it arrived, so a
test never races the push. Everything a harness starts is stopped by `close()`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mizzen.services.cli.http import apply_objects, delete_keys
from mizzen.services.demo.echo import make_servers
from mizzen.services.mesh import procs
from mizzen.services.mesh.store import key_of
from mizzen.services.sidecar.bootstrap import envoy_command
from tests.sds_fixture import SdsServer
from tests.stack import Stack
from tests.test_e2e_support import eventually, mizzen

GATEWAY = "traffic-gw"
NS = "default"


class Upstream:
    """An echo HTTP server on `ip:port` (port 0: a free one), answering as `name` (and `version`)."""

    def __init__(self, name: str, ip: str, port: int = 0, version: str | None = None, ssl_context=None):
        self.name, self.ip = name, ip
        (self.server,) = make_servers([port], [], name, ip, version=version, pod=name)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=f"echo-{name}")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def seen(self) -> list[dict]:
        return self.server.seen

    def hits(self, **headers: str) -> int:
        """Requests that reached this upstream carrying these headers (e.g. a test's own marker)."""
        return sum(1 for s in self.seen if all(s["headers"].get(k.replace("_", "-")) == v for k, v in headers.items()))

    def answer(self, status: int | None = None, delay: float | None = None) -> None:
        """From now on answer every request with `status` after `delay` seconds (None: normally)."""
        self.server.status, self.server.delay = status, delay

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Reply:
    status: int
    body: object
    headers: dict[str, str]
    seconds: float

    @property
    def who(self) -> str | None:
        """The upstream that answered (its name), None unless an echo server answered."""
        return self.body.get("name") if isinstance(self.body, dict) else None


def service_entry(name: str, host: str, upstreams: list[Upstream], *, labels: list[dict] | None = None,
                  localities: list[str] | None = None, protocol: str = "HTTP", port: int = 80) -> dict:
    """A MESH_INTERNAL STATIC ServiceEntry whose endpoints are the upstreams (with labels/localities)."""
    eps = []
    for i, u in enumerate(upstreams):
        ep: dict = {"address": u.ip, "ports": {"http": u.port}}
        if labels:
            ep["labels"] = labels[i]
        if localities:
            ep["locality"] = localities[i]
        eps.append(ep)
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": [host], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": port, "name": "http", "protocol": protocol}], "endpoints": eps}}


def virtual_service(name: str, host: str, http: list[dict]) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": [host], "gateways": [GATEWAY], "http": http}}


def destination_rule(name: str, host: str, traffic_policy: dict | None = None, subsets: list | None = None) -> dict:
    spec: dict = {"host": host}
    if traffic_policy is not None:
        spec["trafficPolicy"] = traffic_policy
    if subsets is not None:
        spec["subsets"] = subsets
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


def outbound(host: str, port: int = 80, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


@dataclass
class TrafficMesh:
    work: Path
    gateway_labels: dict[str, str] = field(default_factory=dict)  # e.g. the gateway's locality labels
    bootstrap_flags: list[str] = field(default_factory=list)  # more `mizzen bootstrap` flags (e.g. --locality)
    stack: Stack = field(init=False)
    envoy: procs.Proc | None = field(init=False, default=None)
    sds: SdsServer | None = field(init=False, default=None)
    upstreams: list[Upstream] = field(default_factory=list)
    _next_ip: int = 20

    def __post_init__(self) -> None:
        self.stack = Stack(self.work)
        try:
            self.stack.start()
            self.port = procs.free_port()
            self.admin_port = procs.free_port()
            self.access_log = self.work / "gateway-access.log"
            self.apply(self.gateway())
            self._start_envoy()
        except BaseException:
            self.close()
            raise

    # ---- processes
    def _start_envoy(self) -> None:
        boot = self.work / "gateway.json"
        # Its SDS, as the agent beside a real gateway: the mesh certificate (`default`, `ROOTCA`) that auto mTLS
        # clusters name. Without it every such cluster would warm until the secrets' fetch times out.
        self.sds = SdsServer([self.work / "sds.sock"]).start()
        labels = {"istio": "ingressgateway", **self.gateway_labels}
        flags = [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
        mizzen("bootstrap", "--router", "--pod", GATEWAY, "-n", NS, "--ip", "127.0.0.1",
               "--xds", self.stack.xds_address, *flags, "--admin-port", str(self.admin_port),
               "--health-port", str(procs.free_port()), "--prometheus-port", str(procs.free_port()),
               "--agent-port", str(procs.free_port()), "--listen-address", "127.0.0.1", "--zipkin", "",
               "--sds-path", str(self.work / "sds.sock"), "--initial-fetch-timeout", "5s",
               "--access-log", str(self.access_log), *self.bootstrap_flags, "-o", str(boot))
        argv = envoy_command(str(boot), concurrency=1, log_level="warning", flush_interval_ms=100, drain_seconds=1)
        self.envoy = procs.spawn("envoy-gateway", argv, self.stack.log_dir)
        eventually(lambda: self._listening(), 60, 0.1, what="the gateway Envoy listening on the Gateway's port")

    def _listening(self) -> bool:
        if self.envoy is not None and not self.envoy.alive():
            raise AssertionError(f"Envoy exited:\n{self.envoy.log_text()[-3000:]}")
        return port_open(self.port)

    def close(self) -> None:
        if self.envoy is not None:
            with contextlib.suppress(Exception):
                self.envoy.stop()
        for u in self.upstreams:
            with contextlib.suppress(Exception):
                u.close()
        if self.sds is not None:
            with contextlib.suppress(Exception):
                self.sds.stop()
        with contextlib.suppress(Exception):
            self.stack.stop()

    # ---- config
    def gateway(self) -> dict:
        return {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
                "metadata": {"name": GATEWAY, "namespace": NS},
                "spec": {"selector": {"istio": "ingressgateway"},
                         "servers": [{"port": {"number": self.port, "name": "http", "protocol": "HTTP"},
                                      "bind": "127.0.0.1", "hosts": ["*"]}]}}

    def apply(self, *objects: dict) -> None:
        apply_objects(self.stack.registry_url, list(objects))

    def delete(self, *objects: dict) -> None:
        delete_keys(self.stack.registry_url, [key_of(o) for o in objects])

    def _ip(self) -> str:
        self._next_ip += 1
        assert self._next_ip < 255, "out of 127.0.0.x addresses"
        return f"127.0.0.{self._next_ip}"

    def upstream(self, name: str, port: int = 0, version: str | None = None, ip: str | None = None) -> Upstream:
        """A new echo upstream on its own 127.0.0.x address."""
        u = Upstream(name, ip or self._ip(), port, version)
        self.upstreams.append(u)
        return u

    def tls_upstream(self, name: str, server_name: str) -> TlsUpstream:
        u = TlsUpstream(name, self._ip(), server_name, self.work)
        self.upstreams.append(u)
        return u

    # ---- Envoy's admin
    def admin(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            return r.read()

    def config_dump(self) -> dict:
        return json.loads(self.admin("/config_dump?include_eds"))

    def cluster_config(self, name: str) -> dict | None:
        for c in self.config_dump()["configs"]:
            if c["@type"].endswith("ClustersConfigDump"):
                for dc in c.get("dynamic_active_clusters", []):
                    if dc["cluster"]["name"] == name:
                        return dc["cluster"]
        return None

    def route_for(self, host: str) -> list[dict]:
        """The routes of the gateway's virtual host for `host`."""
        for c in self.config_dump()["configs"]:
            if c["@type"].endswith("RoutesConfigDump"):
                for rc in c.get("dynamic_route_configs", []):
                    for vh in rc["route_config"].get("virtual_hosts", []):
                        if host in vh.get("domains", []):
                            return vh.get("routes", [])
        return []

    def host_statuses(self, cluster: str) -> dict[str, dict]:
        """address → Envoy's /clusters host status (health_status, priority, locality, stats)."""
        status = json.loads(self.admin("/clusters?format=json"))
        for c in status.get("cluster_statuses", []):
            if c["name"] == cluster:
                out = {}
                for h in c.get("host_statuses", []):
                    sa = h["address"]["socket_address"]
                    out[f"{sa['address']}:{sa['port_value']}"] = h
                return out
        return {}

    def stats(self, prefix: str) -> dict[str, int]:
        out = {}
        for line in self.admin(f"/stats?filter=^{prefix}").decode().splitlines():
            key, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def wait_cluster(self, name: str, check: Callable[[dict], object] = lambda c: True, what: str = "",
                     timeout: float = 30.0) -> dict:
        """Until Envoy holds cluster `name` and `check(its config)` holds; returns the config."""
        return eventually(lambda: (c := self.cluster_config(name)) is not None and check(c) and c, timeout,
                          0.1, what=what or f"cluster {name} in Envoy")  # type: ignore[return-value]

    def clusters(self, section: str = "dynamic_active_clusters") -> dict[str, dict]:
        for c in self.config_dump()["configs"]:
            if c["@type"].endswith("ClustersConfigDump"):
                return {dc["cluster"]["name"]: dc["cluster"] for dc in c.get(section, [])}
        return {}

    def wait_policy(self, name: str, check: Callable[[dict], object], what: str = "") -> None:
        """Until Envoy got a version of cluster `name` for which `check` holds (active or still warming), then
        up to 5 s for it to become the active one. A change a test waits for this way may stay warming (the
        bug this tolerates is what the test's traffic must then expose): no assertion on the config here."""
        def received() -> bool:
            return any((c := self.clusters(sec).get(name)) is not None and check(c)
                       for sec in ("dynamic_active_clusters", "dynamic_warming_clusters"))

        eventually(received, 30, 0.1, what=what or f"a new version of {name}")
        with contextlib.suppress(AssertionError):
            eventually(lambda: (c := self.clusters().get(name)) is not None and check(c), 5, 0.1)

    def wait_hosts(self, cluster: str, upstreams: list[Upstream], timeout: float = 30.0) -> None:
        want = {u.address for u in upstreams}
        eventually(lambda: set(self.host_statuses(cluster)) == want, timeout, 0.1,
                   what=f"{cluster} with endpoints {sorted(want)}")

    def wait_routes(self, host: str, check: Callable[[list[dict]], object], what: str = "",
                    timeout: float = 30.0) -> list[dict]:
        return eventually(lambda: (r := self.route_for(host)) and check(r) and r, timeout, 0.1,
                          what=what or f"routes for {host}")  # type: ignore[return-value]

    def wait_vs(self, vs: dict, timeout: float = 30.0) -> list[dict]:
        """Until the gateway's routes for the VirtualService's host come from this VirtualService's spec: the
        route names (rule `name`s; the test names each rule after a marker) all present."""
        host = vs["spec"]["hosts"][0]
        names = {r.get("name", "") for r in vs["spec"]["http"]}
        return self.wait_routes(host, lambda rs: names <= {r.get("name", "") for r in rs},
                                what=f"routes of VirtualService {vs['metadata']['name']}", timeout=timeout)

    # ---- traffic
    def request(self, host: str, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET",
                timeout: float = 10.0) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t0 = time.monotonic()
        try:
            conn.request(method, path, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            body: object = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return Reply(resp.status, body, {k.lower(): v for k, v in resp.getheaders()}, time.monotonic() - t0)

    def spread(self, host: str, n: int, headers: dict[str, str] | None = None, path: str = "/") -> Counter:
        """Who answered n sequential requests (non-echo answers count by status, e.g. `503`)."""
        out: Counter = Counter()
        for _ in range(n):
            r = self.request(host, path, headers)
            out[r.who if r.status == 200 and r.who else str(r.status)] += 1
        return out

    def concurrent(self, host: str, n: int, headers: dict[str, str] | None = None, path: str = "/",
                   timeout: float = 30.0) -> list[Reply]:
        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(lambda _: self.request(host, path, headers, timeout=timeout), range(n)))

    def log_entries(self) -> list[dict]:
        if not self.access_log.exists():
            return []
        return [json.loads(ln) for ln in self.access_log.read_text(errors="replace").splitlines()
                if ln.startswith("{")]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class TlsUpstream(Upstream):
    """An echo server speaking HTTPS with a self-signed certificate for `server_name`; records the SNI each
    TLS client sent (`snis`)."""

    def __init__(self, name: str, ip: str, server_name: str, work: Path):
        import ssl

        cert, key = self_signed(server_name, work / f"{name}-cert.pem", work / f"{name}-key.pem")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.snis: list[str | None] = []
        ctx.sni_callback = lambda sock, sni, _ctx: self.snis.append(sni)
        self.cert = cert
        super().__init__(name, ip, ssl_context=ctx)


def self_signed(name: str, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
