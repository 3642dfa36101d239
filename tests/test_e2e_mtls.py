"""Issue 9, end to end: real mTLS between sidecars run by `mizzen agent`, certificates from the real certauth.

One mesh for the module: the control plane as processes (NATS, Redis, registry, translator, xds_gateway) plus
certauth, and pods in network namespaces. `server` (echo app, service account `server`) and `client`
(service account `client`) each run `mizzen agent`, which makes the workload key in the pod, gets a 60 s
certificate from certauth with a `mizzen token`, serves SDS and runs Envoy (uid 1337). `plain` has no sidecar:
a plaintext client of the server's pod address. Every policy change goes through `mizzen apply` / `mizzen
delete`; nothing is restarted (the agents' and Envoys' pids are checked).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import NETNS_E2E
from tests.test_e2e_support import (
    E2E,
    TLS_MODE_LABEL,
    RequestLoop,
    call,
    endpoints,
    eventually,
    mizzen,
    served_by,
    service,
)

pytestmark = NETNS_E2E

SERVER_IP = "10.96.9.1"
PLAIN_IP = "10.96.9.2"
FQDN = "server.default.svc.cluster.local"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
TTL = 60


def pa(name: str, namespace: str, mode: str, selector: dict | None = None, ports: dict | None = None) -> dict:
    spec: dict = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def dr(mode: str) -> dict:
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "DestinationRule",
            "metadata": {"name": "server", "namespace": "default"},
            "spec": {"host": FQDN, "trafficPolicy": {"tls": {"mode": mode}}}}


class Mesh:
    def __init__(self, env: E2E):
        self.env = env
        self.server = env.add_pod("server", {"app": "server", TLS_MODE_LABEL: "istio"}, app_port=8080,
                                  service_account="server")
        self.client = env.add_pod("client", {"app": "client", TLS_MODE_LABEL: "istio"}, service_account="client")
        self.plain = env.add_pod("plain", {"app": "plain"}, app_port=8080)  # no sidecar, no tlsMode label
        env.register([service("server", SERVER_IP), endpoints("server", [self.server]),
                      service("plain", PLAIN_IP), endpoints("plain", [self.plain])])
        flags = ["--cert-ttl", str(TTL), "--root-poll", "1"]
        self.cars = {"server": env.start_agent(self.server, agent_flags=flags),
                     "client": env.start_agent(self.client, delta=True, agent_flags=flags)}
        for car in self.cars.values():
            env.wait_ready(car)
        self.pids = {n: (c.proc.pid, self.envoy_pid(c)) for n, c in self.cars.items()}
        car = self.cars["client"]
        eventually(lambda: car.serves(f"outbound|80||{FQDN}", {f"{self.server.ip}:8080"}), 60,
                   what="client holds the server's endpoint")

    @staticmethod
    def envoy_pid(car) -> int:
        """The agent's child: Envoy."""
        pid = car.proc.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
        assert children, f"{car.pod_name}: the agent runs no Envoy"
        return int(children[0])

    def via_client(self) -> dict:
        return call(self.client, f"http://{SERVER_IP}/")

    def from_plain(self) -> dict:
        return call(self.plain, f"http://{self.server.ip}:8080/", timeout=3.0)

    def nothing_restarted(self) -> None:
        for name, car in self.cars.items():
            assert car.proc.alive(), f"{name}'s agent died:\n{car.proc.log_text()[-2000:]}"
            assert (car.proc.pid, self.envoy_pid(car)) == self.pids[name], f"{name}: agent or Envoy restarted"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("e2e-mtls"), subnet="10.244.9.0/24", certauth=True)
    try:
        yield Mesh(env)
    finally:
        env.close()


def ok(result: dict) -> bool:
    return served_by(result) == "server"


def eventually_ok(what: str, fn, want: bool, timeout: float = 30.0) -> dict:
    """Poll a request until it succeeds (want=True) or fails (want=False) — config takes a moment to land."""
    return eventually(lambda: (r := fn()) and (ok(r) == want) and (r or {"x": 1}), timeout, 0.3, what=what)


