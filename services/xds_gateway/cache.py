"""Where snapshots come from: Redis (via SnapshotStore), woken by NATS, kept in memory as shared wire bytes.

The protocol code (sotw.py, delta.py) never touches Redis or NATS; it asks this cache for a proxy's current
`ProxyView` and registers a callback to hear when it changes. Everything here is shared between streams:

- `ResourceSet` is an immutable name → hash map of one type with its content version. Sets are interned, so
  2,000 proxies with the same clusters hold one set object, and its response body is built once.
- Resource bytes are cached by (type URL, hash) already wrapped in `google.protobuf.Any`, so a resource is
  read from Redis and wrapped once, and every stream that gets it sends the same bytes.

The gateway is stateless: the truth is in Redis. NATS `mizzen.snapshot.<proxy>` events only say "look again";
a periodic resync (and one after every NATS reconnect) re-reads the manifests of the watched proxies, so a lost
event costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from mizzen.services.mesh import tracing
from mizzen.services.mesh.bus import SNAPSHOT_PREFIX, Bus
from mizzen.services.mesh.snapstore import MANIFEST, RES, Manifest, SnapshotStore, digest, type_version
from mizzen.services.mesh.xds_types import ENDPOINT

from . import wire

log = logging.getLogger("mizzen.xds_gateway.cache")


class LRU(OrderedDict):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_recent(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class SizedLRU(OrderedDict):
    """An LRU bounded by the total size of its values (as reported by `size(value)`)."""

    def __init__(self, budget: int, size):
        super().__init__()
        self.budget = budget
        self.size = size
        self.used = 0

    def get_recent(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        if key in self:
            self.used -= self.size(self.pop(key))
        self[key] = value
        self.used += self.size(value)
        while self.used > self.budget and len(self) > 1:
            _k, old = self.popitem(last=False)
            self.used -= self.size(old)


class ResourceSet:
    """Resources of one type, name → content hash. Immutable once built; `version` is a hash of the content
    (the same function the translator uses for manifest type versions, so a full set's version equals the
    manifest's).

    A proxy's full set is usually composed of layers (mesh-wide outbound config shared by every proxy plus a
    few proxy-specific resources). Such a set keeps its `parts`: its response body is the concatenation of the
    parts' bodies (a protobuf repeated field is just repeated entries), and its name map is only merged when
    something needs it. So 2,000 proxies sharing a 1,000-cluster layer share that layer's bytes and dict."""

    __slots__ = ("type_url", "_entries", "version", "synthesized", "parts", "_names", "_len", "_body",
                 "__weakref__")

    def __init__(self, type_url: str, entries: dict[str, str] | None, version: str | None = None,
                 synthesized: frozenset[str] = frozenset(), parts: tuple[ResourceSet, ...] = ()):
        self.type_url = type_url
        self._entries = entries
        self.parts = parts
        self.version = version or type_version(self.entries)
        self.synthesized = synthesized  # names the snapshot lacks, answered with an empty resource
        self._names: frozenset[str] | None = None
        self._len = len(entries) if entries is not None else sum(len(p) for p in parts)
        self._body: bytes | None = None

    @property
    def entries(self) -> dict[str, str]:
        if self._entries is None:
            merged: dict[str, str] = {}
            for p in self.parts:
                merged.update(p.entries)
            self._entries = merged
        return self._entries

    @property
    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = frozenset(self.entries)
        return self._names

    def __len__(self) -> int:
        return self._len

    def all_names(self) -> list[str]:
        """Every name, part by part: a proxy's composite set keeps no merged map of its own for this."""
        return list(self._entries) if self._entries is not None else [n for p in self.parts for n in p.all_names()]

    def present(self, names: set[str]) -> set[str]:
        """Those of `names` this set has, looked up part by part (a proxy's composite map is not merged)."""
        out: set[str] = set()
        for p in self.parts or (self,):
            out |= p.names.intersection(names)
        return out

    def lookup(self, names: Iterable[str]) -> list[tuple[str, str]]:
        """(name, hash) of those of `names` this set has, part by part."""
        parts = self.parts or (self,)
        out = []
        for n in names:
            for p in parts:
                h = p.entries.get(n)
                if h is not None:
                    out.append((n, h))
                    break
        return out

    def __repr__(self) -> str:
        return f"ResourceSet({self.type_url.rsplit('.', 1)[-1]}, {len(self)} res, v={self.version})"


