"""Acceptance: `mizzen proxy-config … --config tests/fixtures/seed-mesh` for the seed's pod prints the seed's
rows (tests/fixtures/seed-mesh/tables/*.txt, copied from the seed), through Mizzen's real translator.

Differences that are not the printer's and not the translator's, and how the tests handle them:
- the sidecar's own bootstrap clusters (agent, prometheus_stats, sds-grpc, xds-grpc, zipkin) and the
  bootstrap listeners' inline routes are not in a translated snapshot: excluded offline; with the bootstrap
  added (as a live Envoy's dump has it) the tables are compared whole;
- a STRICT_DNS endpoint is a host name until Envoy resolves it: offline the seed's 151.101.228.133:443 row
  is `raw.githubusercontent.com:443`; the whole-table comparison resolves names as the seed's Envoy did;
- the order of route configurations in the seed is Envoy's hash-map order: compared as lines.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mizzen.services.cli import proxy_config, tables
from mizzen.services.mesh.configdump import config_dump_for_snapshot, dump_from_snapshot, parse_config_dump
from tests.test_proxy_config_support import (
    POD,
    SEED_DNS,
    SEED_MESH,
    STATIC_CLUSTERS,
    cells,
    resolve_dns,
    seed_table,
)

RAW_SEED = "151.101.228.133:443"
RAW_OFFLINE = "raw.githubusercontent.com:443"


@pytest.fixture(scope="module")
def resources() -> dict:
    res, _pod = proxy_config.translate_offline([str(SEED_MESH)], POD, "default")
    return res


def pc(capsys, *argv: str) -> str:
    rc = proxy_config.main([*argv[:1], POD, "--config", str(SEED_MESH), *argv[1:]], command="proxy-config")
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def without_static(rows: list[list[str]], column: int) -> list[list[str]]:
    return [r for r in rows if r[column] not in STATIC_CLUSTERS]


def offline_endpoint_rows(seed_rows: list[list[str]]) -> list[list[str]]:
    """The seed's endpoint rows as an unresolved offline dump has them, in istioctl's order."""
    header, body = seed_rows[0], seed_rows[1:]
    body = [[RAW_OFFLINE if r[0] == RAW_SEED else r[0], *r[1:]] for r in without_static(body, 3)]

    def key(r):
        address, _, port = r[0].rpartition(":")
        return address, int(port), r[3]

    return [header, *sorted(body, key=key)]


# ---------------------------------------------------------------------------------------------------------
# offline, no bootstrap


def test_cluster_table(capsys):
    out = pc(capsys, "cluster")
    seed = seed_table("clusters").splitlines()
    # the static rows are short names, so the remaining rows keep the seed's exact layout
    assert out.splitlines() == [line for line in seed if line.split(" ", 1)[0] not in STATIC_CLUSTERS]


def test_cluster_table_port_80(capsys):
    out = pc(capsys, "cluster", "--port", "80")
    seed = cells(seed_table("clusters"))
    assert cells(out) == [seed[0], *[r for r in seed[1:] if r[1] == "80"]]


def test_cluster_filters(capsys):
    out = pc(capsys, "cluster", "--fqdn", "webserver.default", "--direction", "outbound")
    assert [r[:4] + r[5:] for r in cells(out)[1:]] == [
        ["webserver.default.svc.cluster.local", "80", "-", "outbound", "webserver.default"],
        ["webserver.default.svc.cluster.local", "80", "v1", "outbound", "webserver.default"],
        ["webserver.default.svc.cluster.local", "80", "v2", "outbound", "webserver.default"]]
    out = pc(capsys, "cluster", "--fqdn", "raw.githubusercontent.com")
    assert cells(out)[1] == ["raw.githubusercontent.com", "443", "-", "outbound", "STRICT_DNS", "github.default"]


def test_endpoint_table(capsys):
    out = pc(capsys, "endpoint")
    assert cells(out) == offline_endpoint_rows(cells(seed_table("endpoints")))


def test_endpoint_filters(capsys):
    seed = cells(seed_table("endpoints"))
    out = pc(capsys, "endpoint", "--port", "3030")
    assert cells(out) == [seed[0], *[r for r in seed[1:] if r[0].endswith(":3030")]]
    out = pc(capsys, "endpoint", "--cluster", "outbound|80|v1|webserver.default.svc.cluster.local")
    assert cells(out)[1:] == [r for r in seed[1:] if r[3] == "outbound|80|v1|webserver.default.svc.cluster.local"]


def test_listener_table_port_80(capsys):
    assert pc(capsys, "listener", "--port", "80") == seed_table("listeners-port80")


def test_route_table(capsys):
    out = pc(capsys, "route")
    seed = cells(seed_table("routes"))
    static_routes = ("", "/healthz/ready*"), ("", "/stats/prometheus*")  # the bootstrap listeners' inline routes
    expected = [r for r in seed[1:] if (r[0], r[2]) not in static_routes]
    printed = cells(out)
    assert printed[0] == seed[0]
    assert Counter(map(tuple, printed[1:])) == Counter(map(tuple, expected))
    # within a route configuration the order is the seed's
    assert [r for r in printed if r[0] == "80"] == [r for r in seed if r[0] == "80"]


def test_route_table_port_80(capsys):
    seed = cells(seed_table("routes"))
    out = pc(capsys, "route", "--name", "80")
    assert cells(out) == [seed[0], *[r for r in seed[1:] if r[0] == "80"]]
    out = pc(capsys, "route", "--port", "80")
    assert cells(out) == [seed[0], *[r for r in seed[1:] if r[0] == "80"],
                          *[r for r in seed[1:] if r[0] == "proxy.default.svc.cluster.local:80"]]


# ---------------------------------------------------------------------------------------------------------
# with the bootstrap, as a live Envoy's dump has it: the whole tables


@pytest.fixture(scope="module")
def full_dump_file(resources, tmp_path_factory):
    from mizzen.services.sidecar.bootstrap import build_bootstrap

    boot = build_bootstrap(POD, "default", "10.200.0.135", xds="istiod.istio-system.svc:15012",
                           labels={"app": "webserver", "version": "v1"})
    doc = resolve_dns(config_dump_for_snapshot(resources, boot), SEED_DNS)
    path = tmp_path_factory.mktemp("dump") / "config_dump.json"
    path.write_text(json.dumps(doc))
    return path


def pc_file(capsys, path, *argv: str) -> str:
    rc = proxy_config.main([argv[0], "--file", str(path), *argv[1:]], command="proxy-config")
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_full_cluster_table_is_the_seeds(capsys, full_dump_file):
    assert pc_file(capsys, full_dump_file, "cluster") == seed_table("clusters")


def test_full_endpoint_table_is_the_seeds(capsys, full_dump_file):
    assert pc_file(capsys, full_dump_file, "endpoint") == seed_table("endpoints")


def test_full_route_table_has_the_seeds_lines(capsys, full_dump_file):
    printed = pc_file(capsys, full_dump_file, "route").splitlines()
    seed = seed_table("routes").splitlines()
    assert printed[0] == seed[0]
    assert Counter(printed[1:]) == Counter(seed[1:])


def test_full_listener_table_port_80_is_the_seeds(capsys, full_dump_file):
    assert pc_file(capsys, full_dump_file, "listener", "--port", "80") == seed_table("listeners-port80")


# ---------------------------------------------------------------------------------------------------------
# one parse path: translate → config_dump JSON → parse prints what the snapshot prints directly


def test_round_trip_prints_the_same_rows(resources):
    direct = dump_from_snapshot(resources)
    parsed = parse_config_dump(json.dumps(config_dump_for_snapshot(resources)))
    assert tables.cluster_rows(parsed) == tables.cluster_rows(direct)
    assert tables.listener_rows(parsed) == tables.listener_rows(direct)
    assert tables.listener_rows(parsed, verbose=False) == tables.listener_rows(direct, verbose=False)
    assert tables.route_rows(parsed) == tables.route_rows(direct)
    assert tables.endpoint_rows(parsed) == tables.endpoint_rows(direct)
    # and the raw protos survive unchanged
    assert tables.to_dicts(tables.sorted_clusters(parsed)) == tables.to_dicts(tables.sorted_clusters(direct))
    assert tables.to_dicts(parsed.listeners) == tables.to_dicts(direct.listeners)
    assert tables.to_dicts(parsed.routes) == tables.to_dicts(direct.routes)
    assert tables.to_dicts(parsed.endpoints) == tables.to_dicts(direct.endpoints)
    # every cluster the translator built, every listener and every route configuration is printed
    assert len(tables.cluster_rows(direct)) == len(resources[
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"])


def test_bootstrap_offline(capsys):
    boot = json.loads(pc(capsys, "bootstrap"))["bootstrap"]
    assert boot["node"]["id"] == f"sidecar~10.200.0.135~{POD}.default~default.svc.cluster.local"
    assert [c["name"] for c in boot["static_resources"]["clusters"]] == list(
        ("prometheus_stats", "agent", "sds-grpc", "xds-grpc", "zipkin"))


def test_offline_errors(capsys, tmp_path):
    rc = proxy_config.main(["cluster", "no-such-pod", "--config", str(SEED_MESH)], command="pc")
    _, err = capsys.readouterr()
    assert rc == 1 and "pod no-such-pod.default is not in the given config" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: Bad_Name\nspec:\n  ports: []\n")
    rc = proxy_config.main(["cluster", POD, "--config", str(bad)], command="pc")
    _, err = capsys.readouterr()
    assert rc == 1 and "invalid config" in err and "metadata.name" in err
    rc = proxy_config.main(["cluster", f"{POD}.default", "--config", str(SEED_MESH), "--port", "15010"],
                           command="pc")
    out, _ = capsys.readouterr()
    assert rc == 0 and cells(out)[1][:2] == ["istiod.istio-system.svc.cluster.local", "15010"]


def test_mizzen_dispatches_proxy_config_and_pc(capsys):
    from mizzen.services.cli.main import main as mizzen

    for command in ("proxy-config", "pc"):
        assert mizzen([command, "listener", POD, "--config", str(SEED_MESH), "--port", "80"]) == 0
        out, _ = capsys.readouterr()
        assert out == seed_table("listeners-port80")
