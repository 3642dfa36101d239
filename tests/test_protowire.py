"""The shared wire encoder writes what protobuf itself writes."""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from mizzen.services.mesh import protowire


def test_varints_match_protobuf_at_every_length_boundary():
    assert protowire.varint(0) == b"\x00"  # proto3 omits zero fields, so protobuf is asked from 1 on
    for n in (1, 127, 128, 300, 16383, 16384, 2097151, 2097152, 2**31, 2**63 - 1, 2**64 - 1):
        assert wrappers_pb2.UInt64Value(value=n).SerializeToString() == b"\x08" + protowire.varint(n), n
    for n in (-1, -300, -(2**63)):  # int64 two's complement, ten bytes
        assert wrappers_pb2.Int64Value(value=n).SerializeToString() == b"\x08" + protowire.varint(n), n


def test_length_delimited_fields_match_protobuf():
    assert protowire.ld(b"\x0a", b"") == b"\x0a\x00"
    for size in (1, 127, 128, 16383, 16384, 70000):
        value = "x" * size
        want = wrappers_pb2.StringValue(value=value).SerializeToString()
        assert protowire.ld(protowire.tag(1), value.encode()) == want, size
    assert protowire.tag(1, 0) == b"\x08" and protowire.tag(16) == b"\x82\x01"
