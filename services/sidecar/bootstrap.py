"""The Envoy v3 bootstrap of a Mizzen sidecar (or gateway), shaped like the one pilot-agent writes.

What is in it, and where each piece comes from (Istio 1.7–1.9, `tools/packaging/common/envoy_bootstrap.json`
and `pkg/bootstrap/config.go`; the seed's "bootstrap 配置" section):

- `node`: id `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (`router~…` for gateways), cluster
  `<app label or workload>.<ns>`, locality from the pod's labels (`istio-locality`, else the topology ones; as
  pilot-agent, which reads `istio-locality`) else the one given (pilot-agent asks the cloud platform), and
  Istio's node metadata keys.
- `admin` on 127.0.0.1:<admin_port>.
- static clusters `prometheus_stats` (the admin), `agent` (127.0.0.1:15020), `sds-grpc` (unix pipe),
  `xds-grpc` (STRICT_DNS to the control plane), `zipkin` (STRICT_DNS).
- static listeners: Prometheus (15090, `/stats/prometheus` → `prometheus_stats`) and health (15021,
  `/healthz/ready`; see `HEALTH_MODES`).
- `dynamic_resources`: ADS over `xds-grpc` (SotW `GRPC` or incremental `DELTA_GRPC`), CDS and LDS from ADS.
- `layered_runtime`, `stats_config`, `tracing` (Zipkin).

Everything here is plain JSON-able dicts: `mizzen bootstrap` dumps them, tests hand them to a real Envoy. It
runs on stock Envoy (no `istio.*` extensions). `access_log_config()` is shared with the translator, which
attaches the same JSON access log to the listeners it builds.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mizzen.services.mesh import locality as loc
from mizzen.services.mesh import settings
from mizzen.services.mesh.accesslog import (  # noqa: F401 - re-exported for callers of the bootstrap module
    ACCESS_LOG_FIELDS,
    ISTIO_ACCESS_LOG_FIELDS,
    MIZZEN_ACCESS_LOG_FIELDS,
    SEED_ACCESS_LOG_FIELDS,
)

# The Istio release whose bootstrap and access-log shapes this follows (the seed's vintage). Sent to the
# control plane as ISTIO_VERSION, which istiod-style translators use to pick version-specific output.
ISTIO_VERSION = "1.9.9"

DEFAULT_SDS_PATH = "./etc/istio/proxy/SDS"
DEFAULT_ZIPKIN = "zipkin.istio-system.svc:9411"
DEFAULT_XDS = f"127.0.0.1:{settings.XDS_PORT}"
DEFAULT_ACCESS_LOG = "/dev/stdout"

# How the health listener answers `/healthz/ready`:
# - "envoy": from Envoy itself. The route goes to the admin's `/ready` (through `prometheus_stats`), which is
#   200 `LIVE` once Envoy finished initializing (first CDS/LDS applied, or the initial fetch timed out) and
#   503 while initializing or draining. Mizzen runs no pilot-agent, so this is the default.
# - "agent": as Istio, to the `agent` cluster (pilot-agent's status server on 127.0.0.1:<agent_port>).
# In both modes the `agent` cluster is present with the seed's endpoint.
HEALTH_MODES = ("envoy", "agent")

# Stats Envoy keeps when the Istio-style stats matcher is on (pilot-agent's required prefixes). Everything
# else is not even created, as in an Istio sidecar; `all_stats=True` turns the matcher off.
REQUIRED_STATS_PREFIXES = (
    "reporter=",
    "cluster_manager",
    "listener_manager",
    "server",
    "cluster.xds-grpc",
    "wasm",
)

# The access-log fields live in the kernel: the translator attaches the same format to its listeners.

_HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

# ReplicaSet pods are `<deployment>-<pod-template-hash>-<5 chars>`; other controllers add one suffix.
_REPLICASET_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$")
_CONTROLLER_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{5}$")


# ---------------------------------------------------------------------------------------------------------
# access log (shared with the translator)


def access_log_config(path: str = DEFAULT_ACCESS_LOG, *, fields: Mapping[str, str] | None = None) -> dict:
    """An `envoy.config.accesslog.v3.AccessLog` (JSON form) writing one JSON object per request/connection.

    For an HCM's or a tcp_proxy's `access_log` list. Values are typed (numbers as numbers, unset as null)."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _FILE_LOG_TYPE,
            "path": path,
            "log_format": {
                "json_format": dict(fields if fields is not None else ACCESS_LOG_FIELDS),
                "json_format_options": {"sort_properties": False},
            },
        },
    }


