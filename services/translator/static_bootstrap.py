"""A snapshot embedded statically in an Envoy bootstrap, so Envoy itself can validate it (`--mode validate`).

EDS clusters become STATIC with their ClusterLoadAssignment inline, RDS references become inline route
configs, and the static `sds-grpc` / `xds-grpc` clusters the resources refer to are added.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb

from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from . import pb

Cluster = cluster_pb2.Cluster
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _grpc_cluster(name: str, port: int) -> Cluster:
    c = Cluster(name=name, type=Cluster.STATIC)
    pb.set_duration(c.connect_timeout, 1)
    c.load_assignment.cluster_name = name
    sa = c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", port
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

    opts = hpo.HttpProtocolOptions()
    opts.explicit_http_config.http2_protocol_options.SetInParent()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts, deterministic=True)
    return c


def static_bootstrap(resources: dict[str, dict[str, object]], node_id: str = "sidecar~127.0.0.1~validate.default~"
                     "default.svc.cluster.local") -> bootstrap_pb2.Bootstrap:
    """resources: type URL → name → message (a Snapshot's `merged()`)."""
    b = bootstrap_pb2.Bootstrap()
    b.node.id = node_id
    b.node.cluster = "validate"
    b.admin.address.socket_address.address = "127.0.0.1"
    b.admin.address.socket_address.port_value = 0
    sr = b.static_resources
    cla = resources.get(ENDPOINT, {})
    rds = resources.get(ROUTE, {})
    for c in resources.get(CLUSTER, {}).values():
        c2 = Cluster()
        c2.CopyFrom(c)
        if c2.type == Cluster.EDS:
            name = c2.eds_cluster_config.service_name or c2.name
            if name not in cla:
                raise KeyError(f"EDS cluster {c2.name} has no ClusterLoadAssignment {name!r} in the snapshot")
            c2.ClearField("eds_cluster_config")
            c2.type = Cluster.STATIC
            c2.load_assignment.CopyFrom(cla[name])
        sr.clusters.append(c2)
    sr.clusters.append(_grpc_cluster(pb.SDS_CLUSTER, 15012))
    sr.clusters.append(_grpc_cluster("xds-grpc", 15010))
    for listener in resources.get(LISTENER, {}).values():
        l2 = sr.listeners.add()
        l2.CopyFrom(listener)
        for fc in list(l2.filter_chains) + ([l2.default_filter_chain] if l2.HasField("default_filter_chain") else []):
            for f in fc.filters:
                if f.typed_config.type_url != _HCM_TYPE:
                    continue
                h = hcm_pb.HttpConnectionManager()
                f.typed_config.Unpack(h)
                if h.HasField("rds"):
                    name = h.rds.route_config_name
                    if name not in rds:
                        raise KeyError(f"listener {listener.name} uses RDS {name!r}, not in the snapshot")
                    h.route_config.CopyFrom(rds[name])
                    f.typed_config.Pack(h, deterministic=True)
    return b


def envoy_validate(bootstrap: bootstrap_pb2.Bootstrap, envoy: str | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `envoy --mode validate` on a bootstrap; returncode 0 means Envoy accepted all of it."""
    if envoy is None:
        from mizzen.services.mesh.procs import envoy_binary

        envoy = envoy_binary()
    with tempfile.TemporaryDirectory(prefix="mizzen-validate-") as tmp:
        path = Path(tmp) / "bootstrap.pb"
        path.write_bytes(bootstrap.SerializeToString())
        return subprocess.run([envoy, "--mode", "validate", "-c", str(path), "-l", "warning",
                               "--base-id-path", str(Path(tmp) / "base-id"), "--use-dynamic-base-id"],
                              capture_output=True, text=True, timeout=timeout)
