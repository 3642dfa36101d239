"""The ISTIO_MUTUAL socket written from a serialised template must equal the context built and packed."""

from __future__ import annotations

import pytest

from mizzen.services.translator import pb, tls


@pytest.mark.parametrize("sni", ["", "outbound_.8080_.v1_.reviews.shop.svc.cluster.local", "s" * 300])
@pytest.mark.parametrize("h2", [False, True])
@pytest.mark.parametrize("sans", [[], ["spiffe://cluster.local/ns/shop/sa/reviews", "reviews.example.com"]])
def test_istio_mutual_socket_matches_the_built_socket(sni, h2, sans):
    want = tls.tls_socket(tls.istio_mutual_upstream(sni, sans, h2))
    got = pb.base_pb2.TransportSocket()
    tls.preset_istio_mutual_socket(got)  # as a cluster skeleton holds it
    got.typed_config.value = tls.istio_mutual_socket_value(sni, sans, h2)  # as each cluster's copy sets it
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
