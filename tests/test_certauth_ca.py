"""certauth's pure core: the workload certificate template field by field, CSR checks, TTL rules, the
self-signed store (0600 keys, kept on reload, rotation phases), the plug-in CA, and tokens."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mizzen.services.certauth import ca, csr, tokens

ID = "spiffe://cluster.local/ns/default/sa/web"


def chain_certs(chain: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in chain]


def verify_chain(chain: list[str], roots: list[x509.Certificate]) -> None:
    """Each cert is signed by the next; the last is one of `roots`."""
    certs = chain_certs(chain)
    for child, parent in zip(certs, certs[1:], strict=False):
        child.verify_directly_issued_by(parent)
    assert certs[-1] in roots


@pytest.fixture
def store(tmp_path):
    ca.ensure_self_signed(tmp_path)
    return tmp_path


def test_workload_certificate_fields(store):
    a = ca.load_self_signed(store)
    k = csr.new_key_and_csr(ID)
    before = ca.utcnow()
    chain = a.sign_csr(k.csr_pem, ID, 3600)
    assert len(chain) == 2  # self-signed: leaf, root
    leaf, root = chain_certs(chain)
    assert root == a.signing_root and root.issuer == root.subject
    verify_chain(chain, [root])
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ID)]  # the SPIFFE URI and nothing else
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.content_commitment
                or ku.value.data_encipherment or ku.value.key_agreement)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False
    # validity: now - 2 min .. now + ttl
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert abs((nb - (before - dt.timedelta(minutes=2))).total_seconds()) < 5
    assert abs((na - nb).total_seconds() - (3600 + 120)) < 5
    # the key is the CSR's
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(k.key_pem.encode(), None)
    assert (leaf.public_key().public_bytes(serialization.Encoding.DER, pub)
            == key.public_key().public_bytes(serialization.Encoding.DER, pub))
    assert 0 < leaf.serial_number < 2**128
    # default TTL (24 h) when none is asked for
    leaf2 = chain_certs(a.sign_csr(k.csr_pem, ID, None))[0]
    assert abs((leaf2.not_valid_after_utc - leaf2.not_valid_before_utc).total_seconds() - (86400 + 120)) < 5
    assert leaf2.serial_number != leaf.serial_number


def test_ttl_over_the_max_is_refused_as_istio_does(store):
    a = ca.load_self_signed(store, default_ttl=3600, max_ttl=7200)
    k = csr.new_key_and_csr(ID)
    with pytest.raises(ca.InvalidRequest, match="greater than the max allowed TTL 7200s"):
        a.sign_csr(k.csr_pem, ID, 7201)
    leaf = chain_certs(a.sign_csr(k.csr_pem, ID, 7200))[0]
    assert abs((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() - 7320) < 5


def test_not_after_clamped_to_the_signer(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    root = ca.make_root(key, "cluster.local", "short", ttl=dt.timedelta(hours=1))
    a = ca.Authority("cluster.local", root, key, [], [root])
    leaf = chain_certs(a.sign_csr(csr.new_key_and_csr(ID).csr_pem, ID, 86400))[0]
    assert leaf.not_valid_after_utc == root.not_valid_after_utc


def _csr_with_sans(names: list[x509.GeneralName], key=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("names", [
    [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/other/sa/web")],
    [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/admin")],
    [x509.UniformResourceIdentifier("spiffe://evil.example/ns/default/sa/web")],
    [x509.UniformResourceIdentifier(ID), x509.DNSName("web.default.svc")],
    [x509.UniformResourceIdentifier(ID), x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y")],
    [x509.UniformResourceIdentifier(ID), x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))],
    [x509.DNSName("web")],
])
def test_other_identity_or_extra_san_is_forbidden(store, names):
    a = ca.load_self_signed(store)
    with pytest.raises(ca.Forbidden):
        a.sign_csr(_csr_with_sans(names), ID)


def test_csr_without_san_gets_the_callers_identity(store):
    a = ca.load_self_signed(store)
    leaf = chain_certs(a.sign_csr(_csr_with_sans([]), ID))[0]
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == \
        [x509.UniformResourceIdentifier(ID)]


def test_bad_csrs_are_invalid_with_a_reason(store):
    a = ca.load_self_signed(store)
    with pytest.raises(ca.InvalidRequest, match="empty"):
        a.sign_csr("", ID)
    with pytest.raises(ca.InvalidRequest, match="no PEM 'CERTIFICATE REQUEST' block"):
        a.sign_csr("hello", ID)
    with pytest.raises(ca.InvalidRequest, match="does not parse"):
        a.sign_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", ID)
    # broken signature: flip a byte inside the signature of a valid CSR
    good = x509.load_pem_x509_csr(csr.new_key_and_csr(ID).csr_pem.encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    import base64
    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(ca.InvalidRequest, match="signature"):
        a.sign_csr(tampered, ID)
    # weak RSA key
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ca.InvalidRequest, match="1024 bits"):
        a.sign_csr(_csr_with_sans([], weak), ID)


def test_store_keys_are_0600_and_kept(store):
    d = ca.ca_dir(store)
    for key in (d / "roots" / "root-1" / "key.pem",):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    tokens.ensure_key(store)
    assert stat.S_IMODE(os.stat(d / "token-key.pem").st_mode) == 0o600
    first = ca.load_self_signed(store).signing_root
    ca.ensure_self_signed(store)  # a restart: same root
    assert ca.load_self_signed(store).signing_root == first
    with pytest.raises(ca.CAError, match="trust domain"):
        ca.ensure_self_signed(store, trust_domain="other.example")


def test_rotation_phases(store):
    old = ca.load_self_signed(store).signing_root
    new_id = ca.rotate_add(store)
    a = ca.load_self_signed(store)
    assert a.signing_root == old and len(a.trusted_roots) == 2  # overlap: both trusted, old still signs
    bundle = x509.load_pem_x509_certificates((ca.ca_dir(store) / "trust-bundle.pem").read_bytes())
    assert bundle == a.trusted_roots
    verify_chain(a.sign_csr(csr.new_key_and_csr(ID).csr_pem, ID), [old])
    with pytest.raises(ca.CAError, match="still signs"):
        ca.rotate_retire(store, "root-1")
    assert ca.rotate_activate(store) == new_id
    a = ca.load_self_signed(store)
    new = a.signing_root
    assert new != old and a.trusted_roots == [new, old]
    verify_chain(a.sign_csr(csr.new_key_and_csr(ID).csr_pem, ID), [new])
    assert ca.rotate_retire(store) == ["root-1"]
    a = ca.load_self_signed(store)
    assert a.trusted_roots == [new]
    assert x509.load_pem_x509_certificates((ca.ca_dir(store) / "trust-bundle.pem").read_bytes()) == [new]
    with pytest.raises(ca.CAError, match="not trusted"):
        ca.rotate_activate(store, "root-1")


def _intermediate(root_key, root, name="Mizzen intermediate"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca.utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(root.subject).public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(root_key, hashes.SHA256()))
    return key, cert


def write_plugin(d, root_key, root, extra_roots=()):
    key, inter = _intermediate(root_key, root)
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca-cert.pem").write_text(ca.pem(inter))
    ca.write_private(d / "ca-key.pem", ca.key_pem(key))
    (d / "cert-chain.pem").write_text(ca.pem(inter) + ca.pem(root))
    (d / "root-cert.pem").write_text(ca.pem(root) + "".join(ca.pem(r) for r in extra_roots))
    return inter


def test_plugin_ca_chain_with_an_intermediate(tmp_path):
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = ca.make_root(root_key, "cluster.local", "operator root")
    inter = write_plugin(tmp_path / "cacerts", root_key, root)
    a = ca.load_plugin(tmp_path / "cacerts")
    chain = a.sign_csr(csr.new_key_and_csr(ID).csr_pem, ID)
    assert len(chain) == 3
    assert chain_certs(chain)[1:] == [inter, root]  # leaf, intermediate, root last
    verify_chain(chain, [root])
    # broken layouts are named
    (tmp_path / "cacerts" / "cert-chain.pem").write_text(ca.pem(root))
    with pytest.raises(ca.CAError, match="must start with ca-cert.pem"):
        ca.load_plugin(tmp_path / "cacerts")
    (tmp_path / "cacerts" / "cert-chain.pem").unlink()
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = ca.make_root(other_key, "cluster.local", "other")
    (tmp_path / "cacerts" / "root-cert.pem").write_text(ca.pem(other))
    with pytest.raises(ca.CAError, match="does not end at a certificate of root-cert.pem"):
        ca.load_plugin(tmp_path / "cacerts")
    ca.write_private(tmp_path / "cacerts" / "ca-key.pem", ca.key_pem(other_key))
    with pytest.raises(ca.CAError, match="does not match"):
        ca.load_plugin(tmp_path / "cacerts")


def test_tokens_roundtrip_and_refusals(tmp_path):
    tok = tokens.issue(tmp_path, "default", "web", 600)
    keys = tokens.load_public_keys(tmp_path)
    c = tokens.verify(tok, keys, "istio-ca")
    assert (c.namespace, c.service_account, c.subject) == ("default", "web", "system:serviceaccount:default:web")
    assert c.spiffe_id("cluster.local") == ID
    assert c.expires_at - c.issued_at == 600
    with pytest.raises(tokens.TokenError, match="audience"):
        tokens.verify(tok, keys, "other")
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(tokens.issue(tmp_path, "default", "web", 10, now=time.time() - 3600), keys)
    h, p, s = tok.split(".")
    forged = tokens._b64(tokens.orjson.dumps({**tokens.orjson.loads(tokens._unb64(p)),
                                              "kubernetes.io/namespace": "kube-system"}))
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify(f"{h}.{forged}.{s}", keys)
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify(tokens.issue(ed25519.Ed25519PrivateKey.generate(), "default", "web"), keys)
    for garbage in ("", "abc", "a.b.c", "....", h + "." + p):
        with pytest.raises(tokens.TokenError):
            tokens.verify(garbage, keys)
    # alg none / HS256 are refused outright
    none = tokens._b64(b'{"alg":"none"}') + "." + p + "."
    with pytest.raises(tokens.TokenError):
        tokens.verify(none, keys)


def test_generated_proto_modules_match_the_protos():
    """The checked-in modules (services/mesh/proto_gen, one mechanism for every .proto under proto/) register
    exactly what protoc makes of ca.proto and trust.proto today (tests/test_proto_gen.py checks all of them)."""
    from mizzen.services.mesh import protogen
    from mizzen.services.mesh.proto_gen.istio.v1.auth import ca_pb2
    from mizzen.services.mesh.proto_gen.mizzen.v1 import trust_pb2

    assert not [p for p in protogen.mismatches() if "ca.proto" in p or "trust.proto" in p]
    fields = {f.name: f.number for f in ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields}
    assert fields == {"csr": 1, "validity_duration": 3, "metadata": 4}  # istio/api numbering
    assert [f.number for f in ca_pb2.IstioCertificateResponse.DESCRIPTOR.fields] == [1]
    assert ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].methods_by_name["CreateCertificate"] \
        .full_name == "istio.v1.auth.IstioCertificateService.CreateCertificate"
    assert trust_pb2.DESCRIPTOR.services_by_name["TrustBundleService"].full_name == "mizzen.v1.TrustBundleService"


def test_cli_token_prints_only_the_token(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mizzen", "token", "--data-dir", str(tmp_path), "--namespace", "ns1",
                        "--service-account", "sa1", "--ttl", "2h"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    c = tokens.verify(r.stdout.strip(), tokens.load_public_keys(tmp_path))
    assert (c.namespace, c.service_account, c.expires_at - c.issued_at) == ("ns1", "sa1", 7200)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_fast_leaf_encoding_is_byte_identical_to_cryptographys_builder(tmp_path, key_type):
    """The leaf's TBSCertificate assembled from cached DER parts equals CertificateBuilder's for the same
    inputs (also with DNS and IP SANs, as in certauth's serving certificate), and verifies under the signer."""
    ca.ensure_self_signed(tmp_path, key_type=key_type)
    a = ca.load_self_signed(tmp_path)
    assert a._fast is not None
    pub = ca.parse_csr(csr.new_key_and_csr(ID).csr_pem).public_key()
    now = ca.utcnow()
    for serial, names in ((2**126 + 5, ([ID], [], [])), (1, ([], ["localhost", "a.b"], ["127.0.0.1", "::1"]))):
        fast = x509.load_pem_x509_certificate(a.issue(pub, uris=names[0], dns=names[1], ips=names[2], ttl=3600,
                                                      serial=serial, now=now).encode())
        ref = a._builder_leaf(pub, serial, (now - ca.CLOCK_SKEW).replace(microsecond=0),
                              (now + dt.timedelta(seconds=3600)).replace(microsecond=0), ca._san(*names))
        assert fast.tbs_certificate_bytes == ref.tbs_certificate_bytes
        fast.verify_directly_issued_by(a.signer_cert)
