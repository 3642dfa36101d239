"""The test-pod harness itself: namespaces, links, routes, processes, registration, relays, and cleanup."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mizzen.services.mesh import procs
from mizzen.services.sidecar.netns import REPO_ROOT, PodNetwork, unavailable_reason
from tests.conftest import is_root

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not is_root(), reason="needs root: creates network namespaces, veth pairs and bridges"),
    pytest.mark.skipif(is_root() and unavailable_reason() is not None, reason=str(unavailable_reason())),
]

ECHO = str(REPO_ROOT / "services" / "demo" / "echo.py")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def host_routes() -> str:
    return subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True).stdout


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); its state says it is gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_pods_get_addresses_routes_and_nothing_leaks_into_the_host(tmp_path):
    assert "10.244.7." not in host_routes()
    with PodNetwork(subnet="10.244.7.0/24", service_cidr="10.96.0.0/16", keep_dir=tmp_path) as net:
        a = net.add_pod("a")
        b = net.add_pod("b")
        assert (a.ip, b.ip) == ("10.244.7.2", "10.244.7.3")
        assert "inet 127.0.0.1/8" in a.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"]).stdout
        assert "inet 10.244.7.2/24" in a.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert ",UP," in a.run(["ip", "-o", "link", "show", "lo"]).stdout
        routes = a.run(["ip", "route", "show"]).stdout
        assert "10.96.0.0/16 via 10.244.7.1 dev eth0" in routes
        assert a.run(["ip", "route", "show", "default"]).stdout.strip() == ""
        assert "master br0" in net.hub.ip("link", "show", "v1").stdout

        # Pod to pod over the bridge works; anything else has no route.
        b.start_app([sys.executable, ECHO, "serve", "--http", "8080", "--name", "b"], wait_ports=[8080])
        out = json.loads(a.run([sys.executable, ECHO, "http", f"http://{b.ip}:8080/"]).stdout)
        assert out["body"]["name"] == "b" and out["body"]["peer"].startswith(f"{a.ip}:")

        def connect(host: str) -> int:
            s = socket.socket()
            s.settimeout(2)
            try:
                return s.connect_ex((host, 80))
            finally:
                s.close()

        assert a.call(connect, "192.0.2.1") == errno.ENETUNREACH  # no default route out of a pod
        assert "10.244.7." not in host_routes()
        # The host namespace never sees our links: the bridge and the veths live only in our namespaces.
        host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert net.tag not in host_links
    assert "10.244.7." not in host_routes()


def test_everything_is_removed_when_the_body_fails(tmp_path):
    names: set[str] = set()
    pids: list[int] = []
    work_dir: Path | None = None
    with pytest.raises(RuntimeError, match="boom"), PodNetwork(keep_dir=tmp_path) as net:
        pod = net.add_pod("a")
        work_dir = net.work_dir
        names = {net.hub.name, pod.netns_name}
        assert names <= netns_names()
        pids.append(pod.start_app([sys.executable, ECHO, "serve", "--tcp", "9000"], wait_ports=[9000]).pid)
        pids.append(pod.spawn("sleeper", ["sleep", "300"], uid=1337).pid)
        # a grandchild the harness did not start itself still dies with the namespace
        pod.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])
        raise RuntimeError("boom")
    assert not names & netns_names()
    assert not [p for p in pids if pid_alive(p)]
    assert work_dir is not None and not work_dir.exists()
    assert (tmp_path / f"pods-{net.tag}" / "logs").is_dir()  # logs kept for the failed test


def test_parallel_networks_do_not_collide(tmp_path):
    with PodNetwork(keep_dir=tmp_path) as one, PodNetwork(keep_dir=tmp_path) as two:
        assert one.tag != two.tag
        pods = {}
        for label, net in (("one", one), ("two", two)):
            a, b = net.add_pod("a"), net.add_pod("b")  # same names and addresses in both
            b.start_app([sys.executable, ECHO, "serve", "--http", "8080", "--name", f"b-{label}"], wait_ports=[8080])
            pods[label] = (a, b)
        assert pods["one"][1].ip == pods["two"][1].ip
        for label, (a, b) in pods.items():
            out = json.loads(a.run([sys.executable, ECHO, "http", f"http://{b.ip}:8080/"]).stdout)
            assert out["body"]["name"] == f"b-{label}"


def test_processes_run_as_the_uid_asked_for(tmp_path):
    with PodNetwork(keep_dir=tmp_path) as net:
        a = net.add_pod("a")
        a.start_app([sys.executable, ECHO, "serve", "--tcp", "9000", "--name", "proxyish"], uid=1337, wait_ports=[9000])
        out = json.loads(a.run([sys.executable, ECHO, "tcp", "127.0.0.1:9000"], uid=1000).stdout)
        assert out["reply"]["uid"] == 1337
        assert a.run(["id", "-u"], uid=1337).stdout.strip() == "1337"
        assert oct(a.work_dir.stat().st_mode & 0o777) == "0o755" and a.work_dir.stat().st_uid == 1337


def test_register_callable_gets_pod_and_endpoints(tmp_path):
    seen: list[dict] = []
    with PodNetwork(keep_dir=tmp_path) as net:
        a = net.add_pod("web-1", namespace="shop", labels={"app": "web", "version": "v1"}, register=seen.extend,
                        service_account="web", container_ports=[8080])
        b = net.add_pod("web-2", namespace="shop", labels={"app": "web", "version": "v2"}, register=seen.extend)
        net.register_endpoints(seen.extend, "web", [a, b], [{"name": "http", "port": 8080, "protocol": "TCP"}],
                               namespace="shop")
    pod_a, pod_b, eps = seen
    assert pod_a["kind"] == "Pod" and pod_a["metadata"] == {"name": "web-1", "namespace": "shop",
                                                            "labels": {"app": "web", "version": "v1"}}
    assert pod_a["status"]["podIP"] == a.ip and pod_a["spec"]["serviceAccountName"] == "web"
    assert pod_a["spec"]["containers"][0]["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert pod_b["status"]["podIP"] == b.ip
    assert eps["kind"] == "Endpoints" and eps["metadata"] == {"name": "web", "namespace": "shop"}
    assert eps["subsets"] == [{
        "addresses": [{"ip": a.ip, "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                      {"ip": b.ip, "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "shop"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]


def test_relays_reach_across_the_namespace_boundary(tmp_path):
    host_port = procs.free_port()
    host_app = procs.spawn("host-echo", [sys.executable, ECHO, "serve", "--http", str(host_port), "--bind", "127.0.0.1",
                                         "--name", "host"], tmp_path)
    try:
        procs.wait_port("127.0.0.1", host_port, proc=host_app.popen)
        with PodNetwork(keep_dir=tmp_path) as net:
            a = net.add_pod("a")
            # inside the pod, 127.0.0.1:<port> now reaches the host's server (how Envoy reaches xDS)
            a.forward_to_host(host_port, 15010)
            out = json.loads(a.run([sys.executable, ECHO, "http", "http://127.0.0.1:15010/x"]).stdout)
            assert out["body"]["name"] == "host"
            # and the reverse: a host port reaching a server inside the pod
            a.start_app([sys.executable, ECHO, "serve", "--http", "8080", "--name", "in-pod"], wait_ports=[8080])
            port = a.forward_from_host(8080)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/y", timeout=10) as r:
                assert json.loads(r.read())["name"] == "in-pod"
            relay_pids = [p.pid for p in net._relays]
        assert not [p for p in relay_pids if pid_alive(p)]
    finally:
        host_app.stop()
