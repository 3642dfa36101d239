"""Issue 4, end to end: the control plane restarts under live traffic and not one request fails.

One mesh for the module (as tests/test_e2e_traffic.py): the real control plane as processes, pods in
network namespaces with `mizzen iptables` and real Envoys from `mizzen bootstrap` — `client-sotw` (ADS state
of the world) and `client-delta` (`--delta`) — and two echo pods b1, b2 behind the service `steady`, mTLS
on (tests/sds_fixture.py). While both clients run a bounded request loop to `steady`'s ClusterIP through their
sidecars, each part is killed with SIGKILL and started again on the same port (`Stack.restart_service` /
`Stack.restart_infra`): the xds_gateway (every sidecar reconnects to the new replica and is SYNCED again),
the translator, the registry, NATS and Redis. Every request of every loop must succeed, and a service applied
with `mizzen apply` after each restart must reach both running Envoys (traffic to it works).
"""

from __future__ import annotations

import pytest

from tests.conftest import NETNS_E2E
from tests.test_e2e_support import (
    E2E,
    TLS_MODE_LABEL,
    RequestLoop,
    call,
    endpoints,
    eventually,
    served_by,
    service,
)

pytestmark = NETNS_E2E

STEADY_IP = "10.96.10.1"
AFTER_IPS = {"xds-gateway": "10.96.11.1", "translator": "10.96.11.2", "registry": "10.96.11.3",
             "nats": "10.96.11.4", "redis": "10.96.11.5"}
CLIENTS = ("client-sotw", "client-delta")
SYNCED = ["SYNCED"] * 4
# Requests each loop sends before the kill, and after the replacement is up (and, for the gateway, every
# sidecar resynced): the loops run at their own pace, the test waits for counts, never for time.
BEFORE, AFTER = 40, 60


def outbound(name: str) -> str:
    return f"outbound|80||{name}.default.svc.cluster.local"


class Mesh:
    def __init__(self, env: E2E):
        self.env = env
        self.pods = {}
        for name, app, port in (("b1", "b", 8080), ("b2", "b", 8080), ("client-sotw", "client", None),
                                ("client-delta", "client", None)):
            self.pods[name] = env.add_pod(name, {"app": app, TLS_MODE_LABEL: "istio"}, app_port=port)
        env.register([service("steady", STEADY_IP, app="b"),
                      endpoints("steady", [self.pods["b1"], self.pods["b2"]])])
        self.cars = {name: env.start_sidecar(pod, delta=name in ("b2", "client-delta"))
                     for name, pod in self.pods.items()}
        hosts = {f"{self.pods[b].ip}:8080" for b in ("b1", "b2")}
        for name, car in self.cars.items():
            env.wait_ready(car)
            if name in CLIENTS:
                eventually(lambda car=car: car.serves(outbound("steady"), hosts), what=f"steady in {name}'s Envoy")
        self.envoy_pids = {name: car.proc.pid for name, car in self.cars.items()}

    def loops(self) -> list[RequestLoop]:
        return [RequestLoop(self.pods[c], f"http://{STEADY_IP}/", {"b1", "b2"}, gap=0.01).start() for c in CLIENTS]

    @staticmethod
    def wait_loops(loops: list[RequestLoop], more: int) -> list[int]:
        """Let every loop send `more` requests from now on; returns where each loop was when asked."""
        at = [loop.sent for loop in loops]
        for start, loop in zip(at, loops, strict=True):
            loop.wait_sent(start + more)
        return at

    def check_loops(self, loops: list[RequestLoop], at_kill: list[int], at_up: list[int]) -> None:
        for c, loop, killed, up in zip(CLIENTS, loops, at_kill, at_up, strict=True):
            assert loop.failures == [], f"{c}: {len(loop.failures)} of {loop.sent} requests failed: {loop.failures[:5]}"
            assert loop.ok == loop.sent, (c, loop.ok, loop.sent)
            assert killed >= BEFORE and loop.sent - up >= AFTER, (c, killed, up, loop.sent)
            assert set(loop.by_upstream) == {"b1", "b2"}, loop.by_upstream

    def check_change_reaches_envoys(self, name: str) -> None:
        """`mizzen apply` of a new service after the restart: both running Envoys route to it."""
        ip, svc = AFTER_IPS[name], f"after-{name}"
        b1 = self.pods["b1"]
        self.env.apply(service(svc, ip, app="b"), endpoints(svc, [b1]))
        for c in CLIENTS:
            car = self.env.sidecars[c]
            eventually(lambda car=car: car.serves(outbound(svc), {f"{b1.ip}:8080"}), timeout=45,
                       what=f"{svc} in {c}'s Envoy after the {name} restart")
            assert served_by(call(self.pods[c], f"http://{ip}/")) == "b1"
        # no Envoy was restarted along the way
        assert {n: car.proc.pid for n, car in self.cars.items() if car.alive()} == self.envoy_pids

    def synced_rows(self) -> dict[str, list[str]] | None:
        status = self.env.proxy_status()
        rows = {car.proxy_name: status.get(car.proxy_name) for car in self.cars.values()}
        return rows if all(r and r[:4] == SYNCED for r in rows.values()) else None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("e2e-restart"))
    try:
        yield Mesh(env)
    finally:
        env.close()


@pytest.mark.parametrize("name", ["xds-gateway", "translator", "registry"])
def test_service_killed_and_replaced_no_request_fails(mesh, name):
    env = mesh.env
    before = eventually(mesh.synced_rows, what="every proxy SYNCED before the restart")
    old = env.stack.procs[name]
    loops = mesh.loops()
    try:
        mesh.wait_loops(loops, BEFORE)  # traffic flows before the kill …
        at_kill = [loop.sent for loop in loops]
        env.stack.restart_service(name)  # SIGKILL; a new process on the same port, waited for until ready
        assert not old.alive() and env.stack.procs[name].pid != old.pid
        if name == "xds-gateway":
            # every sidecar reconnected to the new replica (proxy-status' ISTIOD column) and resynced
            def moved():
                rows = mesh.synced_rows()
                return rows if rows and all(rows[p][4] != before[p][4] for p in rows) else None

            after = eventually(moved, timeout=45, what="every proxy SYNCED with the new gateway replica")
            assert len({r[4] for r in after.values()}) == 1
        at_up = mesh.wait_loops(loops, AFTER)  # … and after it
    finally:
        for loop in loops:
            loop.stop()
    mesh.check_loops(loops, at_kill, at_up)
    mesh.check_change_reaches_envoys(name)


@pytest.mark.parametrize("name", ["nats", "redis"])
def test_infra_killed_and_restarted_then_apply_reaches_envoy(mesh, name):
    env = mesh.env
    old = env.stack.procs[name]
    loops = mesh.loops()
    try:
        mesh.wait_loops(loops, BEFORE)
        at_kill = [loop.sent for loop in loops]
        env.stack.restart_infra(name)  # SIGKILL; the same port (Redis keeps its AOF data)
        assert not old.alive() and env.stack.procs[name].alive()
        for service_name in ("registry", "translator", "xds-gateway"):
            env.stack.wait_ready(service_name, timeout=30)
        at_up = mesh.wait_loops(loops, AFTER)
    finally:
        for loop in loops:
            loop.stop()
    mesh.check_loops(loops, at_kill, at_up)
    mesh.check_change_reaches_envoys(name)
    eventually(mesh.synced_rows, timeout=30, what=f"every proxy SYNCED after the {name} restart")
