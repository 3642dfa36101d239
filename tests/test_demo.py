"""`mizzen up --demo`: the whole stack plus the demo mesh as a user runs it (`python -m mizzen up --demo`, a real
subprocess), traffic through the real ingress gateway Envoy to both hello versions, nothing left running
afterwards, only loopback listeners, and the config kept in --data-dir for the next `mizzen up`.
The --netns variant (root) does the same with pods in network namespaces and sidecars.

Every process `mizzen up` starts inherits a marker environment variable, so a test can find (and, if it
fails, kill by pid) whatever is left, wherever it was started from."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from mizzen.services.demo import echo, mesh
from mizzen.services.mesh import procs
from mizzen.services.mesh.validation import check_documents
from mizzen.services.mesh.yamlio import Document

ROOT = Path(__file__).resolve().parent.parent
MARK = "MIZZEN_TEST_DEMO_MARK"  # read by no service: only inherited, to find the run's processes
READY = "mizzen: ready"


# ---------------------------------------------------------------------------------------------------------
# helpers


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries MARK=mark (every process a `mizzen up` run started)."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that these processes hold (host namespace)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                    if m:
                        inodes.add(m.group(1))
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw[:width])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
            found.add((str(ip), int(hexport, 16)))
    return found


class UpRun:
    """`python -m mizzen up …` as a subprocess; its output lines are collected as they come."""

    def __init__(self, data_dir: Path, *args: str, mark: str):
        self.mark = mark
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self.registry_port = procs.free_port()
        argv = [sys.executable, "-m", "mizzen", "up", "--data-dir", str(data_dir),
                "--registry-port", str(self.registry_port), "--xds-port", str(procs.free_port()),
                "--xds-tls-port", str(procs.free_port()), "--ca-port", str(procs.free_port()), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{MARK: mark})
        env.pop("MIZZEN_SERVER", None)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r} within {timeout}s; output:\n" + "\n".join(self.lines))

    def wait_exit(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)

    def reported_pids(self) -> dict[str, int]:
        out = {}
        for line in self.lines:
            if line.startswith("demo: pids "):
                out.update({k: int(v) for k, v in (kv.split("=") for kv in line.split()[2:])})
        return out

    def kill_everything(self) -> None:
        """Cleanup after a failure: the run itself, then whatever it left (by pid)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in marked_pids(self.mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def call_gateway(url: str, want: int = 40, limit: int = 200) -> list[dict]:
    """Requests through the gateway until both versions answered and at least `want` were sent."""
    answers: list[dict] = []
    versions: Counter = Counter()
    while len(answers) < limit and (len(answers) < want or len(versions) < 2):
        r = echo.http_call(url, {"x-request-id": f"test-{len(answers)}"}, timeout=10)
        answers.append(r)
        if r["status"] == 200:
            versions[r["body"]["version"]] += 1
    return answers


def tally_lines(output: str, label: str) -> list[dict[str, int]]:
    """The run's periodic lines `demo: <label>: 200 x20 (v1 16, v2 4)` as {"200": 20, "v1": 16, "v2": 4}."""
    out = []
    for m in re.finditer(rf"^demo: {re.escape(label)}: (.*?)(?: \((.*)\))?$", output, re.M):
        counts = {s: int(n) for s, n in re.findall(r"(\w+) x(\d+)", m.group(1))}
        counts.update({v: int(n) for v, n in re.findall(r"(v\d) (\d+)", m.group(2) or "")})
        out.append(counts)
    return out


def assert_versions_split(answers: list[dict]) -> None:
    assert all(a["status"] == 200 for a in answers), [a["status"] for a in answers]
    versions = Counter(a["body"]["version"] for a in answers)
    assert set(versions) == {"v1", "v2"}
    assert versions["v1"] > versions["v2"]  # 80/20: v2 ≥ v1 in ≥ 40 draws has odds below 1e-5
    pods = {a["body"]["version"]: a["body"]["pod"] for a in answers}
    assert pods == {"v1": mesh.POD_NAMES["hello-v1"], "v2": mesh.POD_NAMES["hello-v2"]}


# ---------------------------------------------------------------------------------------------------------
# the demo app (services/demo/echo.py) and the Demo's own checks


def test_echo_app_by_path_reports_version_and_pod_and_loop_tallies_them(tmp_path):
    a_port, b_port = procs.free_port(), procs.free_port()
    app = [sys.executable, str(ROOT / "services" / "demo" / "echo.py"), "serve", "--bind", "127.0.0.1"]
    a = procs.spawn("echo-a", [*app, "--http", str(a_port), "--name", "hello", "--version", "v9", "--pod", "p-1",
                               "--next", f"http://127.0.0.1:{procs.free_port()}/"], tmp_path)
    b = procs.spawn("echo-b", [*app, "--http", str(b_port), "--name", "other", "--version", "v2"], tmp_path)
    try:
        procs.wait_port("127.0.0.1", a_port, proc=a.popen)
        procs.wait_port("127.0.0.1", b_port, proc=b.popen)
        # A's default next hop is unreachable: the answer says so, with 502.
        r = echo.http_call(f"http://127.0.0.1:{a_port}/a?x=1")
        assert r["status"] == 502 and "error" in r["body"]["next"]
        body = r["body"]
        assert (body["name"], body["version"], body["pod"], body["path"], body["query"]) == (
            "hello", "v9", "p-1", "/a", {"x": "1"})
        # A next hop named by the request wins over the default one, and gets the request id.
        r = echo.http_call(f"http://127.0.0.1:{a_port}/", {"x-echo-next": f"http://127.0.0.1:{b_port}/b",
                                                            "x-request-id": "rid-1"})
        assert r["status"] == 200
        assert (r["body"]["next"]["body"]["name"], r["body"]["next"]["body"]["path"]) == ("other", "/b")
        assert r["body"]["next"]["body"]["request_id"] == "rid-1"
        res = subprocess.run([sys.executable, "-m", "mizzen.services.demo.echo", "loop", f"http://127.0.0.1:{a_port}/",
                              "--header", f"x-echo-next: http://127.0.0.1:{b_port}/", "--count", "5", "--every", "0",
                              "--summary", "60", "--label", "hello"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["hello: 200 x5 (v9 5)", "total hello: 200 x5 (v9 5)"]
    finally:
        a.stop()
        b.stop()


def test_demo_refuses_a_gateway_port_in_use(tmp_path):
    import socket

    from mizzen.services.cli.demo import Demo, DemoError
    from mizzen.services.mesh.stack import Stack

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        demo = Demo(Stack(tmp_path / "stack"), gateway_port=s.getsockname()[1])
        with pytest.raises(DemoError, match="in use"):
            demo.start()
    assert not demo.procs


# ---------------------------------------------------------------------------------------------------------
# the translator honours Gateway `bind` (what keeps the demo's gateway on loopback)


def test_gateway_server_bind_gets_its_own_listener_on_that_address():
    from google.protobuf import json_format

    from mizzen.services.mesh.xds_types import LISTENER, ROUTE
    from mizzen.services.translator.proxy import Proxy
    from mizzen.services.translator.push_context import PushContext
    from mizzen.services.translator.snapshot import build_snapshot

    pods = [mesh.DemoPod("hello-v1", "10.1.0.1"), mesh.DemoPod("hello-v2", "10.1.0.2"),
            mesh.DemoPod("gateway", "10.1.0.10")]
    objs = mesh.objects(pods, gateway_port=18080)
    wildcard = {"port": {"number": 18080, "name": "http-any", "protocol": "HTTP"}, "hosts": ["*"]}
    next(o for o in objs if o["kind"] == "Gateway")["spec"]["servers"].append(wildcard)
    valid, errors = check_documents([Document("demo", i, o) for i, o in enumerate(objs)])
    assert not errors
    push = PushContext.from_resources(valid)
    gw = pods[2]
    proxy = Proxy.from_node_id(f"router~{gw.ip}~{gw.name}.demo~demo.svc.cluster.local", push)
    snap = build_snapshot(push, proxy).merged()
    listeners = snap[LISTENER]
    # Istio ≥ 1.10: servers merge per (port, bind); a bound server's listener is <bind>_<port> on that address.
    assert set(listeners) == {"127.0.0.1_18080", "0.0.0.0_18080"}
    bound = json_format.MessageToDict(listeners["127.0.0.1_18080"])
    assert bound["address"]["socketAddress"] == {"address": "127.0.0.1", "portValue": 18080}
    rds = {fc["filters"][0]["typedConfig"]["rds"]["routeConfigName"] for fc in bound["filterChains"]}
    assert rds == {"http.18080.127.0.0.1"}
    assert set(snap[ROUTE]) == {"http.18080.127.0.0.1", "http.18080"}
    clusters = {c["name"] for vh in json_format.MessageToDict(snap[ROUTE]["http.18080.127.0.0.1"])["virtualHosts"]
                for r in vh["routes"] for c in r["route"]["weightedClusters"]["clusters"]}
    assert clusters == {"outbound|80|v1|hello.demo.svc.cluster.local", "outbound|80|v2|hello.demo.svc.cluster.local"}


# ---------------------------------------------------------------------------------------------------------
# mizzen up --demo on loopback


@pytest.fixture(scope="module")
def loopback_run(tmp_path_factory):
    """One `mizzen up --demo --for 20` run: what it printed, what the test saw through its gateway while it
    ran, and what it left behind."""
    data_dir = tmp_path_factory.mktemp("demo-data")
    gateway_port = procs.free_port()
    otlp = SyncOTLPReceiver()
    run = UpRun(data_dir, "--demo", "--for", "20", "--gateway-port", str(gateway_port),
                "--otlp-endpoint", otlp.endpoint, mark=uuid.uuid4().hex)
    try:
        run.wait_for(READY, 90)
        seen = {
            "answers": call_gateway(f"http://127.0.0.1:{gateway_port}/"),
            "listeners": listening_addresses(marked_pids(run.mark)),
            "pids": run.reported_pids(),
        }
        seen["rc"] = run.wait_exit(60)
        seen["left"] = [p for p in marked_pids(run.mark) if pid_alive(p)]
        seen["output"] = run.output()
        m = re.search(r"^demo: service hello\.demo: hello-v1 (\S+), hello-v2 (\S+);", seen["output"], re.M)
        assert m, seen["output"]
        seen["pod_addresses"] = {"v1": m.group(1), "v2": m.group(2)}
        seen["spans"] = otlp.spans()
        yield data_dir, gateway_port, seen
    finally:
        run.kill_everything()
        otlp.stop()


class SyncOTLPReceiver:
    """A real OTLP/gRPC TraceService on a free loopback port, collecting (service.name, span) pairs."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

        self._got: list[tuple[str, object]] = []
        outer = self

        class Service(ts_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                for rs in request.resource_spans:
                    name = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                    outer._got.extend((name, s) for ss in rs.scope_spans for s in ss.spans)
                return ts_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ts_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def spans(self) -> list[tuple[str, object]]:
        return list(self._got)

    def stop(self) -> None:
        self.server.stop(None).wait(5)


def test_demo_gateway_access_logs_become_traces(loopback_run):
    """`mizzen up` runs the logsink on the demo sidecars' JSON access logs; traces reach the OTLP endpoint."""
    _, _, seen = loopback_run
    names = {name for name, _span in seen["spans"]}
    assert any(n.startswith("hello-gateway") or "gateway" in n for n in names), names
    methods = {a.value.string_value for _n, s in seen["spans"] for a in s.attributes if a.key == "http.request.method"}
    codes = {a.value.int_value for _n, s in seen["spans"] for a in s.attributes
             if a.key == "http.response.status_code"}
    assert methods == {"GET"} and 200 in codes, (methods, codes)


def test_demo_traffic_reaches_both_versions_through_the_gateway(loopback_run):
    _, port, seen = loopback_run
    answers = seen["answers"]
    assert_versions_split(answers)
    for a in answers:
        # It went through Envoy: the router's headers on the way back, Envoy's request id and x-forwarded-for
        # on the way in, and the app saw a connection from Envoy, not from this test.
        assert "x-envoy-upstream-service-time" in a["headers"]
        # An edge proxy (use_remote_address) replaces an outside caller's x-request-id with its own UUID.
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                            a["body"]["headers"]["x-request-id"])
        assert a["body"]["headers"]["x-forwarded-proto"] == "http"
        assert a["body"]["peer"] != a["local"]
        # Each version answered from the address the demo gave its pod (EDS endpoints of the subsets).
        assert a["body"]["local"] == seen["pod_addresses"][a["body"]["version"]]


def test_demo_prints_its_traffic_and_the_curl_command(loopback_run):
    _, port, seen = loopback_run
    out = seen["output"]
    assert seen["rc"] == 0, out
    assert f"curl -s http://127.0.0.1:{port}/" in out
    assert "applied the demo mesh to namespace demo" in out
    lines = tally_lines(out, "ingress → hello")
    assert len(lines) >= 2, out  # every 5 s over a 20 s run
    assert sum(c.get("200", 0) for c in lines) >= 20
    assert all(set(c) <= {"200", "v1", "v2"} for c in lines), lines  # nothing but 200s
    assert sum(c.get("v1", 0) for c in lines) > 0 and sum(c.get("v2", 0) for c in lines) > 0
    total = tally_lines(out, "total ingress → hello")
    assert len(total) == 1 and total[0]["200"] >= sum(c["200"] for c in lines)


def test_demo_listens_only_on_loopback(loopback_run):
    _, port, seen = loopback_run
    listeners = seen["listeners"]
    assert ("127.0.0.1", port) in listeners  # the gateway (Gateway server bind 127.0.0.1)
    for address in seen["pod_addresses"].values():
        host, _, app_port = address.rpartition(":")
        assert (host, int(app_port)) in listeners  # each hello pod on its own loopback address
    outside = {(a, p) for a, p in listeners if not ipaddress.ip_address(a).is_loopback}
    assert not outside, f"listening beyond loopback: {sorted(outside)}"


def test_demo_leaves_no_process_behind(loopback_run):
    _, _, seen = loopback_run
    assert set(seen["pids"]) == {"hello-v1", "hello-v2", "gateway-agent"}
    assert not [p for p in seen["pids"].values() if pid_alive(p)]
    assert seen["left"] == [], f"still running after `mizzen up` ended: {seen['left']}"


def test_second_up_comes_back_with_the_demo_config(loopback_run):
    data_dir, _, first = loopback_run
    run = UpRun(data_dir, mark=uuid.uuid4().hex)  # no --demo: nothing is applied
    try:
        run.wait_for(READY, 90)
        res = subprocess.run([sys.executable, "-m", "mizzen", "get", "vs", "-n", "demo", "--server",
                              run.registry_url], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        names = {line.split()[0] for line in res.stdout.splitlines()[1:] if line.strip()}
        assert names == {"hello", "hello-ingress"}, res.stdout
        res = subprocess.run([sys.executable, "-m", "mizzen", "get", "gateway", mesh.GATEWAY_NAME, "-n", "demo",
                              "-o", "json", "--server", run.registry_url], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert '"bind": "127.0.0.1"' in res.stdout
        run.proc.send_signal(signal.SIGTERM)  # as Ctrl-C would
        assert run.wait_exit(60) == 0
        assert "demo:" not in run.output()
        assert [p for p in marked_pids(run.mark) if pid_alive(p)] == []
    finally:
        run.kill_everything()


# ---------------------------------------------------------------------------------------------------------
# mizzen up --demo --netns


def netns_names() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


@pytest.mark.root
@pytest.mark.slow
def test_netns_demo_sleep_calls_hello_through_sidecars(tmp_path):
    from mizzen.services.sidecar.netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    gateway_port = procs.free_port()
    run = UpRun(tmp_path / "data", "--demo", "--netns", "--for", "20", "--gateway-port", str(gateway_port),
                mark=uuid.uuid4().hex)
    try:
        run.wait_for(READY, 180)
        assert [n for n in netns_names() if n.startswith(f"mz-{run.proc.pid}-")], "no pod namespaces"
        answers = call_gateway(f"http://127.0.0.1:{gateway_port}/")
        assert_versions_split(answers)
        # the traffic is mTLS: the sleep sidecar holds a certificate from certauth (`proxy-config secret` on its
        # live admin), and hello's access log names its callers' SPIFFE identities
        out = run.output()
        admin = re.search(r"sidecar admins sleep (\S+),", out).group(1)
        table = subprocess.run([sys.executable, "-m", "mizzen", "proxy-config", "secret", "--admin", admin],
                               capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
        rows = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:] if ln.strip()}
        assert rows["default"][1:5] == ["Cert", "Chain", "ACTIVE", "true"], table
        assert rows["ROOTCA"][1:4] == ["CA", "ACTIVE", "true"], table
        logs = dict(re.findall(r"(hello-v[12]) (\S+access\.log)", re.search(r"^demo: access logs: (.*)$", out,
                                                                             re.M).group(1)))

        def peers() -> set[str]:
            found = set()
            for path in logs.values():
                for line in Path(path).read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        found.add(json.loads(line).get("downstream_peer_uri_san"))
            return found

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not {"spiffe://cluster.local/ns/demo/sa/sleep",
                                                    "spiffe://cluster.local/ns/demo/sa/demo-ingressgateway"} <= peers():
            time.sleep(0.5)
        assert {"spiffe://cluster.local/ns/demo/sa/sleep",
                "spiffe://cluster.local/ns/demo/sa/demo-ingressgateway"} <= peers(), peers()
        # In a pod, the app sees its own sidecar's inbound side (127.0.0.1 after 15006), not the gateway.
        assert all(a["body"]["local"] == f"127.0.0.1:{mesh.APP_PORT}" for a in answers)
        rc = run.wait_exit(60)
        out = run.output()
        assert rc == 0, out
        lines = tally_lines(out, "sleep → hello")
        assert lines and sum(c.get("200", 0) for c in lines) > 0, out
        assert all(set(c) <= {"200", "v1", "v2"} for c in lines), lines
        assert {"v1", "v2"} <= {k for c in lines for k in c}, out
        total = tally_lines(out, "total sleep → hello")  # the loop's last words, printed as it stopped
        assert len(total) == 1 and total[0]["200"] >= sum(c["200"] for c in lines), out
        assert set(run.reported_pids()) >= {"hello-v1", "hello-v2", "gateway-agent", "sleep-agent", "sleep-loop"}
        assert not [p for p in run.reported_pids().values() if pid_alive(p)]
        assert [p for p in marked_pids(run.mark) if pid_alive(p)] == []
        assert not [n for n in netns_names() if n.startswith(f"mz-{run.proc.pid}-")]
    finally:
        run.kill_everything()
