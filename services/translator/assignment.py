"""One ClusterLoadAssignment builder for both places endpoints appear: EDS responses (endpoints.py) and the
inline `load_assignment` of DNS clusters (clusters.py). Endpoints are grouped by locality, each weighted."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from mizzen.services.mesh.protowire import VARINT, ld, varint

from . import pb

TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"

ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment
LocalityLbEndpoints = endpoint_components_pb2.LocalityLbEndpoints
LbEndpoint = endpoint_components_pb2.LbEndpoint

_TLS_MODE_MD: dict[str, base_pb2.Metadata] = {}


def tls_mode_metadata(mode: str) -> base_pb2.Metadata:
    md = _TLS_MODE_MD.get(mode)
    if md is None:
        md = base_pb2.Metadata()
        md.filter_metadata[TRANSPORT_SOCKET_MATCH].update({"tlsMode": mode})
        _TLS_MODE_MD[mode] = md
    return md


def set_locality(loc: base_pb2.Locality, label: str) -> None:
    """`region/zone/subzone` → Locality."""
    parts = label.split("/")
    loc.region = parts[0]
    if len(parts) > 1:
        loc.zone = parts[1]
    if len(parts) > 2:
        loc.sub_zone = parts[2]


# An assignment is parsed from bytes put together here: one parse costs a fraction of adding each endpoint and
# setting its fields through the protobuf API. Tags of the fields written:
_CLA_NAME = pb.tag(ClusterLoadAssignment, "cluster_name")
_CLA_ENDPOINTS = pb.tag(ClusterLoadAssignment, "endpoints")
_LLE_LOCALITY = pb.tag(LocalityLbEndpoints, "locality")
_LLE_ENDPOINTS = pb.tag(LocalityLbEndpoints, "lb_endpoints")
_LLE_WEIGHT = pb.tag(LocalityLbEndpoints, "load_balancing_weight")
_LLE_PRIORITY = pb.tag(LocalityLbEndpoints, "priority", VARINT)
_LBE_ENDPOINT = pb.tag(LbEndpoint, "endpoint")
_LBE_METADATA = pb.tag(LbEndpoint, "metadata")
_LBE_WEIGHT = pb.tag(LbEndpoint, "load_balancing_weight")
_ENDPOINT_ADDRESS = pb.tag(endpoint_components_pb2.Endpoint, "address")
_SOCKET_ADDRESS = pb.tag(address_pb2.Address, "socket_address")
_ADDRESS = pb.tag(address_pb2.SocketAddress, "address")
_PORT = pb.tag(address_pb2.SocketAddress, "port_value", VARINT)
_U32_VALUE = pb.tag(wrappers_pb2.UInt32Value, "value", VARINT)


def _u32(tag: bytes, value: int) -> bytes:
    """A UInt32Value field (present, so written even for 0)."""
    if not 0 <= value <= pb.MAX_UINT32:
        raise ValueError(f"{value} is out of range for a uint32")  # as setting the field would
    return ld(tag, _U32_VALUE + varint(value) if value else b"")


_LOCALITIES: dict[str, bytes] = {}


def _locality(label: str) -> bytes:
    """The `locality` field of a label's LocalityLbEndpoints, serialised once per label."""
    wire = _LOCALITIES.get(label)
    if wire is None:
        if len(_LOCALITIES) > 10_000:
            _LOCALITIES.clear()
        loc = base_pb2.Locality()
        set_locality(loc, label)
        wire = _LOCALITIES[label] = ld(_LLE_LOCALITY, loc.SerializeToString(deterministic=True))
    return wire


_WEIGHT_1 = _u32(_LBE_WEIGHT, 1)
_MODES: dict[str | None, bytes] = {None: b""}


def _mode(mode: str | None) -> bytes:
    """An endpoint's `metadata` field for its tlsMode (nothing for None), serialised once per mode."""
    wire = _MODES.get(mode)
    if wire is None:
        wire = _MODES[mode] = ld(_LBE_METADATA, tls_mode_metadata(mode).SerializeToString(deterministic=True))
    return wire


# An endpoint's `lb_endpoints` entry per (address, port, weight, tlsMode or None): every assignment that holds
# the endpoint (its service's cluster, each subset's) shares it, and so do later push contexts.
_LB_ENDPOINTS: dict[tuple[str, int, int, str | None], bytes] = {}


def _lb_endpoint(address: str, port: int, weight: int, mode: str | None) -> bytes:
    key = (address, port, weight, mode)
    wire = _LB_ENDPOINTS.get(key)
    if wire is None:
        if len(_LB_ENDPOINTS) > 200_000:
            _LB_ENDPOINTS.clear()
        a = address.encode()
        sa = (ld(_ADDRESS, a) if a else b"") + (_PORT + varint(port) if port else b"")
        lb = ld(_LBE_ENDPOINT, ld(_ENDPOINT_ADDRESS, ld(_SOCKET_ADDRESS, sa)))
        lb += _WEIGHT_1 if weight == 1 else _u32(_LBE_WEIGHT, weight)
        wire = _LB_ENDPOINTS[key] = ld(_LLE_ENDPOINTS, lb + _mode(mode))
    return wire


def build_assignment(name: str, endpoints: Iterable, labels: dict | None,
                     tls_metadata: bool,
                     mtls_disabled: Callable[[Any], bool] | None = None,
                     priority: Callable[[Any], int] | None = None) -> ClusterLoadAssignment:
    """The endpoints whose labels ⊇ `labels`, grouped by locality. With `tls_metadata`, each endpoint says
    whether its workload takes mTLS (auto mTLS picks the TLS transport socket by it): it runs a sidecar, and
    `mtls_disabled(endpoint)` (its PeerAuthentication says DISABLE for that workload and port, Istio's EDS
    mtlsChecker) is false. With `priority`, a locality's endpoints are split further by their priority
    (failoverPriority, endpoints.py)."""
    groups: dict[tuple[str, int], list] = {}
    # Most selectors name no None value: then a C-level test of the items says what `.get(k) == v` for each would.
    wanted = labels.items() if labels and None not in labels.values() else None
    for e in endpoints:
        if wanted is not None:
            if not wanted <= e.labels.items():
                continue
        elif labels and any(e.labels.get(k) != v for k, v in labels.items()):
            continue
        groups.setdefault((e.locality, priority(e) if priority else 0), []).append(e)
    wire = [ld(_CLA_NAME, name.encode())] if name else []
    for (locality, prio), eps in groups.items():
        group = [_locality(locality)] if locality else []
        if prio:
            group.append(_LLE_PRIORITY + varint(prio))
        total = 0
        for e in eps:
            w = e.weight or 1
            total += w
            mode = None
            if tls_metadata:
                mode = e.tls_mode or "disabled"
                if mode == "istio" and mtls_disabled is not None and mtls_disabled(e):
                    mode = "disabled"
            group.append(_lb_endpoint(e.address, e.port, w, mode))
        group.append(_u32(_LLE_WEIGHT, total))
        wire.append(ld(_CLA_ENDPOINTS, b"".join(group)))
    return ClusterLoadAssignment.FromString(b"".join(wire))
