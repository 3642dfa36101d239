"""`mizzen up --demo`: a demo mesh on a running stack, with real Envoys and traffic flowing through them.

Default (no root): everything on loopback. The two `hello` pods are echo apps on their own loopback
addresses (127.0.N.1 and 127.0.N.2, port 8080), and an ingress gateway Envoy in router mode (`mizzen bootstrap
--router`) serves the Gateway's server, bound to 127.0.0.1 on the gateway port (18080). The VirtualService
splits 80/20 between v1 and v2 with retries, so a loop of requests through the gateway shows both versions.
Nothing listens beyond 127.0.0.0/8.

With `--netns` (root): the pods run in network namespaces (mizzen.services.sidecar.netns) with `mizzen iptables`
and Envoy sidecars (uid 1337); a `sleep` pod calls `hello` through its sidecar, and the ingress gateway runs
in a pod of its own, reached from the host through a relay on 127.0.0.1:<gateway port>.

`Demo.stop()` stops every process it started and removes every namespace it made; the demo's config stays
in the registry (and so in the data dir) like any other config.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..demo import echo, mesh
from ..mesh import procs
from ..mesh.stack import Stack
from ..sidecar.bootstrap import node_id
from .http import apply_objects, delete_keys

ECHO = str(Path(echo.__file__).resolve())  # run by path: works wherever the package is installed
APP_UID = 1000  # the demo apps' uid inside pods: anything but Envoy's 1337, so their traffic is captured
XDS_IN_POD = 15010  # inside a pod, 127.0.0.1:15010 is relayed to the xDS gateway on the host
XDS_TLS_IN_POD = 15012  # … 127.0.0.1:15012 to its TLS port
CA_IN_POD = 8060  # … 127.0.0.1:8060 to certauth
REQUEST_EVERY = 0.25  # seconds between the traffic loop's requests
REPORT_EVERY = 5.0  # seconds between its lines


class DemoError(RuntimeError):
    pass


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def loopback_pods(first_subnet: int = 10) -> list[mesh.DemoPod]:
    """hello-v1/hello-v2/gateway on 127.0.N.1/.2/.10 for the first N (from 10) whose app port is free on
    both pod addresses, so a second demo (or a test) on the same machine does not collide."""
    for n in range(first_subnet, 250):
        a, b = f"127.0.{n}.1", f"127.0.{n}.2"
        if port_free(a, mesh.APP_PORT) and port_free(b, mesh.APP_PORT):
            return [mesh.DemoPod("hello-v1", a), mesh.DemoPod("hello-v2", b), mesh.DemoPod("gateway", f"127.0.{n}.10")]
    raise DemoError(f"no free loopback address pair for port {mesh.APP_PORT} in 127.0.10-249.x")


def wait_until(check: Callable[[], bool], what: str, timeout: float, abort: threading.Event,
               alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll check() until it holds; DemoError when `alive()` names a dead process or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if abort.is_set():
            raise DemoError(f"interrupted while waiting for {what}")
        dead = alive()
        if dead:
            raise DemoError(dead)
        if check():
            return
        time.sleep(0.2)
    raise DemoError(f"{what} did not happen within {timeout:.0f}s")


class Demo:
    def __init__(self, stack: Stack, netns: bool = False, gateway_port: int | None = None,
                 out: TextIO | None = None, abort: threading.Event | None = None):
        self.stack = stack
        self.netns = netns
        self.explicit_port = gateway_port is not None
        self.gateway_port = gateway_port or mesh.DEFAULT_GATEWAY_PORT
        self.out = out or sys.stdout
        self.abort = abort or threading.Event()
        self.work_dir = Path(stack.work_dir).parent / "demo"
        self.log_dir = self.work_dir / "logs"
        self.procs: dict[str, procs.Proc] = {}
        self.network = None  # PodNetwork with --netns
        self.pods: list[mesh.DemoPod] = []
        self.tallies: dict[str, echo.Tally] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._loop_proc: procs.Proc | None = None  # the sleep pod's traffic loop (--netns)
        self._relayed = 0  # bytes of its output printed so far
        self.access_logs: dict[str, str] = {}  # node id → the sidecar's JSON access-log file (for the logsink)
        self.admins: dict[str, str] = {}  # role → the Envoy admin address reachable from the host

    @property
    def gateway_url(self) -> str:
        return f"http://{mesh.GATEWAY_BIND}:{self.gateway_port}/"

    def say(self, line: str) -> None:
        print(f"demo: {line}", file=self.out, flush=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("demo-*.log"):  # the logs point at this run only
            old.unlink(missing_ok=True)
        try:
            self._choose_gateway_port()
            if self.netns:
                self._start_netns()
            else:
                self._start_loopback()
            self._start_traffic()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for t in self._threads:
            t.join(10)
        for label, tally in self.tallies.items():
            self.say(f"total {tally.summary(label)}")
        if self._loop_proc is not None:  # its last lines (and total) come when it stops
            with contextlib.suppress(Exception):
                self._loop_proc.stop(timeout=5)
                self._relay_once(self._loop_proc)
        for name, p in reversed(list(self.procs.items())):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
            self.procs.pop(name, None)
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.close()
            self.network = None

    # ------------------------------------------------------------------ config
    def _choose_gateway_port(self) -> None:
        if port_free(mesh.GATEWAY_BIND, self.gateway_port):
            return
        if self.explicit_port:
            raise DemoError(f"gateway port {mesh.GATEWAY_BIND}:{self.gateway_port} is in use (--gateway-port)")
        taken = self.gateway_port
        self.gateway_port = procs.free_port(mesh.GATEWAY_BIND)
        self.say(f"port {taken} is in use; the gateway listens on {self.gateway_port} instead")

    def _apply(self) -> None:
        objs = mesh.objects(self.pods, self.gateway_port, mtls=self.netns)
        result = apply_objects(self.stack.registry_url, objs, source="mizzen up --demo")
        actions: dict[str, int] = {}
        for r in result.get("results", []):
            actions[r.get("action", "?")] = actions.get(r.get("action", "?"), 0) + 1
        # Pods of the other variant (loopback vs --netns) from an earlier run would be proxies nobody runs.
        stale = sorted(mesh.all_pod_keys() - {mesh.key(o) for o in objs})
        deleted = delete_keys(self.stack.registry_url, stale).get("deleted", []) if stale else []
        summary = ", ".join(f"{n} {a}" for a, n in sorted(actions.items()))
        self.say(f"applied the demo mesh to namespace {mesh.NAMESPACE} ({summary}"
                 + (f"; removed {len(deleted)} stale pods" if deleted else "") + ")")

    def _agent_argv(self, pod: mesh.DemoPod, work_dir: Path, *, xds: str, ca: str, router: bool,
                    access_log: Path, extra: list[str] = ()) -> list[str]:
        """`mizzen agent` for one demo proxy: its token (certauth's key issues it for the pod's service account)
        and the CA's roots in its work dir; xDS over TLS when the stack serves it."""
        from ..certauth import tokens

        work_dir.mkdir(parents=True, exist_ok=True)
        token_file, roots = work_dir / "token", work_dir / "root-cert.pem"
        token_file.write_text(tokens.issue(self.stack.ca_dir, mesh.NAMESPACE, pod.service_account, 7 * 24 * 3600))
        roots.write_bytes(self.stack.trust_bundle_path.read_bytes())
        for f in (token_file, roots):
            f.chmod(0o600)
        labels = [a for k, v in pod.labels.items() for a in ("--label", f"{k}={v}")]
        return [sys.executable, "-m", "mizzen", "agent", "--pod", pod.name, "-n", mesh.NAMESPACE, "--ip", pod.ip,
                "--service-account", pod.service_account, "--token-file", str(token_file), "--ca-root-cert",
                str(roots), "--ca", ca, "--xds", xds, *([] if self.stack.xds_tls_port else ["--xds-plaintext"]),
                *labels, *(["--router"] if router else []), "--access-log", str(access_log), "--zipkin", "",
                "--work-dir", str(work_dir), *extra]

    def _spawn(self, name: str, argv: list[str], cwd: Path | None = None) -> procs.Proc:
        p = procs.spawn(f"demo-{name}", argv, self.log_dir, cwd=cwd)
        self.procs[name] = p
        return p

    def _dead(self) -> str | None:
        for name, p in self.procs.items():
            if not p.alive():
                return f"{name} exited ({p.popen.returncode}); log {p.log_path}:\n{p.log_text()[-2000:]}"
        return None

    # ------------------------------------------------------------------ loopback
    def _start_loopback(self) -> None:
        self.pods = loopback_pods()
        self._apply()
        for pod in self.pods:
            if pod.version:
                self._spawn(pod.role, [sys.executable, ECHO, "serve", "--http", str(mesh.APP_PORT), "--bind", pod.ip,
                                       "--name", mesh.SERVICE, "--version", pod.version, "--pod", pod.name])
        for pod in self.pods:
            if pod.version:
                procs.wait_port(pod.ip, mesh.APP_PORT, proc=self.procs[pod.role].popen)
        gw = next(p for p in self.pods if p.role == "gateway")
        admin, agent, health, prom = (procs.free_port() for _ in range(4))
        access_log = self.work_dir / "gateway-access.log"
        self.access_logs[node_id(gw.name, mesh.NAMESPACE, gw.ip, router=True)] = str(access_log)
        # the gateway through `mizzen agent`: its certificate from certauth over SDS, xDS over TLS
        xds = self.stack.xds_tls_address if self.stack.xds_tls_port else self.stack.xds_address
        argv = self._agent_argv(gw, self.work_dir / "gateway", xds=xds, ca=self.stack.ca_address, router=True,
                                access_log=access_log,
                                extra=["--admin-port", str(admin), "--agent-port", str(agent), "--health-port",
                                       str(health), "--prometheus-port", str(prom), "--listen-address", "127.0.0.1",
                                       "-o", str(self.work_dir / "gateway-envoy.json")])
        envoy = self._spawn("gateway-agent", argv, cwd=self.work_dir)
        self.admins["gateway"] = f"127.0.0.1:{admin}"
        self._wait_gateway()
        self.say(f"service {mesh.SERVICE}.{mesh.NAMESPACE}: "
                 + ", ".join(f"{p.role} {p.ip}:{mesh.APP_PORT}" for p in self.pods if p.version)
                 + f"; VirtualService {mesh.SERVICE}-ingress splits v1/v2 "
                 + "/".join(str(w) for w in mesh.SPLIT.values()) + " with retries")
        self.say(f"ingress gateway: Envoy (router mode, run by `mizzen agent`) on {self.gateway_url}, admin "
                 f"http://127.0.0.1:{admin}/, log {envoy.log_path}, JSON access log {access_log}")
        self._say_pids()
        self._say_try()

    def _wait_gateway(self, timeout: float = 60.0) -> None:
        def answers() -> bool:
            try:
                return echo.http_call(self.gateway_url, timeout=2)["status"] == 200
            except OSError:
                return False

        wait_until(answers, f"a 200 from the ingress gateway at {self.gateway_url}", timeout, self.abort, self._dead)

    def _say_pids(self) -> None:
        self.say("pids " + " ".join(f"{name}={p.pid}" for name, p in self.procs.items()))

    def _say_try(self) -> None:
        self.say(f"try:  curl -s {self.gateway_url}")
        self.say(f"      MIZZEN_SERVER={self.stack.registry_url} mizzen get virtualservices -n {mesh.NAMESPACE}")
        self.say(f"      MIZZEN_SERVER={self.stack.registry_url} mizzen proxy-status")

    # ------------------------------------------------------------------ traffic
    def _start_traffic(self) -> None:
        label = f"ingress → {mesh.SERVICE}"
        tally = self.tallies[label] = echo.Tally()
        t = threading.Thread(target=self._traffic_loop, args=(label, tally), name="demo-traffic", daemon=True)
        t.start()
        self._threads.append(t)

    def _traffic_loop(self, label: str, tally: echo.Tally) -> None:
        next_report = time.monotonic() + REPORT_EVERY
        while not self._stop.is_set():
            tally.record(self.gateway_url, timeout=5)
            if time.monotonic() >= next_report:
                self.say(tally.flush(label))
                next_report = time.monotonic() + REPORT_EVERY
            self._stop.wait(REQUEST_EVERY)

    # ------------------------------------------------------------------ network namespaces
    def _start_netns(self) -> None:
        from ..sidecar.netns import SEED_IPTABLES_FLAGS, PodNetwork, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise DemoError(f"--netns: {reason}")
        for old in self.work_dir.glob("pods-*"):  # an earlier run's pod logs
            shutil.rmtree(old, ignore_errors=True)
        net = self.network = PodNetwork(keep_dir=self.work_dir)
        roles = ("hello-v1", "hello-v2", "sleep", "gateway")
        pods = {}
        for role in roles:
            spec = mesh.DemoPod(role, "")
            ports = [mesh.APP_PORT] if spec.version else []
            pods[role] = net.add_pod(spec.name, namespace=mesh.NAMESPACE, labels=mesh.DemoPod(role, "", True).labels,
                                     container_ports=ports, service_account=spec.service_account)
        self.pods = [mesh.DemoPod(role, pods[role].ip, sidecar=True) for role in roles]
        self._apply()
        for spec in self.pods:
            pod = pods[spec.role]
            if spec.version:
                self.procs[spec.role] = pod.start_app(
                    [sys.executable, ECHO, "serve", "--http", str(mesh.APP_PORT), "--name", mesh.SERVICE,
                     "--version", spec.version, "--pod", spec.name], uid=APP_UID, wait_ports=[mesh.APP_PORT])
            if spec.role != "gateway":  # gateways are not intercepted
                pod.apply_iptables(SEED_IPTABLES_FLAGS)
            # `mizzen agent` in the pod (root; Envoy as uid 1337): key, certificate from certauth, SDS, Envoy;
            # relays: xDS (over TLS when the stack serves it) and the CA, inside the pod on 127.0.0.1
            tls = bool(self.stack.xds_tls_port)
            pod.forward_to_host(self.stack.xds_tls_port if tls else self.stack.xds_port,
                                XDS_TLS_IN_POD if tls else XDS_IN_POD)
            pod.forward_to_host(self.stack.ca_port, CA_IN_POD)
            access_log = pod.work_dir / "access.log"
            argv = self._agent_argv(spec, pod.work_dir, xds=f"127.0.0.1:{XDS_TLS_IN_POD if tls else XDS_IN_POD}",
                                    ca=f"127.0.0.1:{CA_IN_POD}", router=spec.role == "gateway",
                                    access_log=access_log, extra=["--proxy-uid", "1337"])
            self.access_logs[node_id(spec.name, mesh.NAMESPACE, pod.ip, router=spec.role == "gateway")] = \
                str(access_log)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.procs[f"{spec.role}-agent"] = pod.spawn("agent", argv, cwd=pod.work_dir, env=env)
        for spec in self.pods:
            pods[spec.role].wait_envoy_ready(15000, self.procs[f"{spec.role}-agent"], timeout=90)
        for role in ("sleep", "hello-v1"):  # `mizzen proxy-config … --admin` from the host
            self.admins[role] = f"127.0.0.1:{pods[role].forward_from_host(15000)}"
        gw = pods["gateway"]
        gw.forward_from_host(self.gateway_port, self.gateway_port, pod_host=mesh.GATEWAY_BIND)
        self._wait_gateway()
        sleep = pods["sleep"]
        target = f"http://{mesh.CLUSTER_IP}:{mesh.SERVICE_PORT}/"

        def sleep_reaches_hello() -> bool:
            res = sleep.run([sys.executable, ECHO, "http", target, "--timeout", "3"], uid=APP_UID, check=False,
                            timeout=10)
            with contextlib.suppress(ValueError):
                return json.loads(res.stdout).get("status") == 200
            return False

        wait_until(sleep_reaches_hello, f"sleep → {target} through the sidecars", 60, self.abort, self._dead)
        label = f"sleep → {mesh.SERVICE}"
        loop = sleep.start_app([sys.executable, ECHO, "loop", target, "--every", str(REQUEST_EVERY),
                                "--summary", str(REPORT_EVERY), "--label", label], name="loop", uid=APP_UID)
        self.procs["sleep-loop"] = loop
        self._loop_proc = loop
        t = threading.Thread(target=self._relay_lines, args=(loop,), name="demo-sleep-loop", daemon=True)
        t.start()
        self._threads.append(t)
        self.say(f"pods in network namespaces ({net.subnet}), sidecars with `mizzen iptables` (the seed's flags): "
                 + ", ".join(f"{p.name} {p.ip}" for p in self.pods))
        self.say(f"service {mesh.SERVICE}.{mesh.NAMESPACE} at ClusterIP {mesh.CLUSTER_IP}:{mesh.SERVICE_PORT}; "
                 f"the sleep pod calls it every {REQUEST_EVERY}s through its sidecar")
        self.say("mTLS between every proxy (PeerAuthentication STRICT): certificates from certauth through each "
                 "pod's `mizzen agent`; sidecar admins " + ", ".join(f"{r} {a}" for r, a in self.admins.items())
                 + f" (try: mizzen proxy-config secret --admin {self.admins['sleep']})")
        self.say("access logs: " + ", ".join(f"{s.role} {pods[s.role].work_dir / 'access.log'}" for s in self.pods))
        self.say(f"ingress gateway pod {gw.ip}, reached at {self.gateway_url} (a relay into the pod); "
                 f"pod logs under {net.work_dir} (kept in {self.work_dir}/pods-{net.tag} on exit)")
        self.say("pids " + " ".join(f"{name}={p.pid}" for name, p in self.procs.items()))
        self._say_try()

    def _relay_lines(self, proc: procs.Proc) -> None:
        """Print the sleep pod's loop lines (its tallies) as they arrive in its log file."""
        while not self._stop.wait(0.5):
            self._relay_once(proc)

    def _relay_once(self, proc: procs.Proc) -> None:
        path = proc.log_path
        if path is None or not path.exists():
            return
        with path.open("rb") as f:
            f.seek(self._relayed)
            data = f.read()
        complete = data.rpartition(b"\n")[0]
        if not complete:
            return
        self._relayed += len(complete) + 1
        for line in complete.decode(errors="replace").splitlines():
            if line.strip():
                self.say(line)
