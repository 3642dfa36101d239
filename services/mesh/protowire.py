"""Protobuf wire encoding for messages written straight to bytes.

Several hot paths assemble protobuf messages from pre-serialised parts instead of building message objects:
the translator's endpoints, TLS contexts and listener filters, the xDS gateway's responses, the OTLP spans of
the logsink and of Mizzen's own tracing. They share these primitives. A message is a concatenation of fields;
a length-delimited field (string, bytes, embedded message) is its tag, the payload's length as a varint, and
the payload.
"""

from __future__ import annotations

VARINT, LENGTH_DELIMITED = 0, 2  # wire types: ints and enums; strings, bytes and embedded messages

# Varints below 16384, precomputed: almost every length and small number written is one of them.
VARINTS: list[bytes] = ([bytes((i,)) for i in range(128)]
                        + [bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(128, 16384)])


def varint(n: int) -> bytes:
    """An unsigned varint; a negative number is written as int64 two's complement (10 bytes), as protobuf does."""
    if 0 <= n < 16384:
        return VARINTS[n]
    if 0 < n < 2097152:  # three bytes: ports, body sizes
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(number: int, wire_type: int = LENGTH_DELIMITED) -> bytes:
    """A field's tag: its number and wire type."""
    return varint(number << 3 | wire_type)


def ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (VARINTS[n] if n < 16384 else varint(n)) + payload
