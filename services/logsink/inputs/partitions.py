"""Several logsink replicas sharing one JetStream stream, each call's lines meeting in one replica.

Publishers hash each line's request id (else trace id, else TCP connection) into one of N partitions and
publish to `mizzen.accesslog._p<k>.<proxy>` (`mesh.accesslog.split_by_partition`, `mesh.bus.accesslog_subject`).
Each partition has its own durable pull consumer (`<durable>-p<k>`, filter `mizzen.accesslog._p<k>.>`), read by
exactly one replica at a time: the one holding the partition's lease in the JetStream key-value bucket
`<durable>-leases` (key `p<k>`, value the replica id). Leases and the replicas' heartbeats (`m.<replica>`) expire
after `lease` seconds unless renewed (the bucket's max age), so:

- every replica aims at ceil(N / live replicas) partitions: it claims free ones (`create` succeeds only when
  the key is absent) and hands back extras when replicas join (stops fetching, waits until what it read is
  exported and acked, deletes its lease);
- a replica stopped with SIGTERM drains (join, export, acks) and deletes its leases at once: the others take its
  partitions with nothing lost or doubled;
- a replica that dies stops renewing: its leases expire after `lease` seconds and the others claim them; what it
  had read but not acked is delivered again after `ack_wait` (lines it had exported but not yet acked are then
  exported twice, with the same span ids: the one at-least-once window, as with any consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.errors import NotFoundError

from ...mesh.accesslog import partition_of
from ...mesh.bus import ACCESSLOG_PREFIX, PARTITION_TOKEN, accesslog_subject, split_accesslog_subject
from ..identity import Source
from .nats import NatsInput

log = logging.getLogger("mizzen.logsink.partitions")


class _Partition:
    __slots__ = ("k", "sub", "task", "revision", "releasing", "inflight")

    def __init__(self, k: int):
        self.k = k
        self.sub = None
        self.task: asyncio.Task | None = None
        self.revision = 0
        self.releasing = False
        self.inflight = 0  # messages read and not yet acked


class PartitionedNatsInput(NatsInput):
    def __init__(self, *args, partitions: int = 8, replica: str = "", lease: float = 10.0, **kw):
        super().__init__(*args, **kw)
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.partitions = partitions
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self.lease = lease
        self.owned: dict[int, _Partition] = {}
        self.kv = None
        self.js = None
        self._stop: asyncio.Event | None = None
        self.pipeline.keep_raw = True

    def _source(self, subject: str) -> Source:
        src = self._sources.get(subject)
        if src is None:
            _k, proxy = split_accesslog_subject(subject)
            if len(self._sources) > 10000:
                self._sources.clear()
            src = self._sources[subject] = Source("nats", proxy)
        return src

    async def connect(self) -> None:
        await self._connect_stream()
        bucket = f"{self.durable}-leases"
        try:
            self.kv = await self.js.key_value(bucket)
        except Exception:  # noqa: BLE001 - not there yet: make it (another replica may race us; both fine)
            self.kv = await self.js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=self.lease,
                                                                    storage=StorageType.FILE))
        await self._heartbeat()
        self.connected = True

    async def _heartbeat(self) -> None:
        await self.kv.put(f"m.{self.replica}", self.replica.encode())

    async def _members(self) -> int:
        try:
            keys = await self.kv.keys()
        except Exception:  # noqa: BLE001 - NoKeysError when empty
            return 1
        return max(1, sum(1 for k in keys if k.startswith("m.")))

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        acker = asyncio.create_task(self._acker(stop))
        try:
            while not stop.is_set():
                try:
                    await self._balance()
                except Exception as e:  # noqa: BLE001 - NATS away: keep what we have, retry
                    log.warning("partition balancing failed: %s", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.lease / 3)
        finally:
            stop.set()
            # Let each fetch in flight finish and its messages be handled: cancelling it would drop messages
            # already pulled (unacked, so redelivered only after ack_wait — too late to meet their other side).
            tasks = [p.task for p in self.owned.values() if p.task is not None]
            if tasks:
                _done, late = await asyncio.wait(tasks, timeout=5.0)
                for t in late:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await acker

    async def _balance(self) -> None:
        await self._heartbeat()
        # renew what we hold; a lease someone else holds now (ours expired) is lost
        for k, p in list(self.owned.items()):
            if p.releasing:
                continue
            try:
                p.revision = await self.kv.update(f"p{k}", self.replica.encode(), last=p.revision)
            except Exception as e:  # noqa: BLE001 - KeyWrongLastSequenceError: taken over
                log.warning("lost partition %d: %s", k, e)
                await self._drop(p)
        target = math.ceil(self.partitions / await self._members())
        active = [p for p in self.owned.values() if not p.releasing]
        if len(active) > target:
            for p in sorted(active, key=lambda p: -p.k)[: len(active) - target]:
                p.releasing = True
                asyncio.create_task(self._release(p))
            return
        for k in range(self.partitions):
            if len([p for p in self.owned.values() if not p.releasing]) >= target:
                break
            if k in self.owned:
                continue
            try:
                rev = await self.kv.create(f"p{k}", self.replica.encode())
            except Exception:  # noqa: BLE001 - held by another replica
                continue
            await self._take(k, rev)

    async def _take(self, k: int, revision: int) -> None:
        p = _Partition(k)
        p.revision = revision
        durable = f"{self.durable}-p{k}"
        policy = dict(deliver_policy=DeliverPolicy.ALL)
        try:
            info = await self.js.consumer_info(self.stream, durable)
        except NotFoundError:
            info = None
        if info is not None and info.num_ack_pending:
            # The last owner died holding messages it never acked. JetStream would redeliver them only after
            # ack_wait — long after the other side of their calls, read here meanwhile, has given up waiting.
            # Start the consumer again right after its ack floor: they come back at once, in stream order
            # (lines it acked beyond the floor come again too: exported twice, as identical spans).
            start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            await self.js.delete_consumer(self.stream, durable)
            policy = dict(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
            log.warning("took over partition from a dead owner", extra={"partition": k, "from_seq": start,
                                                                         "unacked": info.num_ack_pending})
        p.sub = await self.js.pull_subscribe(
            f"{ACCESSLOG_PREFIX}{PARTITION_TOKEN}{k}.>",
            durable=durable,
            stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_ack_pending=-1,
                                  **policy),
        )
        self.owned[k] = p
        p.task = asyncio.create_task(self._fetch(p), name=f"partition-{k}")
        self._gauge()
        log.info("took partition", extra={"partition": k, "replica": self.replica})

    async def _fetch(self, p: _Partition) -> None:
        stop = self._stop
        while not stop.is_set() and not p.releasing:
            await self.shipper.wait_room()
            try:
                msgs = await p.sub.fetch(self.batch, timeout=0.5)
            except (TimeoutError, NatsTimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnecting; keep trying
                if stop.is_set():
                    break
                log.warning("nats fetch failed (partition %d): %s", p.k, e)
                await asyncio.sleep(0.5)
                continue
            p.inflight += len(msgs)
            for msg in msgs:
                self._handle(msg)
            await asyncio.sleep(0)

    async def flush_acks(self) -> None:
        msgs = list(self.to_ack)
        await super().flush_acks()
        for m in msgs:
            k, _ = split_accesslog_subject(m.subject)
            p = self.owned.get(k) if k is not None else None
            if p is not None:
                p.inflight -= 1

    async def handover(self, partitions: set[int] | None = None) -> int:
        """Lines read here that still wait for their other side are published again to their partition (for its
        next owner, who then joins them) instead of being exported here; their messages are acked once that
        publish is confirmed. Returns how many lines were handed over."""
        n = self.partitions

        def mine(rec) -> bool:
            return rec.raw is not None and (partitions is None or partition_of(rec.raw, n) in partitions)

        recs = self.pipeline.joiner.take_pending(mine)
        for rec in recs:
            proxy = rec.src.proxy if rec.src is not None else ""
            await self.js.publish(accesslog_subject(proxy, partition_of(rec.raw, n)), rec.raw)
            token, rec.token = rec.token, None
            if token is not None:
                token()
        if recs:
            log.info("handed over waiting lines", extra={"lines": len(recs), "replica": self.replica})
        self.pipeline.stats.gauges["handed_over_lines"] = self.pipeline.stats.gauges.get("handed_over_lines", 0) \
            + len(recs)
        return len(recs)

    async def _release(self, p: _Partition) -> None:
        """Hand a partition back: stop reading, pass on the lines waiting for their other side, let what was read
        be exported and acked, then free the lease."""
        if p.task is not None:
            with contextlib.suppress(Exception):
                await p.task
        with contextlib.suppress(Exception):
            await self.handover({p.k})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_wait
        while p.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await self._drop(p, delete=True)
        log.info("released partition", extra={"partition": p.k, "replica": self.replica})

    async def _drop(self, p: _Partition, delete: bool = False) -> None:
        p.releasing = True
        if p.task is not None and not p.task.done():
            p.task.cancel()
            await asyncio.gather(p.task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await p.sub.unsubscribe()
        if delete:
            with contextlib.suppress(Exception):
                await self.kv.delete(f"p{p.k}", last=p.revision)
        self.owned.pop(p.k, None)
        self._gauge()

    def _gauge(self) -> None:
        self.pipeline.stats.gauges["partitions_owned"] = len(self.owned)

    async def close(self) -> None:
        """After the pipeline is flushed and exported: the last acks, then give every partition back at once."""
        await self.flush_acks()
        if self.kv is not None:
            for p in list(self.owned.values()):
                with contextlib.suppress(Exception):
                    await p.sub.unsubscribe()
                with contextlib.suppress(Exception):
                    await self.kv.delete(f"p{p.k}", last=p.revision)
            with contextlib.suppress(Exception):
                await self.kv.delete(f"m.{self.replica}")
        self.owned.clear()
        await super().close()
