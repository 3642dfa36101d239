"""Proxyless gRPC: a real grpcio client with its built-in xDS resolver (`xds:///…`, GRPC_XDS_BOOTSTRAP written by
`mizzen bootstrap --grpc`) resolves and balances through a real control plane (NATS, Redis, registry, translator,
xds_gateway as processes) to two real grpcio servers; a VirtualService weight change moves its calls."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from mizzen.services.cli import watch as watch_cli
from mizzen.services.mesh import procs
from mizzen.services.mesh.stack import Stack
from mizzen.services.mesh.xds_types import CLUSTER, LISTENER, ROUTE
from tests.apps.grpc_who import server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOST = "greeter.default.svc.cluster.local"


def mesh(port: int) -> str:
    pods = ""
    for version, ip in (("v1", "127.0.0.2"), ("v2", "127.0.0.3")):
        pods += f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: greeter-{version}, namespace: default, labels: {{app: greeter, version: {version}}}}}
spec: {{serviceAccountName: default, containers: [{{name: greeter, image: greeter}}]}}
status: {{podIP: {ip}}}
"""
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: greeter, namespace: default}}
spec:
  clusterIP: 10.96.7.7
  selector: {{app: greeter}}
  ports: [{{name: grpc, port: {port}, targetPort: {port}, protocol: TCP}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: greeter, namespace: default}}
subsets:
- addresses:
  - {{ip: 127.0.0.2, targetRef: {{kind: Pod, name: greeter-v1, namespace: default}}}}
  - {{ip: 127.0.0.3, targetRef: {{kind: Pod, name: greeter-v2, namespace: default}}}}
  ports: [{{name: grpc, port: {port}, protocol: TCP}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: greeter, namespace: default}}
spec:
  host: greeter
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
{pods}"""


def weights(v1: int, v2: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: greeter, namespace: default}}
spec:
  hosts: [greeter]
  http:
  - route:
    - {{destination: {{host: greeter, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: greeter, subset: v2}}, weight: {v2}}}
"""


def apply(stack: Stack, tmp_path: Path, text: str) -> None:
    f = tmp_path / f"doc-{time.monotonic_ns()}.yaml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "mizzen", "apply", "-f", str(f), "--server", stack.registry_url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


class Client:
    """The proxyless client process; its answers (one per call) arrive on a queue."""

    def __init__(self, bootstrap: Path, target: str, log: Path):
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap), PYTHONPATH=str(REPO),
                   GRPC_VERBOSITY="ERROR")
        self.err = log.open("w")
        self.p = subprocess.Popen([sys.executable, "-m", "tests.apps.grpc_who", "call", target], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.q.put(line.strip())

    def wait_for(self, name: str, run: int = 30, timeout: float = 90.0) -> list[str]:
        """Answers until `run` calls in a row answered `name`."""
        seen: list[str] = []
        streak = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ans = self.q.get(timeout=1)
            except queue.Empty:
                assert self.p.poll() is None, "client exited"
                continue
            seen.append(ans)
            streak = streak + 1 if ans == name else 0
            if streak >= run:
                return seen
        raise TimeoutError(f"no run of {run} x {name}; last answers: {Counter(seen[-200:])}")

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()
        self.err.close()


def test_grpc_client_follows_a_weight_change(tmp_path):
    port = procs.free_port()
    servers = [server("v1", f"127.0.0.2:{port}"), server("v2", f"127.0.0.3:{port}")]
    stack = Stack(tmp_path)
    client = None
    try:
        stack.start(services=("registry", "translator", "xds-gateway"))
        apply(stack, tmp_path, mesh(port))
        apply(stack, tmp_path, weights(100, 0))

        boot = tmp_path / "grpc-bootstrap.json"
        r = subprocess.run([sys.executable, "-m", "mizzen", "bootstrap", "--grpc", "--pod", "grpc-client",
                            "--namespace", "default", "--ip", "127.0.0.9", "--xds", stack.xds_address,
                            "-o", str(boot)], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0, r.stderr
        doc = json.loads(boot.read_text())
        assert doc["xds_servers"][0]["server_uri"] == stack.xds_address
        assert doc["node"]["metadata"]["GENERATOR"] == "grpc"
        node = doc["node"]["id"]
        assert node == "sidecar~127.0.0.9~grpc-client.default~default.svc.cluster.local"

        client = Client(boot, f"xds:///{HOST}:{port}", tmp_path / "client.log")
        before = client.wait_for("v1")
        assert "v2" not in before

        # what the client was given is the proxyless shape (seen through the snapshot API)
        snap = watch_cli.get(stack.xds_address, node)
        names = {t: {r.name for r in snap.resources if r.type_url == t} for t in (CLUSTER, LISTENER, ROUTE)}
        assert f"{HOST}:{port}" in names[LISTENER] and f"greeter:{port}" in names[LISTENER]
        assert {f"outbound|{port}|v1|{HOST}", f"outbound|{port}|v2|{HOST}"} <= names[CLUSTER]
        assert f"outbound|{port}||{HOST}" in names[ROUTE]
        assert "virtualOutbound" not in names[LISTENER] and "BlackHoleCluster" not in names[CLUSTER]

        apply(stack, tmp_path, weights(0, 100))
        after = client.wait_for("v2")
        assert "v1" in after[:5] or after[0] == "v2"  # calls kept flowing: it moved, it did not restart
        apply(stack, tmp_path, weights(50, 50))
        mixed = Counter(client.wait_for("v1", run=1, timeout=60) + [client.q.get(timeout=30) for _ in range(60)])
        assert mixed["v1"] > 5 and mixed["v2"] > 5, mixed
    finally:
        if client is not None:
            client.stop()
        stack.stop()
        for s in servers:
            s.stop(0)
