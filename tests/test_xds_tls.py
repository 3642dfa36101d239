"""xDS over TLS: the gateway's TLS port serves a certificate certauth issued (checked by Envoy against the
mesh roots and the gateway's SPIFFE id) and wants a workload token on the ADS stream.

Real parts: NATS, Redis, registry, translator, xds_gateway (with `--tls-port`), certauth; real Envoys on the
host (loopback only) built by `build_bootstrap(xds_root_from_sds=True, xds_token=…)` — the bootstrap the agent
writes — with tests/sds_fixture.py serving their `ROOTCA` (certauth's trust bundle) and a client certificate.
The agent-run sidecars of test_e2e_mtls.py use the same port for all their xDS.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from mizzen.services.mesh import procs
from mizzen.services.sidecar.agent import DEFAULT_XDS_SAN
from mizzen.services.sidecar.bootstrap import build_bootstrap
from tests.sds_fixture import FixtureCA, SdsServer, make_ca
from tests.stack import Stack
from tests.test_e2e_support import eventually, mizzen


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("xds-tls"))
    s.xds_tls_port = procs.free_port()
    try:
        s.start_infra()
        s.start_service("certauth")
        s.start(("registry", "translator", "xds-gateway"))
        yield s
    finally:
        s.stop()


def _envoy(stack: Stack, work: Path, pod: str, token: str, sans: list[str]) -> tuple[procs.Proc, SdsServer, int]:
    fixture = make_ca()
    roots = stack.trust_bundle_path.read_bytes()
    sds = SdsServer([work / f"{pod}.sds"], ca=FixtureCA(roots, fixture.cert_pem, fixture.key_pem, fixture.spiffe_id))
    sds.start()
    admin = procs.free_port()
    boot = build_bootstrap(pod, "default", "127.0.0.1", xds=stack.xds_tls_address, access_log=None, zipkin=None,
                           admin_port=admin, agent_port=procs.free_port(), health_port=procs.free_port(),
                           prometheus_port=procs.free_port(), sds_path=str(work / f"{pod}.sds"),
                           xds_root_from_sds=True, xds_token=token, xds_sans=sans, listen_address="127.0.0.1")
    cfg = work / f"{pod}.json"
    cfg.write_text(json.dumps(boot))
    p = procs.spawn(pod, [procs.envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                          "-l", "info", "--base-id", str(procs.free_port())], work)
    return p, sds, admin


def _proxies(stack: Stack) -> set[str]:
    out = mizzen("proxy-status", "--server", stack.registry_url).stdout
    return {line.split()[0] for line in out.splitlines()[1:] if line.strip()}


def _metric(stack: Stack, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.http_ports['xds-gateway']}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    return 0.0


def test_xds_over_tls_with_a_token(stack: Stack, tmp_path: Path) -> None:
    token = mizzen("token", "--data-dir", str(stack.ca_dir), "-n", "default", "--sa", "probe").stdout.strip()
    envoy, sds, admin = _envoy(stack, tmp_path, "tls-good", token, [DEFAULT_XDS_SAN])
    try:
        eventually(lambda: "tls-good.default" in _proxies(stack), 60, 0.5, what="Envoy connected over TLS")
        # Envoy got its config over the TLS connection: the xds-grpc cluster's TLS handshakes succeeded
        stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=xds-grpc.*ssl", timeout=5).read()
        assert b"cluster.xds-grpc.ssl.handshake: " in stats and b"cluster.xds-grpc.ssl.handshake: 0" not in stats
        # the gateway's certificate is certauth's: Envoy checked it against ROOTCA and the gateway's SPIFFE id
        certs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/certs", timeout=5).read())
        assert certs["certificates"], certs
    finally:
        envoy.stop()
        sds.stop()


def test_xds_over_tls_refuses_bad_tokens_and_wrong_identities(stack: Stack, tmp_path: Path) -> None:
    before = _metric(stack, "mizzen_xds_unauthenticated")
    bad, sds1, _ = _envoy(stack, tmp_path, "tls-bad-token", "not.a.token", [DEFAULT_XDS_SAN])
    token = mizzen("token", "--data-dir", str(stack.ca_dir), "-n", "default", "--sa", "probe").stdout.strip()
    wrong, sds2, admin2 = _envoy(stack, tmp_path, "tls-wrong-san", token,
                                 ["spiffe://cluster.local/ns/istio-system/sa/someone-else"])
    try:
        eventually(lambda: _metric(stack, "mizzen_xds_unauthenticated") > before, 60, 0.5,
                   what="the gateway refusing the bad token")
        eventually(lambda: "UNAUTHENTICATED" in bad.log_text() or " 16," in bad.log_text(), 30, 0.5,
                   what="Envoy seeing UNAUTHENTICATED")

        def san_refused() -> bool:
            stats = urllib.request.urlopen(f"http://127.0.0.1:{admin2}/stats?filter=xds-grpc.*ssl", timeout=5)
            return b"ssl.fail_verify_san: " in (s := stats.read()) and b"ssl.fail_verify_san: 0" not in s

        eventually(san_refused, 60, 0.5, what="Envoy refusing a gateway certificate with another identity")
        time.sleep(1)
        proxies = _proxies(stack)
        assert "tls-bad-token.default" not in proxies and "tls-wrong-san.default" not in proxies
    finally:
        for p in (bad, wrong):
            p.stop()
        sds1.stop()
        sds2.stop()