def test_two_sidecars_talk_mtls_and_the_server_sees_the_client_identity(mesh: Mesh) -> None:
    res = eventually_ok("client → server", mesh.via_client, True)
    assert ok(res)
    # the echo app got Envoy's x-forwarded-client-cert: the client's SPIFFE id, from the verified certificate
    xfcc = res["body"]["headers"].get("x-forwarded-client-cert", "")
    assert f"URI={CLIENT_ID}" in xfcc, xfcc
    server, client = mesh.cars["server"], mesh.cars["client"]
    entry = server.wait_entry(downstream_peer_uri_san=CLIENT_ID)
    assert entry["requested_server_name"] == f"outbound_.80_._.{FQDN}"
    out = client.wait_entry(upstream_peer_uri_san=SERVER_ID)
    assert out["upstream_cluster"] == f"outbound|80||{FQDN}"
    # `mizzen proxy-config secret` on a live sidecar: the agent's certificate, ACTIVE and valid
    table = server.pc("secret")
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:]}
    assert rows["default"][1:5] == ["Cert", "Chain", "ACTIVE", "true"], table
    assert rows["default"][5] in server.envoy_certs()[0]
    assert rows["ROOTCA"][1:4] == ["CA", "ACTIVE", "true"], table
    # the key never left the agent: not in its log, not on disk in the pod
    certs = server.agent_certs()
    assert certs["identity"] == SERVER_ID
    assert "PRIVATE KEY" not in server.proc.log_text()
    for f in server.pod.work_dir.rglob("*"):
        if f.is_file() and f.stat().st_size < 1_000_000:
            assert b"PRIVATE KEY" not in f.read_bytes(), f
    mesh.nothing_restarted()


def test_peer_authentication_modes_switch_live(mesh: Mesh) -> None:
    def plaintext_request() -> bool:
        """A request from the client sidecar that the server side logs without a peer certificate."""
        before = len(mesh.cars["server"].log_entries())
        if not ok(mesh.via_client()):
            return False
        time.sleep(0.3)  # the access log is flushed every 100 ms
        inbound = [e for e in mesh.cars["server"].log_entries()[before:]
                   if str(e.get("upstream_cluster", "")).startswith("inbound|")]
        return bool(inbound) and inbound[-1].get("downstream_peer_uri_san") in (None, "-", "")

    # default: PERMISSIVE — both a plaintext client and a sidecar are served
    eventually_ok("plaintext client served (PERMISSIVE)", mesh.from_plain, True)
    eventually_ok("sidecar served (PERMISSIVE)", mesh.via_client, True)
    mesh_strict = pa("default", "istio-system", "STRICT")
    mesh.env.apply(mesh_strict)
    try:
        eventually_ok("plaintext client refused (mesh-wide STRICT)", mesh.from_plain, False)
        eventually_ok("sidecar served (STRICT)", mesh.via_client, True)
        server_log = mesh.cars["server"]
        server_log.wait_entry(downstream_peer_uri_san=CLIENT_ID)

        # namespace PERMISSIVE overrides the mesh
        ns = pa("default", "default", "PERMISSIVE")
        mesh.env.apply(ns)
        eventually_ok("plaintext client served (namespace PERMISSIVE)", mesh.from_plain, True)
        eventually_ok("sidecar served (namespace PERMISSIVE)", mesh.via_client, True)

        # a workload selector beats the namespace: STRICT for app=server
        wl = pa("server-strict", "default", "STRICT", selector={"app": "server"})
        mesh.env.apply(wl)
        eventually_ok("plaintext client refused (workload STRICT)", mesh.from_plain, False)
        eventually_ok("sidecar served (workload STRICT)", mesh.via_client, True)

        # port level: the same workload policy, PERMISSIVE on 8080
        wl_port = pa("server-strict", "default", "STRICT", selector={"app": "server"}, ports={8080: "PERMISSIVE"})
        mesh.env.apply(wl_port)
        eventually_ok("plaintext client served (port-level PERMISSIVE)", mesh.from_plain, True)
        eventually_ok("sidecar served (port-level PERMISSIVE)", mesh.via_client, True)
        mesh.env.delete(wl_port)

        # workload-level DISABLE: the server takes plaintext only; the client's auto mTLS follows it (the
        # endpoint's tlsMode metadata says disabled, as Istio's EDS mtls checker), so both callers are served
        wl_off = pa("server-strict", "default", "DISABLE", selector={"app": "server"})
        mesh.env.apply(wl_off)
        eventually_ok("plaintext client served (workload DISABLE)", mesh.from_plain, True)
        eventually(plaintext_request, 30, 0.2, what="a sidecar request arriving in plaintext (workload DISABLE)")
        mesh.env.delete(wl_off)

        # DISABLE: plaintext served; auto mTLS turns itself off toward a DISABLE namespace, so the sidecar too
        mesh.env.apply(pa("default", "default", "DISABLE"))
        eventually_ok("plaintext client served (DISABLE)", mesh.from_plain, True)
        eventually_ok("sidecar served (DISABLE)", mesh.via_client, True)

        # once both sides have the change (old connections drain), the client's requests arrive in plaintext
        eventually(plaintext_request, 30, 0.2, what="a sidecar request arriving in plaintext (DISABLE)")
        mesh.env.delete(pa("default", "default", "DISABLE"))
    finally:
        mesh.env.delete(mesh_strict)
        for obj in (pa("default", "default", "PERMISSIVE"), pa("server-strict", "default", "STRICT")):
            mizzen("delete", "-f", str(mesh.env._yaml([obj])), "--server", mesh.env.server, check=False)
    eventually_ok("plaintext client served again", mesh.from_plain, True)
    mesh.nothing_restarted()