@dataclass
class ProxyView:
    """A proxy's snapshot as the gateway sees it: the manifest plus one ResourceSet per type."""

    manifest: Manifest
    full: dict[str, ResourceSet]
    seen_at: float  # monotonic time the gateway learned about this manifest (push latency starts here)
    traceparent: str | None = None  # the translator's span that announced it (control-plane tracing)

    @property
    def key(self) -> tuple:
        return (self.manifest.version, tuple(self.manifest.layers))

    def versions(self) -> dict[str, str]:
        return self.manifest.versions

    def resources(self, type_url: str) -> ResourceSet | None:
        return self.full.get(type_url)


Watcher = Callable[[ProxyView | None], None]


def empty_load_assignment(name: str) -> bytes:
    """ClusterLoadAssignment{cluster_name=name}: istiod answers EDS for a cluster with no endpoints this way,
    so the cluster finishes warming at once instead of after Envoy's 15 s initial-fetch timeout."""
    return wire.string_field(1, name)


@dataclass(slots=True)
class PartDiff:
    """One layer's share of a delta response: what changed between two versions of the layer."""

    send: list[tuple[str, str]]  # (name, content hash) to send
    removed: list[str]
    body: bytes | None  # the encoded discovery.v3.Resource entries of `send` (None: not encoded yet)
    added: frozenset[str]  # names of `send` the client did not have
    changed: frozenset[str]  # names of `send` the client had with other content


class DeltaDiff:
    """A delta client's way from what it holds to a resource set: usually the cached layer pieces every proxy
    making the same move shares, so a push costs no loop over resource names."""

    __slots__ = ("parts", "_send", "_removed", "_names", "_len")

    def __init__(self, parts: list[PartDiff]):
        self.parts = parts
        self._len = sum(len(p.send) for p in parts)
        self._send: list[tuple[str, str]] | None = None
        self._removed: list[str] | None = None
        self._names: frozenset[str] | None = None

    @classmethod
    def of(cls, send: list[tuple[str, str]], removed: list[str], had: dict[str, str] | None) -> DeltaDiff:
        """A diff from explicit lists (the client's holdings are its own map, or a push adjusts the plan);
        had=None: the client has every name of `send` already (a resend)."""
        names = frozenset(n for n, _h in send)
        if had is None:
            return cls([PartDiff(send, removed, None, frozenset(), names)])
        return cls([PartDiff(send, removed, None, names - had.keys(), names & had.keys())])

    def plus_resend(self, send: list[tuple[str, str]]) -> DeltaDiff:
        """This diff and resources the client has, sent again."""
        return DeltaDiff([*self.parts, *DeltaDiff.of(send, [], None).parts])

    @property
    def to_send(self) -> list[tuple[str, str]]:
        if self._send is None:
            self._send = self.parts[0].send if len(self.parts) == 1 else [x for p in self.parts for x in p.send]
        return self._send

    @property
    def removed(self) -> list[str]:
        if self._removed is None:
            self._removed = [n for p in self.parts for n in p.removed]
        return self._removed

    @property
    def names(self) -> frozenset[str]:
        """Names to send."""
        if self._names is None:
            self._names = self.parts[0].added | self.parts[0].changed if len(self.parts) == 1 else \
                frozenset().union(*(p.added | p.changed for p in self.parts))
        return self._names

    @property
    def added(self) -> frozenset[str]:
        return frozenset().union(*(p.added for p in self.parts))

    @property
    def changed(self) -> frozenset[str]:
        return frozenset().union(*(p.changed for p in self.parts))

    def __len__(self) -> int:
        return self._len


