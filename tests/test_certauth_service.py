"""certauth as real processes, called over real gRPC/TLS: every refusal, key files and logs, restarts,
replicas, root rotation followed without a restart, the plug-in CA, and the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from mizzen.services.certauth import ca, client, csr, tokens
from mizzen.services.certauth.client import CertAuthClient, CertAuthError
from tests.certauth_support import certauth
from tests.test_certauth_ca import _csr_with_sans, verify_chain, write_plugin

ID = "spiffe://cluster.local/ns/default/sa/web"


def certs(chain: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in chain]


def roots_of(pem_text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem_text.encode())


async def refused(address: str, roots: str, *, csr_pem: str, token: str, validity: int | None = None) -> CertAuthError:
    async with CertAuthClient(address, root_certs_pem=roots) as c:
        with pytest.raises(CertAuthError) as e:
            await c.create_certificate(csr_pem=csr_pem, token=token, validity_seconds=validity)
    return e.value


async def test_every_refusal_and_a_good_certificate(tmp_path):
    data = tmp_path / "data"
    with certauth(data, tmp_path / "logs", "--max-workload-cert-ttl", "48h") as ca_proc:
        roots = ca_proc.trust_bundle
        addr = ca_proc.address
        good_token = tokens.issue(data, "default", "web", 600)
        k = csr.new_key_and_csr(ID)
        used_tokens = [good_token]

        # --- a good request: the certificate field by field, the chain up to the served root ---
        chain = await client.create_certificate(addr, csr_pem=k.csr_pem, token=good_token, root_certs_pem=roots,
                                                validity_seconds=3600)
        leaf, root = certs(chain)
        verify_chain(chain, roots_of(roots))
        assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == \
            [x509.UniformResourceIdentifier(ID)]
        assert leaf.subject == x509.Name([])
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert abs((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() - 3720) < 5
        # default TTL 24 h when none is asked for
        leaf24 = certs(await client.create_certificate(addr, csr_pem=k.csr_pem, token=good_token,
                                                       root_certs_pem=roots))[0]
        assert abs((leaf24.not_valid_after_utc - leaf24.not_valid_before_utc).total_seconds() - 86520) < 5
        assert await client.trust_bundle(addr, root_certs_pem=roots) == [ca.pem(r) for r in roots_of(roots)]
        # responses carry certificates and public keys only
        bundle = await client.get_bundle(addr, root_certs_pem=roots)
        assert bundle.trust_domain == "cluster.local" and len(bundle.token_public_keys) == 1
        assert tokens.parse_public_keys(bundle.token_public_keys[0])[0].public_bytes_raw() == \
            tokens.load_public_keys(data)[0].public_bytes_raw()
        for text in [*chain, *bundle.roots, *bundle.token_public_keys]:
            assert "PRIVATE" not in text

        # --- UNAUTHENTICATED: no / garbage / tampered / expired / wrong-audience / foreign-key tokens ---
        async with CertAuthClient(addr, root_certs_pem=roots) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:  # no authorization metadata at all
                await c._create(csr_pem_request(k.csr_pem))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        h, p, s = good_token.split(".")
        claims = tokens.orjson.loads(tokens._unb64(p))
        tampered = f"{h}.{tokens._b64(tokens.orjson.dumps({**claims, 'exp': claims['exp'] + 10**6}))}.{s}"
        other_dir = tmp_path / "other"
        bad_tokens = {
            "empty": "",
            "garbage": "not-a-token",
            "tampered": tampered,
            "expired": tokens.issue(data, "default", "web", 10, now=time.time() - 3600),
            "wrong audience": tokens.issue(data, "default", "web", 600, audience="someone-else"),
            "foreign key": tokens.issue(other_dir, "default", "web", 600),
        }
        used_tokens += list(bad_tokens.values())
        for what, tok in bad_tokens.items():
            err = await refused(addr, roots, csr_pem=k.csr_pem, token=tok)
            assert err.code == "UNAUTHENTICATED", (what, err)

        # --- PERMISSION_DENIED: another identity, extra SANs ---
        import ipaddress
        for names in ([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/web")],
                      [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/admin")],
                      [x509.UniformResourceIdentifier(ID), x509.DNSName("web.default.svc.cluster.local")],
                      [x509.UniformResourceIdentifier(ID), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                      [x509.UniformResourceIdentifier(ID), x509.UniformResourceIdentifier("spiffe://x/ns/a/sa/b")]):
            err = await refused(addr, roots, csr_pem=_csr_with_sans(names), token=good_token)
            assert err.code == "PERMISSION_DENIED", (names, err)
            assert "not the caller's identity" in err.message

        # --- INVALID_ARGUMENT with the reason: bad CSR, broken signature, TTL over the max ---
        err = await refused(addr, roots, csr_pem="garbage", token=good_token)
        assert err.code == "INVALID_ARGUMENT" and "csr" in err.message
        err = await refused(addr, roots, token=good_token, csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n"
                            "-----END CERTIFICATE REQUEST-----\n")
        assert err.code == "INVALID_ARGUMENT" and "does not parse" in err.message
        err = await refused(addr, roots, csr_pem=broken_signature(k.csr_pem), token=good_token)
        assert err.code == "INVALID_ARGUMENT" and "signature is invalid" in err.message
        err = await refused(addr, roots, csr_pem=k.csr_pem, token=good_token, validity=48 * 3600 + 1)
        assert err.code == "INVALID_ARGUMENT" and "max allowed TTL" in err.message

        # --- TLS: a client that does not trust the CA cannot talk to it ---
        stranger = ca.pem(ca.make_root(ec.generate_private_key(ec.SECP256R1()), "cluster.local", "stranger"))
        err = await refused(addr, stranger, csr_pem=k.csr_pem, token=good_token)
        assert err.code == "UNAVAILABLE"

        metrics = ca_proc.metrics()
        assert 'certauth_csr_requests_total{result="signed"} 2.0' in metrics
        assert 'certauth_csr_requests_total{result="unauthenticated"} 7.0' in metrics
        assert 'certauth_csr_requests_total{result="permission_denied"} 5.0' in metrics
        assert 'certauth_csr_requests_total{result="invalid_argument"} 4.0' in metrics
        await client.close_all()
        assert ca_proc.stop() == 0  # graceful SIGTERM

    # key files 0600, and no secret in the log: no line of any private key PEM body, no token
    cadir = data / "ca"
    keys = [cadir / "token-key.pem", *sorted(cadir.glob("roots/*/key.pem"))]
    assert len(keys) == 2
    log = (tmp_path / "logs" / "certauth.log").read_text()
    assert "CSR refused" in log and "PERMISSION_DENIED" in log
    for key in keys:
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
        body = "".join(key.read_text().splitlines()[1:-1])
        for chunk in re.findall(".{16}", body):
            assert chunk not in log, f"{key.name} material in the log"
        raw = serialization.load_pem_private_key(key.read_bytes(), None)
        if isinstance(raw, ec.EllipticCurvePrivateKey):
            assert format(raw.private_numbers().private_value, "x") not in log
    for tok in used_tokens:
        for part in tok.split(".")[1:]:
            if len(part) > 16:
                assert part not in log, "token in the log"


def csr_pem_request(csr_pem: str):
    from mizzen.services.mesh.proto_gen.istio.v1.auth import ca_pb2

    return ca_pb2.IstioCertificateRequest(csr=csr_pem)


def broken_signature(csr_pem: str) -> str:
    """The same CSR with one bit of its signature flipped (still well-formed DER)."""
    import base64

    good = x509.load_pem_x509_csr(csr_pem.encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    sig = good.signature
    at = bytes(der).rfind(sig)
    der[at + len(sig) // 2] ^= 0x01
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


async def test_restart_keeps_the_root_and_honours_earlier_tokens(tmp_path):
    data = tmp_path / "data"
    with certauth(data, tmp_path / "logs") as ca_proc:
        roots = ca_proc.trust_bundle
        token = tokens.issue(data, "shop", "cart", 3600)
        first = certs(await client.create_certificate(ca_proc.address, csr_pem=csr.new_key_and_csr(
            "spiffe://cluster.local/ns/shop/sa/cart").csr_pem, token=token, root_certs_pem=roots))
        await client.close_all()
        assert ca_proc.stop() == 0
        ca_proc.start()  # same data dir, same port
        assert ca_proc.trust_bundle == roots
        again = certs(await client.create_certificate(ca_proc.address, csr_pem=csr.new_key_and_csr(
            "spiffe://cluster.local/ns/shop/sa/cart").csr_pem, token=token, root_certs_pem=roots))
        assert again[-1] == first[-1]
        verify_chain([ca.pem(c) for c in again], roots_of(roots))
        await client.close_all()


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mizzen", *args], capture_output=True, text=True, timeout=60,
                          input=stdin)


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def test_replicas_share_the_ca_and_follow_rotation_without_restart(tmp_path):
    data = tmp_path / "data"
    logs = tmp_path / "logs"
    with certauth(data, logs, "--reload-interval", "0.3", name="certauth-a") as a, \
            certauth(data, logs, "--reload-interval", "0.3", name="certauth-b") as b:
        pids = (a.proc.pid, b.proc.pid)
        old_root = a.trust_bundle
        token = tokens.issue(data, "default", "web", 3600)

        async def sign(replica, roots: str) -> list[x509.Certificate]:
            return certs(await client.create_certificate(replica.address, csr_pem=csr.new_key_and_csr(ID).csr_pem,
                                                         token=token, root_certs_pem=roots))

        # both replicas sign, and their chains end at the one root
        ca_, cb = await sign(a, old_root), await sign(b, old_root)
        assert ca_[-1] == cb[-1] == roots_of(old_root)[0]

        # phase 1: add. Both roots in the bundle (served by both replicas), the old root still signs
        r = cli("ca", "rotate", "add", "--data-dir", str(data))
        assert r.returncode == 0, r.stderr
        for replica in (a, b):
            await wait_for(lambda rep=replica: _bundle_len(rep, old_root, 2), what="two roots")
        both = "".join(await client.trust_bundle(a.address, root_certs_pem=old_root))
        assert roots_of(both)[0] == roots_of(old_root)[0]
        new_root = roots_of(both)[1]
        for replica in (a, b):
            chain = await sign(replica, old_root)
            assert chain[-1] == roots_of(old_root)[0]
            verify_chain([ca.pem(c) for c in chain], roots_of(both))

        # phase 2: activate. New leaves chain to the new root; replicas' own TLS certificates follow
        r = cli("ca", "rotate", "activate", "--data-dir", str(data))
        assert r.returncode == 0, r.stderr

        async def signs_with_new(rep) -> bool:
            return (await sign(rep, both))[-1] == new_root

        for replica in (a, b):
            await wait_for(lambda rep=replica: signs_with_new(rep), what="leaf from the new root")
            verify_chain([ca.pem(c) for c in await sign(replica, both)], [new_root])

        # phase 3: retire. Only the new root is trusted; a client that trusts only it gets served
        r = cli("ca", "rotate", "retire", "--data-dir", str(data))
        assert r.returncode == 0, r.stderr
        only_new = ca.pem(new_root)
        for replica in (a, b):
            await wait_for(lambda rep=replica: _bundle_len(rep, only_new, 1), what="the old root retired")
            assert await client.trust_bundle(replica.address, root_certs_pem=only_new) == [only_new]
            verify_chain([ca.pem(c) for c in await sign(replica, only_new)], [new_root])
        assert (data / "ca" / "trust-bundle.pem").read_text() == only_new
        assert (a.proc.pid, b.proc.pid) == pids  # nothing restarted
        await client.close_all()


async def _bundle_len(replica, roots: str, n: int) -> bool:
    try:
        # a fresh connection each time: the check is about what the replica serves now
        async with CertAuthClient(replica.address, root_certs_pem=roots) as c:
            return len(await c.trust_bundle(timeout=5)) == n
    except CertAuthError:
        return False


async def test_plugin_ca_with_an_intermediate_and_a_root_change(tmp_path):
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = ca.make_root(root_key, "cluster.local", "operator root")
    plugin = tmp_path / "cacerts"
    inter = write_plugin(plugin, root_key, root)
    with certauth(tmp_path / "data", tmp_path / "logs", "--plugin-ca-dir", str(plugin),
                  "--reload-interval", "0.3") as p:
        roots = ca.pem(root)
        token = tokens.issue(tmp_path / "data", "default", "web", 600)
        chain = await client.create_certificate(p.address, csr_pem=csr.new_key_and_csr(ID).csr_pem, token=token,
                                                root_certs_pem=roots)
        assert certs(chain)[1:] == [inter, root]
        verify_chain(chain, [root])
        # the operator adds a second trusted root to root-cert.pem: served without a restart
        extra = ca.make_root(ec.generate_private_key(ec.SECP256R1()), "cluster.local", "next root")
        (plugin / "root-cert.pem").write_text(ca.pem(root) + ca.pem(extra))

        async def two() -> bool:
            async with CertAuthClient(p.address, root_certs_pem=roots) as c:
                return len(await c.trust_bundle()) == 2

        await wait_for(two, what="the plug-in root bundle reloaded")
        assert not (tmp_path / "data" / "ca" / "roots").exists()  # plug-in mode makes no root of its own
        await client.close_all()


async def test_cli_sign_and_root_against_a_running_ca(tmp_path):
    data = tmp_path / "data"
    with certauth(data, tmp_path / "logs") as p:
        k = csr.new_key_and_csr(ID)
        (tmp_path / "w.csr").write_text(k.csr_pem)
        tok = cli("token", "--data-dir", str(data), "--namespace", "default", "--service-account", "web").stdout.strip()
        r = cli("ca", "sign", "--data-dir", str(data), "--ca", p.address, "--csr", str(tmp_path / "w.csr"),
                "--token", tok, "--ttl", "2h")
        assert r.returncode == 0, r.stderr
        chain = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", r.stdout, re.S)
        assert len(chain) == 2
        verify_chain(chain, roots_of(p.trust_bundle))
        leaf = certs(chain)[0]
        assert abs((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() - 7320) < 5
        r = cli("ca", "sign", "--data-dir", str(data), "--ca", p.address, "--csr", str(tmp_path / "w.csr"),
                "--token", tok + "x")
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
        r = cli("ca", "root", "--data-dir", str(data), "--ca", p.address)
        assert r.returncode == 0 and r.stdout == p.trust_bundle
        r = cli("ca", "root", "--data-dir", str(data))
        assert r.returncode == 0 and r.stdout == p.trust_bundle
    r = cli("ca", "root", "--data-dir", str(tmp_path / "empty"))
    assert r.returncode == 1 and "no CA in" in r.stderr
    shutil.rmtree(tmp_path / "empty", ignore_errors=True)


async def test_the_stack_runs_certauth(tmp_path):
    """services/mesh/stack.py (what `mizzen up` and the tests start) runs certauth beside the control plane."""
    from mizzen.services.mesh.stack import Stack

    stack = Stack(tmp_path / "stack", ca_data_dir=tmp_path / "data")
    try:
        stack.start(services=("certauth",))
        roots = stack.trust_bundle_path.read_text()
        assert stack.trust_bundle_path == tmp_path / "data" / "ca" / "trust-bundle.pem"
        token = tokens.issue(stack.ca_dir, "default", "web", 600)
        chain = await client.create_certificate(stack.ca_address, csr_pem=csr.new_key_and_csr(ID).csr_pem,
                                                token=token, root_certs_pem=roots)
        verify_chain(chain, roots_of(roots))
        r = cli("ca", "root", "--data-dir", str(stack.ca_dir), "--ca", stack.ca_address)
        assert r.returncode == 0 and r.stdout == roots
        await client.close_all()
    finally:
        stack.stop()


async def test_client_switching_roots_lets_calls_in_flight_finish(tmp_path):
    """An agent that learns a new bundle (root rotation) opens a new channel; calls still running on the old
    one (another coroutine of the same agent) complete instead of being cancelled."""
    data = tmp_path / "data"
    with certauth(data, tmp_path / "logs") as p:
        roots = p.trust_bundle
        token = tokens.issue(data, "default", "web", 600)
        pending = [asyncio.ensure_future(client.create_certificate(
            p.address, csr_pem=csr.new_key_and_csr(ID).csr_pem, token=token, root_certs_pem=roots))
            for _ in range(20)]
        await asyncio.sleep(0)  # the calls are started on the cached channel
        extra = ca.pem(ca.make_root(ec.generate_private_key(ec.SECP256R1()), "cluster.local", "next"))
        assert await client.trust_bundle(p.address, root_certs_pem=roots + extra) == [roots]
        chains = await asyncio.gather(*pending)
        assert all(len(c) == 2 for c in chains)
        await client.close_all()