def test_destination_rule_tls_mode_overrides_auto_mtls(mesh: Mesh) -> None:
    strict = pa("default", "istio-system", "STRICT")
    mesh.env.apply(strict)
    try:
        eventually_ok("plaintext refused (STRICT)", mesh.from_plain, False)
        mesh.env.apply(dr("DISABLE"))  # the client now sends plaintext to a STRICT server: refused
        eventually_ok("client sending plaintext refused by STRICT", mesh.via_client, False)
        mesh.env.apply(dr("ISTIO_MUTUAL"))
        res = eventually_ok("client with DR ISTIO_MUTUAL served", mesh.via_client, True)
        assert f"URI={CLIENT_ID}" in res["body"]["headers"].get("x-forwarded-client-cert", "")
        mesh.env.delete(dr("ISTIO_MUTUAL"))
    finally:
        mesh.env.delete(strict)
    mesh.nothing_restarted()


def test_auto_mtls_only_toward_endpoints_with_a_sidecar(mesh: Mesh) -> None:
    """Mesh-wide STRICT: the client's auto mTLS still talks plaintext to a pod without a sidecar (its endpoint has
    no `tlsMode: istio`), and mTLS to the one with a sidecar."""
    strict = pa("default", "istio-system", "STRICT")
    mesh.env.apply(strict)
    try:
        eventually_ok("plaintext refused by the sidecar pod (STRICT)", mesh.from_plain, False)
        eventually(lambda: served_by(call(mesh.client, f"http://{PLAIN_IP}/")) == "plain",
                   30, 0.3, what="client → plain (no sidecar) served")
        entry = mesh.cars["client"].wait_entry(upstream_cluster="outbound|80||plain.default.svc.cluster.local")
        assert entry.get("upstream_peer_uri_san") in (None, "-", ""), entry  # plaintext: no peer certificate
        assert ok(mesh.via_client())
        mesh.cars["client"].wait_entry(upstream_peer_uri_san=SERVER_ID)
    finally:
        mesh.env.delete(strict)


def _serials(car) -> set[str]:
    return car.envoy_certs()[0]


def test_certificates_renew_under_traffic(mesh: Mesh) -> None:
    """60 s certificates renew at about 30 s: two renewals of both sidecars under a request loop, zero failures,
    and the serials Envoy holds change (the server in STRICT mode, so every request is mTLS)."""
    strict = pa("default", "istio-system", "STRICT")
    mesh.env.apply(strict)
    try:
        eventually_ok("plaintext refused (STRICT)", mesh.from_plain, False)
        eventually_ok("sidecar served", mesh.via_client, True)
        start = {n: c.agent_certs()["renewals"] for n, c in mesh.cars.items()}
        seen = {n: set(_serials(c)) for n, c in mesh.cars.items()}
        first = {n: c.agent_certs()["serial"] for n, c in mesh.cars.items()}
        loop = RequestLoop(mesh.client, f"http://{SERVER_IP}/", {"server"}, gap=0.05, max_requests=100_000,
                           max_seconds=4 * TTL).start()
        try:
            def renewed_twice() -> bool:
                for n, c in mesh.cars.items():
                    seen[n] |= _serials(c)
                return all(c.agent_certs()["renewals"] - start[n] >= 2 for n, c in mesh.cars.items())

            eventually(renewed_twice, 3 * TTL, 1.0, what="two renewals of both agents")
            loop.wait_sent(loop.sent + 20)
        finally:
            loop.stop()
        assert not loop.failures, loop.failures[:5]
        assert loop.ok > 100
        for n, c in mesh.cars.items():
            now = c.agent_certs()["serial"]
            assert now != first[n]
            assert now in _serials(c), f"{n}: Envoy does not hold the agent's current certificate"
            assert len(seen[n]) >= 3, f"{n}: Envoy held only {seen[n]}"
    finally:
        mesh.env.delete(strict)
    mesh.nothing_restarted()


