"""IP address checks shared by validation and translation (translation calls them per endpoint: cached)."""

from __future__ import annotations

import re
from functools import lru_cache
from ipaddress import ip_address

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def _dotted_quad(text: str) -> bool:
    """A valid IPv4 address by ipaddress's rules (ASCII decimal octets, at most 3 digits, ≤ 255, no leading
    zero): the common case, checked without ipaddress's costly parse (a push sees each Service's IP once)."""
    return _DOTTED_QUAD.fullmatch(text) is not None


@lru_cache(maxsize=65536)
def is_ip(text: str) -> bool:
    if _dotted_quad(text):
        return True
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
