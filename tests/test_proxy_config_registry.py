"""proxy-config against the running control plane: registry and translator as real processes (real NATS and
Redis), the seed mesh applied, and `mizzen proxy-config … --server` (the registry's /debug/config_dump)
prints exactly what the offline translation of the same YAML prints."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from mizzen.services.cli import proxy_config
from mizzen.services.cli import resources as resources_cli
from tests.test_proxy_config_support import POD, SEED_MESH


@pytest.fixture
def stack(control_plane):
    return control_plane


def pc(capsys, *argv: str) -> str:
    rc = proxy_config.main(list(argv), command="proxy-config")
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def wait_for_dump(server: str, want_clusters: int, timeout: float = 30.0) -> dict:
    """Poll the registry until the pod's snapshot holds as many clusters as the offline translation."""
    url = f"{server}/debug/config_dump?" + urllib.parse.urlencode({"pod": POD, "namespace": "default"})
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                doc = json.loads(r.read())
            clusters = next(c for c in doc["configs"] if c["@type"].endswith("ClustersConfigDump"))
            last = len(clusters.get("dynamic_active_clusters", []))
            if last == want_clusters:
                return doc
        except urllib.error.HTTPError as e:
            last = e.code
        time.sleep(0.1)
    raise AssertionError(f"no complete snapshot for {POD} (last: {last})")


def test_registry_source_prints_the_offline_rows(stack, capsys, monkeypatch):
    offline = {what: pc(capsys, what, POD, "--config", str(SEED_MESH)) for what in ("cluster", "listener",
                                                                                  "route", "endpoint")}
    rc = resources_cli.main(["-f", str(SEED_MESH), "--server", stack.registry_url], command="apply")
    capsys.readouterr()
    assert rc == 0
    wait_for_dump(stack.registry_url, len(offline["cluster"].splitlines()) - 1)
    for what, text in offline.items():
        assert pc(capsys, what, POD, "--server", stack.registry_url) == text, what
    # the server from $MIZZEN_SERVER, the pod as <pod>.<namespace>, a filter
    monkeypatch.setenv("MIZZEN_SERVER", stack.registry_url)
    assert pc(capsys, "listener", f"{POD}.default", "--port", "80") == pc(
        capsys, "listener", POD, "--config", str(SEED_MESH), "--port", "80")
    boot = json.loads(pc(capsys, "bootstrap", POD))["bootstrap"]
    assert boot["node"]["id"] == f"sidecar~10.200.0.135~{POD}.default~default.svc.cluster.local"
    # a pod the registry has no snapshot for
    rc = proxy_config.main(["cluster", "nobody"], command="pc")
    _, err = capsys.readouterr()
    assert rc == 1 and "404" in err and "no snapshot for pod nobody.default" in err
