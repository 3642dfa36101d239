"""Gateway TLS with `credentialName`: Kubernetes Secrets in the registry (validated, never shown), served to a real
gateway Envoy over ADS as `kubernetes://NAME` / `kubernetes://NAME-cacert`, and traffic from real TLS clients:
SIMPLE and MUTUAL termination, PASSTHROUGH by SNI (a VirtualService `tls` route), AUTO_PASSTHROUGH (Istio's
`outbound_.<port>_.<subset>_.<host>` SNI), and a certificate rotated by re-applying the Secret, with no restart.

All on loopback: the real control plane (NATS, Redis, registry, translator, xds_gateway as processes), a router
Envoy from `mizzen bootstrap`'s builder, HTTP and TLS upstreams on 127.0.0.x."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mizzen.services.cli.http import RegistryError, apply_objects, request
from mizzen.services.mesh import procs
from mizzen.services.mesh.secrets import REDACTED
from mizzen.services.mesh.stack import Stack
from mizzen.services.sidecar.bootstrap import build_bootstrap, envoy_command, node_id
from tests.test_e2e_support import eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NS = "edge"


# ---- certificates ------------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca: tuple, cn: str, dns: list[str]) -> tuple[bytes, bytes, int]:
    """(cert PEM, key PEM, serial) signed by ca."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), cert.serial_number)


def pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tls_secret(name: str, cert: bytes, key: bytes, ca: bytes | None = None) -> dict:
    data = {"tls.crt": b64(cert), "tls.key": b64(key), **({"ca.crt": b64(ca)} if ca else {})}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "type": "kubernetes.io/tls", "data": data}