def listener_access_log_config(path: str = DEFAULT_ACCESS_LOG) -> dict:
    """The listener-level log Istio adds: only connections no filter chain took (response flag NR)."""
    cfg = access_log_config(path)
    cfg["filter"] = {"response_flag_filter": {"flags": ["NR"]}}
    return cfg


def access_log_proto(path: str = DEFAULT_ACCESS_LOG, *, listener: bool = False):
    """`access_log_config` as an `envoy.config.accesslog.v3.AccessLog` message, for code that builds protos."""
    from envoy.config.accesslog.v3 import accesslog_pb2
    from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401 - registers the Any type
    from google.protobuf import json_format

    cfg = listener_access_log_config(path) if listener else access_log_config(path)
    return json_format.ParseDict(cfg, accesslog_pb2.AccessLog())


# ---------------------------------------------------------------------------------------------------------
# node


def node_id(
    pod: str, namespace: str, ip: str, *, router: bool = False, domain_suffix: str = settings.DOMAIN_SUFFIX
) -> str:
    kind = "router" if router else "sidecar"
    return f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.{domain_suffix}"


def workload_name(pod: str) -> str:
    """The controller's name guessed from a pod name (`webserverv1-84596579c6-xxvhd` → `webserverv1`)."""
    for pattern in (_REPLICASET_POD, _CONTROLLER_POD):
        m = pattern.match(pod)
        if m:
            return m.group("name")
    return pod


def _split_host_port(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _is_ipv6(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 6
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------
# static resources


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"protocol": "TCP", "address": host, "port_value": port}}


def _load_assignment(name: str, address: dict) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}


def _http2_options(**common: Any) -> dict:
    opts: dict[str, Any] = {
        "@type": _HTTP_OPTIONS_TYPE,
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    if common:
        opts["common_http_protocol_options"] = common
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts}


def _static_cluster(name: str, address: dict, connect_timeout: str = "0.250s") -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _load_assignment(name, address),
    }


def _dns_cluster(name: str, host: str, port: int, dns_family: str) -> dict:
    return {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": dns_family,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _load_assignment(name, _socket_address(host, port)),
    }


def _xds_cluster(host: str, port: int, dns_family: str, root_cert: str | None, sans: Sequence[str],
                 root_from_sds: bool = False) -> dict:
    cluster = _dns_cluster("xds-grpc", host, port, dns_family)
    limits = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
    cluster["circuit_breakers"] = {
        "thresholds": [{"priority": "DEFAULT", **limits}, {"priority": "HIGH", **limits}],
    }
    cluster["upstream_connection_options"] = {"tcp_keepalive": {"keepalive_time": 300}}
    # One gRPC stream per connection, as Istio: a reconnect always gets a fresh connection (and replica).
    cluster["typed_extension_protocol_options"] = _http2_options(max_requests_per_connection=1)
    if root_cert or root_from_sds:
        # The control plane over TLS (port 15012): Envoy's own certificate from SDS, the server checked
        # against the provisioned root file, or against the agent's `ROOTCA` (which follows root rotation),
        # and the given SANs.
        validation: dict[str, Any] = {} if root_from_sds else {"trusted_ca": {"filename": root_cert}}
        if sans:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "DNS" if not s.startswith("spiffe://") else "URI", "matcher": {"exact": s}}
                for s in sans
            ]
        common: dict[str, Any] = {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [_sds_secret("default")],
        }
        if root_from_sds:
            common["combined_validation_context"] = {
                "default_validation_context": validation,
                "validation_context_sds_secret_config": _sds_secret("ROOTCA"),
            }
        else:
            common["validation_context"] = validation
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _TLS_TYPE, "sni": host, "common_tls_context": common},
        }
    return cluster


