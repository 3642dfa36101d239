"""Envoy xDS type URLs and the order a control plane must push them in."""

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# CDS, then EDS, then LDS, then RDS: a listener never points at a cluster Envoy does not have yet.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

# What a snapshot may hold: the pushed types, and SDS secrets (gateway credentials), which Envoy asks for by name.
SNAPSHOT_TYPES = (*PUSH_ORDER, SECRET)

SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS"}

# Wildcard types: Envoy subscribes to all of them; the others are subscribed by name.
WILDCARD = {CLUSTER, LISTENER}


def message_class(type_url: str):
    """The protobuf class for a type URL (imports lazily; the Envoy protos are large)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    return {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
        SECRET: secret_pb2.Secret,
    }[type_url]
