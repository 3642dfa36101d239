"""is_ip's IPv4 fast path must agree with ipaddress on every input it accepts."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from mizzen.services.mesh.addresses import is_ip


def _reference(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("text", [
    "10.0.0.1", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.2.3.4", "10.0.0.010", "1.2.3", "1.2.3.4.5",
    "1..2.3", "1234.1.1.1", "+1.2.3.4", "1.2.3.-4", " 1.2.3.4", "1.2.3.4\n", "\uff11.2.3.4", "\u00b2.1.1.1",
    "::1", "fe80::1%eth0", "reviews.shop.svc.cluster.local", "", "a.b.c.d"])
def test_is_ip_agrees_with_ipaddress(text):
    assert is_ip(text) is _reference(text)
