"""Messages assembled from wire fields (pb.wire_field) must equal the ones built field by field."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from mizzen.services.translator import pb, tls


@pytest.mark.parametrize("sni", ["", "outbound_.8080_.v1_.reviews.shop.svc.cluster.local", "s" * 300])
@pytest.mark.parametrize("h2", [False, True])
@pytest.mark.parametrize("sans", [[], ["spiffe://cluster.local/ns/shop/sa/reviews", "reviews.example.com"]])
def test_istio_mutual_socket_bytes_match_the_built_socket(sni, h2, sans):
    built = tls.tls_socket(tls.istio_mutual_upstream(sni, sans, h2)).SerializeToString(deterministic=True)
    assert tls.istio_mutual_socket_bytes(sni, sans, h2) == built


def test_wire_fields_merge_into_a_parsed_message():
    skeleton = cluster_pb2.Cluster(type=cluster_pb2.Cluster.EDS)
    skeleton.eds_cluster_config.eds_config.CopyFrom(pb.ads_config_source())
    name = "outbound|9080|v1|reviews.shop.svc.cluster.local" * 4  # a length over one varint byte
    raw = name.encode()
    eds_tag = pb.field_tag(cluster_pb2.Cluster, "eds_cluster_config")
    service_name = pb.wire_field(pb.field_tag(cluster_pb2.Cluster.EdsClusterConfig, "service_name"), raw)
    parsed = cluster_pb2.Cluster.FromString(skeleton.SerializeToString() + pb.wire_field(eds_tag, service_name)
                                            + pb.wire_field(pb.field_tag(cluster_pb2.Cluster, "name"), raw))
    want = cluster_pb2.Cluster()
    want.CopyFrom(skeleton)
    want.name = name
    want.eds_cluster_config.service_name = name
    assert parsed.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    assert parsed.eds_cluster_config.eds_config == skeleton.eds_cluster_config.eds_config  # merged, not replaced
