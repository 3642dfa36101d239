"""Issue 10, end to end: DestinationRule `tls` with certificate files, through a real Envoy run by `mizzen agent`.

One mesh for the module: the control plane and certauth as processes, pods in network namespaces. `client`
runs `mizzen agent` (its Envoy asks the agent's SDS for `file-cert:` / `file-root:` secrets, which the agent
reads from files in the client's directory, re-read every 0.3 s). Two upstreams without sidecars run a small
HTTPS server (`tests/apps/tls_echo.py`, a new handshake per request): `tls-server` (server certificate from
CA "a"), and `mtls-server` (the same, and it requires a client certificate from CA "clients"). The client
calls them in plain HTTP; its sidecar originates TLS as the DestinationRule says (Istio's TLS origination).
Every change goes through `mizzen apply`; the agent and its Envoy are never restarted (pids checked).
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import NETNS_E2E
from tests.filecert_support import atomic_write, authority, leaf
from tests.test_e2e_support import E2E, TLS_MODE_LABEL, call, endpoints, eventually, service

pytestmark = NETNS_E2E

TLS_IP, MTLS_IP = "10.96.12.1", "10.96.12.2"
TLS_PORT = 8443
SNI = "tls-server.example"  # the name in the upstreams' certificate; not the service's, so `sni` matters
POLL = 0.3


def fqdn(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def dr(host: str, **tls: str) -> dict:
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "DestinationRule",
            "metadata": {"name": host, "namespace": "default"},
            "spec": {"host": fqdn(host), "trafficPolicy": {"tls": tls}}}


class Mesh:
    def __init__(self, env: E2E):
        self.env = env
        d = self.dir = env.work / "client-certs"
        d.mkdir()
        self.ca_a, self.ca_b, self.clients = authority("ca-a"), authority("ca-b"), authority("clients")
        for name, ca in (("ca-a", self.ca_a), ("ca-b", self.ca_b), ("clients", self.clients)):
            atomic_write(d / f"{name}.pem", ca.pem)
        self.client_pem = leaf(self.clients, "client-1", client=True)
        self.client_pem.write(d / "client.pem", d / "client-key.pem")
        server = leaf(self.ca_a, "tls-server", dns=[SNI])
        server.write(d / "server.pem", d / "server-key.pem")

        self.tls, self.tls_app = self._upstream("tls-server", [])
        self.mtls, self.mtls_app = self._upstream("mtls-server", ["--client-ca", str(d / "clients.pem")])
        env.register([service("tls-server", TLS_IP, target_port=TLS_PORT),
                      endpoints("tls-server", [self.tls], port=TLS_PORT),
                      service("mtls-server", MTLS_IP, target_port=TLS_PORT),
                      endpoints("mtls-server", [self.mtls], port=TLS_PORT)])
        self.client = env.add_pod("client", {"app": "client", TLS_MODE_LABEL: "istio"}, service_account="client")
        self.car = env.start_agent(self.client, agent_flags=["--file-poll", str(POLL)])
        env.wait_ready(self.car)
        self.pids = (self.car.proc.pid, self.envoy_pid())
        for name in ("tls-server", "mtls-server"):
            eventually(lambda n=name: self.car.cluster_hosts(f"outbound|80||{fqdn(n)}"), 60,
                       what=f"client holds {name}'s endpoint")

    def _upstream(self, name: str, extra: list[str]):
        # runs as root: it reads the test's certificate files (pytest's directory is private to root); no
        # sidecar in these pods, so the app's uid does not matter to any iptables rule
        pod = self.env.add_pod(name, {"app": name})
        app = pod.start_app([sys.executable, "-m", "tests.apps.tls_echo", name, str(TLS_PORT),
                             str(self.dir / "server.pem"), str(self.dir / "server-key.pem"), *extra],
                            wait_ports=[TLS_PORT])
        return pod, app

    def envoy_pid(self) -> int:
        pid = self.car.proc.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return int(f.read().split()[0])

    def get(self, ip: str) -> dict:
        return call(self.client, f"http://{ip}/", timeout=3.0)

    def file_secrets(self) -> dict:
        return self.car.agent_certs()["files"]

    def nothing_restarted(self) -> None:
        assert self.car.proc.alive(), self.car.proc.log_text()[-2000:]
        assert (self.car.proc.pid, self.envoy_pid()) == self.pids, "the agent or its Envoy restarted"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("e2e-filecert"), subnet="10.244.12.0/24", certauth=True)
    try:
        yield Mesh(env)
    finally:
        env.close()


def answered_by(res: dict, name: str) -> dict | None:
    body = res.get("body")
    return body if res.get("status") == 200 and isinstance(body, dict) and body.get("name") == name else None


def eventually_answered(mesh: Mesh, ip: str, name: str, check=lambda body: True, what: str = "") -> dict:
    return eventually(lambda: (b := answered_by(mesh.get(ip), name)) and check(b) and b, 30, 0.3,
                      what=what or f"{name} answers through the client's sidecar")  # type: ignore[return-value]


def eventually_refused(mesh: Mesh, ip: str, what: str) -> dict:
    """Requests fail at the sidecar: a 503 from Envoy (the upstream TLS handshake failed)."""
    return eventually(lambda: (r := mesh.get(ip)).get("status") == 503 and r, 30, 0.3, what=what)  # type: ignore[return-value]


def test_simple_tls_with_the_ca_file_and_a_wrong_ca_fails(mesh: Mesh) -> None:
    mesh.env.apply(dr("tls-server", mode="SIMPLE", caCertificates=str(mesh.dir / "ca-a.pem"), sni=SNI))
    body = eventually_answered(mesh, TLS_IP, "tls-server")
    assert body["sni"] == SNI and body["client_cn"] is None
    name = f"file-root:{mesh.dir / 'ca-a.pem'}"
    assert mesh.file_secrets()[name]["error"] is None
    # Envoy holds the file's CA (its /certs lists the CA certificates of its TLS contexts)
    assert format(mesh.ca_a.cert.serial_number, "x") in mesh.car.envoy_certs()[1]

    mesh.env.apply(dr("tls-server", mode="SIMPLE", caCertificates=str(mesh.dir / "ca-b.pem"), sni=SNI))
    eventually_refused(mesh, TLS_IP, "the wrong CA refuses tls-server's certificate")
    # the sidecar aborted the handshake: the upstream got Envoy's "unknown CA" alert
    assert "ALERT_UNKNOWN_CA" in mesh.tls_app.log_text(), mesh.tls_app.log_text()[-2000:]
    mesh.nothing_restarted()


def test_mutual_tls_presents_the_client_certificate_files(mesh: Mesh) -> None:
    d = mesh.dir
    mutual = dr("mtls-server", mode="MUTUAL", caCertificates=str(d / "ca-a.pem"), sni=SNI,
                clientCertificate=str(d / "client.pem"), privateKey=str(d / "client-key.pem"))
    mesh.env.apply(mutual)
    body = eventually_answered(mesh, MTLS_IP, "mtls-server")
    assert body["client_cn"] == "client-1"
    assert int(body["client_serial"], 16) == mesh.client_pem.serial
    # without a client certificate the upstream refuses the handshake
    mesh.env.apply(dr("mtls-server", mode="SIMPLE", caCertificates=str(d / "ca-a.pem"), sni=SNI))
    eventually_refused(mesh, MTLS_IP, "mtls-server refuses a client without a certificate")
    mesh.env.apply(mutual)
    eventually_answered(mesh, MTLS_IP, "mtls-server")
    mesh.nothing_restarted()


def test_rotated_files_reach_envoy_without_restart(mesh: Mesh) -> None:
    d = mesh.dir
    rotating = d / "rotating-ca.pem"
    atomic_write(rotating, mesh.ca_b.pem)  # the wrong CA first
    mesh.env.apply(dr("tls-server", mode="SIMPLE", caCertificates=str(rotating), sni=SNI))
    name = f"file-root:{rotating}"
    before = eventually(lambda: (mesh.file_secrets().get(name) or {}).get("version"), 30, 0.3,
                        what=f"Envoy asked the agent for {name}")
    eventually_refused(mesh, TLS_IP, "ca-b refuses tls-server")
    atomic_write(rotating, mesh.ca_b.pem + mesh.ca_a.pem)  # ca-a added to the bundle
    eventually_answered(mesh, TLS_IP, "tls-server", what="tls-server answers once the bundle holds ca-a")
    assert mesh.file_secrets()[name]["version"] != before

    # a new client certificate and key: new handshakes present it
    mesh.env.apply(dr("mtls-server", mode="MUTUAL", caCertificates=str(d / "ca-a.pem"), sni=SNI,
                      clientCertificate=str(d / "client.pem"), privateKey=str(d / "client-key.pem")))
    eventually_answered(mesh, MTLS_IP, "mtls-server", lambda b: b["client_cn"] == "client-1")
    new = leaf(mesh.clients, "client-2", client=True)
    new.write(d / "client.pem", d / "client-key.pem")
    body = eventually_answered(mesh, MTLS_IP, "mtls-server", lambda b: b["client_cn"] == "client-2",
                               what="mtls-server sees the rotated client certificate")
    assert int(body["client_serial"], 16) == new.serial
    assert format(new.serial, "x") in mesh.car.envoy_certs()[0]
    mesh.nothing_restarted()


def test_a_missing_file_is_an_error_naming_it_until_it_appears(mesh: Mesh) -> None:
    late = mesh.dir / "late-ca.pem"
    mesh.env.apply(dr("tls-server", mode="SIMPLE", caCertificates=str(late), sni=SNI))
    name = f"file-root:{late}"
    err = eventually(lambda: (mesh.file_secrets().get(name) or {}).get("error"), 30, 0.3,
                     what="the agent reports the missing file")
    assert f"cannot read CA certificates file {late}: No such file or directory" in err
    assert str(late) in mesh.car.proc.log_text()
    # Envoy has no such secret: after SDS's initial fetch timeout the cluster is used without it and fails
    eventually_refused(mesh, TLS_IP, "no CA yet: the handshake cannot be verified")
    atomic_write(late, mesh.ca_a.pem)
    eventually_answered(mesh, TLS_IP, "tls-server", what="tls-server answers once the CA file exists")
    assert mesh.file_secrets()[name]["error"] is None
    mesh.nothing_restarted()


def test_no_key_material_in_the_agent_log(mesh: Mesh) -> None:
    log = mesh.car.proc.log_text()
    for key in (mesh.client_pem.key.decode(), (mesh.dir / "client-key.pem").read_text()):
        assert key.splitlines()[1] not in log
    assert "PRIVATE KEY" not in log


# --- a Gateway server with certificate files ----------------------------------------------------------------
GW_PORT = 8443  # above 1024: the gateway's Envoy runs as uid 1337
GW_HOST = "gw.example"
WEB_IP = "10.96.12.3"


def tls_get(ip: str, port: int, sni: str, ca_file: str, client: tuple[str, str] | None = None) -> dict:
    """GET / over TLS (runs inside a pod): the server's certificate checked against ca_file for `sni`;
    `client` = (certificate file, key file) to present."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=ca_file)
    if client:
        ctx.load_cert_chain(*client)
    try:
        with socket.create_connection((ip, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=sni) as s:
            serial = s.getpeercert()["serialNumber"]
            s.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    head, _, body = data.partition(b"\r\n\r\n")
    return {"status": int(head.split()[1]), "serial": int(serial, 16), "body": body.decode(errors="replace")}


def test_gateway_terminates_tls_with_certificate_files(mesh: Mesh) -> None:
    env, d = mesh.env, mesh.dir
    web = env.add_pod("web", {"app": "web"}, app_port=8080)
    env.register([service("web", WEB_IP), endpoints("web", [web])])
    first = leaf(mesh.ca_a, "gateway", dns=[GW_HOST])
    first.write(d / "gw.pem", d / "gw-key.pem")
    gw_pod = env.add_pod("gw", {"istio": "ingressgateway"})
    gw = env.start_agent(gw_pod, iptables=False, agent_flags=["--router", "--file-poll", str(POLL)])
    gateway = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "default"},
               "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{
                   "port": {"number": GW_PORT, "name": "https", "protocol": "HTTPS"}, "hosts": [GW_HOST],
                   "tls": {"mode": "SIMPLE", "serverCertificate": str(d / "gw.pem"),
                           "privateKey": str(d / "gw-key.pem")}}]}}
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "edge", "namespace": "default"},
          "spec": {"hosts": [GW_HOST], "gateways": ["edge"], "http": [{"route": [{"destination": {
              "host": fqdn("web"), "port": {"number": 80}}}]}]}}
    env.apply(gateway, vs)
    eventually(gw.agent_ready, 60, what="the gateway's agent ready")
    client = mesh.tls  # a pod without a sidecar

    def via_gateway() -> dict:
        return client.call(tls_get, gw_pod.ip, GW_PORT, GW_HOST, str(d / "ca-a.pem"), timeout=20)

    res = eventually(lambda: (r := via_gateway()).get("status") == 200 and r, 60, 0.3,
                     what="a TLS client through the gateway")
    assert res["serial"] == first.serial and json.loads(res["body"])["name"] == "web"
    name = f"file-cert:{d / 'gw.pem'}~{d / 'gw-key.pem'}"
    assert gw.agent_certs()["files"][name]["error"] is None

    # rotate the gateway's certificate files: new handshakes get the new certificate, nothing restarts
    pid = gw.proc.pid
    second = leaf(mesh.ca_a, "gateway-2", dns=[GW_HOST])
    second.write(d / "gw.pem", d / "gw-key.pem")
    res = eventually(lambda: (r := via_gateway()).get("serial") == second.serial and r, 30, 0.3,
                     what="the gateway serving the rotated certificate")
    assert res["status"] == 200
    assert gw.proc.alive() and gw.proc.pid == pid
    # a client trusting only ca-b refuses the gateway's certificate
    refused = client.call(tls_get, gw_pod.ip, GW_PORT, GW_HOST, str(d / "ca-b.pem"), timeout=20)
    assert "CERTIFICATE_VERIFY_FAILED" in refused.get("error", ""), refused

    # MUTUAL: the gateway checks client certificates against its caCertificates file
    server = gateway["spec"]["servers"][0]
    server["tls"].update(mode="MUTUAL", caCertificates=str(d / "clients.pem"))
    env.apply(gateway)
    with_cert = (str(d / "client.pem"), str(d / "client-key.pem"))
    eventually(lambda: "error" in via_gateway(), 30, 0.3, what="the gateway requiring a client certificate")
    res = client.call(tls_get, gw_pod.ip, GW_PORT, GW_HOST, str(d / "ca-a.pem"), with_cert, timeout=20)
    assert res.get("status") == 200, res
    assert gw.agent_certs()["files"][f"file-root:{d / 'clients.pem'}"]["error"] is None
    assert gw.proc.alive() and gw.proc.pid == pid