def _sds_secret(name: str) -> dict:
    return {
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
            },
        },
    }


def _http_listener(
    address: str,
    port: int,
    stat_prefix: str,
    prefix: str,
    cluster: str,
    rewrite: str | None,
    access_log: str | None,
) -> dict:
    route: dict[str, Any] = {"cluster": cluster}
    if rewrite is not None:
        route["prefix_rewrite"] = rewrite
    hcm: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "codec_type": "AUTO",
        "stat_prefix": stat_prefix,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": prefix}, "route": route}],
                }
            ],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}],
    }
    if access_log:
        hcm["access_log"] = [access_log_config(access_log)]
    return {
        "address": _socket_address(address, port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def zipkin_tracer_config(cluster: str = "zipkin") -> dict:
    """Envoy's Zipkin tracer as Istio configures it (also usable as an HCM `tracing.provider`)."""
    return {
        "name": "envoy.tracers.zipkin",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
            "collector_cluster": cluster,
            "collector_endpoint": "/api/v2/spans",
            "collector_endpoint_version": "HTTP_JSON",
            "trace_id_128bit": True,
            "shared_span_context": False,
        },
    }


def stats_config(extra_prefixes: Sequence[str] = (), all_stats: bool = False) -> dict:
    # Tag extraction for Envoy's own stat names, so Prometheus sees `cluster_name`, `listener_address`, …
    # as labels (the same tag names and stat-name shapes pilot-agent configures).
    ip_or_port = r"(?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*)"
    tags = [
        {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
        {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
        {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
        {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
        {
            "tag_name": "http_conn_manager_listener_prefix",
            "regex": rf"^listener(?=\.).*?\.http\.(({ip_or_port})\.)",
        },
        {"tag_name": "http_conn_manager_prefix", "regex": rf"^http\.(({ip_or_port})\.)"},
        {"tag_name": "listener_address", "regex": rf"^listener\.(({ip_or_port})\.)"},
    ]
    config: dict[str, Any] = {"use_all_default_tags": False, "stats_tags": tags}
    if not all_stats:
        prefixes = list(dict.fromkeys([*REQUIRED_STATS_PREFIXES, *extra_prefixes, "component"]))
        config["stats_matcher"] = {"inclusion_list": {"patterns": [{"prefix": p} for p in prefixes]}}
    return config


def _overload_manager() -> dict:
    # Istio's "no practical limit" on downstream connections (1.9 set it through the runtime key
    # `overload.global_downstream_max_connections`; Envoy now wants the resource monitor).
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 2147483647,
                },
            }
        ]
    }


def _runtime() -> dict:
    return {
        "layers": [
            {
                "name": "global config",
                "static_layer": {
                    # Istio's: large regexes in routes are allowed but reported.
                    "re2.max_program_size.error_level": 1024,
                },
            },
            {"name": "admin", "admin_layer": {}},
        ]
    }


# ---------------------------------------------------------------------------------------------------------
# how to run Envoy on it


def envoy_command(
    config_path: str,
    *,
    envoy: str | None = None,
    concurrency: int | None = None,
    log_level: str = "warning",
    flush_interval_ms: int = 1000,
    drain_seconds: int = 45,
    ipv6: bool = False,
) -> list[str]:
    """The Envoy command line for a bootstrap file, as pilot-agent starts it (minus hot restart).

    Access-log lines are flushed every `flush_interval_ms` (Envoy's default is 10 s, too slow for a logsink
    that tails the file; Envoy also flushes once 64 KB are buffered, and on exit)."""
    if envoy is None:
        from mizzen.services.mesh import procs

        envoy = procs.envoy_binary()
    argv = [
        envoy,
        "-c",
        config_path,
        "--disable-hot-restart",
        "--drain-time-s",
        str(drain_seconds),
        "--local-address-ip-version",
        "v6" if ipv6 else "v4",
        "--file-flush-interval-msec",
        str(flush_interval_ms),
        "-l",
        log_level,
    ]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return argv


# ---------------------------------------------------------------------------------------------------------
# the bootstrap


def build_bootstrap(
    pod: str,
    namespace: str,
    ip: str,
    xds: str = DEFAULT_XDS,
    router: bool = False,
    access_log: str | None = DEFAULT_ACCESS_LOG,
    delta: bool = False,
    labels: Mapping[str, str] | None = None,
    cluster_id: str = "Kubernetes",
    admin_port: int = settings.PROXY_ADMIN_PORT,
    *,
    sds_path: str = DEFAULT_SDS_PATH,
    zipkin: str | None = DEFAULT_ZIPKIN,
    agent_port: int = settings.PROXY_AGENT_PORT,
    health_port: int = settings.PROXY_HEALTH_PORT,
    prometheus_port: int = settings.PROXY_PROMETHEUS_PORT,
    health: str = "envoy",
    listen_address: str | None = None,
    service_account: str = "default",
    workload: str | None = None,
    interception_mode: str = "REDIRECT",
    istio_version: str = ISTIO_VERSION,
    domain_suffix: str = settings.DOMAIN_SUFFIX,
    mesh_id: str = settings.TRUST_DOMAIN,
    network: str = "",
    xds_root_cert: str | None = None,
    xds_sans: Sequence[str] = (),
    xds_root_from_sds: bool = False,
    xds_token: str | None = None,
    initial_fetch_timeout: str | None = None,
    stats_inclusion_prefixes: Sequence[str] = (),
    all_stats: bool = False,
    log_static_listeners: bool = False,
    pod_ports: Sequence[Mapping[str, Any]] = (),
    extra_metadata: Mapping[str, Any] | None = None,
    locality: str = "",
) -> dict:
    """The whole Envoy v3 bootstrap for one proxy, as a JSON-able dict.

    `xds` is the control plane (`HOST:PORT`, a name or an IP; reached through the STRICT_DNS `xds-grpc`).
    `access_log` is where this proxy's JSON access log goes (None: nowhere); it is announced to the control
    plane as node metadata `ACCESS_LOG_FILE`, and the translator attaches `access_log_config()` for it to the
    listeners it builds. `zipkin=None` drops the zipkin cluster and tracing. `listen_address` is where the
    static 15090/15021 listeners bind (default: the wildcard of the pod's IP family, as Istio).
    `xds_root_from_sds` checks the control plane's TLS certificate against the SDS `ROOTCA` (what the agent
    serves) instead of the `xds_root_cert` file; `xds_token` is sent as `authorization: Bearer <token>` on
    the ADS stream (the xDS gateway's TLS port wants it).
    `initial_fetch_timeout` (a duration like "1s") bounds how long Envoy waits for the first CDS/LDS before
    it goes live anyway (Envoy's default is 15 s).
    `locality` (`region/zone/subzone`) is node.locality when the labels name none; the control plane prefers
    what its registry knows (the Pod's Node) and uses node.locality only without that."""
    if health not in HEALTH_MODES:
        raise ValueError(f"health must be one of {', '.join(HEALTH_MODES)}, got {health!r}")
    if not pod or not namespace or not ip:
        raise ValueError("pod, namespace and ip are all required")
    ipaddress.ip_address(ip)  # raises ValueError for a bad address
    xds_host, xds_port = _split_host_port(xds, "xds")
    labels = dict(labels or {})
    v6 = _is_ipv6(ip)
    dns_family = "AUTO" if v6 else "V4_ONLY"
    localhost = "::1" if v6 else "127.0.0.1"
    wildcard = "::" if v6 else "0.0.0.0"
    listen = listen_address or wildcard
    workload = workload or workload_name(pod)
    service_cluster = f"{labels.get('app') or workload}.{namespace}"

    metadata: dict[str, Any] = {
        "NAME": pod,
        "POD_NAME": pod,
        "NAMESPACE": namespace,
        "LABELS": labels,
        "INSTANCE_IPS": ip,
        "SERVICE_ACCOUNT": service_account,
        "WORKLOAD_NAME": workload,
        "OWNER": f"kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{workload}",
        "CLUSTER_ID": cluster_id,
        "MESH_ID": mesh_id,
        "ISTIO_VERSION": istio_version,
        "INTERCEPTION_MODE": interception_mode,
        "SDS": "true",
        "PROXY_CONFIG": {
            "configPath": "./etc/istio/proxy",
            "serviceCluster": service_cluster,
            "discoveryAddress": xds,
            "proxyAdminPort": admin_port,
            "statusPort": health_port,
            "controlPlaneAuthPolicy": "MUTUAL_TLS" if (xds_root_cert or xds_root_from_sds) else "NONE",
            "drainDuration": "45s",
            "parentShutdownDuration": "60s",
            **({"tracing": {"zipkin": {"address": zipkin}}} if zipkin else {}),
        },
    }
    if network:
        metadata["NETWORK"] = network
    if router:
        metadata["ROUTER_MODE"] = "sni-dnat"
    if access_log:
        metadata["ACCESS_LOG_FILE"] = access_log
        metadata["ACCESS_LOG_ENCODING"] = "JSON"
    if pod_ports:
        # Istio sends POD_PORTS as a JSON string ([{"name","containerPort","protocol"}]).
        metadata["POD_PORTS"] = json.dumps([dict(p) for p in pod_ports], separators=(",", ":"))
    if extra_metadata:
        metadata.update(extra_metadata)

    node: dict[str, Any] = {
        "id": node_id(pod, namespace, ip, router=router, domain_suffix=domain_suffix),
        "cluster": service_cluster,
        "metadata": metadata,
    }
    node_locality = loc.as_node(loc.from_labels(labels) or locality)
    if node_locality:
        node["locality"] = node_locality

    clusters = [
        _static_cluster("prometheus_stats", _socket_address(localhost, admin_port)),
        _static_cluster("agent", _socket_address(localhost, agent_port)),
        # A pipe endpoint is only dialled when a secret is asked for, so a socket that does not exist yet
        # does not stop Envoy from starting.
        {
            **_static_cluster("sds-grpc", {"pipe": {"path": sds_path}}, "1s"),
            "typed_extension_protocol_options": _http2_options(),
        },
        _xds_cluster(xds_host, xds_port, dns_family, xds_root_cert, xds_sans, xds_root_from_sds),
    ]
    if zipkin:
        zhost, zport = _split_host_port(zipkin, "zipkin")
        clusters.append(_dns_cluster("zipkin", zhost, zport, dns_family))

    static_log = access_log if log_static_listeners else None
    if health == "envoy":
        health_listener = _http_listener(
            listen, health_port, "agent", "/healthz/ready", "prometheus_stats", "/ready", static_log
        )
    else:
        health_listener = _http_listener(
            listen, health_port, "agent", "/healthz/ready", "agent", None, static_log
        )
    listeners = [
        _http_listener(
            listen,
            prometheus_port,
            "stats",
            "/stats/prometheus",
            "prometheus_stats",
            "/stats/prometheus",
            static_log,
        ),
        health_listener,
    ]

    ads_source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if initial_fetch_timeout:
        ads_source["initial_fetch_timeout"] = initial_fetch_timeout
    bootstrap: dict[str, Any] = {
        "node": node,
        "layered_runtime": _runtime(),
        "stats_config": stats_config(stats_inclusion_prefixes, all_stats),
        "admin": {"address": _socket_address(localhost, admin_port)},
        "overload_manager": _overload_manager(),
        "dynamic_resources": {
            "lds_config": dict(ads_source),
            "cds_config": dict(ads_source),
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
                "grpc_services": [{
                    "envoy_grpc": {"cluster_name": "xds-grpc"},
                    **({"initial_metadata": [{"key": "authorization", "value": f"Bearer {xds_token}"}]}
                       if xds_token else {}),
                }],
            },
        },
        "static_resources": {"clusters": clusters, "listeners": listeners},
    }
    if zipkin:
        bootstrap["tracing"] = {"http": zipkin_tracer_config()}
    return bootstrap