# ---- upstreams ---------------------------------------------------------------------------------------------
class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({"name": self.server.label, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):  # quiet
        pass


class Upstream:
    """An HTTP (or, with a certificate, HTTPS) server on a loopback address, in a thread of the test."""

    def __init__(self, label: str, host: str, tls: tuple[bytes, bytes] | None = None, work: Path | None = None):
        self.server = http.server.ThreadingHTTPServer((host, 0), _Echo)
        self.server.label = label
        self.host, self.port = host, self.server.server_address[1]
        if tls is not None:
            assert work is not None
            (work / f"{label}.crt").write_bytes(tls[0])
            (work / f"{label}.key").write_bytes(tls[1])
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(work / f"{label}.crt", work / f"{label}.key")
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def https_get(port: int, sni: str, ca: bytes, client: tuple[bytes, bytes] | None = None, work: Path | None = None,
              path: str = "/") -> tuple[int, dict, x509.Certificate]:
    """GET over TLS to 127.0.0.1:port with SNI; returns (status, JSON body, the server's leaf certificate)."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    if client is not None:
        assert work is not None
        (work / "client.crt").write_bytes(client[0])
        (work / "client.key").write_bytes(client[1])
        ctx.load_cert_chain(work / "client.crt", work / "client.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as s:
        leaf = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}"), leaf


# ---- the mesh ------------------------------------------------------------------------------------------------
class Rig:
    def __init__(self, work: Path):
        self.work = work
        self.stack = Stack(work / "stack")
        self.upstreams: list[Upstream] = []
        self.envoy: procs.Proc | None = None
        self.ca = make_ca("gateway-ca")
        self.client_ca = make_ca("client-ca")
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self.stack.start()
        self.web = Upstream("web", "127.0.0.51")
        self.tlsapp = Upstream("tlsapp", "127.0.0.52", issue(self.ca, "tlsapp", ["tlsapp.example.com"])[:2],
                               self.work)
        self.upstreams += [self.web, self.tlsapp]
        self.ports = {k: procs.free_port() for k in ("simple", "mutual", "pass", "auto")}
        cert, key, self.serial = issue(self.ca, "app", ["app.example.com"])
        self.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            service("web", "10.96.9.1", 80, self.web), service("tlsapp", "10.96.9.2", 443, self.tlsapp),
            endpoints("web", self.web, 80), endpoints("tlsapp", self.tlsapp, 443),
            tls_secret("simple-cred", cert, key),
            tls_secret("mutual-cred", cert, key, pem(self.client_ca[1])),
            gateway(self.ports), *virtual_services(),
        ])
        admin, agent, health, prom = (procs.free_port() for _ in range(4))
        self.admin = admin
        boot = build_bootstrap("ingress-1", NS, "127.0.0.50", xds=self.stack.xds_address, router=True,
                               labels={"istio": "ingress"}, access_log=str(self.work / "gw-access.log"),
                               admin_port=admin, agent_port=agent, health_port=health, prometheus_port=prom,
                               listen_address="127.0.0.1", zipkin=None)
        path = self.work / "gw.json"
        path.write_text(json.dumps(boot))
        self.envoy = procs.spawn("gateway-envoy", envoy_command(str(path), concurrency=1, drain_seconds=1),
                                 self.work)
        self.node = node_id("ingress-1", NS, "127.0.0.50", router=True)
        for port in self.ports.values():
            procs.wait_port("127.0.0.1", port, timeout=60, proc=self.envoy.popen)

    def apply(self, objects: list[dict]) -> dict:
        return apply_objects(self.stack.registry_url, objects)

    def secrets(self) -> dict[str, dict]:
        dump = json.loads(procs_http(self.admin, "/config_dump"))
        for c in dump["configs"]:
            if c["@type"].endswith("SecretsConfigDump"):
                return {s["name"]: s for s in c.get("dynamic_active_secrets", [])}
        return {}

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for u in self.upstreams:
            u.close()
        self.stack.stop()


def procs_http(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def service(name: str, ip: str, port: int, up: Upstream) -> dict:
    proto = "https" if port == 443 else "http"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"clusterIP": ip, "selector": {"app": name},
                     "ports": [{"name": proto, "port": port, "targetPort": up.port, "protocol": "TCP"}]}}


def endpoints(name: str, up: Upstream, port: int) -> dict:
    proto = "https" if port == 443 else "http"
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": NS},
            "subsets": [{"addresses": [{"ip": up.host}], "ports": [{"name": proto, "port": up.port}]}]}


def gateway(ports: dict[str, int]) -> dict:
    def server(key: str, proto: str, hosts: list[str], tls: dict) -> dict:
        return {"port": {"number": ports[key], "name": key, "protocol": proto}, "bind": "127.0.0.1",
                "hosts": hosts, "tls": tls}

    return {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "edge", "namespace": NS},
            "spec": {"selector": {"istio": "ingress"}, "servers": [
                server("simple", "HTTPS", ["app.example.com"], {"mode": "SIMPLE", "credentialName": "simple-cred"}),
                server("mutual", "HTTPS", ["app.example.com"], {"mode": "MUTUAL", "credentialName": "mutual-cred"}),
                server("pass", "TLS", ["tlsapp.example.com"], {"mode": "PASSTHROUGH"}),
                server("auto", "TLS", ["*.svc.cluster.local"], {"mode": "AUTO_PASSTHROUGH"}),
            ]}}


def virtual_services() -> list[dict]:
    web = f"web.{NS}.svc.cluster.local"
    tlsapp = f"tlsapp.{NS}.svc.cluster.local"
    return [
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "app", "namespace": NS},
         "spec": {"hosts": ["app.example.com"], "gateways": ["edge"],
                  "http": [{"route": [{"destination": {"host": web, "port": {"number": 80}}}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "pass", "namespace": NS},
         "spec": {"hosts": ["tlsapp.example.com"], "gateways": ["edge"],
                  "tls": [{"match": [{"sniHosts": ["tlsapp.example.com"]}],
                           "route": [{"destination": {"host": tlsapp, "port": {"number": 443}}}]}]}},
    ]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("gw-credentials"))
    try:
        yield r
    finally:
        r.close()


def test_simple_termination_serves_the_secret_certificate_and_routes_to_the_app(rig):
    status, body, leaf = eventually(lambda: https_get(rig.ports["simple"], "app.example.com", pem(rig.ca[1])),
                                    what="HTTPS through the gateway")
    assert status == 200 and body["name"] == "web"
    assert leaf.serial_number == rig.serial
    # Envoy got both credentials over ADS; its config dump redacts the private key
    secrets = rig.secrets()
    assert {"kubernetes://simple-cred", "kubernetes://mutual-cred", "kubernetes://mutual-cred-cacert"} <= set(secrets)
    assert "PRIVATE KEY" not in json.dumps(secrets)


def test_mutual_termination_needs_a_client_certificate_from_the_secrets_ca(rig):
    port, ca = rig.ports["mutual"], pem(rig.ca[1])
    client = issue(rig.client_ca, "client", ["client.example.com"])[:2]
    status, body, _ = eventually(lambda: https_get(port, "app.example.com", ca, client, rig.work),
                                 what="mTLS through the gateway")
    assert status == 200 and body["name"] == "web"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, "app.example.com", ca)  # no client certificate
    stranger = issue(make_ca("other-ca"), "stranger", ["x.example.com"])[:2]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(port, "app.example.com", ca, stranger, rig.work)


def test_passthrough_and_auto_passthrough_reach_the_tls_upstream_by_sni(rig):
    ca = pem(rig.ca[1])
    status, body, leaf = eventually(lambda: https_get(rig.ports["pass"], "tlsapp.example.com", ca),
                                    what="PASSTHROUGH by SNI")
    assert status == 200 and body["name"] == "tlsapp"
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tlsapp"  # the upstream's own cert
    sni = f"outbound_.443_._.tlsapp.{NS}.svc.cluster.local"
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.check_hostname = False  # the SNI is Istio's cluster name, not the certificate's host

    def auto() -> str:
        with socket.create_connection(("127.0.0.1", rig.ports["auto"]), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: tlsapp\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2])["name"]

    assert eventually(auto, what="AUTO_PASSTHROUGH by Istio's SNI") == "tlsapp"


def test_reapplying_the_secret_rotates_the_certificate_without_a_restart(rig):
    pid = rig.envoy.pid
    cert, key, serial = issue(rig.ca, "app", ["app.example.com"])
    rig.apply([tls_secret("simple-cred", cert, key)])
    eventually(lambda: https_get(rig.ports["simple"], "app.example.com", pem(rig.ca[1]))[2].serial_number == serial,
               what="the new certificate served")
    assert rig.envoy.pid == pid and rig.envoy.alive()


def test_secrets_are_validated_and_never_shown(rig, tmp_path):
    server = rig.stack.registry_url
    got = request("GET", f"{server}/api/v1/namespaces/{NS}/secrets/simple-cred")
    assert got["data"] == {"tls.crt": REDACTED, "tls.key": REDACTED}
    listed = request("GET", f"{server}/api/v1/namespaces/{NS}/secrets")
    assert {v for s in listed["items"] for v in s["data"].values()} == {REDACTED}
    out = subprocess.run([sys.executable, "-m", "mizzen", "get", "secrets", "-n", NS, "--server", server],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["NAME", "TYPE", "DATA", "AGE"]
    assert rows[1].split()[:3] == ["simple-cred", "kubernetes.io/tls", "2"]
    out = subprocess.run([sys.executable, "-m", "mizzen", "get", "secret", "mutual-cred", "-n", NS, "-o", "yaml",
                          "--server", server], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "BEGIN" not in out.stdout and "LS0t" not in out.stdout and REDACTED in out.stdout
    # a redacted object written back is refused (not base64), so real values are never overwritten by it
    with pytest.raises(RegistryError) as e:
        apply_objects(server, [got])
    assert "data[tls.crt]" in json.dumps(e.value.body) and "base64" in json.dumps(e.value.body)
    bad = tls_secret("broken", b"x", b"y")
    del bad["data"]["tls.key"]
    with pytest.raises(RegistryError) as e:
        apply_objects(server, [bad])
    assert "data[tls.key]" in json.dumps(e.value.body) and "Required value" in json.dumps(e.value.body)
    # no key material in any service's log
    logs = "".join(p.read_text(errors="replace") for p in rig.stack.log_dir.glob("*.log"))
    assert "PRIVATE KEY" not in logs and b64(b"-----BEGIN")[:12] not in logs



def test_proxy_config_secret_lists_the_gateway_credentials(rig):
    """`mizzen proxy-config secret --admin` on the live gateway: istioctl's rows for the credentials."""
    eventually(lambda: "kubernetes://mutual-cred-cacert" in rig.secrets(), what="credentials active")
    out = subprocess.run([sys.executable, "-m", "mizzen", "proxy-config", "secret", "--admin",
                          f"127.0.0.1:{rig.admin}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:] if line.strip()}
    assert out.stdout.splitlines()[0].split()[:3] == ["RESOURCE", "NAME", "TYPE"]
    for name in ("kubernetes://simple-cred", "kubernetes://mutual-cred"):
        assert rows[name][1:5] == ["Cert", "Chain", "ACTIVE", "true"], rows[name]
    assert rows["kubernetes://mutual-cred-cacert"][1:4] == ["CA", "ACTIVE", "true"]
    ca_serial = format(rig.client_ca[1].serial_number, "x")
    assert rows["kubernetes://mutual-cred-cacert"][4] == ca_serial