def _rotate(mesh: Mesh, phase: str) -> str:
    return mizzen("ca", "rotate", phase, "--data-dir", str(mesh.env.stack.ca_dir)).stdout


def _roots_status(mesh: Mesh) -> dict[str, dict]:
    """`mizzen ca rotate status`: ROOT, SIGNING, TRUSTED, KEY, NOT AFTER, SHA256 (fixed-width columns)."""
    out = mizzen("ca", "rotate", "status", "--data-dir", str(mesh.env.stack.ca_dir)).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        if line.strip():
            rows[line[:10].strip()] = {"signing": line[11:19].strip() == "yes",
                                       "trusted": line[20:28].strip() == "yes", "sha256": line.split()[-1]}
    return rows


def test_root_rotation_under_traffic(mesh: Mesh) -> None:
    """add a root (both trusted) → activate it (new certificates under it) → retire the old: no request fails
    and no sidecar restarts (Istio needs restarts here, istio#22993)."""
    strict = pa("default", "istio-system", "STRICT")
    mesh.env.apply(strict)
    loop = None
    try:
        eventually_ok("sidecar served", mesh.via_client, True)
        old = {rid for rid, r in _roots_status(mesh).items() if r["signing"]}
        loop = RequestLoop(mesh.client, f"http://{SERVER_IP}/", {"server"}, gap=0.05, max_requests=100_000,
                           max_seconds=4 * TTL).start()
        _rotate(mesh, "add")
        eventually(lambda: all(len(c.envoy_certs()[1]) == 2 for c in mesh.cars.values()), 60, 0.5,
                   what="both Envoys trust both roots")
        _rotate(mesh, "activate")
        status = _roots_status(mesh)
        new_sha = next(r["sha256"] for r in status.values() if r["signing"])
        eventually(lambda: all(c.agent_certs().get("root_sha256") == new_sha for c in mesh.cars.values()), 60, 0.5,
                   what="both agents hold certificates under the new root")
        eventually(lambda: all(c.agent_certs()["serial"] in c.envoy_certs()[0] for c in mesh.cars.values()),
                   30, 0.5, what="both Envoys use them")
        loop.wait_sent(loop.sent + 20)
        _rotate(mesh, "retire")
        eventually(lambda: all(len(c.envoy_certs()[1]) == 1 for c in mesh.cars.values()), 60, 0.5,
                   what="both Envoys trust only the new root")
        assert old and not (old & {rid for rid, r in _roots_status(mesh).items()
                                   if r["signing"]})
        loop.wait_sent(loop.sent + 40)
    finally:
        if loop is not None:
            loop.stop()
        mesh.env.delete(strict)
    assert not loop.failures, loop.failures[:5]
    assert loop.ok > 50
    mesh.nothing_restarted()
    eventually_ok("sidecar served after the rotation", mesh.via_client, True)


def test_agent_stops_envoy_on_sigterm(mesh: Mesh) -> None:
    """Last in the module: SIGTERM to an agent stops its Envoy, and the agent exits cleanly."""
    car = mesh.cars["client"]
    envoy = mesh.envoy_pid(car)
    os.kill(car.proc.pid, signal.SIGTERM)
    assert car.proc.popen.wait(30) == 0, car.proc.log_text()[-2000:]

    def gone() -> bool:
        try:
            os.kill(envoy, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{envoy}/stat") as f:
            return f.read().split()[2] == "Z"  # reaped by nobody yet: exited all the same

    eventually(gone, 20, 0.2, what="Envoy gone after the agent's SIGTERM")
    assert not (car.pod.work_dir / "etc/istio/proxy/SDS").exists(), "the SDS socket was not removed"
