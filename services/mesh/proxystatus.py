"""Reading proxy sync status: one place for every gateway worker and replica's records (the registry's
`/debug/syncz` and `mizzen proxy-status` read it here; xds_gateway/status.py writes it).

  proxystatus:<node id>   JSON written by the replica serving the proxy's stream (expires unless refreshed)
  proxies:connected       node ids with a live stream on some replica

`load_statuses(redis)` turns that into istioctl proxy-status's per-type states against the current manifest:
NOT SENT, SYNCED, NACKed, STALE (Never Acknowledged), STALE.
"""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from .snapstore import CONNECTED, MANIFEST, Manifest
from .xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT

STATUS = "proxystatus:"

NOT_SENT = "NOT SENT"
SYNCED = "SYNCED"
NACKED = "NACKed"
STALE = "STALE"
NEVER_ACKED = "STALE (Never Acknowledged)"

TABLE_TYPES = (CLUSTER, LISTENER, ENDPOINT, ROUTE)  # istioctl's column order: CDS LDS EDS RDS


def proxy_name(node_id: str) -> str:
    """istioctl's NAME: `<pod>.<namespace>` from `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`."""
    parts = node_id.split("~")
    return parts[2] if len(parts) == 4 and parts[2] else node_id


def type_state(t: dict | None, current_version: str | None) -> str:
    if not t or not t.get("sent_nonce"):
        return NOT_SENT
    if t.get("error") and t.get("error_nonce") == t.get("sent_nonce"):
        return NACKED
    if not t.get("acked_nonce"):
        return NEVER_ACKED
    if t["acked_nonce"] == t["sent_nonce"] and t.get("basis") and t.get("basis") == current_version:
        return SYNCED
    return STALE


def proxy_version(node: dict) -> str:
    """istioctl's VERSION: the proxy's ISTIO_VERSION metadata, else its Envoy version marked with `*`."""
    md = node.get("metadata") or {}
    if md.get("ISTIO_VERSION"):
        return str(md["ISTIO_VERSION"])
    v = node.get("user_agent_build_version") or node.get("user_agent_version") or ""
    return f"{v}*" if v else ""


async def load_statuses(redis: aioredis.Redis) -> list[dict]:
    """One entry per connected proxy, sorted by name:
    {proxy, name, istiod, version, api, connected_at, manifest_version,
     status: {CDS, LDS, EDS, RDS}, errors: {CDS: error_detail message, ...}, types: raw per-type records}."""
    members = sorted(m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(CONNECTED))
    if not members:
        return []
    docs = await redis.mget([STATUS + m for m in members])
    manifests = await redis.mget([MANIFEST + m for m in members])
    out = []
    for proxy, doc, mdata in zip(members, docs, manifests, strict=True):
        if doc is None:
            continue  # its replica died and the record expired
        d = orjson.loads(doc)
        versions = Manifest.from_json(mdata).versions if mdata else {}
        manifest_version = orjson.loads(mdata).get("version", "") if mdata else ""
        types = d.get("types", {})
        status = {}
        errors = {}
        for t in TABLE_TYPES:
            rec = types.get(t)
            status[SHORT[t]] = type_state(rec, versions.get(t))
            if rec and rec.get("error"):
                errors[SHORT[t]] = rec["error"]
        out.append({
            "proxy": proxy,
            "name": proxy_name(proxy),
            "istiod": d.get("replica", ""),
            "version": d.get("version", ""),
            "api": d.get("api", ""),
            "connected_at": d.get("connected_at"),
            "manifest_version": manifest_version,
            "status": status,
            "errors": errors,
            "types": types,
        })
    out.sort(key=lambda e: (e["name"], e["proxy"]))
    return out
