"""State-of-the-world ADS: AggregatedDiscoveryService.StreamAggregatedResources.

Per the xDS protocol (api-docs/xds_protocol):
- Each type is its own sub-stream with its own version_info and nonce. A request whose response_nonce is not
  the latest nonce sent for its type is stale and ignored. A request with no nonce opens (or reopens) a
  subscription and always gets a response; otherwise a response goes out only when the content changed.
- ACK: the latest nonce without error_detail. NACK: with error_detail. Envoy keeps its last good config; so do
  we: the rejected content is not re-sent, the error is recorded, and the next snapshot that changes that type
  is sent as usual.
- CDS and LDS are wildcard (empty resource_names, or "*"): the full set every time. EDS and RDS are by name:
  the subscribed names' resources (an EDS name with no assignment gets an empty one).
- Make before break: types go out CDS, EDS, LDS, RDS. A cluster the new snapshot drops stays in CDS (with its
  endpoints) until listeners and routes that no longer reference it are sent and ACKed; then CDS without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2

from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE, WILDCARD

from . import wire
from .cache import ResourceSet
from .stream import Stream, order_types

log = logging.getLogger("mizzen.xds_gateway.sotw")

DiscoveryRequest = discovery_pb2.DiscoveryRequest


@dataclass(eq=False, slots=True)
class Subscription:
    wildcard: bool
    names: frozenset[str]
    sent: ResourceSet | None = None  # content of the latest response
    nonce: str = ""  # latest nonce sent for this type
    acked: ResourceSet | None = None  # content of the latest ACKed response
    acked_nonce: str = ""
    nacked_nonce: str = ""
    force: bool = True  # a (re)opened subscription is answered even if nothing changed
    held: bool = False  # the latest response deliberately differs from the snapshot (make-before-break)
    asked: DiscoveryRequest | None = None  # a request naming `names`, without nonce and version (_names)


class SotwStream(Stream):
    api = "sotw"

    def __init__(self, gw, context):
        super().__init__(gw, context)
        self.subs: dict[str, Subscription] = {}

    def _names(self, t: str, req: DiscoveryRequest) -> tuple[bool, frozenset[str], DiscoveryRequest | None]:
        """The names a request (nonce and version cleared) asks for, and the request streams asking the same
        share. Envoy repeats every EDS name in every EDS ACK: an ACK equal to the shared request is known with
        one comparison in C, where reading 1,000 names into Python costs ~10x more."""
        names = self.gw.cache.intern_names(req.resource_names)
        wildcard = t in WILDCARD and (not names or "*" in names)
        if wildcard:
            return wildcard, names, None
        shared = self.gw.sotw_requests
        asked = shared.get((t, names))
        if asked is None and not req.HasField("node") and not req.HasField("error_detail"):  # as ACKs come
            if len(shared) >= 1000:  # each holds its names: bounded, as intern_names is
                shared.clear()
            asked = shared[(t, names)] = req
        return wildcard, names, asked

    async def handle(self, req: DiscoveryRequest) -> None:
        if not self.proxy:
            await self.identify(req.node)
        t = req.type_url
        if not t:
            return
        sub = self.subs.get(t)
        nonce = req.response_nonce
        now = time.monotonic()
        if not nonce:
            req.ClearField("version_info")
            wildcard, names, asked = self._names(t, req)
            self.subs[t] = Subscription(wildcard, names, asked=asked)
            self.type_status(t).pending_since = now
        else:
            if sub is None or nonce != sub.nonce:
                self.gw.metrics.stale_nonces.inc()
                log.debug("stale nonce ignored", extra={"proxy": self.proxy, "type": t, "nonce": nonce})
                return
            if req.HasField("error_detail"):
                sub.nacked_nonce = nonce
                self.record_nack(t, nonce, req.error_detail.message)
            else:
                sub.acked, sub.acked_nonce = sub.sent, nonce
                self.record_ack(t, nonce, sub.sent.version if sub.sent else "")
            req.ClearField("version_info")
            req.ClearField("response_nonce")
            if not sub.wildcard and req != sub.asked:  # once wildcard, a SotW stream stays wildcard
                wildcard, names, sub.asked = self._names(t, req)
                if names is not sub.names:
                    sub.names, sub.wildcard = names, wildcard
                    self.type_status(t).pending_since = now
        await self.push(now)

    def type_settled(self, t: str) -> bool:
        sub = self.subs.get(t)
        if sub is None:
            return True
        if sub.sent is None or sub.acked_nonce != sub.nonce:
            return False
        return sub.sent.version == self.desired(t, sub.wildcard, sub.names).version

    def _plan(self, t: str, sub: Subscription) -> tuple[ResourceSet, bool]:
        """What to send for t now, and whether it is held back from the snapshot's exact content."""
        desired = self.desired(t, sub.wildcard, sub.names)
        held = False
        if sub.sent is not None and desired.version != sub.sent.version:
            if t == CLUSTER:
                removed = self.gw.cache.removed(sub.sent, desired)
                if removed and not self.references_settled():
                    desired = self.gw.cache.merge(desired, {n: sub.sent.entries[n] for n in removed})
                    held = True
            elif t == ENDPOINT and desired.synthesized:
                # endpoints of a cluster the snapshot dropped: keep them while Envoy still has the cluster
                keep = {n: sub.sent.entries[n] for n in desired.synthesized
                        if n in sub.sent.entries and n not in sub.sent.synthesized}
                if keep:
                    desired = self.gw.cache.merge(desired, keep)
                    held = True
        return desired, held

    def endpoints_acked(self) -> frozenset[str]:
        sub = self.subs.get(ENDPOINT)
        return sub.acked.names if sub is not None and sub.acked is not None else frozenset()

    def cds_outstanding(self) -> bool:
        sub = self.subs.get(CLUSTER)
        return sub is not None and sub.sent is not None and sub.acked_nonce != sub.nonce

    async def push(self, since: float) -> None:
        if self.view is None:
            return
        for t in order_types(self.subs):
            if t in (LISTENER, ROUTE) and self.clusters_warming():
                continue  # pushed by the wake that follows the endpoints' ACK (or the warm-up deadline)
            sub = self.subs[t]
            desired, held = self._plan(t, sub)
            if t == ENDPOINT and self.eds_resend:
                if sub.sent is None or desired.version != sub.sent.version:
                    self.eds_resend = set()  # the whole changed set goes anyway
                elif self.take_eds_resend():
                    sub.force = True
            if not sub.force and sub.sent is not None and desired.version == sub.sent.version:
                st = self.type_status(t)
                basis = "" if held else self.basis(t)
                if st.basis != basis:
                    st.basis = basis  # same content, newer snapshot: still in sync
                    self.changed()
                continue
            bodies = await self.gw.cache.sotw_bodies(desired)
            nonce = self.next_nonce()
            msg = wire.sotw_response(desired.version, t, nonce, bodies, self.gw.replica)
            await self.send(msg)
            if t == CLUSTER:
                self.clusters_added(self.gw.cache.removed(desired, sub.sent) if sub.sent is not None
                                    else desired.all_names())
                if sub.sent is not None:
                    self.clusters_changed(self.gw.cache.changed(sub.sent, desired))
            sub.sent, sub.nonce, sub.force, sub.held = desired, nonce, False, held
            self.record_sent(t, nonce, desired.version, "" if held else self.basis(t), len(msg), since, len(desired))
