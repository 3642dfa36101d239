"""`mizzen proxy-status [NAME]`: istioctl proxy-status's table of each proxy's xDS sync state.

    NAME                CDS        LDS        EDS        RDS        ISTIOD          VERSION
    app-1.default       SYNCED     NACKed     SYNCED     SYNCED     xds-gateway-1   1.7.0

States per type: SYNCED (the proxy ACKed the latest response and it reflects the current snapshot), NOT SENT,
NACKed (the proxy rejected the latest response and kept its last good config), STALE (sent but not ACKed yet,
or ACKed but older than the current snapshot), STALE (Never Acknowledged). ISTIOD is the gateway replica that
serves the proxy; VERSION is the proxy's ISTIO_VERSION (or its Envoy version with `*`).

Reads the registry's `GET {server}/debug/syncz` (--server, $MIZZEN_SERVER, default http://127.0.0.1:15080), or
Redis directly with --redis-url.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request

from mizzen.services.mesh import settings

COLUMNS = ("NAME", "CDS", "LDS", "EDS", "RDS", "ISTIOD", "VERSION")


def tabulate(rows: list[list[str]], padding: int = 5) -> str:
    """Go's tabwriter as istioctl configures it (padding 5, spaces): every column but the last is padded to its
    widest cell plus the padding."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(widths[i] + padding) for i, c in enumerate(r[:-1])] + [r[-1]]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def table(statuses: list[dict]) -> str:
    rows = [list(COLUMNS)]
    for s in statuses:
        st = s.get("status", {})
        rows.append([s.get("name") or s.get("proxy", ""), st.get("CDS", "NOT SENT"), st.get("LDS", "NOT SENT"),
                     st.get("EDS", "NOT SENT"), st.get("RDS", "NOT SENT"), s.get("istiod", ""), s.get("version", "")])
    return tabulate(rows)


def fetch_http(server: str) -> list[dict]:
    url = f"{server}/debug/syncz"
    with urllib.request.urlopen(url, timeout=10) as r:
        data = json.loads(r.read())
    if isinstance(data, dict):
        data = data.get("items", data.get("proxies", []))
    return list(data)


def fetch_redis(url: str) -> list[dict]:
    import redis.asyncio as aioredis

    from mizzen.services.mesh.proxystatus import load_statuses

    async def go() -> list[dict]:
        r = aioredis.from_url(url, socket_connect_timeout=5)
        try:
            return await load_statuses(r)
        finally:
            await r.aclose()

    return asyncio.run(go())


def main(argv: list[str], command: str = "proxy-status") -> int:
    p = argparse.ArgumentParser(prog=f"mizzen {command}", description="Show each proxy's xDS sync state.")
    p.add_argument("name", nargs="?", help="only proxies whose name (pod.namespace) or node id contains this")
    p.add_argument("--server", default=None, help="registry URL ($MIZZEN_SERVER, default http://127.0.0.1:15080)")
    p.add_argument("--redis-url", default=None, help="read the status from Redis directly instead of the registry")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    try:
        statuses = fetch_redis(args.redis_url) if args.redis_url else fetch_http(settings.registry_url(args.server))
    except Exception as e:  # noqa: BLE001 - HTTP, JSON or Redis errors all mean "cannot read"
        where = args.redis_url or settings.registry_url(args.server)
        print(f"mizzen {command}: cannot read proxy status from {where}: {e}", file=sys.stderr)
        return 1
    if args.name:
        statuses = [s for s in statuses if args.name in s.get("name", "") or args.name in s.get("proxy", "")]
    if args.output == "json":
        print(json.dumps(statuses, indent=2, sort_keys=True))
        return 0
    if not statuses:
        print("no proxies found" + (f" matching {args.name!r}" if args.name else ""), file=sys.stderr)
        return 1 if args.name else 0
    sys.stdout.write(table(statuses))
    return 0
