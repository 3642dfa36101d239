"""The agent's SDS server and renewal against a real Envoy (no pods, no certauth: a small signer here).

One Envoy holds a server listener (mTLS: `default` + `ROOTCA` from SDS, client certificate required, the
peer's URI SAN echoed in a response header) and a client listener whose cluster talks ISTIO_MUTUAL-style TLS
to it, both secrets from the agent's SDS socket — once with SotW `StreamSecrets`, once with `DeltaSecrets`.
A loop of requests runs while the agent renews twice and while a second root is added; no request fails,
the serial Envoy holds (`/certs`) follows the agent's, and Envoy's SDS stream is never reopened.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mizzen.services.mesh import procs
from mizzen.services.sidecar import agent as agent_mod
from mizzen.services.sidecar import sds

IDENTITY = "spiffe://cluster.local/ns/default/sa/tester"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


class LocalSigner:
    """A tiny CA for this test only (the real one is certauth): signs the CSR's key for the CSR's URI SAN."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.ca: list[tuple[ec.EllipticCurvePrivateKey, x509.Certificate]] = [self._root("root-1")]
        self.signing = 0
        self.signed = 0

    @staticmethod
    def _root(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    @staticmethod
    def _pem(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    async def sign(self, csr_pem: str, validity_seconds: int | None) -> list[str]:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        key, root = self.ca[self.signing]
        now = datetime.datetime.now(datetime.UTC)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(seconds=5))
                .not_valid_after(now + datetime.timedelta(seconds=validity_seconds or self.ttl))
                .add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        self.signed += 1
        return [self._pem(leaf), self._pem(root)]

    async def roots(self) -> list[str]:
        return [self._pem(c) for _k, c in self.ca]


def _sds_ref(name: str) -> dict:
    return {"name": name, "sds_config": {"resource_api_version": "V3", "initial_fetch_timeout": "0s",
                                         "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                                               "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}}


def envoy_config(socket: Path, admin: int, server: int, client: int, delta: bool) -> dict:
    def sds_ref(name: str) -> dict:
        ref = _sds_ref(name)
        if delta:
            ref["sds_config"]["api_config_source"]["api_type"] = "DELTA_GRPC"
        return ref

    def hcm(route: dict, headers: list | None = None) -> dict:
        return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": "t", "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, **route}], "response_headers_to_add": headers or []}]}}}

    common = {"tls_certificate_sds_secret_configs": [sds_ref("default")],
              "combined_validation_context": {"default_validation_context": {},
                                              "validation_context_sds_secret_config": sds_ref("ROOTCA")}}
    upstream_common = json.loads(json.dumps(common))
    upstream_common["combined_validation_context"]["default_validation_context"] = {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": IDENTITY}}]}
    return {
        "node": {"id": "sidecar~127.0.0.1~tester.default~default.svc.cluster.local", "cluster": "tester.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "clusters": [
                {"name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
                 "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                     "explicit_http_config": {"http2_protocol_options": {}}}},
                 "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}]}},
                {"name": "upstream", "type": "STATIC", "connect_timeout": "2s",
                 "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": server}}}}]}]},
                 "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                     "@type": TLS + "UpstreamTlsContext", "sni": "outbound_.80_._.server.default.svc.cluster.local",
                     "common_tls_context": {**upstream_common, "alpn_protocols": ["istio-peer-exchange", "istio"]}}}},
            ],
            "listeners": [
                {"name": "server", "address": {"socket_address": {"address": "127.0.0.1", "port_value": server}},
                 "filter_chains": [{"filters": [hcm({"direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
                                                    [{"header": {"key": "x-peer",
                                                                 "value": "%DOWNSTREAM_PEER_URI_SAN%"}}])],
                                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                                        "@type": TLS + "DownstreamTlsContext", "require_client_certificate": True,
                                        "common_tls_context": common}}}]},
                {"name": "client", "address": {"socket_address": {"address": "127.0.0.1", "port_value": client}},
                 "filter_chains": [{"filters": [hcm({"route": {"cluster": "upstream"}})]}]},
            ],
        },
    }