class SnapshotCache:
    def __init__(self, redis: aioredis.Redis, bus: Bus | None = None, resync_interval: float = 5.0,
                 resource_cache_limit: int = 400_000, set_cache_limit: int = 20_000,
                 delta_diff_budget: int = 256 << 20):
        self.redis = redis
        self.store = SnapshotStore(redis, cache_limit=16)  # we keep our own (wrapped) resource cache
        self.bus = bus
        self.resync_interval = resync_interval
        self._any: LRU = LRU(resource_cache_limit)  # (type_url, hash) → Any bytes
        self._sets: LRU = LRU(set_cache_limit)  # interning key → ResourceSet
        self._names: dict[frozenset[str], frozenset[str]] = {}  # interned subscription name sets
        self._diffs: LRU = LRU(5_000)  # (old part version, new part version) → removed names
        # (old part version, new part version) → delta (to_send, removed, encoded entries), bounded by bytes
        self._delta_diffs = SizedLRU(delta_diff_budget, lambda d: 200 + len(d.body))
        self._views: dict[str, ProxyView] = {}
        self._watchers: dict[str, dict[int, Watcher]] = {}
        self._dirty: set[str] = set()
        self._trace_parents: dict[str, str] = {}  # proxy → traceparent of its latest snapshot event
        self._dirty_event = asyncio.Event()
        self._loading: dict[tuple, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._next_watch = 0
        self.events_received = 0
        self.loads = 0

    # ---- lifecycle ----
    async def start(self) -> None:
        if self.bus is not None and self.bus.nc is not None:
            await self.bus.subscribe(SNAPSHOT_PREFIX + ">", self._on_event)
            previous = self.bus.on_reconnect

            async def on_reconnect() -> None:
                if previous:
                    await previous()
                self.mark_all_dirty()

            self.bus.on_reconnect = on_reconnect
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="snapshot-refresh"))
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="snapshot-resync"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    @property
    def queue_depth(self) -> int:
        return len(self._dirty)

    # ---- watching ----
    def watch(self, proxy: str, callback: Watcher) -> int:
        self._next_watch += 1
        self._watchers.setdefault(proxy, {})[self._next_watch] = callback
        return self._next_watch

    def unwatch(self, proxy: str, handle: int) -> None:
        ws = self._watchers.get(proxy)
        if ws is None:
            return
        ws.pop(handle, None)
        if not ws:
            del self._watchers[proxy]
            self._views.pop(proxy, None)

    def watched(self) -> list[str]:
        return list(self._watchers)

    def mark_dirty(self, proxy: str) -> None:
        if proxy in self._watchers:
            self._dirty.add(proxy)
            self._dirty_event.set()

    def mark_all_dirty(self) -> None:
        self._dirty.update(self._watchers)
        if self._dirty:
            self._dirty_event.set()

    async def _on_event(self, msg) -> None:
        self.events_received += 1
        proxy = msg.subject[len(SNAPSHOT_PREFIX):]
        tp = tracing.header(msg.headers)
        if tp and proxy in self._watchers:
            self._trace_parents[proxy] = tp
        self.mark_dirty(proxy)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            self.mark_all_dirty()

    async def _refresh_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            batch = list(self._dirty)
            self._dirty.clear()
            try:
                await self.refresh(batch)
            except Exception:  # noqa: BLE001 - Redis away: retry these proxies on the next round
                log.exception("snapshot refresh failed; will retry")
                self._dirty.update(batch)
                await asyncio.sleep(0.5)
                self._dirty_event.set()

    async def refresh(self, proxies: list[str]) -> None:
        """Re-read these proxies' manifests (one MGET) and tell watchers about the ones that changed."""
        for i in range(0, len(proxies), 500):
            chunk = proxies[i:i + 500]
            raw = await self.redis.mget([MANIFEST + p for p in chunk])
            for proxy, data in zip(chunk, raw, strict=True):
                tp = self._trace_parents.pop(proxy, None) if self._trace_parents else None
                if proxy not in self._watchers:
                    continue
                old = self._views.get(proxy)
                if data is None:
                    if old is not None:
                        self._views.pop(proxy, None)
                        self._notify(proxy, None)
                    continue
                manifest = Manifest.from_json(data)
                if old is not None and old.key == (manifest.version, tuple(manifest.layers)):
                    continue
                view = await self._build_view(manifest)
                view.traceparent = tp
                self._views[proxy] = view
                self._notify(proxy, view)

    def _notify(self, proxy: str, view: ProxyView | None) -> None:
        for cb in list(self._watchers.get(proxy, {}).values()):
            try:
                cb(view)
            except Exception:  # noqa: BLE001 - one broken stream must not stop the others
                log.exception("snapshot watcher failed", extra={"proxy": proxy})

    # ---- views ----
    async def view(self, proxy: str) -> ProxyView | None:
        """The proxy's current view (from memory when watched and loaded, else from Redis)."""
        v = self._views.get(proxy)
        if v is not None:
            return v
        manifest = await self.store.manifest(proxy)
        if manifest is None:
            return None
        v = await self._build_view(manifest)
        if proxy in self._watchers:
            self._views[proxy] = v
        return v

    def current(self, proxy: str) -> ProxyView | None:
        return self._views.get(proxy)

    async def _build_view(self, manifest: Manifest) -> ProxyView:
        self.loads += 1
        layers = [await self.store.layer(h) for h in manifest.layers]
        full: dict[str, ResourceSet] = {}
        types = {t for layer in layers for t in layer}
        for t in types:
            holders = [self._layer_set(t, h, layer[t]) for h, layer in zip(manifest.layers, layers, strict=True)
                       if layer.get(t)]
            if len(holders) == 1:
                full[t] = holders[0]
                continue
            key = ("full", t, tuple(p.version for p in holders))
            rs = self._sets.get_recent(key)
            if rs is None:
                version = manifest.versions.get(t)
                rs = ResourceSet(t, None, version, parts=tuple(holders))
                if self._overlap(rs):
                    rs = ResourceSet(t, rs.entries, version)  # a later layer overrides a name: merge for real
                self._sets.put(key, rs)
            full[t] = rs
        return ProxyView(manifest, full, time.monotonic())

    def _layer_set(self, t: str, h: str, entries: dict[str, str]) -> ResourceSet:
        key = ("layer", t, h)
        rs = self._sets.get_recent(key)
        if rs is None:
            rs = ResourceSet(t, entries)
            self._sets.put(key, rs)
        return rs

    @staticmethod
    def _overlap(rs: ResourceSet) -> bool:
        seen = 0
        names: set[str] = set()
        for p in rs.parts:
            names.update(p.entries)
            seen += len(p)
        return len(names) != seen

    # ---- resource sets ----
    def intern_names(self, names: Iterable[str]) -> frozenset[str]:
        fs = frozenset(names)
        found = self._names.get(fs)
        if found is None:
            if len(self._names) > 50_000:
                self._names.clear()
            self._names[fs] = fs
            found = fs
        return found

    def empty(self, type_url: str) -> ResourceSet:
        key = ("empty", type_url)
        rs = self._sets.get_recent(key)
        if rs is None:
            rs = ResourceSet(type_url, {})
            self._sets.put(key, rs)
        return rs

    def subset(self, full: ResourceSet | None, type_url: str, names: frozenset[str]) -> ResourceSet:
        """The resources of `full` named in `names` (EDS names with no assignment get an empty one)."""
        base = full if full is not None else self.empty(type_url)
        key = ("sub", type_url, base.version, names)
        rs = self._sets.get_recent(key)
        if rs is not None:
            return rs
        if names >= base.names and type_url != ENDPOINT:
            rs = base
        else:
            entries: dict[str, str] = {}
            made: list[str] = []
            src = base.entries
            for n in names:
                h = src.get(n)
                if h is None and type_url == ENDPOINT:
                    h = self._synthesize(type_url, empty_load_assignment(n))
                    made.append(n)
                if h is not None:
                    entries[n] = h
            if len(entries) == len(src) and entries.keys() == src.keys():
                rs = base
            else:
                rs = ResourceSet(type_url, entries, synthesized=frozenset(made))
        self._sets.put(key, rs)
        return rs

    def merge(self, base: ResourceSet, overrides: dict[str, str]) -> ResourceSet:
        """base with `overrides` added or replacing entries: how a stream keeps a cluster (and its endpoints)
        the snapshot dropped until nothing on the proxy references it any more."""
        entries = dict(base.entries)
        entries.update(overrides)
        key = ("merge", base.type_url, type_version(entries))
        rs = self._sets.get_recent(key)
        if rs is None:
            rs = ResourceSet(base.type_url, entries)
            self._sets.put(key, rs)
        return rs

    def _synthesize(self, type_url: str, data: bytes) -> str:
        h = digest(data)
        if (type_url, h) not in self._any:
            self._any.put((type_url, h), wire.any_message(type_url, data))
        return h

    # ---- bytes ----
    async def ensure(self, type_url: str, hashes: Iterable[str]) -> None:
        """Make sure the Any bytes of these resources are in memory (one MGET for the missing ones, shared by
        every stream that asks for the same hashes at the same time)."""
        hashes = list(hashes)
        while True:
            missing = [h for h in hashes if (type_url, h) not in self._any]
            if not missing:
                return
            key = (type_url, tuple(missing[:4]), len(missing))
            fut = self._loading.get(key)
            if fut is None:
                break
            await asyncio.shield(fut)  # someone is loading (probably) the same set; then look again
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            for i in range(0, len(missing), 2000):
                chunk = missing[i:i + 2000]
                values = await self.redis.mget([RES + h for h in chunk])
                for h, v in zip(chunk, values, strict=True):
                    if v is None:
                        raise KeyError(f"snapshot resource {h} missing from Redis")
                    self._any.put((type_url, h), wire.any_message(type_url, v))
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._loading.pop(key, None)

    def any_bytes(self, type_url: str, h: str) -> bytes:
        return self._any[(type_url, h)]

    async def sotw_bodies(self, rs: ResourceSet) -> list[bytes]:
        """The `resources` fields of a DiscoveryResponse carrying rs: a composed set's are its parts' cached
        bodies, which the response joins once with its other fields (a 730 KiB push is not copied twice)."""
        if rs.parts and rs._body is None:
            return [b for p in rs.parts for b in await self.sotw_bodies(p)]
        return [await self.sotw_body(rs)]

    async def sotw_body(self, rs: ResourceSet) -> bytes:
        """The `resources` fields of a DiscoveryResponse carrying rs, as one piece. Built once per set (a
        composed set joins its parts' cached bodies each time)."""
        if rs._body is not None:
            return rs._body
        if rs.parts:
            return b"".join(await self.sotw_bodies(rs))
        await self.ensure(rs.type_url, rs.entries.values())
        if rs._body is None:
            t = rs.type_url
            rs._body = b"".join([wire.field(wire.DR_RESOURCES, self._any[(t, h)]) for h in rs.entries.values()])
        return rs._body

    def removed(self, old: ResourceSet, new: ResourceSet) -> list[str]:
        """Names in old that new lacks, computed part by part so that what proxies share is computed once."""
        new_parts = new.parts or (new,)
        out: list[str] = []
        for p in old.parts or (old,):
            if any(p is q or p.version == q.version for q in new_parts):
                continue
            rest: frozenset[str] | list[str] | None = None
            for q in sorted(new_parts, key=len, reverse=True):
                if rest is None:
                    key = ("diff", p.version, q.version)
                    rest = self._diffs.get_recent(key)
                    if rest is None:
                        rest = p.names - q.names
                        self._diffs.put(key, rest)
                else:
                    rest = [n for n in rest if n not in q.names]
                if not rest:
                    break
            out.extend(rest or ())
        return out

    def changed(self, old: ResourceSet, new: ResourceSet) -> list[str]:
        """Names in both whose content differs, computed part by part (parts the two share are skipped, and
        a pair of parts is compared once for every proxy that moves between them)."""
        old_parts = old.parts or (old,)
        out: list[str] = []
        for q in new.parts or (new,):
            if any(p is q or p.version == q.version for p in old_parts):
                continue
            for p in old_parts:
                key = ("changed", p.version, q.version)
                hit = self._diffs.get_recent(key)
                if hit is None:
                    pe, qe = p.entries, q.entries
                    hit = [n for n, h in qe.items() if pe.get(n, h) != h] if len(qe) <= len(pe) else \
                        [n for n, h in pe.items() if qe.get(n, h) != h]
                    self._diffs.put(key, hit)
                out.extend(hit)
        return out

    async def delta_diff(self, old: ResourceSet, new: ResourceSet) -> DeltaDiff | None:
        """What a delta client holding `old` needs to reach `new`, computed part by part (layer by layer) and
        cached per pair of parts, so every proxy that moves between the same shared sets reuses one diff and its
        bytes. None when the parts do not line up (then diff the maps)."""
        new_parts = new.parts or (new,)
        old_parts = old.parts or (old,)
        if not len(old):
            old_parts = (old,) * len(new_parts)
        if len(old_parts) != len(new_parts):
            return None
        pieces: list[PartDiff] = []
        for p, q in zip(old_parts, new_parts, strict=True):
            if p.version == q.version:
                continue
            key = (p.version, q.version)
            d = self._delta_diffs.get_recent(key)
            if d is None:
                pe, qe = p.entries, q.entries
                send = [(n, h) for n, h in qe.items() if pe.get(n) != h]
                names = frozenset(n for n, _h in send)
                d = PartDiff(send, [n for n in pe if n not in qe], b"".join(await self.delta_entries(q.type_url, send)),
                             names - pe.keys(), names & pe.keys())
                self._delta_diffs.put(key, d)
            pieces.append(d)
        diff = DeltaDiff(pieces)
        if diff.removed and diff.to_send and not diff.names.isdisjoint(diff.removed):
            return None  # a name moved between layers: the per-layer diffs contradict each other
        return diff

    async def delta_entries(self, type_url: str, items: list[tuple[str, str]]) -> list[bytes]:
        """discovery.v3.Resource entries for (name, hash) pairs; the version of each resource is its hash."""
        await self.ensure(type_url, [h for _n, h in items])
        out = []
        for name, h in items:
            body = wire.string_field(wire.RES_NAME, name) + wire.string_field(wire.RES_VERSION, h)
            body += wire.field(wire.RES_RESOURCE, self._any[(type_url, h)])
            out.append(wire.field(wire.DDR_RESOURCES, body))
        return out
