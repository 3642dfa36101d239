"""Go `time.ParseDuration` syntax (`1.5s`, `300ms`, `1h2m`), which is how Istio reads YAML durations."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string. Raises DurationError on bad syntax."""
    if not isinstance(text, str):
        raise DurationError(f"duration must be a string like \"1.5s\", got {text!r}")
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise DurationError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise DurationError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def to_proto_json(seconds: float) -> str:
    """The protobuf JSON form of a Duration (`"1.500s"`)."""
    nanos = round(seconds * 1e9)
    whole, frac = divmod(nanos, 1_000_000_000)
    return f"{whole}s" if frac == 0 else f"{whole}.{frac:09d}".rstrip("0") + "s"


def set_duration(msg, seconds: float) -> None:
    """Fill a google.protobuf.Duration from seconds."""
    nanos = round(seconds * 1e9)
    msg.seconds, msg.nanos = divmod(nanos, 1_000_000_000)
