"""IP address checks shared by validation and translation (translation calls them per endpoint: cached)."""

from __future__ import annotations

from functools import lru_cache
from ipaddress import ip_address


def _dotted_quad(text: str) -> bool:
    """A valid IPv4 address by ipaddress's rules (ASCII decimal octets, at most 3 digits, ≤ 255, no leading
    zero): the common case, checked without ipaddress's costly parse (a push sees each Service's IP once)."""
    parts = text.split(".")
    if len(parts) != 4:
        return False
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 3 or (len(p) > 1 and p[0] == "0") or int(p) > 255:
            return False
    return True


@lru_cache(maxsize=65536)
def is_ip(text: str) -> bool:
    if _dotted_quad(text):
        return True
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
