"""Helpers of the full-stack end-to-end tests (no tests here).

`E2E` is one running mesh: the real control plane as processes (`Stack`: private NATS and Redis, registry,
translator, xds_gateway), test pods in network namespaces (`PodNetwork`), and for each pod with a sidecar a
real Envoy started from `mizzen bootstrap` (the CLI, as a user would), with an SDS server
(`tests/sds_fixture.py`) on the unix socket the bootstrap's `sds-grpc` cluster names, so Istio's auto mTLS
works between the sidecars. Config changes go through the `mizzen apply` / `mizzen delete` CLI.

Everything is loopback or inside namespaces the test made: the gateway, registry, NATS and Redis listen on
127.0.0.1; each pod reaches the gateway through a relay (127.0.0.1:15010 inside the pod → the gateway's port
on the host) and the test reaches each Envoy's admin through another (a free host port → 127.0.0.1:15000
inside the pod).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mizzen.services.cli.http import apply_objects
from mizzen.services.demo.echo import http_call
from mizzen.services.mesh import procs
from mizzen.services.sidecar.bootstrap import envoy_command
from mizzen.services.sidecar.netns import REPO_ROOT, SEED_IPTABLES_FLAGS, Pod, PodNetwork, endpoints_object
from tests.sds_fixture import FixtureCA, SdsServer, issue, make_ca
from tests.stack import Stack

ECHO = str(REPO_ROOT / "services" / "demo" / "echo.py")
APP_UID = 1000  # the apps' uid: anything but the proxy's 1337
XDS_IN_POD = 15010  # inside a pod, 127.0.0.1:15010 is relayed to the gateway on the host
XDS_TLS_IN_POD = 15012  # … and 127.0.0.1:15012 to the gateway's TLS port (agents: xDS over TLS with a token)
CA_IN_POD = 8060  # inside a pod, 127.0.0.1:8060 is relayed to certauth on the host
SDS_SOCKET = Path("etc/istio/proxy/SDS")  # the bootstrap's default, relative to Envoy's working directory
TLS_MODE_LABEL = "security.istio.io/tlsMode"  # set by Istio's injector; auto mTLS keys on it
MESH_IDENTITY = "spiffe://cluster.local/ns/default/sa/default"


def mizzen(*args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the `mizzen` CLI (`python -m mizzen …`) as a user would."""
    res = subprocess.run([sys.executable, "-m", "mizzen", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    if check and res.returncode != 0:
        raise AssertionError(f"mizzen {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def service(name: str, cluster_ip: str, port: int = 80, target_port: int = 8080, port_name: str = "http",
            app: str | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "selector": {"app": app or name},
                     "ports": [{"name": port_name, "port": port, "targetPort": target_port, "protocol": "TCP"}]}}


def endpoints(name: str, pods: list[Pod], port: int = 8080, port_name: str = "http") -> dict:
    return endpoints_object(name, "default", pods, [{"name": port_name, "port": port, "protocol": "TCP"}])


def eventually(check: Callable[[], object], timeout: float = 30.0, interval: float = 0.1,
               what: str = "condition") -> object:
    """Poll `check()` until it returns something truthy (returned); fail with the last value or error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001 - keep polling; reported if it never succeeds
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# --- a sidecar ------------------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """A pod's Envoy: started from `mizzen bootstrap`, its SDS server, its admin relayed to the host."""

    pod: Pod
    delta: bool
    proc: procs.Proc  # Envoy, or the agent that runs it
    sds: SdsServer | None  # the test SDS server; None when the agent serves SDS
    admin_port: int  # on the host, relayed to 127.0.0.1:15000 inside the pod
    bootstrap_path: Path
    access_log: Path
    pod_name: str  # the Kubernetes pod name (the netns pod may have a shorter name)
    namespace: str = "default"
    agent_port: int | None = None  # on the host, relayed to the agent's 15020 inside the pod

    def agent_get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}{path}", timeout=timeout) as r:
            return r.read()

    def agent_ready(self) -> bool:
        try:
            return self.agent_get("/healthz/ready") == b"ok\n"
        except OSError:
            return False

    def agent_certs(self) -> dict:
        """What the agent holds (`/debug/certs`: identity, serial, renewals, number of roots)."""
        return json.loads(self.agent_get("/debug/certs"))

    def envoy_certs(self) -> tuple[set[str], set[str]]:
        """Envoy's `/certs`: the serial numbers of the leaf certificates and of the CA certificates it holds."""
        data = json.loads(self.get("/certs"))
        leaves, cas = set(), set()
        for c in data.get("certificates", []):
            # Envoy prints serials in even-length hex (a leading 0 where needed), istioctl/Python without it
            leaves |= {x["serial_number"].lower().lstrip("0") for x in c.get("cert_chain", [])}
            cas |= {x["serial_number"].lower().lstrip("0") for x in c.get("ca_cert", [])}
        return leaves, cas

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def proxy_name(self) -> str:
        return f"{self.pod_name}.{self.namespace}"

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as r:
            return r.read()

    def config_dump(self) -> dict:
        return json.loads(self.get("/config_dump?include_eds"))

    def section(self, kind: str, dump: dict | None = None) -> dict:
        """One section of the config dump by its message name (`ClustersConfigDump`, `RoutesConfigDump`, …)."""
        for c in (dump or self.config_dump())["configs"]:
            if c["@type"].rsplit(".", 1)[-1] == kind:
                return c
        return {}

    def clusters(self) -> set[str]:
        sec = self.section("ClustersConfigDump")
        return {c["cluster"]["name"] for c in sec.get("dynamic_active_clusters", [])}

    def cluster_hosts(self, cluster: str) -> set[str] | None:
        """The hosts Envoy holds for a cluster right now (from /clusters), None if it has no such cluster."""
        status = json.loads(self.get("/clusters?format=json"))
        for c in status.get("cluster_statuses", []):
            if c["name"] == cluster:
                return {f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}"
                        for h in c.get("host_statuses", [])}
        return None

    def routes_to(self, cluster: str) -> bool:
        """Whether one of Envoy's RDS route configurations sends requests to `cluster`."""
        sec = self.section("RoutesConfigDump")
        return f'"{cluster}"' in json.dumps(sec.get("dynamic_route_configs", []))

    def serves(self, cluster: str, hosts: set[str]) -> bool:
        """Envoy routes to `cluster` and holds exactly `hosts` for it (so a request now must go there)."""
        return self.cluster_hosts(cluster) == hosts and self.routes_to(cluster)

    def listeners(self) -> set[str]:
        status = json.loads(self.get("/listeners?format=json"))
        return {x["name"] for x in status.get("listener_statuses", [])}

    def server_info(self) -> dict:
        return json.loads(self.get("/server_info"))

    def stats(self, prefix: str) -> dict[str, int]:
        """Envoy's counters and gauges under a prefix (`listener_manager.` …; the bootstrap's stats matcher
        keeps only some prefixes)."""
        out = {}
        for line in self.get(f"/stats?filter=^{prefix}").decode().splitlines():
            key, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def settled(self) -> bool:
        """Nothing in transition: no cluster or listener warming, no listener or filter chain draining (an
        updated listener's old filter chains drain for --drain-time-s and still show in the config dump)."""
        lm = self.stats("listener_manager.")
        cm = self.stats("cluster_manager.")
        return (lm["listener_manager.total_listeners_warming"] == 0
                and lm["listener_manager.total_listeners_draining"] == 0
                and lm["listener_manager.total_filter_chains_draining"] == 0
                and cm["cluster_manager.warming_clusters"] == 0)

    def pc(self, *args: str) -> str:
        """`mizzen proxy-config <args> --admin <this Envoy>`."""
        return mizzen("proxy-config", *args, "--admin", self.admin).stdout

    def log_entries(self) -> list[dict]:
        """The JSON access-log lines: from the bootstrap's --access-log file, or from Envoy's own output when the
        snapshot's loggers still write to /dev/stdout (built before the proxy connected with its metadata)."""
        lines: list[str] = []
        for path in (self.access_log, self.proc.log_path):
            if path is not None and path.exists():
                lines += [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("{")]
        return [json.loads(ln) for ln in lines]

    def wait_entry(self, timeout: float = 10.0, **match: object) -> dict:
        def find() -> dict | None:
            for e in self.log_entries():
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None

        return eventually(find, timeout, 0.05, what=f"{self.pod_name}: access-log line with {match}")  # type: ignore[return-value]

    def alive(self) -> bool:
        return self.proc.alive()


