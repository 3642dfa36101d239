"""`mizzen proxy-config secret`: istioctl's table from a config dump's SecretsConfigDump (offline, exact text).
The same command against a live Envoy fed by the agent is in test_agent_sds.py and the mTLS e2e tests."""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import sys
from pathlib import Path

from mizzen.services.cli import tables
from tests.sds_fixture import make_ca


def _dump(ca) -> dict:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    return {"configs": [{
        "@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        "dynamic_active_secrets": [
            {"name": "default", "version_info": "2026-12-03T02:00:00Z/3", "secret": {
                "@type": secret, "name": "default", "tls_certificate": {
                    "certificate_chain": {"inline_bytes": b64(ca.cert_pem)},
                    "private_key": {"inline_bytes": "W3JlZGFjdGVkXQ=="}}}},
            {"name": "ROOTCA", "version_info": "2026-12-03T02:00:00Z/2", "secret": {
                "@type": secret, "name": "ROOTCA", "validation_context": {
                    "trusted_ca": {"inline_bytes": b64(ca.root_pem)}}}},
        ],
        "dynamic_warming_secrets": [{"name": "file-root:/etc/certs/ca.pem", "version_info": "uninitialized"}],
    }]}


def test_secret_table_is_istioctls(tmp_path: Path) -> None:
    from cryptography import x509

    ca = make_ca()
    leaf = x509.load_pem_x509_certificate(ca.cert_pem)
    root = x509.load_pem_x509_certificate(ca.root_pem)
    f = "%Y-%m-%dT%H:%M:%SZ"

    def times(c):
        return c.not_valid_after_utc.strftime(f), c.not_valid_before_utc.strftime(f)

    ls, rs = format(leaf.serial_number, "x"), format(root.serial_number, "x")
    serial_w = max(len(ls), len(rs), len("SERIAL NUMBER")) + 5
    name_w = len("file-root:/etc/certs/ca.pem") + 5
    expected = [
        "RESOURCE NAME".ljust(name_w) + "TYPE".ljust(15) + "STATUS".ljust(12) + "VALID CERT".ljust(15)
        + "SERIAL NUMBER".ljust(serial_w) + "NOT AFTER".ljust(25) + "NOT BEFORE",
        "file-root:/etc/certs/ca.pem".ljust(name_w) + "".ljust(15) + "WARMING".ljust(12) + "false",
        "default".ljust(name_w) + "Cert Chain".ljust(15) + "ACTIVE".ljust(12) + "true".ljust(15) + ls.ljust(serial_w)
        + times(leaf)[0].ljust(25) + times(leaf)[1],
        "ROOTCA".ljust(name_w) + "CA".ljust(15) + "ACTIVE".ljust(12) + "true".ljust(15) + rs.ljust(serial_w)
        + times(root)[0].ljust(25) + times(root)[1],
    ]
    assert tables.secret_table(_dump(ca)).splitlines() == expected
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    assert [r[3] for r in tables.secret_rows(_dump(ca), later)] == ["false", "false", "false"]

    path = tmp_path / "dump.json"
    path.write_text(json.dumps(_dump(ca)))
    res = subprocess.run([sys.executable, "-m", "mizzen", "proxy-config", "secret", "--file", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == expected
    res = subprocess.run([sys.executable, "-m", "mizzen", "pc", "secret", "--file", str(path), "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(res.stdout)["dynamic_active_secrets"][0]["name"] == "default"
