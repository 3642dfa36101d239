"""`mizzen watch <pod>[.<ns>] | <node id>`: print each new snapshot version of a proxy as it arrives, through the
xds_gateway's `mizzen.v1.SnapshotService.Watch` (docs/snapshot-api.md).

    5-1f2e3d4c  rev 5  changed CDS,EDS  CDS 12 (4.1 KiB)  EDS 9 (1.2 KiB)  LDS 6 (20.3 KiB)  RDS 3 (2.2 KiB)

When the gateway goes away the command reconnects (to any replica) and resumes from the last version it printed,
so nothing is printed twice and no newer version is missed. `--json` prints one JSON object per version.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import grpc
import orjson

from mizzen.services.mesh import settings
from mizzen.services.mesh.proto_gen.mizzen.v1 import snapshot_pb2 as pb
from mizzen.services.mesh.xds_types import PUSH_ORDER, SHORT

WATCH = "/mizzen.v1.SnapshotService/Watch"
GET = "/mizzen.v1.SnapshotService/Get"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN)


def xds_address(flag: str | None = None) -> str:
    return flag or settings.env("MIZZEN_XDS", f"127.0.0.1:{settings.XDS_PORT}")


def get(target: str, proxy: str, types: list[str] | None = None, names_only: bool = False,
        timeout: float = 10.0) -> pb.Snapshot:
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(GET, request_serializer=pb.GetRequest.SerializeToString,
                              response_deserializer=pb.Snapshot.FromString)
        return call(pb.GetRequest(proxy=proxy, types=types or [], names_only=names_only), timeout=timeout)


def watch(target: str, proxy: str = "", since: str = "", types: list[str] | None = None, names_only: bool = False,
          reconnect: bool = True, on_reconnect=None, namespace: str = "",
          since_versions: dict[str, str] | None = None) -> Iterator[pb.Snapshot]:
    """Every new snapshot version of `proxy` (or of every proxy in `namespace`), resuming from the last one
    yielded (per proxy) after a lost connection."""
    last = since
    seen = dict(since_versions or {})
    delay = 0.2
    while True:
        ch = grpc.insecure_channel(target)
        try:
            call = ch.unary_stream(WATCH, request_serializer=pb.WatchRequest.SerializeToString,
                                   response_deserializer=pb.Snapshot.FromString)
            req = pb.WatchRequest(proxy=proxy, since_version=last, types=types or [], names_only=names_only,
                                  namespace=namespace, since_versions=seen if namespace and not proxy else {})
            stream = call(req, wait_for_ready=True)
            try:
                for snap in stream:
                    last = snap.version
                    seen[snap.proxy] = snap.version
                    delay = 0.2
                    yield snap
            finally:
                stream.cancel()
            return  # the server ended the stream cleanly
        except grpc.RpcError as e:
            if not reconnect or e.code() not in RETRYABLE:
                raise
            if on_reconnect is not None:
                on_reconnect(e)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            ch.close()


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def summary(snap: pb.Snapshot) -> dict:
    sizes: dict[str, int] = {}
    for r in snap.resources:
        sizes[r.type_url] = sizes.get(r.type_url, 0) + r.size
    types = [t for t in PUSH_ORDER if t in snap.counts] + sorted(t for t in snap.counts if t not in PUSH_ORDER)
    return {"proxy": snap.proxy, "version": snap.version, "revision": snap.revision,
            "changed": [SHORT.get(t, t) for t in snap.changed_types],
            "types": {SHORT.get(t, t): {"resources": snap.counts[t], "bytes": sizes.get(t, 0)} for t in types}}


def line(snap: pb.Snapshot) -> str:
    s = summary(snap)
    parts = [s["version"], f"rev {s['revision']}", "changed " + (",".join(s["changed"]) or "-")]
    parts += [f"{t} {d['resources']} ({_human(d['bytes'])})" for t, d in s["types"].items()]
    return "  ".join(parts)


def main(argv: list[str] | None = None, command: str = "watch") -> int:
    p = argparse.ArgumentParser(prog=f"mizzen {command}", description="Print each new snapshot version of a proxy.")
    p.add_argument("proxy", nargs="?", default="", help="<pod>[.<namespace>] or a full node id")
    p.add_argument("-n", "--namespace", default="",
                   help="without PROXY: every proxy of this namespace (each line names its proxy)")
    p.add_argument("--xds", default=None, help="xds_gateway address (default $MIZZEN_XDS or 127.0.0.1:15010)")
    p.add_argument("--since", default="", help="the last version already seen: start after it")
    p.add_argument("--type", action="append", default=[], dest="types",
                   help="CDS, EDS, LDS, RDS or a type URL (repeatable; default all)")
    p.add_argument("--count", type=int, default=0, help="exit after this many versions (0: run until stopped)")
    p.add_argument("--json", action="store_true", help="one JSON object per version")
    p.add_argument("--no-reconnect", action="store_true", help="exit when the connection is lost")
    args = p.parse_args(argv)
    if not args.proxy and not args.namespace:
        p.error("give a proxy (<pod>[.<namespace>] or node id) or --namespace")
    target = xds_address(args.xds)

    def reconnecting(e: grpc.RpcError) -> None:
        print(f"mizzen watch: connection lost ({e.code().name}); reconnecting to {target}", file=sys.stderr)

    seen = 0
    try:
        for snap in watch(target, args.proxy, since=args.since, types=args.types, names_only=True,
                          reconnect=not args.no_reconnect, on_reconnect=reconnecting, namespace=args.namespace):
            out = orjson.dumps(summary(snap)).decode() if args.json else line(snap)
            if not args.proxy and not args.json:
                out = f"{snap.proxy.split('~')[2] if snap.proxy.count('~') == 3 else snap.proxy}  {out}"
            print(out, flush=True)
            seen += 1
            if args.count and seen >= args.count:
                return 0
    except grpc.RpcError as e:
        print(f"mizzen {command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0
