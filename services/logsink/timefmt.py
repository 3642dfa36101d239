"""Timestamps in access logs → Unix nanoseconds, fast for Envoy's `%START_TIME%` form
(`2021-02-18T07:08:50.031Z`) and correct for any RFC 3339 time or epoch seconds."""

from __future__ import annotations

import calendar
import datetime
import re

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9}))?(?:([Zz])|([+-])(\d\d):?(\d\d))?"
)
_EPOCH = re.compile(r"(\d{1,12})(?:\.(\d{1,9}))?")

# "YYYY-MM-DDTHH:MM" → Unix seconds at that minute (UTC); the fast path for Envoy's default format.
_minute_cache: dict[str, int] = {}
# "YYYY-MM-DDTHH:MM:SS" → Unix ns at that second: lines come in bursts within one second.
_second_cache: dict[str, int] = {}

# "000".."999" → ns: the milliseconds of the fast path without isdigit/int per line.
_MS_NS = {f"{i:03d}": i * 1_000_000 for i in range(1000)}


class TimeError(ValueError):
    pass


def _minute_base(prefix: str) -> int:
    base = _minute_cache.get(prefix)
    if base is None:
        m = _RFC3339.fullmatch(prefix + ":00")
        if not m:
            raise TimeError("not an RFC 3339 time")
        base = _calendar(m)
        if len(_minute_cache) > 50000:
            _minute_cache.clear()
        _minute_cache[prefix] = base
    return base


def _calendar(m: re.Match) -> int:
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60):
        raise TimeError("time field out of range")
    try:
        datetime.date(y, mo, d)  # rejects 2021-02-30; timegm would roll it over
        return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    except (ValueError, OverflowError) as e:
        raise TimeError(str(e)) from None


def parse_time_ns(value: str) -> int:
    """RFC 3339 (`Z` or an offset; missing zone = UTC; up to 9 fraction digits) or epoch seconds."""
    # Fast path: exactly Envoy's default `2021-02-18T07:08:50.031Z`.
    if len(value) == 24 and value[23] == "Z" and value[19] == ".":
        base = _second_cache.get(value[:19])
        if base is not None:
            ms_ns = _MS_NS.get(value[20:23])
            if ms_ns is not None:
                return base + ms_ns
    if len(value) == 24 and value[23] == "Z" and value[19] == "." and value[16] == ":":
        sec, ms = value[17:19], value[20:23]
        if sec.isdigit() and ms.isdigit() and sec.isascii() and ms.isascii():
            s = int(sec)
            if s <= 60:
                base = (_minute_base(value[:16]) + s) * 1_000_000_000
                if len(_second_cache) > 100_000:
                    _second_cache.clear()
                _second_cache[value[:19]] = base
                return base + int(ms) * 1_000_000
    m = _RFC3339.fullmatch(value)
    if m:
        secs = _calendar(m)
        frac = m.group(7) or ""
        ns = int(frac.ljust(9, "0")) if frac else 0
        if m.group(9):
            off = int(m.group(10)) * 3600 + int(m.group(11)) * 60
            secs -= off if m.group(9) == "+" else -off
        return secs * 1_000_000_000 + ns
    m = _EPOCH.fullmatch(value)
    if m:
        frac = m.group(2) or ""
        return int(m.group(1)) * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    raise TimeError("not an RFC 3339 time or epoch seconds")


def format_time_ns(ns: int) -> str:
    """Unix ns → `2021-02-18T07:08:50.031000000Z` (used in messages and the dead-letter file)."""
    import time

    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"