# --- the environment --------------------------------------------------------------------------------------


@dataclass
class E2E:
    """One mesh: the control plane, the pod network, the sidecars."""

    work: Path
    subnet: str = "10.244.1.0/24"
    service_cidr: str = "10.96.0.0/16"
    stack: Stack = field(init=False)
    net: PodNetwork = field(init=False)
    ca: FixtureCA = field(init=False)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    _sds: list[SdsServer] = field(default_factory=list)
    _files: int = 0
    stack_env: dict[str, str] = field(default_factory=dict)  # extra environment for the control plane

    certauth: bool = False  # run the real CA (certauth) too: sidecars from start_agent get their certificates there
    certauth_flags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ca = make_ca(MESH_IDENTITY)
        self.stack = Stack(self.work, env=dict(self.stack_env))
        self.net = None  # type: ignore[assignment]
        try:
            if self.certauth:
                self.stack.xds_tls_port = procs.free_port()  # sidecars from start_agent talk xDS over TLS
                self.stack.start_infra()
                self.stack.start_service("certauth", extra=list(self.certauth_flags))
                self.stack.start(("registry", "translator", "xds-gateway"))
            else:
                self.stack.start()
            self.net = PodNetwork(self.subnet, self.service_cidr, keep_dir=self.work)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop everything this mesh started: pods (Envoys, apps, relays, namespaces), SDS servers, the stack."""
        if self.net is not None:
            with contextlib.suppress(Exception):
                self.net.close()
        for sds in self._sds:
            with contextlib.suppress(Exception):
                sds.stop()
        with contextlib.suppress(Exception):
            self.stack.stop()

    # config
    @property
    def server(self) -> str:
        return self.stack.registry_url

    def register(self, objects: list[dict]) -> None:
        """Set-up writes straight through the registry's HTTP API (the steps under test use the CLI)."""
        apply_objects(self.server, objects)

    def _yaml(self, objects: list[dict]) -> Path:
        self._files += 1
        path = self.work / f"change-{self._files}.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        return path

    def apply(self, *objects: dict) -> str:
        return mizzen("apply", "-f", str(self._yaml(list(objects))), "--server", self.server).stdout

    def mizzen_apply(self, *objects: dict) -> subprocess.CompletedProcess:
        """`mizzen apply` of the objects, with its warnings (stderr)."""
        return mizzen("apply", "-f", str(self._yaml(list(objects))), "--server", self.server)

    def delete(self, *objects: dict) -> str:
        return mizzen("delete", "-f", str(self._yaml(list(objects))), "--server", self.server).stdout

    def proxy_status(self) -> dict[str, list[str]]:
        """`mizzen proxy-status` (through the registry's /debug/syncz): NAME → the row's other cells."""
        out = mizzen("proxy-status", "--server", self.server).stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        return {r[0]: r[1:] for r in rows if r}

    # pods
    def add_pod(self, name: str, labels: dict[str, str], app_port: int | None = None, register: bool = True,
                ip: str | None = None, service_account: str = "default") -> Pod:
        """A pod (registered as a Pod object unless told otherwise), running the echo app on app_port."""
        pod = self.net.add_pod(name, labels=labels, ip=ip, register=self.register if register else None,
                               container_ports=[app_port] if app_port else [], service_account=service_account)
        if app_port:
            pod.start_app([sys.executable, ECHO, "serve", "--http", str(app_port), "--name", name], uid=APP_UID,
                          wait_ports=[app_port])
        return pod

    def start_sidecar(self, pod: Pod, *, delta: bool = False, xds: str = f"127.0.0.1:{XDS_IN_POD}",
                      pod_name: str | None = None, extra_bootstrap: list[str] = (),
                      hosts: dict[str, str] | None = None, iptables: bool = True,
                      identity: str | None = None, concurrency: int = 1) -> Sidecar:
        """`mizzen iptables` in the pod, the xDS relay, an SDS server, `mizzen bootstrap -o FILE [--delta]`,
        and Envoy as uid 1337 (not waited for: see wait_ready). With `hosts`, Envoy sees a private /etc/hosts
        (a bind mount in its own mount namespace) and a resolv.conf naming only the pod's loopback, so its
        DNS answers come from the test and never leave the pod. `identity` (a SPIFFE id) gives the sidecar a
        certificate of its own under the mesh's root instead of the shared default one."""
        pod_name = pod_name or pod.name
        if iptables:
            pod.apply_iptables(SEED_IPTABLES_FLAGS)
        if xds == f"127.0.0.1:{XDS_IN_POD}":
            pod.forward_to_host(self.stack.xds_port, XDS_IN_POD)
        sds = SdsServer([pod.work_dir / SDS_SOCKET], ca=issue(self.ca, identity) if identity else self.ca)
        self._sds.append(sds)
        sds.start()
        boot = pod.work_dir / "envoy.json"
        access_log = pod.work_dir / "access.log"
        labels = [arg for k, v in pod.labels.items() for arg in ("--label", f"{k}={v}")]
        mizzen("bootstrap", "--pod", pod_name, "-n", pod.namespace, "--ip", pod.ip, "--xds", xds, *labels,
               "--access-log", str(access_log), *(["--delta"] if delta else []), *extra_bootstrap, "-o", str(boot))
        boot.chmod(0o644)
        argv = envoy_command(str(boot), concurrency=concurrency, log_level="info", flush_interval_ms=100, drain_seconds=2)
        setpriv = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "--"]
        if hosts is None:
            proc = pod.spawn("envoy", argv, uid=1337, cwd=pod.work_dir)
        else:
            hosts_file, resolv = pod.work_dir / "hosts", pod.work_dir / "resolv.conf"
            hosts_file.write_text("".join(f"{ip} {name}\n" for name, ip in hosts.items()))
            resolv.write_text("nameserver 127.0.0.1\n")
            script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
            # Envoy reopens its stdout by name for a `/dev/stdout` access log: as uid 1337 it must own the file
            log_file = pod.netns.log_dir / f"{pod.netns_name}.envoy.log"
            log_file.touch()
            os.chown(log_file, 1337, 1337)
            proc = pod.spawn("envoy", ["unshare", "--mount", "sh", "-c", script, "sh", str(hosts_file), str(resolv),
                                       *setpriv, *argv], cwd=pod.work_dir)
        admin = pod.forward_from_host(15000)
        car = Sidecar(pod, delta, proc, sds, admin, boot, access_log, pod_name)
        self.sidecars[pod.name] = car
        return car

    def token(self, namespace: str, service_account: str, ttl: str = "24h") -> str:
        """`mizzen token` against the stack's CA data dir."""
        return mizzen("token", "--data-dir", str(self.stack.ca_dir), "--namespace", namespace,
                      "--service-account", service_account, "--ttl", ttl).stdout.strip()

    def start_agent(self, pod: Pod, *, delta: bool = False, service_account: str | None = None,
                    agent_flags: list[str] = (), iptables: bool = True, pod_name: str | None = None) -> Sidecar:
        """`mizzen agent` in the pod (as root; Envoy as uid 1337 through `--proxy-uid`; it makes the key, gets the certificate from certauth with a
        `mizzen token`, serves SDS, runs Envoy): `mizzen iptables`, relays for xDS over TLS (15012) and the CA (8060),
        the token and the trust bundle (`mizzen ca root`) in the pod's work dir."""
        assert self.certauth, "E2E(certauth=True) runs the CA the agents need"
        pod_name = pod_name or pod.name
        sa = service_account or pod.service_account
        if iptables:
            pod.apply_iptables(SEED_IPTABLES_FLAGS)
        pod.forward_to_host(self.stack.xds_tls_port, XDS_TLS_IN_POD)
        pod.forward_to_host(self.stack.ca_port, CA_IN_POD)
        token_file = pod.work_dir / "token"
        token_file.write_text(self.token(pod.namespace, sa))
        roots = pod.work_dir / "root-cert.pem"
        roots.write_text(mizzen("ca", "root", "--data-dir", str(self.stack.ca_dir)).stdout)
        for f in (token_file, roots):
            f.chmod(0o600)
        access_log = pod.work_dir / "access.log"
        labels = [arg for k, v in pod.labels.items() for arg in ("--label", f"{k}={v}")]
        argv = [sys.executable, "-m", "mizzen", "agent", "--pod", pod_name, "-n", pod.namespace, "--ip", pod.ip,
                "--service-account", sa, "--token-file", str(token_file), "--ca-root-cert", str(roots),
                "--ca", f"127.0.0.1:{CA_IN_POD}", "--xds", f"127.0.0.1:{XDS_TLS_IN_POD}", *labels,
                "--access-log", str(access_log), "--work-dir", str(pod.work_dir), "--concurrency", "1",
                "--envoy-log-level", "info", "--drain-seconds", "2", *(["--delta"] if delta else []),
                "--proxy-uid", "1337", "--log-level", "debug", *agent_flags]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        proc = pod.spawn("agent", argv, cwd=pod.work_dir, env=env)
        admin = pod.forward_from_host(15000)
        agent_port = pod.forward_from_host(15020)
        car = Sidecar(pod, delta, proc, None, admin, pod.work_dir / "etc/istio/proxy/envoy-rev.json", access_log,
                      pod_name, pod.namespace, agent_port)
        self.sidecars[pod.name] = car
        return car

    def wait_ready(self, car: Sidecar, timeout: float = 60.0) -> None:
        """Envoy initialised (its first CDS and LDS applied, secrets included: SDS has no fetch timeout) and
        listening on 15001/15006."""
        car.pod.wait_envoy_ready(15000, car.proc, timeout)
        if car.sds is not None:
            car.sds.wait_acked("default", "ROOTCA", timeout=timeout)
        else:
            eventually(car.agent_ready, timeout, what=f"{car.pod_name}: the agent's /healthz/ready")
        eventually(lambda: {"virtualOutbound", "virtualInbound"} <= car.listeners(), timeout,
                   what=f"{car.pod_name}: virtualOutbound and virtualInbound listening")
        # The translator rebuilds a proxy once it connects (its node metadata names its access-log file), which
        # updates every listener once; wait for that update to land and the old filter chains to drain, so
        # traffic and access-log lookups never race it.
        path = str(car.access_log)
        eventually(lambda: path in json.dumps(car.section("ListenersConfigDump")) and car.settled(), timeout,
                   what=f"{car.pod_name}: listeners logging to {path}, nothing draining")


