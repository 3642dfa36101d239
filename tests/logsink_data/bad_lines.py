"""A table of bad access-log lines: each with the kind of fault (the `reason` label of
mizzen_logsink_bad_lines_total) and words its dead-letter reason must contain."""

from __future__ import annotations

import orjson

T = "2024-03-01T10:00:00.000Z"


def obj(**kw) -> bytes:
    d = {"start_time": T, "method": "GET", "path": "/", "response_code": 200, "duration": 1,
         "request_id": "bad-line", "upstream_cluster": "outbound|80||web.default.svc.cluster.local"}
    d.update(kw)
    return orjson.dumps(d)


MAX_LINE = 65536

BAD_LINES: list[tuple[bytes, str, str]] = [
    (b"not json at all", "not_json", "not JSON"),
    (b"{", "cut_off", "cut off"),
    (obj()[:60], "cut_off", "cut off"),
    (b"[1, 2, 3]", "not_object", "an array"),
    (b'"just a string"', "not_object", "a string"),
    (b"42", "not_object", "a number"),
    (b"null", "not_object", "null"),
    (b"true", "not_object", "a boolean"),
    (b"{}", "missing_field", "start_time: missing"),
    (b'{"method":"GET","path":"/"}', "missing_field", "start_time: missing"),
    (obj(start_time="-"), "missing_field", "start_time: missing"),
    (obj(start_time=True), "wrong_type", "start_time"),
    (obj(start_time={"t": 1}), "wrong_type", "start_time"),
    (obj(start_time="yesterday"), "bad_value", "start_time"),
    (obj(start_time="2021-02-30T00:00:00.000Z"), "bad_value", "start_time"),
    (obj(duration="abc"), "bad_value", "duration"),
    (obj(duration=-5), "bad_value", "duration: negative"),
    (obj(duration=1.5), "wrong_type", "duration"),
    (obj(duration=True), "wrong_type", "duration"),
    (obj(response_code="OK"), "bad_value", "response_code"),
    (obj(response_code=1000), "bad_value", "response_code: value 1000 out of range"),
    (obj(response_code=[]), "wrong_type", "response_code"),
    (obj(bytes_sent=-1), "bad_value", "bytes_sent: negative"),
    (obj(bytes_received="12kb"), "bad_value", "bytes_received"),
    (obj(method=7), "wrong_type", "method: expected a string"),
    (obj(path={"p": 1}), "wrong_type", "path: expected a string, got an object"),
    (obj(request_id=["x"]), "wrong_type", "request_id"),
    (obj(upstream_cluster=80), "wrong_type", "upstream_cluster"),
    (obj(user_agent=3.5), "wrong_type", "user_agent"),
    (obj(downstream_remote_address=False), "wrong_type", "downstream_remote_address"),
    (obj(response_flags="uf"), "bad_value", "response_flags"),
    (obj(response_flags=3), "wrong_type", "response_flags"),
    (obj(upstream_service_time="fast"), "bad_value", "upstream_service_time"),
    (obj(grpc_status={}), "wrong_type", "grpc_status"),
    # JSON objects that are not access logs: no request or connection fields, so no span can be made of them
    (b'{"start_time":"2024-03-01T10:00:00.000Z"}', "missing_field", "not an access log"),
    (b'{"start_time":"2024-03-01T10:00:00.000Z","duration":5,"msg":"hello"}', "missing_field",
     "not an access log"),
    (b'{"start_time":"2024-03-01T10:00:00.000Z","request_id":"abc"}', "missing_field", "an HTTP entry needs"),
    (b'{"level":"info","ts":"2024-03-01T10:00:00.000Z","msg":"started"}', "missing_field", "start_time: missing"),
    # wrong-typed timestamps: Envoy prints %START_TIME% as a string; a number would make a span in 1970
    (b'{"start_time":12}', "wrong_type", "start_time: expected an RFC 3339 string, got 12"),
    (obj(start_time=1709287200), "wrong_type", "start_time: expected an RFC 3339 string"),
    (obj(start_time=1709287200.5), "wrong_type", "start_time: expected an RFC 3339 string, got number"),
    (obj(start_time=["2024-03-01T10:00:00.000Z"]), "wrong_type", "got an array"),
    (obj(start_time="2024-03-01T25:00:00.000Z"), "bad_value", "start_time"),
    # wrong-typed numbers
    (obj(response_code=200.0), "wrong_type", "response_code: expected a non-negative integer, got number"),
    (obj(bytes_sent="1e3"), "bad_value", "bytes_sent"),
    (obj(duration="1.5"), "bad_value", "duration"),
    (obj(bytes_received={"n": 1}), "wrong_type", "bytes_received: expected a non-negative integer, got an object"),
    (obj(upstream_request_attempt_count=True), "wrong_type", "upstream_request_attempt_count"),
    (obj(connection_id=7.0), "wrong_type", "connection_id"),
    (obj()[:-1] + b',"bytes_sent":123456789012345678901234567890}', "wrong_type", "bytes_sent: expected a non-negative integer, got number"),
    (b'\xff\xfe{"start_time":"2024-03-01T10:00:00.000Z"}', "not_utf8", "UTF-8"),
    (b'{"start_time":"2024-03-01T10:00:00.000Z","path":"/\xc3"}', "not_utf8", "UTF-8"),
    (b'{"start_time":"2024-03-01T10:00:00.000Z","duration":NaN}', "not_json", "not JSON"),
    (obj() + b" trailing", "not_json", "not JSON"),
    (b'{"start_time":"2024-03-01T10:00:00.000Z","x":' + b"[" * 1100 + b"]" * 1100 + b"}", "not_json", "depth"),
    (obj(path="/" + "x" * (MAX_LINE + 10)), "too_long", "line too long"),
]


def good_line(i: int) -> bytes:
    return orjson.dumps({
        "start_time": f"2024-03-01T10:00:{i % 60:02d}.{i % 1000:03d}Z", "method": "GET", "path": f"/good/{i}",
        "protocol": "HTTP/1.1", "response_code": 200, "response_flags": "-", "bytes_received": 0, "bytes_sent": 5,
        "duration": 2, "request_id": f"00000000-0000-4000-8000-{i:012d}", "authority": "web",
        "upstream_cluster": "outbound|80||web.default.svc.cluster.local", "upstream_host": "10.1.0.2:8080",
        "upstream_local_address": f"10.1.0.1:{20000 + i}", "downstream_remote_address": "10.1.0.1:9999",
        "downstream_local_address": "10.96.0.2:80",
    })


def interleaved() -> tuple[list[bytes], list[bytes]]:
    """Good and bad lines mixed: a good line before and after every bad one. Returns (all lines, good lines)."""
    lines, good = [], []
    for i, (raw, _kind, _words) in enumerate(BAD_LINES):
        g = good_line(i)
        lines += [g, raw]
        good.append(g)
    g = good_line(len(BAD_LINES))
    lines.append(g)
    good.append(g)
    return lines, good
