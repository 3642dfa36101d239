"""Which workload owns an IP: the mesh's Pods and WorkloadEntries, indexed by address, so a span whose sidecar the
input does not name still gets `service.name`, `k8s.pod.name`, `k8s.namespace.name`.

Three ways to fill the index, all ending in `WorkloadIndex.set_objects` / `.update`:
- offline (`convert --config DIR`): the same YAML `proxy-config --config` reads, validated the same way;
- live (`mizzen logsink --redis-url …`): the registry's state in Redis, read once at start and again for the keys
  each `mizzen.config.changed` event names (events are hints, state is the truth; a reconnect re-reads all);
- tests: objects directly.

A lookup is one dict access, never a round trip: the index is kept current in the background.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from ..mesh.kinds import object_key
from .identity import Identity, workload_from_pod

log = logging.getLogger("mizzen.logsink.workloads")

KINDS = ("Pod", "WorkloadEntry")
# Istio's canonical service labels, best first (pkg/config/labels: CanonicalServiceName's sources).
_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")


def identity_of(obj: dict) -> tuple[list[str], Identity] | None:
    """(its IPs, its identity) for a Pod or WorkloadEntry; None for anything else or without an address."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    name = meta.get("name") or ""
    if kind == "Pod":
        status = obj.get("status") or {}
        ips = [status["podIP"]] if isinstance(status.get("podIP"), str) and status.get("podIP") else []
        for item in status.get("podIPs") or ():
            ip = item.get("ip") if isinstance(item, dict) else None
            if isinstance(ip, str) and ip and ip not in ips:
                ips.append(ip)
        if (obj.get("spec") or {}).get("hostNetwork"):
            return None  # the node's address: shared by every host-network pod, names none of them
        labels = meta.get("labels") or {}
        pod = name
        workload = workload_from_pod(name)
    elif kind == "WorkloadEntry":
        spec = obj.get("spec") or {}
        addr = spec.get("address")
        ips = [addr] if isinstance(addr, str) and addr and not addr.startswith("unix://") else []
        labels = spec.get("labels") or meta.get("labels") or {}
        pod = name
        workload = name
    else:
        return None
    if not ips:
        return None
    for key in _NAME_LABELS:
        v = labels.get(key) if isinstance(labels, dict) else None
        if isinstance(v, str) and v:
            workload = v
            break
    return ips, Identity.of(f"{workload}.{ns}", ns, pod)


class WorkloadIndex:
    """IP → Identity of the Pod or WorkloadEntry with that address."""

    def __init__(self) -> None:
        self._by_ip: dict[str, Identity] = {}
        self._by_key: dict[str, list[str]] = {}  # object key → the IPs it holds (to forget them on change)
        self.revision = 0

    def get(self, ip: str | None) -> Identity | None:
        return self._by_ip.get(ip) if ip else None

    def __len__(self) -> int:
        return len(self._by_ip)

    def set_objects(self, objects: list[dict], revision: int = 0) -> None:
        self._by_ip.clear()
        self._by_key.clear()
        for o in objects:
            self._put(_key(o), o)
        self.revision = revision

    def update(self, changed: dict[str, dict | None], revision: int = 0) -> None:
        """`changed`: object key → the object now stored, or None when deleted."""
        for key, obj in changed.items():
            for ip in self._by_key.pop(key, ()):
                self._by_ip.pop(ip, None)
            if obj is not None:
                self._put(key, obj)
        self.revision = max(self.revision, revision)

    def _put(self, key: str, obj: dict) -> None:
        hit = identity_of(obj)
        if hit is None:
            return
        ips, ident = hit
        self._by_key[key] = ips
        for ip in ips:
            self._by_ip[ip] = ident


def _key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return object_key(str(obj.get("kind")), meta.get("namespace"), str(meta.get("name")))


def load_config(paths: list[str]) -> WorkloadIndex:
    """The index of the Pods and WorkloadEntries in YAML files/directories (`convert --config`). Raises
    ValueError naming the file, resource and field when a document is invalid."""
    from ..mesh.validation import check_documents
    from ..mesh.yamlio import load_paths

    objects, errors = check_documents(load_paths(paths))
    if errors:
        lines = [line for err in errors for line in str(err).splitlines()]
        raise ValueError("invalid config:\n  " + "\n  ".join(lines))
    index = WorkloadIndex()
    index.set_objects([o for o in objects if o.get("kind") in KINDS])
    return index


class RegistryWatch:
    """Keeps a WorkloadIndex current from the running stack: Redis state + NATS `mizzen.config.changed`."""

    def __init__(self, index: WorkloadIndex, redis_url: str, nats_url: str):
        self.index = index
        self.redis_url = redis_url
        self.nats_url = nats_url
        self.redis = None
        self.bus = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        from ..mesh.bus import CONFIG_CHANGED, Bus
        from ..mesh.store import ConfigStore, connect

        self.redis = connect(self.redis_url)
        self.store = ConfigStore(self.redis)
        self.bus = Bus(self.nats_url, "mizzen-logsink-workloads")
        await self.bus.connect()

        async def on_change(msg) -> None:
            try:
                d = orjson.loads(msg.data)
                keys = [k for k in d.get("keys", ()) if k.split("/", 1)[0] in KINDS]
                self._queue.put_nowait((int(d.get("revision", 0)), keys))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                self._queue.put_nowait((0, None))  # unreadable: re-read everything

        async def on_reconnect() -> None:
            self._queue.put_nowait((0, None))

        self.bus.on_reconnect = on_reconnect
        await self.bus.subscribe(CONFIG_CHANGED, on_change)
        await self.reload()
        self._task = asyncio.create_task(self._run(), name="workloads")

    async def reload(self) -> None:
        rev, objects = await self.store.snapshot()
        self.index.set_objects([o for o in objects if o.get("kind") in KINDS], rev)
        self.loaded.set()
        log.info("workloads loaded", extra={"revision": rev, "addresses": len(self.index)})

    async def _run(self) -> None:
        while True:
            rev, keys = await self._queue.get()
            try:
                if keys is None:
                    await self.reload()
                elif rev > self.index.revision + 1:
                    await self.reload()  # a change went by unseen (every write bumps the one revision)
                elif rev > self.index.revision:
                    got = await self.store.get_many(keys) if keys else {}
                    self.index.update({k: got.get(k) for k in keys}, rev)
            except Exception as e:  # noqa: BLE001 - Redis away: the next event or reconnect re-reads
                log.warning("could not refresh workloads: %s", e)
                await asyncio.sleep(1.0)
                self._queue.put_nowait((0, None))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.bus is not None:
            await self.bus.close()
        if self.redis is not None:
            await self.redis.aclose()