# --- traffic ----------------------------------------------------------------------------------------------


def call(pod: Pod, url: str, request_id: str | None = None, timeout: float = 5.0) -> dict:
    """One HTTP GET from inside the pod as root (so the pod's iptables send it through its sidecar).
    Returns echo.py's client result, or {"error": …} when the request failed."""
    headers = {"x-request-id": request_id} if request_id else {}
    try:
        return pod.call(http_call, url, headers, timeout, timeout=timeout + 10)
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def served_by(result: dict) -> str | None:
    """The echo app that answered (its --name), None for anything but a 200 from an echo app."""
    body = result.get("body")
    if result.get("status") == 200 and isinstance(body, dict):
        return body.get("name")
    return None


class RequestLoop:
    """A bounded request loop from inside a pod: GETs `url` every `gap` seconds until stop() (or max_requests,
    or max_seconds), counting a request as failed unless it got a 200 from one of `expect` (echo app names)."""

    def __init__(self, pod: Pod, url: str, expect: set[str], gap: float = 0.02, max_requests: int = 2000,
                 max_seconds: float = 60.0, timeout: float = 3.0):
        self.pod, self.url, self.expect = pod, url, expect
        self.gap, self.max_requests, self.max_seconds, self.timeout = gap, max_requests, max_seconds, timeout
        self.sent = 0
        self.failures: list[str] = []
        self.by_upstream: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"loop-{pod.name}")

    def _body(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and self.sent < self.max_requests and time.monotonic() < deadline:
            self.sent += 1
            try:
                res = http_call(self.url, {}, self.timeout)
            except OSError as e:
                res = {"error": f"{type(e).__name__}: {e}"}
            name = served_by(res)
            if name in self.expect:
                self.by_upstream[name] = self.by_upstream.get(name, 0) + 1
            else:
                self.failures.append(json.dumps({k: res.get(k) for k in ("status", "error", "body")})[:300])
            time.sleep(self.gap)

    def _run(self) -> None:
        try:
            self.pod.call(self._body, timeout=self.max_seconds + 30)
        except Exception as e:  # noqa: BLE001 - reported as a failure of the loop
            self.failures.append(f"loop crashed: {type(e).__name__}: {e}")

    def start(self) -> RequestLoop:
        self._thread.start()
        return self

    def stop(self) -> RequestLoop:
        self._stop.set()
        self._thread.join(self.max_seconds + 40)
        assert not self._thread.is_alive(), "request loop did not stop"
        return self

    @property
    def ok(self) -> int:
        return sum(self.by_upstream.values())

    def wait_sent(self, count: int, timeout: float = 30.0) -> int:
        """Block until the loop has sent `count` requests (it runs at its own pace); returns the count sent."""
        eventually(lambda: self.sent >= count or not self._thread.is_alive(), timeout, 0.02,
                   what=f"{count} requests from {self.pod.name}")
        assert self.sent >= count, f"loop ended after {self.sent} requests: {self.failures[:3]}"
        return self.sent
