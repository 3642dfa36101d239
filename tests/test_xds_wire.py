"""The hand-assembled response bytes decode, with the real protobuf classes, to the messages they stand for."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from mizzen.services.mesh.xds_types import CLUSTER
from mizzen.services.xds_gateway import wire


def test_sotw_response_matches_protobuf():
    clusters = [cluster_pb2.Cluster(name=f"c{i}" * (i * 40 + 1)) for i in range(4)]  # varint lengths > 127
    entries = [wire.sotw_resource_entry(CLUSTER, c.SerializeToString()) for c in clusters]
    # a proxy's body comes in pieces (its layers' cached bodies), joined with the other fields once
    data = wire.sotw_response("v1", CLUSTER, "n7", [b"".join(entries[:3]), entries[3]], "gw-1")
    got = discovery_pb2.DiscoveryResponse.FromString(data)
    want = discovery_pb2.DiscoveryResponse(version_info="v1", type_url=CLUSTER, nonce="n7")
    want.control_plane.identifier = "gw-1"
    for c in clusters:
        want.resources.add().Pack(c)
    assert got == want
    assert [cluster_pb2.Cluster.FromString(a.value).name for a in got.resources] == [c.name for c in clusters]


def test_delta_response_matches_protobuf():
    c = cluster_pb2.Cluster(name="x" * 300)
    entries = [wire.delta_resource_entry(CLUSTER, c.name, "h1", c.SerializeToString())]
    data = wire.delta_response("sv", CLUSTER, "n1", entries, ["old-1", "old-2"], "gw")
    got = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
    assert got.system_version_info == "sv" and got.type_url == CLUSTER and got.nonce == "n1"
    assert list(got.removed_resources) == ["old-1", "old-2"] and got.control_plane.identifier == "gw"
    assert got.resources[0].name == c.name and got.resources[0].version == "h1"
    assert got.resources[0].resource.type_url == CLUSTER
    assert cluster_pb2.Cluster.FromString(got.resources[0].resource.value) == c

