"""The istioctl-1.7 printers against the seed's tables, from an Istio-1.7-shaped config dump of the seed's pod
written by hand (tests/test_proxy_config_support.py), independent of Mizzen's translator."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from google.protobuf import json_format

from mizzen.services.cli import proxy_config, tables
from mizzen.services.mesh.configdump import (
    ConfigDumpError,
    config_dump_for_snapshot,
    load_config_dump_file,
    parse_config_dump,
)
from tests.test_proxy_config_support import (
    SEED_DNS,
    istio17_resources,
    parse_resources,
    resolve_dns,
    seed_table,
)


@pytest.fixture(scope="module")
def seed_document() -> dict:
    """The dump a live Istio 1.7 sidecar of the seed's pod answers with (DNS names resolved as the seed's were)."""
    resources, bootstrap = istio17_resources()
    return resolve_dns(config_dump_for_snapshot(parse_resources(resources), bootstrap), SEED_DNS)


@pytest.fixture(scope="module")
def seed_dump(seed_document):
    return parse_config_dump(json.dumps(seed_document))


def test_cluster_table_is_the_seeds(seed_dump):
    assert tables.cluster_table(seed_dump) == seed_table("clusters")


def test_endpoint_table_is_the_seeds(seed_dump):
    assert tables.endpoint_table(seed_dump) == seed_table("endpoints")


def test_listener_table_port_80_is_the_seeds(seed_dump):
    assert tables.listener_table(seed_dump, tables.ListenerFilter(port=80)) == seed_table("listeners-port80")


def test_route_table_has_the_seeds_lines(seed_dump):
    """Same lines, same alignment. The seed's order across route configurations is Envoy's hash-map order
    (istioctl 1.7's sort is a no-op when the first name is not numeric), so ours is a fixed one: dynamic
    routes, numeric names first, then inline (static) ones; within a route configuration the order is the
    seed's."""
    printed = tables.route_table(seed_dump).splitlines()
    seed = seed_table("routes").splitlines()
    assert printed[0] == seed[0]
    assert Counter(printed[1:]) == Counter(seed[1:])
    names = [line.split(" ", 1)[0] for line in printed[1:]]
    assert names[:8] == ["80"] * 6 + ["15010", "15014"]
    assert [line for line in printed if line.startswith("80 ")] == [line for line in seed if line.startswith("80 ")]


def test_route_filters(seed_dump):
    by_name = tables.route_rows(seed_dump, tables.RouteFilter(name="80"))
    assert [r[1] for r in by_name] == ["istio-egressgateway.istio-system", "istio-ingressgateway.istio-system",
                                      "proxy", "webserver", "webserverv1", "webserverv2"]
    webserver = by_name[3]
    assert webserver[2:] == ['regex google_re2:{max_program_size:{value:1024}} regex:".*"', "webserver.default"]
    by_port = tables.route_rows(seed_dump, tables.RouteFilter(port=80))
    assert [r[0] for r in by_port] == ["80"] * 6 + ["proxy.default.svc.cluster.local:80"]
    short = tables.route_rows(seed_dump, tables.RouteFilter(name="80"), verbose=False)
    assert short == [["80", "7"]]  # six services and allow_any


def test_cluster_filters_are_istioctl_17_substring_matches(seed_dump):
    def names(**kw):
        return [(r[0], r[1], r[2], r[3]) for r in tables.cluster_rows(seed_dump, tables.ClusterFilter(**kw))]

    assert names(fqdn="webserver.default", port=80) == [
        ("webserver.default.svc.cluster.local", "80", "-", "outbound"),
        ("webserver.default.svc.cluster.local", "80", "http-web", "inbound"),
        ("webserver.default.svc.cluster.local", "80", "v1", "outbound"),
        ("webserver.default.svc.cluster.local", "80", "v2", "outbound")]
    assert names(direction="inbound") == [("webserver.default.svc.cluster.local", "80", "http-web", "inbound"),
                                          ("webserverv1.default.svc.cluster.local", "80", "http-web", "inbound")]
    # 1.7 matched the subset as a substring of the whole name: "v2" also finds webserverv2's clusters
    assert {n[0] for n in names(subset="v2")} == {"webserver.default.svc.cluster.local",
                                                  "webserverv2.default.svc.cluster.local"}
    assert names(port=853) == [("istiod.istio-system.svc.cluster.local", "853", "-", "outbound")]
    assert names(fqdn="nothing-like-this") == []


def test_listener_filters_and_short_form(seed_dump):
    rows = tables.listener_rows(seed_dump, tables.ListenerFilter(type="tcp"), verbose=False)
    assert rows == [["10.200.1.62", "443", "TCP"], ["0.0.0.0", "15001", "TCP"]]
    rows = tables.listener_rows(seed_dump, tables.ListenerFilter(address="10.200.1.132"))
    assert rows == [["10.200.1.132", "80", "App: HTTP", "Route: proxy.default.svc.cluster.local:80"],
                    ["10.200.1.132", "80", "ALL", "Cluster: outbound|80||proxy.default.svc.cluster.local"]]
    inbound = tables.listener_rows(seed_dump, tables.ListenerFilter(port=15006))
    texts = [(r[2], r[3]) for r in inbound]
    assert ("Addr: :15006", "Non-HTTP/Non-TCP") not in texts  # no address suffix: the port alone is not shown
    assert ("ALL", "Non-HTTP/Non-TCP") in texts  # the blackhole chain (tcp_proxy to BlackHoleCluster)
    assert ("Trans: tls; App: TCP TLS",
            "Inline Route: /*") in texts
    assert tables.listener_rows(seed_dump, tables.ListenerFilter(type="HTTP+TCP"), verbose=False) == [
        ["0.0.0.0", "80", "HTTP+TCP"], ["10.200.1.132", "80", "HTTP+TCP"], ["10.200.1.62", "853", "HTTP+TCP"],
        ["10.200.1.10", "9153", "HTTP+TCP"], ["0.0.0.0", "15010", "HTTP+TCP"], ["0.0.0.0", "15014", "HTTP+TCP"],
        ["10.200.1.101", "15021", "HTTP+TCP"]]
    # the inbound listener's blackhole chain does not count as TCP; the bootstrap's listeners are HTTP too
    assert tables.listener_rows(seed_dump, tables.ListenerFilter(type="http"), verbose=False) == [
        ["0.0.0.0", "15006", "HTTP"], ["0.0.0.0", "15021", "HTTP"], ["0.0.0.0", "15090", "HTTP"]]


def test_endpoint_filters(seed_dump):
    def rows(**kw):
        return tables.endpoint_rows(seed_dump, tables.EndpointFilter(**kw))

    assert rows(cluster="outbound|80||webserver.default.svc.cluster.local") == [
        ["10.200.0.135:3030", "HEALTHY", "OK", "outbound|80||webserver.default.svc.cluster.local"],
        ["10.200.0.148:3030", "HEALTHY", "OK", "outbound|80||webserver.default.svc.cluster.local"]]
    assert [r[0] for r in rows(port=15012)] == ["10.200.0.137:15012", "10.200.1.62:15012"]
    assert [r[3] for r in rows(address="127.0.0.1")] == [
        "inbound|80|http-web|webserver.default.svc.cluster.local",
        "inbound|80|http-web|webserverv1.default.svc.cluster.local", "prometheus_stats", "agent"]
    assert rows(status="unhealthy") == []
    assert len(rows(status="healthy")) == len(seed_table("endpoints").splitlines()) - 1


def test_tabwriter_follows_go_column_blocks():
    # a column's width is set per run of lines that have the column; a line's last cell is never aligned
    assert tables.tabwrite([["a", "b", "c"], ["aaa", "x"], ["z"], ["q", "rrrr", "s"]], padding=1) == \
        "a   b c\naaa x\nz\nq rrrr s\n"
    assert tables.tabwrite([["NAME", "X"], ["", "y"]], padding=5) == "NAME     X\n         y\n"


def test_go_text_quotes_like_go():
    from envoy.type.matcher.v3 import regex_pb2

    m = regex_pb2.RegexMatcher(regex='a"b\\c\n\x01\x85é')
    assert tables.go_text(m) == r'regex:"a\"b\\c\n\x01\u0085é"'
    m = regex_pb2.RegexMatcher(regex="^/api/.*")
    assert tables.describe_match(_route_match(m)) == 'regex regex:"^/api/.*"'


def _route_match(regex):
    from envoy.config.route.v3 import route_components_pb2

    rm = route_components_pb2.RouteMatch()
    rm.safe_regex.CopyFrom(regex)
    return rm


def test_render_config_paths():
    assert tables.render_config("/apis/networking.istio.io/v1alpha3/namespaces/default/destination-rule/web") == \
        "web.default"
    assert tables.render_config("/apis/networking.istio.io/v1/namespaces/prod/virtual-service/r") == "r.prod"
    assert tables.render_config("/apis/networking.istio.io/v1/namespaces/prod") == ""
    assert tables.render_config("/other/thing") == "<unknown>"


# ---------------------------------------------------------------------------------------------------------
# the CLI on a saved dump


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = proxy_config.main(list(argv), command="proxy-config")
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_reads_a_dump_file(tmp_path, capsys, seed_document):
    path = tmp_path / "config_dump.json"
    path.write_text(json.dumps(seed_document))
    rc, out, _ = _run(capsys, "cluster", "--file", str(path))
    assert rc == 0 and out == seed_table("clusters")
    rc, out, _ = _run(capsys, "endpoint", "-f", str(path))
    assert rc == 0 and out == seed_table("endpoints")
    rc, out, _ = _run(capsys, "listener", "--file", str(path), "--port", "80")
    assert rc == 0 and out == seed_table("listeners-port80")
    rc, out, _ = _run(capsys, "routes", "--file", str(path), "--name", "15010")
    assert rc == 0 and out.splitlines()[1].split() == ["15010", "istiod.istio-system", "/*"]


def test_cli_raw_output(tmp_path, capsys, seed_document):
    import yaml

    path = tmp_path / "config_dump.json"
    path.write_text(json.dumps(seed_document))
    rc, out, _ = _run(capsys, "cluster", "--file", str(path), "--fqdn", "webserver.default", "-o", "json")
    assert rc == 0
    clusters = json.loads(out)
    assert [c["name"] for c in clusters] == ["outbound|80||webserver.default.svc.cluster.local",
                                             "inbound|80|http-web|webserver.default.svc.cluster.local",
                                             "outbound|80|v1|webserver.default.svc.cluster.local",
                                             "outbound|80|v2|webserver.default.svc.cluster.local"]
    assert clusters[2]["metadata"]["filter_metadata"]["istio"]["subset"] == "v1"
    rc, out, _ = _run(capsys, "endpoint", "--file", str(path), "--cluster",
                      "outbound|80|v2|webserver.default.svc.cluster.local", "-o", "yaml")
    assert rc == 0
    [cla] = yaml.safe_load(out)
    assert cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] == "10.200.0.148"
    rc, out, _ = _run(capsys, "bootstrap", "--file", str(path))
    assert rc == 0
    boot = json.loads(out)["bootstrap"]
    assert [c["name"] for c in boot["static_resources"]["clusters"]] == [
        "prometheus_stats", "agent", "sds-grpc", "xds-grpc", "zipkin"]
    rc, out, _ = _run(capsys, "all", "--file", str(path), "-o", "json")
    assert rc == 0 and json.loads(out) == seed_document
    rc, out, _ = _run(capsys, "all", "--file", str(path))
    assert rc == 0
    assert out.split("\n\n")[0] + "\n" == seed_table("clusters")
    assert out.rstrip("\n").endswith(seed_table("endpoints").rstrip("\n"))


