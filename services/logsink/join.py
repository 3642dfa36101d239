"""Joining the two sides of each call into one trace.

Ids are deterministic, so re-reading a line (after a crash, or converting a file twice) yields the same span:
- span id: 8 bytes of BLAKE2b over the line's bytes;
- trace id: the `traceparent` trace id when the request carried one, else the `x-request-id` UUID (with Envoy's
  trace-reason nibble reset, see `parse.normalize_request_id`); a TCP connection's trace id hashes its
  4-tuple and the client side's start time. A joined child takes its parent's trace id.

Parents:
- a SERVER line (callee's sidecar) is the child of the CLIENT line (caller's sidecar) with the same request id
  whose connection it is: client `upstream_local_address` = server `downstream_remote_address`, and whose
  interval contains it. When only the request id and the caller's pod agree (a retry on another connection), or
  clocks disagree by more than the tolerance, the match is taken loosely when the line's wait ends;
- a CLIENT line is the child of the SERVER line of the same pod and request id whose interval contains it (the
  application forwarded `x-request-id` while serving that request: A→B→C becomes one trace);
- otherwise the parent is the `traceparent` parent span when there is one, else the span is a root.

Each line waits at most `window` seconds (of the caller's clock) for its other side and stays that long as a
possible parent; `max_records` bounds memory (the oldest lines are released early), as does `max_group`.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
from collections import deque
from collections.abc import Callable

from .cluster_name import parse_sni
from .identity import Identity, PeerMap, identity_from_fields, identity_from_san, unknown
from .parse import KIND_CLIENT, KIND_SERVER, Record, address_ip

PENDING, EMITTED, GONE = 0, 1, 2
_SHARED_IPS = frozenset({"127.0.0.1", "127.0.0.6", "::1", "0.0.0.0", "::"})

_blake = hashlib.blake2b


_ZERO_ID = bytes(8)


def span_id_of(raw: bytes) -> bytes:
    sid = _blake(raw, digest_size=8).digest()
    return sid if sid != _ZERO_ID else b"\x00" * 7 + b"\x01"


class Joiner:
    def __init__(
        self,
        emit: Callable[[Record], None],
        window: float = 5.0,
        max_records: int = 200_000,
        max_group: int = 256,
        tolerance_ms: int = 2,
        skew_ms: int = 1000,
        peers: PeerMap | None = None,
        workloads=None,
    ):
        self.emit_cb = emit
        self.window = window
        self.max_records = max_records
        self.max_group = max_group
        self.tol = tolerance_ms * 1_000_000
        self.skew = skew_ms * 1_000_000
        self.peers = peers if peers is not None else PeerMap()
        self.workloads = workloads  # WorkloadIndex (or anything with .get(ip)): the registry's Pods by IP
        self.groups: dict[object, list[Record]] = {}
        # Deadlines, earliest first. The service's clock only moves forward, so deadlines arrive in order: they
        # go to a FIFO (O(1), no comparisons). Only one arriving out of order (`convert` uses log time) goes to
        # the heap; the earlier head of the two is taken, by (deadline, seq) as a single heap would.
        self.fifo: deque[tuple[float, int, Record]] = deque()
        self.heap: list[tuple[float, int, Record]] = []
        self.live = 0  # records held (pending or kept as possible parents)
        self.pending = 0
        self._seq = 0
        self.stats = {"connection": 0, "request_id": 0, "same_pod": 0, "traceparent": 0, "root": 0, "early": 0}

    # ---- intake -------------------------------------------------------------------------------------------
    def add(self, rec: Record, now: float) -> None:
        """Take a record whose `span_id` and join fields are set (see `prepare`)."""
        self._learn(rec)
        key = rec.gkey
        if key is None:
            self._emit(rec)
            return
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = []
        elif len(group) >= self.max_group:
            self._release(group[0], early=True)
        group.append(rec)
        rec.state = PENDING
        self.pending += 1
        self.live += 1
        self._seq += 1
        entry = (now + self.window, self._seq, rec)
        fifo = self.fifo
        if not fifo or fifo[-1][0] <= entry[0]:
            fifo.append(entry)
        else:
            heapq.heappush(self.heap, entry)

        if rec.http or rec.kind == KIND_SERVER:
            if len(group) > 1:  # alone in its group it has no candidate parent
                parent, how = self._find_parent(rec, group, strict=True)
                if parent is not None:
                    self._link(rec, parent, how)
        else:
            self._emit(rec)  # a TCP client line has no parent to wait for; it stays as a possible parent
        # Lines already waiting may have been waiting for this one.
        if len(group) > 1:
            for other in group:
                if other.state == PENDING and other is not rec:
                    parent, how = self._find_parent(other, (rec,), strict=True)
                    if parent is not None:
                        self._link(other, parent, how)
        while self.live > self.max_records:
            old = self._pop_due(None)
            if old is None:
                break
            if old.state != GONE:
                self._release(old, early=True)

    def _pop_due(self, now: float | None) -> Record | None:
        """Remove and return the record with the earliest deadline, if that deadline is at most `now` (any
        deadline when `now` is None); else None."""
        fifo, heap = self.fifo, self.heap
        if heap and (not fifo or heap[0] < fifo[0]):
            if now is not None and heap[0][0] > now:
                return None
            return heapq.heappop(heap)[2]
        if fifo and (now is None or fifo[0][0] <= now):
            return fifo.popleft()[2]
        return None

    def expire(self, now: float) -> None:
        """Release every record whose wait is over: unmatched ones are emitted with their best loose match."""
        while (rec := self._pop_due(now)) is not None:
            if rec.state != GONE:
                self._release(rec)

    def take_pending(self, want: Callable[[Record], bool] | None = None) -> list[Record]:
        """Remove and return the records still waiting for their other side (not emitted), for a replica that
        hands its partitions over: their lines go to the next owner instead of being exported here."""
        out = []
        for _, _, rec in (*self.fifo, *self.heap):
            if rec.state == PENDING and (want is None or want(rec)):
                rec.state = GONE
                self.pending -= 1
                self.live -= 1
                group = self.groups.get(rec.gkey)
                if group is not None:
                    with contextlib.suppress(ValueError):
                        group.remove(rec)
                    if not group:
                        del self.groups[rec.gkey]
                out.append(rec)
        return out

    def flush(self) -> None:
        while (rec := self._pop_due(None)) is not None:
            if rec.state != GONE:
                self._release(rec)

    # ---- matching -----------------------------------------------------------------------------------------
    def _find_parent(self, rec: Record, candidates, strict: bool) -> tuple[Record | None, str]:
        tol = self.tol
        best = None
        best_score = None
        how = ""
        if rec.kind == KIND_SERVER:
            dr = rec.dr
            if not rec.http:
                # TCP: the connection is the key; the closest client start wins (ports get reused).
                for c in candidates:
                    if c is not rec and c.kind == KIND_CLIENT:
                        score = abs(rec.start_ns - c.start_ns)
                        if best_score is None or score < best_score:
                            best, best_score = c, score
                return best, "connection"
            slack = tol if strict else self.skew
            for c in candidates:
                if c is rec or c.kind != KIND_CLIENT:
                    continue
                if c.ul == dr and dr is not None:
                    level = 0
                elif strict:
                    continue
                else:
                    src_ip = rec.dr_ip
                    if src_ip and src_ip not in _SHARED_IPS and c.ul_ip == src_ip:
                        level = 1
                    elif c.uh is not None and c.uh == rec.dl:
                        level = 2
                    else:
                        continue
                if c.start_ns - slack <= rec.start_ns and rec.end_ns <= c.end_ns + slack and not self._is_ancestor(rec, c):
                    score = (level, abs(rec.start_ns - c.start_ns))
                    if best_score is None or score < best_score:
                        best, best_score = c, score
            if best is not None:
                how = "connection" if best_score[0] == 0 else "request_id"
            return best, how
        # CLIENT: the innermost SERVER line of the same pod that contains it.
        for s in candidates:
            if s is rec or s.kind != KIND_SERVER:
                continue
            if not _same_pod(rec, s):
                continue
            if s.dr is not None and s.dr == rec.ul:
                continue  # that server line is this call's other side, not its parent
            if s.start_ns - tol <= rec.start_ns and rec.end_ns <= s.end_ns + tol and not self._is_ancestor(rec, s):
                score = -s.start_ns
                if best_score is None or score < best_score:
                    best, best_score = s, score
        return best, "same_pod"

    @staticmethod
    def _is_ancestor(rec: Record, cand: Record) -> bool:
        """Would linking rec under cand make a cycle (cand already descends from rec)?"""
        p = cand
        for _ in range(64):
            if p is None:
                return False
            if p is rec:
                return True
            p = p.parent
        return True

    def _link(self, rec: Record, parent: Record, how: str) -> None:
        # A client line whose application made its own span (a different traceparent than the request it serves)
        # belongs under that application span rather than directly under the sidecar's server span.
        if rec.kind == KIND_CLIENT and rec.tp is not None and (parent.tp is None or parent.tp[1] != rec.tp[1]):
            rec.ext_parent = rec.tp[1]
            rec.trace_id = rec.tp[0]
            rec.joined_by = "traceparent"
            self._emit(rec)
            return
        rec.parent = parent
        rec.trace_id = parent.trace_id
        rec.joined_by = how
        self._emit(rec)

    def _release(self, rec: Record, early: bool = False) -> None:
        if rec.state == PENDING:
            group = self.groups.get(rec.gkey)
            parent = None
            if group is not None and rec.kind == KIND_SERVER:
                parent, how = self._find_parent(rec, group, strict=False)
            if parent is not None:
                self._link(rec, parent, how)
            else:
                if rec.tp is not None:
                    rec.ext_parent = rec.tp[1]
                    rec.joined_by = "traceparent"
                self._emit(rec)
            if early:
                self.stats["early"] += 1
        if rec.state != GONE:
            rec.state = GONE
            self.live -= 1
            group = self.groups.get(rec.gkey)
            if group is not None:
                try:
                    group.remove(rec)
                except ValueError:
                    pass
                if not group:
                    del self.groups[rec.gkey]

    def _emit(self, rec: Record) -> None:
        if rec.state == PENDING:
            self.pending -= 1
        if rec.tp is not None and rec.parent is None and rec.ext_parent is None:
            rec.ext_parent = rec.tp[1]  # emitted at once (no join key): the sender's span is the parent
            rec.joined_by = "traceparent"
        self.stats[rec.joined_by or "root"] += 1
        rec.state = EMITTED if rec.gkey is not None else GONE
        self.emit_cb(rec)

    # ---- identity -----------------------------------------------------------------------------------------
    def _learn(self, rec: Record) -> None:
        ident = rec.src.identity if rec.src is not None else None
        if ident is None:
            ident = rec.own
        peers = self.peers
        if rec.kind == KIND_SERVER:
            if ident is not None:
                peers.learn(rec.dl_ip, ident, True)
            elif rec.sni_ident is not None:
                peers.learn(rec.dl_ip, rec.sni_ident, False)
            if rec.san_ident is not None and rec.san_ident[1] is not None:
                peers.learn(rec.dr_ip, rec.san_ident[1], False)  # the caller's certificate names it
        else:
            if ident is not None:
                peers.learn(rec.ul_ip, ident, True)
            if rec.san_ident is not None and rec.san_ident[1] is not None:
                peers.learn(rec.uh_ip, rec.san_ident[1], False)  # the callee's certificate names it
            cl = rec.cluster
            if cl is not None and cl.namespace and rec.uh is not None and cl.direction == "outbound":
                peers.learn(rec.uh_ip, _cluster_identity(cl), False)

    def identity(self, rec: Record) -> Identity:
        """The workload that wrote the line (see identity.py for the order of sources)."""
        if rec.src is not None and rec.src.identity is not None:
            return rec.src.identity
        if rec.own is not None:
            return rec.own  # the line's own node metadata
        ws = self.workloads
        san = rec.san_ident
        if rec.kind == KIND_SERVER:
            ip = rec.dl_ip
            if ws is not None:
                hit = ws.get(ip)
                if hit is not None:
                    return hit
            if san is not None and san[0] is not None:
                return san[0]
            if rec.sni_ident is not None:
                return rec.sni_ident
            return self.peers.get(ip) or unknown(ip)
        ip = rec.ul_ip or rec.dr_ip
        if ws is not None:
            hit = ws.get(ip) or ws.get(rec.dr_ip)
            if hit is not None:
                return hit
        if san is not None and san[0] is not None:
            return san[0]
        p = rec.parent
        if p is not None and p.kind == KIND_SERVER:
            return self.identity(p)
        return self.peers.get(ip) or self.peers.get(rec.dr_ip) or unknown(ip)

    def peer_identity(self, ip: str | None) -> Identity | None:
        """Who is at an address: the registry first, else what the lines taught."""
        ws = self.workloads
        if ws is not None:
            hit = ws.get(ip)
            if hit is not None:
                return hit
        return self.peers.get(ip)


_cluster_idents: dict[str, Identity] = {}
_sni_cache: dict[str, tuple[Identity | None, str | None]] = {}


def _cluster_identity(cl) -> Identity:
    """The service a cluster name points at, as an identity (cached: one object per cluster)."""
    ident = _cluster_idents.get(cl.raw)
    if ident is None:
        if len(_cluster_idents) > 10000:
            _cluster_idents.clear()
        ident = _cluster_idents[cl.raw] = Identity.of(cl.service_id, cl.namespace)
    return ident


def _same_pod(c: Record, s: Record) -> bool:
    cs, ss = c.src, s.src
    if cs is not None and ss is not None:
        ck, sk = cs.pod_key, ss.pod_key
        if ck and sk:
            return ck == sk
    sip = s.dl_ip
    if not sip or sip in _SHARED_IPS:
        return False
    return sip == c.ul_ip or sip == c.dr_ip


_ip_cache: dict[str, str] = {}


def _ip_of(addr: str) -> str | None:
    ip = address_ip(addr)
    if ip is not None:
        if len(_ip_cache) > 10000:
            _ip_cache.clear()
        _ip_cache[addr] = ip
    return ip


def prepare(rec: Record, raw_for_id: bytes) -> None:
    """Set the join fields of a freshly parsed record: span id, own trace id, group key, 4-tuple."""
    f = rec.f
    get = f.get
    rec.span_id = span_id_of(raw_for_id)
    rec.ul = ul = get("upstream_local_address")
    rec.uh = uh = get("upstream_host")
    rec.dr = dr = get("downstream_remote_address")
    rec.dl = dl = get("downstream_local_address")
    rec.ul_ip = address_ip(ul)  # a new port on most lines: not cached like uh and dl below
    rec.dr_ip = address_ip(dr)
    # upstream_host and downstream_local_address repeat (pods and their ports): their ips are cached.
    if uh is None:
        rec.uh_ip = None
    else:
        ip = _ip_cache.get(uh)
        rec.uh_ip = ip if ip is not None else _ip_of(uh)
    if dl is None:
        rec.dl_ip = None
    else:
        ip = _ip_cache.get(dl)
        rec.dl_ip = ip if ip is not None else _ip_of(dl)
    tp = rec.tp
    rec.tstate = get("tracestate") if tp is not None else None
    # The line's own identity (node metadata in the log format) and the SANs: (own, peer) from certificates.
    extra = rec.extra
    rec.own = identity_from_fields(extra) if extra else None
    server = rec.kind == KIND_SERVER
    if server:
        local, peer = get("downstream_local_uri_san"), get("downstream_peer_uri_san")
    else:
        local, peer = get("upstream_local_uri_san"), get("upstream_peer_uri_san")
    rec.san_ident = (identity_from_san(local), identity_from_san(peer)) if local or peer else None
    sni = get("requested_server_name") if server else None
    rec.sni_ident = None
    rec.sni_host = None
    if sni:
        hit = _sni_cache.get(sni)
        if hit is None:
            c = parse_sni(sni)
            hit = (Identity.of(c.service_id, c.namespace), c.host) if c is not None and c.host else (None, None)
            if len(_sni_cache) > 10000:
                _sni_cache.clear()
            _sni_cache[sni] = hit
        rec.sni_ident, rec.sni_host = hit
    if rec.http:
        rid = rec.rid
        rec.gkey = rid if rid is not None else (tp[0] if tp is not None else None)
        if tp is not None:
            rec.trace_id = tp[0]
        elif rid is not None:
            rec.trace_id = rid
        else:
            rec.trace_id = _blake(raw_for_id, digest_size=16).digest()
    else:
        src, dst = (dr, dl) if server else (ul, uh)
        if src and dst:
            rec.gkey = ("tcp", src, dst)
            rec.trace_id = _blake(f"tcp|{src}|{dst}|{rec.start_ns}".encode(), digest_size=16).digest()
        else:
            rec.gkey = None
            rec.trace_id = _blake(raw_for_id, digest_size=16).digest()
        if tp is not None:
            rec.trace_id = tp[0]