class Loop:
    """An asyncio loop on a thread (the agent is async; the test drives it from outside)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def get(url: str, timeout: float = 3.0) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, dict(r.headers)


def envoy_serials(admin: int) -> tuple[set[str], int]:
    """The leaf serials and the number of distinct CA certificates Envoy holds (`/certs`)."""
    data = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/certs", timeout=3).read())
    leaves, cas = set(), set()
    for c in data.get("certificates", []):
        for leaf in c.get("cert_chain", []):
            leaves.add(leaf["serial_number"].lower().lstrip("0"))  # Envoy pads to even length; Python does not
        for ca in c.get("ca_cert", []):
            cas.add(ca["serial_number"])
    return leaves, len(cas)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_sds_renewal_and_roots_reach_envoy_without_reconnect(tmp_path: Path, delta: bool) -> None:
    loop = Loop()
    signer = LocalSigner(ttl=6.0)
    core = agent_mod.AgentCore(signer, IDENTITY, grace_ratio=0.5, jitter=0.05, root_poll_seconds=0.5)
    stop = asyncio.Event()
    sock = tmp_path / "sds.sock"
    server = servicer = envoy = task = None
    try:
        async def setup():
            srv, svc = await sds.serve(core.store, sock)
            await core.start(stop)
            return srv, svc, asyncio.ensure_future(core.run(stop))

        server, servicer, task = loop.run(setup())
        admin, sport, cport = procs.free_port(), procs.free_port(), procs.free_port()
        cfg = tmp_path / "envoy.json"
        cfg.write_text(json.dumps(envoy_config(sock, admin, sport, cport, delta)))
        envoy = procs.spawn("envoy", [procs.envoy_binary(), "-c", str(cfg), "--disable-hot-restart",
                                      "--concurrency", "1", "-l", "warning"], tmp_path)

        def up() -> bool:
            try:
                return get(f"http://127.0.0.1:{cport}/")[0] == 200
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while not up():
            assert envoy.alive(), envoy.log_text()[-2000:]
            assert time.monotonic() < deadline, "Envoy never served through its mTLS cluster"
            time.sleep(0.1)
        status, headers = get(f"http://127.0.0.1:{cport}/")
        assert status == 200 and headers["x-peer"] == IDENTITY
        served = envoy_serials(admin)[0]  # serials Envoy held right after a request it answered (see below)
        loop.run(servicer.wait_acked("default", "ROOTCA"))
        streams_before = servicer.streams
        first = format(core.cert.serial, "x")
        assert first in envoy_serials(admin)[0]
        # `mizzen proxy-config secret --admin` reads the same from Envoy's config dump (istioctl's table)
        out = subprocess.run([sys.executable, "-m", "mizzen", "proxy-config", "secret", "--admin",
                              f"127.0.0.1:{admin}"], capture_output=True, text=True, timeout=60, check=True).stdout
        lines = out.splitlines()
        assert lines[0].split() == ["RESOURCE", "NAME", "TYPE", "STATUS", "VALID", "CERT", "SERIAL", "NUMBER",
                                    "NOT", "AFTER", "NOT", "BEFORE"]
        rows = {ln.split()[0]: ln for ln in lines[1:]}
        assert rows["default"].split()[1:6] == ["Cert", "Chain", "ACTIVE", "true", first], out
        assert rows["ROOTCA"].split()[1:4] == ["CA", "ACTIVE", "true"], out

        # two renewals (6 s certificates renew at ~3 s) and a second root, under a request loop; `served` holds
        # the serials Envoy held right after a request it answered, so traffic is shown to pass under each one
        # (the first one's request is above: under load its renewal can come before this loop starts)
        failures, seen = [], {first}
        deadline = time.monotonic() + 40
        added = False
        while time.monotonic() < deadline:
            ok = False
            try:
                status, headers = get(f"http://127.0.0.1:{cport}/")
                ok = status == 200 and headers.get("x-peer") == IDENTITY
                if not ok:
                    failures.append((status, headers.get("x-peer")))
            except OSError as e:
                failures.append(repr(e))
            leaves, roots = envoy_serials(admin)
            seen |= leaves
            if ok:
                served |= leaves
            if core.renewals >= 1 and not added:
                signer.ca.append(signer._root("root-2"))  # phase 1 of a root rotation: trust both
                added = True
            if core.renewals >= 2 and roots == 2 and format(core.cert.serial, "x") in served:
                break
            time.sleep(0.05)
        assert not failures, failures[:5]
        assert core.renewals >= 2, f"only {core.renewals} renewals"
        assert len(seen) >= 3, f"Envoy held serials {seen}"
        assert len(served) >= 3, f"requests answered under serials {served} of {seen}"
        assert envoy_serials(admin)[1] == 2, "Envoy does not trust both roots"
        assert servicer.streams == streams_before, "Envoy's SDS stream was reopened"
        assert not [e for e in servicer.events if e.kind == "NACK"]
    finally:
        if envoy is not None:
            envoy.stop()
        stop_ev = stop

        async def teardown():
            stop_ev.set()
            if task is not None:
                await asyncio.wait_for(task, 5)
            if server is not None:
                await server.stop(0)

        try:
            loop.run(teardown())
        finally:
            loop.close()


def test_key_and_csr_carry_only_the_identity() -> None:
    key_pem, csr_pem = agent_mod.key_and_csr(IDENTITY)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and [str(u) for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)] == [IDENTITY]
    assert len(list(san.value)) == 1 and list(csr.subject) == []
    assert b"PRIVATE KEY" in key_pem and key_pem.decode() not in csr_pem


def test_agent_refuses_bad_flags_clearly(tmp_path: Path) -> None:
    def agent(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mizzen", "agent", "--pod", "p", "-n", "ns", "--ip", "10.0.0.1",
                               *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    res = agent("--token", "t", "--ca-root-cert", str(tmp_path / "missing.pem"))
    assert res.returncode == 2 and "missing.pem" in res.stderr and "mizzen ca root" in res.stderr, res.stderr
    (tmp_path / "empty.pem").write_text("nothing here\n")
    res = agent("--token", "t", "--ca-root-cert", str(tmp_path / "empty.pem"))
    assert res.returncode == 2 and "holds no PEM certificate" in res.stderr, res.stderr
    root = LocalSigner(60)._pem(LocalSigner(60).ca[0][1])
    (tmp_path / "root.pem").write_text(root)
    env_token = {k: v for k, v in os.environ.items() if k != "MIZZEN_TOKEN"}
    res = subprocess.run([sys.executable, "-m", "mizzen", "agent", "--pod", "p", "-n", "ns", "--ip", "10.0.0.1",
                          "--ca-root-cert", str(tmp_path / "root.pem")], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env_token)
    assert res.returncode == 2 and "a token is needed" in res.stderr, res.stderr
    res = agent("--token", "t", "--ca-root-cert", str(tmp_path / "root.pem"), "--ip", "not-an-ip")
    assert res.returncode == 2 and "not-an-ip" in res.stderr, res.stderr