def test_cli_errors(tmp_path, capsys):
    rc, _, err = _run(capsys, "cluster", "--file", str(tmp_path / "missing.json"))
    assert rc == 1 and "cannot read" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a dump"}')
    rc, _, err = _run(capsys, "listener", "--file", str(bad))
    assert rc == 1 and "no `configs` list" in err
    empty = tmp_path / "empty.json"
    empty.write_text('{"configs": []}')
    rc, _, err = _run(capsys, "cluster", "--file", str(empty))
    assert rc == 1 and "no clusters found" in err
    rc, _, err = _run(capsys, "endpoint", "--file", str(empty))
    assert rc == 1 and "include_eds" in err
    rc, _, err = _run(capsys, "cluster", "--admin", "127.0.0.1:1")
    assert rc == 1 and "cannot reach the Envoy admin" in err


# ---------------------------------------------------------------------------------------------------------
# parsing dumps from other builds


def test_parse_keeps_unknown_types_and_ignores_unknown_fields(tmp_path):
    doc = {"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "some_future_field": 3,
         "dynamic_listeners": [{"name": "l", "active_state": {"listener": {
             "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
             "name": "0.0.0.0_9080", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 9080}},
             "a_field_from_the_future": {"x": 1},
             "filter_chains": [{"filters": [
                 {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/istio.stats.v1.PluginConfig",
                                                          "disable_host_header_fallback": True}},
                 {"name": "envoy.tcp_proxy", "typed_config": {
                     "@type": "type.googleapis.com/envoy.config.filter.network.tcp_proxy.v2.TcpProxy",
                     "stat_prefix": "s", "cluster": "outbound|9080||ratings.default.svc.cluster.local"}}]}]}}},
             {"name": "warming-only", "warming_state": {"listener": {
                 "@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "w"}}}]},
        {"@type": "type.googleapis.com/envoy.admin.v2alpha.ClustersConfigDump", "static_clusters": [
            {"cluster": {"@type": "type.googleapis.com/envoy.api.v2.Cluster", "name": "legacy", "type": "STATIC",
                         "hosts": [{"socket_address": {"address": "1.2.3.4", "port_value": 1}}]}}]},
    ]}
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(doc))
    dump = load_config_dump_file(path)
    assert [lst.name for lst in dump.listeners] == ["0.0.0.0_9080"]  # warming listeners are not shown
    assert tables.listener_rows(dump) == [
        ["0.0.0.0", "9080", "ALL", "Cluster: outbound|9080||ratings.default.svc.cluster.local"]]
    stats = dump.listeners[0].filter_chains[0].filters[0].typed_config
    assert stats.type_url.endswith("google.protobuf.Struct")  # kept readable, not dropped
    assert json_format.MessageToDict(stats)["value"]["@type"] == "type.googleapis.com/istio.stats.v1.PluginConfig"
    assert tables.cluster_rows(dump) == [["legacy", "-", "-", "-", "STATIC", ""]]
    assert not dump.has_endpoints


def test_parse_rejects_what_is_not_a_dump():
    with pytest.raises(ConfigDumpError):
        parse_config_dump("[1, 2]")
    with pytest.raises(ConfigDumpError):
        parse_config_dump("{not json")
    with pytest.raises(ConfigDumpError):
        parse_config_dump({"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                                        "static_clusters": "not a list"}]})
