"""kubectl drives a real mesh: a VirtualService applied, edited and deleted with the real `kubectl` against the
registry moves a real sidecar's traffic (the control plane as processes, pods in network namespaces, Envoy
intercepting with `mizzen iptables`), exactly as `mizzen apply` does."""

from __future__ import annotations

from tests.conftest import NETNS_E2E
from tests.test_e2e_support import E2E, call, endpoints, eventually, served_by, service
from tests.test_kubectl import Kubectl

pytestmark = NETNS_E2E

WEB_IP, B_IP, C_IP = "10.96.7.1", "10.96.7.2", "10.96.7.3"
VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {{host: {host}}}
"""


def test_kubectl_apply_edit_delete_moves_sidecar_traffic(tmp_path):
    env = E2E(tmp_path / "mesh")
    try:
        b1 = env.add_pod("b1", {"app": "web-b"}, app_port=8080)
        c1 = env.add_pod("c1", {"app": "web-c"}, app_port=8080)
        client = env.start_sidecar(env.add_pod("client", {"app": "client"}))
        env.register([service("web", WEB_IP), service("web-b", B_IP), endpoints("web-b", [b1]),
                      service("web-c", C_IP), endpoints("web-c", [c1])])
        env.wait_ready(client)
        k = Kubectl(tmp_path, env.server, "default")
        f = tmp_path / "vs.yaml"

        def answers(n: int = 10) -> set[str | None]:
            return {served_by(call(client.pod, f"http://{WEB_IP}/", timeout=3.0)) for _ in range(n)}

        f.write_text(VS.format(host="web-b"))
        assert k.ok("apply", "-f", str(f)).strip() == "virtualservice.networking.istio.io/web created"
        eventually(lambda: answers(3) == {"b1"}, timeout=60, what="web routed to web-b (b1)")
        assert answers() == {"b1"}

        f.write_text(VS.format(host="web-c"))
        assert k.ok("apply", "-f", str(f)).strip() == "virtualservice.networking.istio.io/web configured"
        eventually(lambda: answers(3) == {"c1"}, timeout=60, what="web routed to web-c (c1)")
        assert answers() == {"c1"}
        assert k.ok("apply", "-f", str(f)).strip() == "virtualservice.networking.istio.io/web unchanged"

        # an invalid edit is refused naming its field; the sidecar keeps the last good route
        p = k("apply", "-f", "-", stdin=VS.format(host="web-b").replace("destination: {host: web-b}",
                                                                          "destination: {host: web-b, port: {number: 0}}"))
        assert p.returncode != 0 and "spec.http[0].route[0].destination.port.number" in p.stderr, p.stderr
        assert answers() == {"c1"}

        assert 'virtualservice.networking.istio.io "web" deleted' in k.ok("delete", "-f", str(f))
        # no route rule left: `web` itself has no endpoints, so neither backend answers any more
        eventually(lambda: answers(3) == {None}, timeout=60, what="the VirtualService's route removed")
    finally:
        env.close()
