"""The bootstrap's shape, without Envoy: node id and metadata, static clusters and listeners, ADS, access log,
and the `mizzen bootstrap` command."""

from __future__ import annotations

import json

import pytest

from mizzen.services.cli import bootstrap as cli
from mizzen.services.cli.main import main as mizzen
from mizzen.services.sidecar import bootstrap as bs

# The seed's example outbound access-log line (its keys are acceptance data; the values are a sample).
SEED_LOG_LINE = {
    "upstream_local_address": "10.200.0.131:42288",
    "duration": "1",
    "upstream_transport_failure_reason": "-",
    "route_name": "default",
    "downstream_local_address": "10.200.1.246:80",
    "user_agent": "Go-http-client/1.1",
    "response_code": "200",
    "response_flags": "-",
    "start_time": "2021-02-18T07:08:50.031Z",
    "method": "GET",
    "request_id": "967f8e1a-dbc0-4cce-ad53-ce6a27d5e54c",
    "upstream_host": "10.200.0.189:3030",
    "x_forwarded_for": "-",
    "requested_server_name": "-",
    "bytes_received": "0",
    "istio_policy_status": "-",
    "bytes_sent": "75",
    "upstream_cluster": "outbound|80||webserverv1.default.svc.cluster.local",
    "downstream_remote_address": "10.200.0.131:44728",
    "authority": "webserverv1.default.svc",
    "path": "/",
    "protocol": "HTTP/1.1",
    "upstream_service_time": "0",
}

# The seed's cluster rows for the bootstrap's own clusters (proxy-config cluster: name → TYPE).
SEED_STATIC_CLUSTERS = {
    "agent": "STATIC",
    "prometheus_stats": "STATIC",
    "sds-grpc": "STATIC",
    "xds-grpc": "STRICT_DNS",
    "zipkin": "STRICT_DNS",
}

POD = "webserverv1-84596579c6-xxvhd"


def clusters_by_name(b: dict) -> dict[str, dict]:
    return {c["name"]: c for c in b["static_resources"]["clusters"]}


def endpoint_address(cluster: dict) -> dict:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb,) = locality["lb_endpoints"]
    return lb["endpoint"]["address"]


