"""Just enough protobuf wire encoding to assemble xDS responses from pre-serialized pieces.

A response to 2,000 streams carries the same resources each time; building `Any` messages per stream would
cost more than the rest of the push. Protobuf messages are concatenations of fields, so a response is the
cached bytes of its repeated `resources` fields plus a few small scalar fields (version, type URL, nonce)
encoded here. Field numbers are those of envoy.service.discovery.v3 (checked against the real classes in
tests/test_xds_wire.py).
"""

from __future__ import annotations

from mizzen.services.mesh.protowire import ld, tag


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message) by its number."""
    return ld(tag(number), payload)


def string_field(number: int, value: str) -> bytes:
    return field(number, value.encode()) if value else b""


def any_message(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any{type_url=1, value=2}."""
    return string_field(1, type_url) + field(2, value)


# DiscoveryResponse
DR_VERSION, DR_RESOURCES, DR_TYPE_URL, DR_NONCE, DR_CONTROL_PLANE = 1, 2, 4, 5, 6
# DeltaDiscoveryResponse
DDR_SYSTEM_VERSION, DDR_RESOURCES, DDR_TYPE_URL, DDR_NONCE, DDR_REMOVED, DDR_CONTROL_PLANE = 1, 2, 4, 5, 6, 7
# discovery.v3.Resource
RES_VERSION, RES_RESOURCE, RES_NAME = 1, 2, 3


def sotw_resource_entry(type_url: str, value: bytes) -> bytes:
    """One `resources` entry of a DiscoveryResponse: the Any around a serialized resource."""
    return field(DR_RESOURCES, any_message(type_url, value))


def delta_resource_entry(type_url: str, name: str, version: str, value: bytes | None) -> bytes:
    """One `resources` entry of a DeltaDiscoveryResponse: discovery.v3.Resource{name, version, resource}."""
    body = string_field(RES_NAME, name) + string_field(RES_VERSION, version)
    if value is not None:
        body += field(RES_RESOURCE, any_message(type_url, value))
    return field(DDR_RESOURCES, body)


def control_plane(identifier: str) -> bytes:
    return string_field(1, identifier)


def sotw_response(version: str, type_url: str, nonce: str, bodies: list[bytes], control_plane_id: str = "") -> bytes:
    """`bodies`: encoded `resources` fields, in order (pieces of one body, joined here once)."""
    out = [string_field(DR_VERSION, version), *bodies, string_field(DR_TYPE_URL, type_url),
           string_field(DR_NONCE, nonce)]
    if control_plane_id:
        out.append(field(DR_CONTROL_PLANE, control_plane(control_plane_id)))
    return b"".join(out)


def delta_response(system_version: str, type_url: str, nonce: str, entries: list[bytes], removed: list[str],
                   control_plane_id: str = "") -> bytes:
    out = [string_field(DDR_SYSTEM_VERSION, system_version), *entries, string_field(DDR_TYPE_URL, type_url)]
    out.extend(field(DDR_REMOVED, n.encode()) for n in removed)
    out.append(string_field(DDR_NONCE, nonce))
    if control_plane_id:
        out.append(field(DDR_CONTROL_PLANE, control_plane(control_plane_id)))
    return b"".join(out)
