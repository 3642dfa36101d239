"""Traffic capture for real, without the control plane: pods in network namespaces, `mizzen iptables` with
the seed's flags, and a real Envoy (uid 1337) from a small static bootstrap written here.

Pods: A (sidecar), B (sidecar; echo app on HTTP 8080, TCP 9000 and TCP 15020, a port in -d), C (no sidecar,
the same app). The Envoy mimics Istio's shape: virtualOutbound on 15001 (use_original_dst, TCP passthrough
to an ORIGINAL_DST cluster) with a bind_to_port=false HTTP listener 0.0.0.0_8080 it hands HTTP off to;
virtualInbound on 15006 (original_dst listener filter) passing through to the original destination from
127.0.0.6. Both write JSON access logs to a file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mizzen.services.sidecar.netns import REPO_ROOT, SEED_IPTABLES_FLAGS, PodNetwork, unavailable_reason
from tests.conftest import is_root

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not is_root(), reason="needs root: network namespaces, iptables, processes as uid 1337"),
    pytest.mark.skipif(is_root() and unavailable_reason() is not None, reason=str(unavailable_reason())),
]

ECHO = str(REPO_ROOT / "services" / "demo" / "echo.py")
HTTP_PORT, TCP_PORT, EXCLUDED_PORT = 8080, 9000, 15020  # 15020 is in the seed's -d list

LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "protocol": "%PROTOCOL%",
}


def file_log(path: Path, listener: str) -> list[dict]:
    return [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": {"listener": listener, **LOG_FIELDS}},
        },
    }]


def tcp_proxy(prefix: str, cluster: str, log: list[dict]) -> dict:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": prefix, "cluster": cluster, "access_log": log}}


def http_manager(prefix: str, cluster: str, log: list[dict]) -> dict:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": prefix,
        "preserve_external_request_id": True,
        "route_config": {"name": str(HTTP_PORT), "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "access_log": log}}


def address(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def static_bootstrap(pod_name: str, pod_ip: str, log_path: Path) -> dict:
    original_dst = {"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}
    return {
        "node": {"id": f"sidecar~{pod_ip}~{pod_name}.default~default.svc.cluster.local", "cluster": pod_name},
        "admin": {"address": address("127.0.0.1", 15000)},
        "static_resources": {
            "listeners": [
                {"name": "virtualOutbound", "address": address("0.0.0.0", 15001), "use_original_dst": True,
                 "filter_chains": [{"filters": [tcp_proxy("outbound_tcp", "PassthroughCluster",
                                                          file_log(log_path, "virtualOutbound"))]}]},
                {"name": f"0.0.0.0_{HTTP_PORT}", "address": address("0.0.0.0", HTTP_PORT), "bind_to_port": False,
                 "filter_chains": [{"filters": [http_manager(f"outbound_0.0.0.0_{HTTP_PORT}", "PassthroughCluster",
                                                             file_log(log_path, f"0.0.0.0_{HTTP_PORT}"))]}]},
                {"name": "virtualInbound", "address": address("0.0.0.0", 15006), "listener_filters": [original_dst],
                 "filter_chains": [
                     {"filter_chain_match": {"destination_port": HTTP_PORT},
                      "filters": [http_manager("inbound_http", "InboundPassthroughClusterIpv4",
                                               file_log(log_path, "virtualInbound"))]},
                     {"filters": [tcp_proxy("inbound_tcp", "InboundPassthroughClusterIpv4",
                                            file_log(log_path, "virtualInbound"))]},
                 ]},
            ],
            "clusters": [
                {"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "5s"},
                {"name": "InboundPassthroughClusterIpv4", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "5s",
                 "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}}},
            ],
        },
    }


class Mesh:
    def __init__(self, net: PodNetwork):
        self.net = net
        self.a = net.add_pod("a", labels={"app": "a"})
        self.b = net.add_pod("b", labels={"app": "b"})
        self.c = net.add_pod("c", labels={"app": "c"})
        serve = [sys.executable, ECHO, "serve", "--http", str(HTTP_PORT), "--tcp", str(TCP_PORT),
                 "--tcp", str(EXCLUDED_PORT)]
        for pod in (self.b, self.c):
            pod.start_app([*serve, "--name", pod.name], wait_ports=[HTTP_PORT, TCP_PORT, EXCLUDED_PORT])
        self.logs = {}
        for pod in (self.a, self.b):
            pod.apply_iptables(SEED_IPTABLES_FLAGS)
            self.logs[pod.name] = pod.work_dir / "access.log"
            pod.start_envoy(static_bootstrap(pod.name, pod.ip, self.logs[pod.name]),
                            extra_args=["--file-flush-interval-msec", "50"])

    def client(self, pod, *args: str, uid: int | None = None) -> dict:
        res = pod.run([sys.executable, ECHO, *args], uid=uid, timeout=30, check=False)
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        return json.loads(res.stdout)

    def log_entries(self, pod) -> list[dict]:
        path = self.logs[pod.name]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_entry(self, pod, timeout: float = 10.0, **match: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.log_entries(pod):
                if all(entry.get(k) == v for k, v in match.items()):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no access-log entry {match} in {pod.name}:\n" +
                             "\n".join(json.dumps(e) for e in self.log_entries(pod)))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with PodNetwork(keep_dir=tmp_path_factory.mktemp("interception")) as net:
        yield Mesh(net)


def test_outbound_tcp_to_a_pod_goes_through_15001_and_arrives(mesh):
    a, b = mesh.a, mesh.b
    out = mesh.client(a, "tcp", f"{b.ip}:{TCP_PORT}", "--send", "via-sidecars")
    # The app believes it is connected to B directly, and B's app answered and echoed.
    assert out["peer"] == f"{b.ip}:{TCP_PORT}"
    assert out["reply"]["data"] == "via-sidecars" and out["echo"] == "again\n"
    assert out["reply"]["name"] == "b"

    # A's Envoy took the connection on virtualOutbound (15001) and logged the original destination.
    sent = mesh.wait_entry(a, listener="virtualOutbound", downstream_remote_address=out["local"])
    assert sent["downstream_local_address"] == f"{b.ip}:{TCP_PORT}"
    assert sent["upstream_host"] == f"{b.ip}:{TCP_PORT}"
    assert sent["upstream_cluster"] == "PassthroughCluster"
    assert sent["upstream_local_address"].startswith(f"{a.ip}:")

    # B's Envoy took the connection A's Envoy made on virtualInbound (15006) and handed it to the app
    # from 127.0.0.6 (the passthrough source that ISTIO_OUTPUT's first rule lets through).
    got = mesh.wait_entry(b, listener="virtualInbound", downstream_remote_address=sent["upstream_local_address"])
    assert got["downstream_local_address"] == f"{b.ip}:{TCP_PORT}"
    assert got["upstream_cluster"] == "InboundPassthroughClusterIpv4"
    assert got["upstream_local_address"].startswith("127.0.0.6:")
    assert out["reply"]["peer"] == got["upstream_local_address"]
    assert out["reply"]["local"] == f"{b.ip}:{TCP_PORT}"


def test_http_through_both_sidecars_keeps_the_request_id(mesh):
    a, b = mesh.a, mesh.b
    rid = "4f7a1c2e-mizzen-interception"
    out = mesh.client(a, "http", f"http://{b.ip}:{HTTP_PORT}/hello?x=1", "--header", f"x-request-id: {rid}")
    assert out["status"] == 200 and out["peer"] == f"{b.ip}:{HTTP_PORT}"
    seen = out["body"]
    assert seen["name"] == "b" and seen["path"] == "/hello" and seen["request_id"] == rid
    assert seen["peer"].startswith("127.0.0.6:")  # delivered by B's inbound passthrough
    assert "x-forwarded-proto" in seen["headers"]  # an Envoy HTTP connection manager handled it

    # virtualOutbound handed the HTTP connection to the 0.0.0.0_8080 listener (use_original_dst).
    sent = mesh.wait_entry(a, listener=f"0.0.0.0_{HTTP_PORT}", request_id=rid)
    assert sent["downstream_local_address"] == f"{b.ip}:{HTTP_PORT}"
    assert sent["downstream_remote_address"] == out["local"]
    assert sent["upstream_host"] == f"{b.ip}:{HTTP_PORT}" and sent["response_code"] == 200
    assert sent["method"] == "GET" and sent["path"] == "/hello?x=1"
    got = mesh.wait_entry(b, listener="virtualInbound", request_id=rid)
    assert got["downstream_local_address"] == f"{b.ip}:{HTTP_PORT}"
    assert got["downstream_remote_address"] == sent["upstream_local_address"]
    assert got["upstream_local_address"] == seen["peer"]


def test_generated_request_id_is_the_one_both_sidecars_log(mesh):
    a, b = mesh.a, mesh.b
    out = mesh.client(a, "http", f"http://{b.ip}:{HTTP_PORT}/generated")
    rid = out["body"]["request_id"]
    assert rid and len(rid) >= 32  # A's Envoy made one up (a UUID)
    assert mesh.wait_entry(a, listener=f"0.0.0.0_{HTTP_PORT}", request_id=rid)["path"] == "/generated"
    assert mesh.wait_entry(b, listener="virtualInbound", request_id=rid)["path"] == "/generated"


def test_proxy_uid_traffic_is_not_redirected(mesh):
    a, c = mesh.a, mesh.c
    # As uid 1337 the connection goes straight out: C sees exactly the client's own address and port.
    direct = mesh.client(a, "tcp", f"{c.ip}:{TCP_PORT}", "--send", "as-1337", uid=1337)
    assert direct["reply"]["peer"] == direct["local"]
    # As another uid it is captured: C sees A's Envoy's connection, which A's access log names.
    captured = mesh.client(a, "tcp", f"{c.ip}:{TCP_PORT}", "--send", "as-app", uid=1000)
    assert captured["reply"]["peer"] != captured["local"]
    entry = mesh.wait_entry(a, listener="virtualOutbound", downstream_remote_address=captured["local"])
    assert entry["upstream_local_address"] == captured["reply"]["peer"]
    assert entry["downstream_local_address"] == f"{c.ip}:{TCP_PORT}"
    # Log lines are written in order, so the uid-1337 connection (made first) would be there by now.
    assert not [e for e in mesh.log_entries(a) if e["downstream_remote_address"] == direct["local"]]


def test_ports_in_d_are_not_captured(mesh):
    b, c = mesh.b, mesh.c
    # C has no sidecar, so only B's inbound rules act. 15020 is in -d: B's app sees C's own socket.
    excluded = mesh.client(c, "tcp", f"{b.ip}:{EXCLUDED_PORT}", "--send", "excluded")
    assert excluded["reply"]["peer"] == excluded["local"]
    assert excluded["reply"]["local"] == f"{b.ip}:{EXCLUDED_PORT}"
    # 9000 is not: B's Envoy delivers it from 127.0.0.6, and logs C's connection with its original destination.
    captured = mesh.client(c, "tcp", f"{b.ip}:{TCP_PORT}", "--send", "captured")
    assert captured["reply"]["peer"].startswith("127.0.0.6:")
    entry = mesh.wait_entry(b, listener="virtualInbound", downstream_remote_address=captured["local"])
    assert entry["downstream_local_address"] == f"{b.ip}:{TCP_PORT}"
    assert not [e for e in mesh.log_entries(b) if e["downstream_remote_address"] == excluded["local"]]


def test_redirect_is_visible_as_original_dst_to_a_plain_listener(tmp_path):
    """Without Envoy: a plain server on 15001 in a captured pod gets the app's connection, and
    SO_ORIGINAL_DST on it names the pod the app dialled."""
    with PodNetwork(keep_dir=tmp_path) as net:
        a, b = net.add_pod("a"), net.add_pod("b")
        b.start_app([sys.executable, ECHO, "serve", "--tcp", str(TCP_PORT), "--name", "b"], wait_ports=[TCP_PORT])
        a.start_app([sys.executable, ECHO, "serve", "--tcp", "15001", "--name", "fake-envoy"], wait_ports=[15001])
        a.apply_iptables(SEED_IPTABLES_FLAGS)
        res = a.run([sys.executable, ECHO, "tcp", f"{b.ip}:{TCP_PORT}", "--send", "x"], uid=1000)
        out = json.loads(res.stdout)
        assert out["peer"] == f"{b.ip}:{TCP_PORT}"  # what the app believes
        assert out["reply"]["name"] == "fake-envoy"  # who actually answered
        assert out["reply"]["local"] == "127.0.0.1:15001"  # REDIRECT of local traffic lands on loopback
        assert out["reply"]["original_dst"] == f"{b.ip}:{TCP_PORT}"
