"""Incremental ADS: AggregatedDiscoveryService.DeltaAggregatedResources.

Per the xDS protocol's incremental variant:
- The server tracks, per type, which resources the client has and at which version (here: the resource's
  content hash), and sends only resources that changed plus `removed_resources` for ones that went away.
- On (re)connect the client lists what it already has in `initial_resource_versions`; those are not resent
  when unchanged, so a gateway restart costs almost nothing on the wire.
- resource_names_subscribe / _unsubscribe change the subscription at any time; a name subscribed again is
  always resent (the client may have forgotten it). CDS and LDS are wildcard when the first request names
  nothing, or names "*"; "*" can also be unsubscribed.
- Every response has its own nonce; the request echoing it is the ACK (or, with error_detail, the NACK). A
  NACKed resource is not resent until the snapshot changes it again. Unknown nonces are ignored for ACK/NACK
  purposes, but the subscription changes they carry are applied.
- Same make-before-break order as SotW: CDS, EDS, LDS, RDS, and clusters are removed only after listeners and
  routes that stopped referencing them are ACKed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from mizzen.services.mesh.snapstore import digest
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE, WILDCARD

from . import wire
from .cache import DeltaDiff, ResourceSet, empty_load_assignment
from .stream import Stream, order_types

log = logging.getLogger("mizzen.xds_gateway.delta")

DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest

@dataclass(eq=False, slots=True)
class DeltaSubscription:
    wildcard: bool
    names: frozenset[str]  # explicit subscriptions, interned (streams with the same names share one set)
    # What the client holds, name → version (our content hash). Usually exactly a set we sent (`has_set`,
    # shared with every proxy that got the same set, so diffs between shared sets are computed once); after
    # initial_resource_versions, subscription changes or a held removal it is a private map (`has`).
    has_set: ResourceSet | None = None
    has: dict[str, str] | None = None
    outstanding: dict[str, str] = field(default_factory=dict)  # nonce → system version sent
    sent_any: bool = False

    def holdings(self) -> dict[str, str]:
        return self.has if self.has is not None else self.has_set.entries  # type: ignore[union-attr]

    def own_has(self) -> dict[str, str]:
        if self.has is None:
            self.has = dict(self.has_set.entries) if self.has_set is not None else {}
            self.has_set = None
        return self.has


class DeltaStream(Stream):
    api = "delta"

    def __init__(self, gw, context):
        super().__init__(gw, context)
        self.subs: dict[str, DeltaSubscription] = {}

    async def handle(self, req: DeltaDiscoveryRequest) -> None:
        if not self.proxy:
            await self.identify(req.node)
        t = req.type_url
        if not t:
            return
        now = time.monotonic()
        sub = self.subs.get(t)
        subscribe = list(req.resource_names_subscribe)
        unsubscribe = list(req.resource_names_unsubscribe)
        if sub is None:
            wildcard = t in WILDCARD and (not subscribe or "*" in subscribe)
            sub = DeltaSubscription(wildcard, self.gw.cache.intern_names(n for n in subscribe if n != "*"))
            if req.initial_resource_versions:
                sub.has = dict(req.initial_resource_versions)
            else:
                sub.has_set = self.gw.cache.empty(t)
            self.subs[t] = sub
            self.type_status(t).pending_since = now
        elif subscribe or unsubscribe:
            has = sub.own_has()
            names = set(sub.names)
            for n in subscribe:
                if n == "*":
                    sub.wildcard = True
                else:
                    names.add(n)
                    has.pop(n, None)  # always resend what is (re)subscribed
            for n in unsubscribe:
                if n == "*":
                    sub.wildcard = False
                else:
                    names.discard(n)
                    has.pop(n, None)  # the client dropped it; a later subscribe must resend it
            sub.names = self.gw.cache.intern_names(names)
            self.type_status(t).pending_since = now
        nonce = req.response_nonce
        if nonce:
            version = sub.outstanding.get(nonce)
            if version is None:
                self.gw.metrics.stale_nonces.inc()
            else:
                # responses are processed in order: everything sent before this nonce is settled too
                for n in list(sub.outstanding):
                    del sub.outstanding[n]
                    if n == nonce:
                        break
                if req.HasField("error_detail"):
                    self.record_nack(t, nonce, req.error_detail.message)
                else:
                    self.record_ack(t, nonce, version)
        await self.push(now)

    def type_settled(self, t: str) -> bool:
        sub = self.subs.get(t)
        if sub is None:
            return True
        st = self.type_status(t)
        if sub.outstanding or (st.sent_nonce and st.acked_nonce != st.sent_nonce):
            return False
        desired = self.desired(t, sub.wildcard, sub.names)
        if sub.has_set is not None:
            return sub.has_set.version == desired.version
        return sub.has == desired.entries

    async def _diff(self, sub: DeltaSubscription, desired: ResourceSet) -> DeltaDiff:
        """What the client lacks of `desired` and holds beyond it."""
        if sub.has_set is not None:
            if sub.has_set.version == desired.version:
                return DeltaDiff([])
            shared = await self.gw.cache.delta_diff(sub.has_set, desired)
            if shared is not None:
                return shared
        has = sub.holdings()
        new = desired.entries
        return DeltaDiff.of([(n, h) for n, h in new.items() if has.get(n) != h], [n for n in has if n not in new],
                            has)

    def endpoints_acked(self) -> set[str] | frozenset[str]:
        sub = self.subs.get(ENDPOINT)
        if sub is None or sub.outstanding:
            return frozenset()
        return sub.has_set.names if sub.has_set is not None else set(sub.has or ())

    def cds_outstanding(self) -> bool:
        sub = self.subs.get(CLUSTER)
        return sub is not None and bool(sub.outstanding)

    async def push(self, since: float) -> None:
        if self.view is None:
            return
        cache = self.gw.cache
        for t in order_types(self.subs):
            if t in (LISTENER, ROUTE) and self.clusters_warming():
                continue  # pushed by the wake that follows the endpoints' ACK (or the warm-up deadline)
            sub = self.subs[t]
            desired = self.desired(t, sub.wildcard, sub.names)
            diff = await self._diff(sub, desired)
            held = False
            if (t == ENDPOINT and self.eds_resend and (again := self.take_eds_resend(going=diff.names))
                    and (extra := desired.lookup(again))):
                diff = diff.plus_resend(extra)
            if t == ENDPOINT and desired.synthesized and len(diff):
                # endpoints of a cluster the snapshot dropped: keep them while Envoy still has the cluster
                has = sub.holdings()
                keep = {n for n, _h in diff.to_send if n in desired.synthesized and n in has
                        and has[n] != digest(empty_load_assignment(n))}
                if keep:
                    diff = DeltaDiff.of([(n, h) for n, h in diff.to_send if n not in keep], diff.removed, has)
                    held = True
            removed = diff.removed
            if t == CLUSTER and removed and not self.references_settled():
                removed, held = [], True
            if not len(diff) and not removed and sub.sent_any:
                st = self.type_status(t)
                basis = "" if held else self.basis(t)
                if st.basis != basis:
                    st.basis = basis
                    self.changed()
                continue
            bodies = [p.body if p.body is not None else b"".join(await cache.delta_entries(t, p.send))
                      for p in diff.parts]
            nonce = self.next_nonce()
            msg = wire.delta_response(desired.version, t, nonce, bodies, removed, self.gw.replica)
            await self.send(msg)
            if t == CLUSTER:
                self.clusters_added(list(diff.added))
                self.clusters_changed(diff.changed)
            if held:
                has = sub.own_has()
                has.update(diff.to_send)
                for n in removed:
                    has.pop(n, None)
            else:
                sub.has_set, sub.has = desired, None
            sub.outstanding[nonce] = desired.version
            sub.sent_any = True
            self.record_sent(t, nonce, desired.version, "" if held else self.basis(t), len(msg), since, len(diff))
