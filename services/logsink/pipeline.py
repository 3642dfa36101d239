"""The logsink's pure core: lines → records → joined spans → OTLP requests. No I/O here: inputs call
`feed_line`/`feed_record`, the owner calls `tick` and `flush`, and finished requests go to `on_batch`.

Every line carries an optional ack token (a callable). A token is called once the line is finished: its span
was accepted by the receiver (the exporter calls the batch's tokens) or it went to the dead letters. Inputs
use that to commit file offsets and JetStream acks only for lines that are really done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..mesh import otlp_wire as w
from . import otlp_json
from .deadletter import DeadLetters
from .identity import Identity, Source
from .join import Joiner, prepare
from .metrics import IstioMetrics, Stats
from .parse import KIND_CLIENT, KIND_SERVER, BadLine, Record, parse_line
from .spans import K, encode_body

log = logging.getLogger("mizzen.logsink")

SCOPE_NAME = "mizzen.logsink"
SCOPE_VERSION = "0.1.0"

Token = Callable[[], None]
_authority_host: dict[str, str] = {}  # authority → its host part, for the istio metrics' destination
# on_batch(request_bytes, span_count, tokens)
BatchSink = Callable[[bytes, int, list[Token]], None]


class Batch:
    __slots__ = ("by_resource", "count", "tokens")

    def __init__(self) -> None:
        self.by_resource: dict[Identity, list[bytes]] = {}
        self.count = 0
        self.tokens: list[Token] = []


class Pipeline:
    def __init__(
        self,
        on_batch: BatchSink,
        dead: DeadLetters | None = None,
        stats: Stats | None = None,
        istio: IstioMetrics | None = None,
        window: float = 5.0,
        max_records: int = 200_000,
        batch_size: int = 512,
        max_line_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        workloads=None,
    ):
        self.on_batch = on_batch
        self.dead = dead or DeadLetters(None)
        self.stats = stats or Stats()
        self.istio = istio
        self.batch_size = batch_size
        self.max_line_bytes = max_line_bytes
        self.clock = clock
        self.joiner = Joiner(self._emitted, window=window, max_records=max_records, workloads=workloads)
        self.stats.joins = self.joiner.stats
        self.traces: set[bytes] | None = None  # convert counts distinct traces
        # Partitioned replicas hand the lines still waiting for their other side to the partition's next owner
        # (inputs/partitions.py), so those keep their bytes until emitted (~0.8 KiB more per waiting line).
        self.keep_raw = False
        # `convert`: spans are written as OTLP/JSON (otlp_json.py) straight from their encoded pieces, and
        # `on_batch` gets a list of JSON `resourceSpans` entries instead of a protobuf request.
        self.json_mode = False
        self._batch = Batch()
        self.batch_since = 0.0
        self._resources: dict[Identity, bytes] = {}
        self._scope = w.scope(SCOPE_NAME, SCOPE_VERSION)
        self._link_attr = {how: K["mizzen.parent.source"].s(how) for how in
                           ("connection", "request_id", "same_pod", "traceparent")}

    # ---- intake -------------------------------------------------------------------------------------------
    def feed_line(self, raw: bytes, src: Source, token: Token | None = None, now: float | None = None) -> bool:
        """One line without its newline. Returns False when it was bad (counted, dead-lettered, acked)."""
        self.stats.lines[src.input] += 1
        if len(raw) > self.max_line_bytes:
            return self.bad_line(raw, BadLine(f"line too long: {len(raw)} bytes (limit {self.max_line_bytes})",
                                              "too_long"), src, token)
        try:
            rec = parse_line(raw, src)
        except BadLine as e:
            return self.bad_line(raw, e, src, token)
        except RecursionError:
            return self.bad_line(raw, BadLine("JSON nested too deeply", "not_json"), src, token)
        except Exception as e:  # noqa: BLE001 - a bug must cost one line, never the stream
            log.exception("unexpected error parsing a line")
            return self.bad_line(raw, BadLine(f"internal error: {e!r}", "internal_error"), src, token)
        self.add_record(rec, raw, token, self.clock() if now is None else now)
        return True

    def bad_line(self, raw: bytes, err: BadLine, src: Source, token: Token | None) -> bool:
        self.stats.bad[(src.input, err.kind, err.field)] += 1
        self.dead.write(raw, err, src)
        self.stats.dead_letters += 1
        if token is not None:
            token()
        return False

    def add_record(self, rec: Record, raw_for_id: bytes, token: Token | None, now: float) -> None:
        rec.token = token
        prepare(rec, raw_for_id)
        rec.body = encode_body(rec, self.json_mode)
        f = rec.f
        if self.istio is not None:
            get = f.get
            duration = get("duration")
            authority = get("authority")
            if authority:
                host = _authority_host.get(authority)
                if host is None:
                    if len(_authority_host) >= 10000:
                        _authority_host.clear()
                    host = _authority_host[authority] = authority.rsplit(":", 1)[0]
            else:
                host = ""
            rec.mvals = (
                # absent values ("-") are stored as None, so `or` supplies the default
                get("response_code") or 0,
                ",".join(rec.flags) if rec.flags else "",
                duration if duration is not None else (rec.end_ns - rec.start_ns) // 1_000_000,
                get("bytes_received") or 0,
                get("bytes_sent") or 0,
                "grpc" if "grpc_status" in f else "http",
                host,
            )
        # The fields are in the body now; drop them so waiting records stay small.
        rec.f = None
        rec.extra = None
        if not self.keep_raw:
            rec.raw = None
        rec.env = None
        self.joiner.add(rec, now)

    # ---- output -------------------------------------------------------------------------------------------
    def _emitted(self, rec: Record) -> None:
        ident = self.joiner.identity(rec)
        parent = rec.parent
        if parent is not None:
            pid = parent.span_id
            remote = parent.kind == KIND_CLIENT  # a server span's parent lives in the caller's sidecar
        else:
            pid = rec.ext_parent
            remote = pid is not None
        flags = w.FLAG_SAMPLED | w.FLAG_HAS_IS_REMOTE | (w.FLAG_IS_REMOTE if remote else 0)
        link = self._link_attr.get(rec.joined_by, b"") if pid is not None else b""
        if self.json_mode:
            span = otlp_json.span_from_parts(rec.trace_id, rec.span_id, pid, flags, rec.tstate or "", rec.body,
                                             link)
        else:
            span = w.span_message(rec.trace_id, rec.span_id, pid, flags, rec.tstate or "", rec.body, link)
        if self.istio is not None:
            # the istio metrics: the peer, and the destination service (inline: this runs for every span)
            joiner = self.joiner
            cl = rec.cluster
            if rec.kind == KIND_SERVER:
                peer = joiner.identity(rec.parent) if parent is not None else joiner.peer_identity(rec.dr_ip)
                # the service the caller addressed: the mTLS SNI names it; else the request's authority
                dest = rec.sni_host or rec.mvals[6]
            else:
                peer = joiner.peer_identity(rec.uh_ip)
                dest = cl.host if cl is not None and cl.host else ""
            self.istio.observe(rec.kind, rec.http, ident, peer, dest, rec.mvals)
        if self.traces is not None:
            self.traces.add(rec.trace_id)
        self.stats.spans += 1
        b = self._batch
        if b.count == 0:
            self.batch_since = self.clock()
        lst = b.by_resource.get(ident)
        if lst is None:
            lst = b.by_resource[ident] = []
        lst.append(span)
        b.count += 1
        if rec.token is not None:
            b.tokens.append(rec.token)
            rec.token = None
        rec.body = None
        if b.count >= self.batch_size:
            self.flush_batch()

    @property
    def batch_count(self) -> int:
        return self._batch.count

    def flush_batch(self) -> None:
        b = self._batch
        if b.count == 0:
            return
        self._batch = Batch()
        parts = []
        for ident, spans in b.by_resource.items():
            res = self._resources.get(ident)
            if res is None:
                res = self._resources[ident] = w.resource(ident.resource_attributes())
            if self.json_mode:
                parts.append(otlp_json.resource_spans_from_json(res, self._scope, spans))
            else:
                parts += w.resource_spans_parts(res, self._scope, spans)
        self.on_batch(parts if self.json_mode else b"".join(parts), b.count, b.tokens)

    def tick(self, now: float | None = None) -> None:
        self.joiner.expire(self.clock() if now is None else now)
        self.stats.gauges["pending_records"] = self.joiner.pending
        self.stats.gauges["held_records"] = self.joiner.live

    def flush(self) -> None:
        """Emit everything still waiting (shutdown, end of a file conversion) and hand over the last batch."""
        self.joiner.flush()
        self.flush_batch()
        self.dead.flush()