def listener_route(listener: dict) -> tuple[int, dict]:
    port = listener["address"]["socket_address"]["port_value"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    (vhost,) = hcm["typed_config"]["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    return port, route


def test_node_id_and_metadata_for_a_sidecar():
    b = bs.build_bootstrap(POD, "default", "10.200.0.135", labels={"app": "webserverv1", "version": "v1"})
    node = b["node"]
    assert node["id"] == f"sidecar~10.200.0.135~{POD}.default~default.svc.cluster.local"
    assert node["cluster"] == "webserverv1.default"
    md = node["metadata"]
    assert md["NAMESPACE"] == "default"
    assert md["LABELS"] == {"app": "webserverv1", "version": "v1"}
    assert md["INSTANCE_IPS"] == "10.200.0.135"
    assert md["POD_NAME"] == md["NAME"] == POD
    assert md["CLUSTER_ID"] == "Kubernetes"
    assert md["ISTIO_VERSION"] == bs.ISTIO_VERSION
    assert md["INTERCEPTION_MODE"] == "REDIRECT"
    assert md["WORKLOAD_NAME"] == "webserverv1"
    assert md["OWNER"] == "kubernetes://apis/apps/v1/namespaces/default/deployments/webserverv1"
    assert md["ACCESS_LOG_FILE"] == "/dev/stdout"
    assert md["PROXY_CONFIG"]["discoveryAddress"] == "127.0.0.1:15010"
    assert "ROUTER_MODE" not in md
    assert "locality" not in node


def test_router_node_and_options():
    b = bs.build_bootstrap(
        "istio-ingressgateway-8f7c6b5d4-abcde",
        "istio-system",
        "10.200.0.146",
        router=True,
        cluster_id="east",
        labels={
            "istio": "ingressgateway",
            "topology.kubernetes.io/region": "r1",
            "topology.kubernetes.io/zone": "z1",
        },
        access_log=None,
    )
    node = b["node"]
    assert (
        node["id"]
        == "router~10.200.0.146~istio-ingressgateway-8f7c6b5d4-abcde.istio-system~istio-system.svc.cluster.local"
    )
    assert node["cluster"] == "istio-ingressgateway.istio-system"
    assert node["locality"] == {"region": "r1", "zone": "z1"}
    assert node["metadata"]["CLUSTER_ID"] == "east"
    assert node["metadata"]["ROUTER_MODE"] == "sni-dnat"
    assert "ACCESS_LOG_FILE" not in node["metadata"]


@pytest.mark.parametrize(
    ("pod", "workload"),
    [
        ("webserverv1-84596579c6-xxvhd", "webserverv1"),
        ("logger-x7k2p", "logger"),
        ("db-0", "db-0"),
        ("solo", "solo"),
    ],
)
def test_workload_name_from_pod_name(pod, workload):
    assert bs.workload_name(pod) == workload


def test_static_clusters_have_the_seed_names_types_and_endpoints():
    b = bs.build_bootstrap(POD, "default", "10.200.0.135", xds="istiod.istio-system.svc:15012")
    clusters = clusters_by_name(b)
    assert {name: c["type"] for name, c in clusters.items()} == SEED_STATIC_CLUSTERS
    # The seed's endpoint rows for them.
    assert endpoint_address(clusters["prometheus_stats"])["socket_address"]["port_value"] == 15000
    assert endpoint_address(clusters["agent"])["socket_address"] == {
        "protocol": "TCP",
        "address": "127.0.0.1",
        "port_value": 15020,
    }
    assert endpoint_address(clusters["sds-grpc"]) == {"pipe": {"path": "./etc/istio/proxy/SDS"}}
    xds = endpoint_address(clusters["xds-grpc"])["socket_address"]
    assert (xds["address"], xds["port_value"]) == ("istiod.istio-system.svc", 15012)
    zipkin = endpoint_address(clusters["zipkin"])["socket_address"]
    assert (zipkin["address"], zipkin["port_value"]) == ("zipkin.istio-system.svc", 9411)
    # gRPC clusters speak HTTP/2.
    for name in ("sds-grpc", "xds-grpc"):
        opts = clusters[name]["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert "http2_protocol_options" in opts["explicit_http_config"]
    assert b["admin"]["address"]["socket_address"] == {
        "protocol": "TCP",
        "address": "127.0.0.1",
        "port_value": 15000,
    }
    assert b["tracing"]["http"]["typed_config"]["collector_cluster"] == "zipkin"


def test_static_listeners_and_configurable_ports():
    b = bs.build_bootstrap(
        POD,
        "default",
        "10.0.0.5",
        admin_port=25000,
        agent_port=25020,
        health_port=25021,
        prometheus_port=25090,
        listen_address="127.0.0.1",
    )
    routes = dict(listener_route(listener) for listener in b["static_resources"]["listeners"])
    assert set(routes) == {25090, 25021}
    assert routes[25090]["match"] == {"prefix": "/stats/prometheus"}
    assert routes[25090]["route"] == {"cluster": "prometheus_stats", "prefix_rewrite": "/stats/prometheus"}
    assert routes[25021]["match"] == {"prefix": "/healthz/ready"}
    assert routes[25021]["route"] == {"cluster": "prometheus_stats", "prefix_rewrite": "/ready"}
    clusters = clusters_by_name(b)
    assert endpoint_address(clusters["prometheus_stats"])["socket_address"]["port_value"] == 25000
    assert endpoint_address(clusters["agent"])["socket_address"]["port_value"] == 25020
    assert b["admin"]["address"]["socket_address"]["port_value"] == 25000
    for listener in b["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == "127.0.0.1"

    agent = bs.build_bootstrap(POD, "default", "10.0.0.5", health="agent")
    routes = dict(listener_route(listener) for listener in agent["static_resources"]["listeners"])
    assert routes[15021]["route"] == {"cluster": "agent"}
    assert {
        listener["address"]["socket_address"]["address"]
        for listener in agent["static_resources"]["listeners"]
    } == {"0.0.0.0"}


@pytest.mark.parametrize(("delta", "api_type"), [(False, "GRPC"), (True, "DELTA_GRPC")])
def test_dynamic_resources_use_ads(delta, api_type):
    b = bs.build_bootstrap(POD, "default", "10.0.0.5", delta=delta)
    dyn = b["dynamic_resources"]
    assert dyn["ads_config"]["api_type"] == api_type
    assert dyn["ads_config"]["transport_api_version"] == "V3"
    assert dyn["ads_config"]["grpc_services"] == [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]
    for key in ("cds_config", "lds_config"):
        assert dyn[key]["ads"] == {}
        assert dyn[key]["resource_api_version"] == "V3"


def test_ipv6_pod_uses_ipv6_loopback_and_wildcard():
    b = bs.build_bootstrap(POD, "default", "fd00::5", xds="[fd00::1]:15010")
    assert b["admin"]["address"]["socket_address"]["address"] == "::1"
    assert {
        listener["address"]["socket_address"]["address"] for listener in b["static_resources"]["listeners"]
    } == {"::"}
    xds = endpoint_address(clusters_by_name(b)["xds-grpc"])["socket_address"]
    assert (xds["address"], xds["port_value"]) == ("fd00::1", 15010)
    assert clusters_by_name(b)["xds-grpc"]["dns_lookup_family"] == "AUTO"


def test_no_tracing_drops_zipkin():
    b = bs.build_bootstrap(POD, "default", "10.0.0.5", zipkin=None)
    assert "zipkin" not in clusters_by_name(b)
    assert "tracing" not in b


@pytest.mark.parametrize(
    "kwargs",
    [{"ip": "not-an-ip"}, {"xds": "no-port"}, {"xds": "host:99999"}, {"health": "sometimes"}, {"pod": ""}],
)
def test_bad_arguments_are_rejected(kwargs):
    args = {"pod": POD, "namespace": "default", "ip": "10.0.0.5", **kwargs}
    with pytest.raises(ValueError):
        bs.build_bootstrap(**args)


def test_access_log_config_has_the_seed_and_istio_fields():
    cfg = bs.access_log_config("/tmp/x.log")
    assert cfg["name"] == "envoy.access_loggers.file"
    typed = cfg["typed_config"]
    assert typed["@type"] == "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
    assert typed["path"] == "/tmp/x.log"
    fmt = typed["log_format"]["json_format"]
    assert set(SEED_LOG_LINE) <= set(fmt)
    for key in ("response_code_details", "connection_termination_details"):  # Istio ≥ 1.9
        assert key in fmt
    assert fmt["request_id"] == "%REQ(X-REQUEST-ID)%"
    assert fmt["upstream_cluster"] == "%UPSTREAM_CLUSTER_RAW%"
    listener_log = bs.listener_access_log_config("/tmp/x.log")
    assert listener_log["filter"] == {"response_flag_filter": {"flags": ["NR"]}}


def test_access_log_proto_round_trips():
    msg = bs.access_log_proto("/var/log/a.log")
    from envoy.extensions.access_loggers.file.v3 import file_pb2

    inner = file_pb2.FileAccessLog()
    assert msg.typed_config.Unpack(inner)
    assert inner.path == "/var/log/a.log"
    assert set(SEED_LOG_LINE) <= set(inner.log_format.json_format.fields)
    assert bs.access_log_proto(listener=True).filter.response_flag_filter.flags == ["NR"]


def test_stats_matcher_keeps_xds_stats_unless_all_stats():
    b = bs.build_bootstrap(POD, "default", "10.0.0.5", stats_inclusion_prefixes=["http."])
    prefixes = [p["prefix"] for p in b["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]]
    assert {"cluster.xds-grpc", "listener_manager", "cluster_manager", "server", "http."} <= set(prefixes)
    assert (
        "stats_matcher" not in bs.build_bootstrap(POD, "default", "10.0.0.5", all_stats=True)["stats_config"]
    )


def test_cli_writes_json_to_a_file(tmp_path):
    out = tmp_path / "sub" / "envoy.json"
    rc = mizzen(
        [
            "bootstrap",
            "--pod",
            POD,
            "--namespace",
            "default",
            "--ip",
            "10.200.0.135",
            "--xds",
            "10.200.1.62:15012",
            "--router",
            "--delta",
            "--access-log",
            "/var/log/envoy.json",
            "--admin-port",
            "16000",
            "-l",
            "app=web,version=v1",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    b = json.loads(out.read_text())
    assert b == bs.build_bootstrap(
        POD,
        "default",
        "10.200.0.135",
        xds="10.200.1.62:15012",
        router=True,
        delta=True,
        access_log="/var/log/envoy.json",
        admin_port=16000,
        labels={"app": "web", "version": "v1"},
    )
    assert b["node"]["id"].startswith("router~10.200.0.135~")


def test_cli_writes_stdout_and_reads_injector_env(monkeypatch, capsys):
    monkeypatch.setenv("POD_NAME", "reviews-v1-545db77b95-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "bookinfo")
    monkeypatch.setenv("INSTANCE_IP", "10.1.2.3")
    assert cli.main(["--access-log", "", "--zipkin", ""]) == 0
    b = json.loads(capsys.readouterr().out)
    assert (
        b["node"]["id"] == "sidecar~10.1.2.3~reviews-v1-545db77b95-abcde.bookinfo~bookinfo.svc.cluster.local"
    )
    assert "ACCESS_LOG_FILE" not in b["node"]["metadata"]
    assert "zipkin" not in clusters_by_name(b)


def test_cli_errors(monkeypatch, capsys):
    for var in ("POD_NAME", "POD_NAMESPACE", "INSTANCE_IP"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["--pod", "p", "--namespace", "d"])
    assert e.value.code == 2
    assert "--ip" in capsys.readouterr().err
    assert cli.main(["--pod", "p", "--namespace", "d", "--ip", "10.0.0.1", "--xds", "nohostport"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert cli.main(["--pod", "p", "--namespace", "d", "--ip", "10.0.0.1", "-l", "novalue"]) == 2


def test_envoy_command_flushes_access_logs_quickly():
    argv = bs.envoy_command("/etc/envoy/envoy.json", envoy="envoy", concurrency=2)
    assert argv[:3] == ["envoy", "-c", "/etc/envoy/envoy.json"]
    assert argv[argv.index("--file-flush-interval-msec") + 1] == "1000"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert argv[argv.index("--local-address-ip-version") + 1] == "v4"


def test_xds_over_tls_with_sds_roots_and_a_token():
    from mizzen.services.sidecar.bootstrap import build_bootstrap

    boot = build_bootstrap("p", "ns", "10.0.0.1", xds="gw:15012", xds_root_from_sds=True, xds_token="tok",
                           xds_sans=["spiffe://cluster.local/ns/istio-system/sa/xds-gateway"])
    xds = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "xds-grpc")
    common = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["default"]
    cvc = common["combined_validation_context"]
    assert cvc["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert cvc["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/istio-system/sa/xds-gateway"}}]
    assert "trusted_ca" not in json.dumps(xds)
    grpc_service = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert grpc_service["initial_metadata"] == [{"key": "authorization", "value": "Bearer tok"}]
    assert boot["node"]["metadata"]["PROXY_CONFIG"]["controlPlaneAuthPolicy"] == "MUTUAL_TLS"
    plain = build_bootstrap("p", "ns", "10.0.0.1")
    assert "initial_metadata" not in json.dumps(plain) and "transport_socket" not in json.dumps(
        next(c for c in plain["static_resources"]["clusters"] if c["name"] == "xds-grpc"))


def test_cli_locality_flag_env_and_label_precedence(monkeypatch, capsys):
    """node.locality: the pod's labels (istio-locality, topology.*) as pilot-agent's label, else --locality /
    MIZZEN_LOCALITY (pilot-agent's platform locality); a malformed one is refused naming the flag."""
    base = ["--pod", "p", "--namespace", "d", "--ip", "10.0.0.1"]

    def node_locality(*args: str) -> dict | None:
        assert cli.main([*base, *args]) == 0
        return json.loads(capsys.readouterr().out)["node"].get("locality")

    assert node_locality("--locality", "r1/z1/s1") == {"region": "r1", "zone": "z1", "sub_zone": "s1"}
    assert node_locality("--locality", "r1/z1", "-l", "istio-locality=r9.z9") == {"region": "r9", "zone": "z9"}
    assert node_locality("--locality", "r1", "-l", "topology.kubernetes.io/zone=z7") == {"zone": "z7"}
    monkeypatch.setenv("MIZZEN_LOCALITY", "r2/z2")
    assert node_locality() == {"region": "r2", "zone": "z2"}
    monkeypatch.delenv("MIZZEN_LOCALITY")
    assert node_locality() is None
    for bad in ("r1/z1/s1/x", "r 1/z1"):
        assert cli.main([*base, "--locality", bad]) == 2
        assert f"--locality wants REGION[/ZONE[/SUBZONE]] (label values), got {bad!r}" in capsys.readouterr().err
