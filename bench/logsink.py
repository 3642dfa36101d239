"""logsink throughput and memory, end to end.

For HTTP lines and for TCP lines (Istio's default JSON format, ~750 bytes per HTTP line; every call logged by
both sidecars, server side first as Envoy writes them), it writes an access-log file, runs the logsink's real
file input → parse → join → OTLP encode → gRPC export to a local OTLP receiver (a separate process that acks
without decoding), and prints:

- lines/s per core: lines ÷ CPU seconds the logsink process used (all its threads, gRPC's included);
- lines/s wall;
- peak RSS of the logsink process during the run (and its growth over the starting RSS);
- the core alone (parse + join + encode, no I/O), in µs per line.

    python bench/logsink.py [--lines 1000000] [--window 5] [--only http|tcp] [--tree DIR] [--convert-lines N]

It also runs `mizzen logsink convert` on the same kind of file and prints its lines/s per CPU second.

The goal is 100,000 lines/s on one core; this prints what is, it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import orjson

# `--tree DIR` measures another checkout (e.g. the main branch, for before/after figures) with this bench.
TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else \
    Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))

from mizzen.services.logsink.app import LogSink, Settings  # noqa: E402
from mizzen.services.logsink.identity import Source  # noqa: E402
from mizzen.services.logsink.pipeline import Pipeline  # noqa: E402

RECEIVER = textwrap.dedent(
    """
    import sys, time
    from concurrent import futures
    import grpc
    count = [0, 0]
    def export(req, ctx):
        count[0] += 1
        count[1] += len(req)
        return b""
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 1 << 28)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    print(count[0], count[1], flush=True)
    """
)


def http_pair(i: int) -> tuple[bytes, bytes]:
    rid = str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15) & ((1 << 128) - 1), version=4))
    port = 20000 + i % 40000
    sec, ms = divmod(i // 10, 1000)
    t = f"2024-06-01T10:{(sec // 60) % 60:02d}:{sec % 60:02d}.{ms:03d}Z"
    common = {
        "start_time": t, "method": "GET", "path": f"/productpage?u={i % 977}", "protocol": "HTTP/1.1",
        "response_code": 200, "response_flags": "-", "response_code_details": "via_upstream",
        "connection_termination_details": None, "upstream_transport_failure_reason": None, "bytes_received": 0,
        "bytes_sent": 5293, "x_forwarded_for": None, "user_agent": "Mozilla/5.0 (X11; Linux x86_64) curl/8.5.0",
        "request_id": rid, "authority": "productpage:9080", "route_name": "default",
    }
    client = {**common, "duration": 8, "upstream_service_time": "7",
              "upstream_host": "10.244.1.17:9080",
              "upstream_cluster": "outbound|9080||productpage.bookinfo.svc.cluster.local",
              "upstream_local_address": f"10.244.0.10:{port}", "downstream_local_address": "10.96.12.3:9080",
              "downstream_remote_address": "10.244.0.10:38122", "requested_server_name": None}
    server = {**common, "duration": 6, "upstream_service_time": "5", "upstream_host": "10.244.1.17:9080",
              "upstream_cluster": "inbound|9080||", "upstream_local_address": "127.0.0.6:43481",
              "downstream_local_address": "10.244.1.17:9080", "downstream_remote_address": f"10.244.0.10:{port}",
              "requested_server_name": "outbound_.9080_._.productpage.bookinfo.svc.cluster.local"}
    return orjson.dumps(server), orjson.dumps(client)


def tcp_pair(i: int) -> tuple[bytes, bytes]:
    port = 20000 + i % 40000
    sec, ms = divmod(i // 10, 1000)
    t = f"2024-06-01T10:{(sec // 60) % 60:02d}:{sec % 60:02d}.{ms:03d}Z"
    common = {"start_time": t, "method": None, "path": None, "protocol": None, "response_code": 0,
              "response_flags": "-", "response_code_details": None, "connection_termination_details": None,
              "upstream_transport_failure_reason": None, "bytes_received": 431, "bytes_sent": 12877,
              "x_forwarded_for": None, "user_agent": None, "request_id": None, "authority": None,
              "route_name": None, "upstream_service_time": None}
    client = {**common, "duration": 1200, "upstream_host": "10.244.2.5:3306",
              "upstream_cluster": "outbound|3306||mysql.db.svc.cluster.local",
              "upstream_local_address": f"10.244.0.10:{port}", "downstream_local_address": "10.96.40.4:3306",
              "downstream_remote_address": "10.244.0.10:51532", "requested_server_name": None}
    server = {**common, "duration": 1199, "upstream_host": "10.244.2.5:3306", "upstream_cluster": "inbound|3306||",
              "upstream_local_address": "127.0.0.6:41000", "downstream_local_address": "10.244.2.5:3306",
              "downstream_remote_address": f"10.244.0.10:{port}",
              "requested_server_name": "outbound_.3306_._.mysql.db.svc.cluster.local"}
    return orjson.dumps(server), orjson.dumps(client)


def write_file(path: Path, make, lines: int) -> int:
    size = 0
    with open(path, "wb", buffering=1 << 20) as fh:
        for i in range(lines // 2):
            s, c = make(i)
            fh.write(s + b"\n" + c + b"\n")
            size += len(s) + len(c) + 2
    return size


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def end_to_end(path: Path, lines: int, endpoint: str, window: float, data_dir: Path) -> dict:
    s = Settings(files=[str(path)], otlp_endpoint=endpoint, admin=None, data_dir=data_dir, window=window,
                 istio_metrics=True, shutdown_grace=60)
    sink = LogSink(s)
    stop = asyncio.Event()
    rss0 = rss_kb()
    peak = [rss0]

    async def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb())
            await asyncio.sleep(0.2)

    c0, t0 = time.process_time(), time.perf_counter()
    task = asyncio.create_task(sink.run(stop))
    sampler = asyncio.create_task(sample())
    while sink.stats.exported < lines:
        await asyncio.sleep(0.05)
        if task.done():
            raise RuntimeError("logsink stopped early")
    c1, t1 = time.process_time(), time.perf_counter()
    stop.set()
    await task
    await sampler
    return {"cpu": c1 - c0, "wall": t1 - t0, "rss0": rss0, "peak": peak[0], "joins": dict(sink.stats.joins),
            "bad": sink.stats.bad_total}


def core_only(make, n: int) -> float:
    """µs per line for parse + join + encode, in memory (no file, no export)."""
    batch = [x for i in range(n // 2) for x in make(i)]
    p = Pipeline(lambda body, count, tokens: None, window=5.0)
    src = Source("bench")
    gc.collect()
    c0 = time.process_time()
    for i, raw in enumerate(batch):
        p.feed_line(raw, src, None, i * 1e-5)
        if i % 1024 == 0:
            p.tick(i * 1e-5)
    p.flush()
    return (time.process_time() - c0) / len(batch) * 1e6


def convert_run(path: Path, lines: int, out_dir: Path) -> dict:
    """`mizzen logsink convert FILE -o OUT` as its own process: lines/s per CPU second of that process."""
    import resource

    env = dict(os.environ, PYTHONPATH=str(TREE))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mizzen.services.logsink", "convert", str(path), "-o",
                    str(out_dir / "out.json")], env=env, cwd=str(TREE), check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"cpu": cpu, "wall": wall, "per_core": lines / cpu, "out_bytes": (out_dir / "out.json").stat().st_size}


def child(a: argparse.Namespace) -> None:
    """One measured run in a fresh process, so its peak RSS is its own."""
    make = http_pair if a.kind == "http" else tcp_pair
    with tempfile.TemporaryDirectory() as tmp:
        r = asyncio.run(end_to_end(Path(a.file), a.lines, a.endpoint, a.window, Path(tmp) / "data"))
    r["core_us"] = core_only(make, 100_000)
    print(orjson.dumps(r).decode(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--window", type=float, default=5.0, help="join window (seconds)")
    ap.add_argument("--only", choices=["http", "tcp"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help="measure the checkout in DIR instead of this one (before/after figures)")
    ap.add_argument("--convert-lines", type=int, default=None,
                    help="lines for the `convert` measurement [same as --lines]")
    ap.add_argument("--no-service", action="store_true", help="only measure `convert`")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    recv = subprocess.Popen([sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(recv.stdout.readline())
        endpoint = f"127.0.0.1:{port}"
        print(f"logsink bench: {a.lines:,} lines per kind, join window {a.window}s, receiver at {endpoint}, "
              f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, code from {TREE}")
        for kind, make in (("http", http_pair), ("tcp", tcp_pair)):
            if a.only and a.only != kind:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                n_conv = a.convert_lines or a.lines
                cpath = Path(tmp) / f"{kind}-convert.log"
                write_file(cpath, make, n_conv)
                c = convert_run(cpath, n_conv, Path(tmp))
                print(f"\n[{kind}] convert, {n_conv:,} lines: {c['per_core']:>9,.0f} lines/s per core "
                      f"({c['cpu']:.1f} s CPU, {c['wall']:.1f} s wall, {c['out_bytes'] / 2**20:.0f} MiB OTLP/JSON)")
                cpath.unlink()
                if a.no_service:
                    continue
                path = Path(tmp) / f"{kind}.log"
                size = write_file(path, make, a.lines)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "--kind", kind, "--file", str(path), "--endpoint", endpoint,
                     "--lines", str(a.lines), "--window", str(a.window), "--tree", str(TREE)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True,
                ).stdout
                r = orjson.loads(out.strip().splitlines()[-1])
            core = r["core_us"]
            print(f"[{kind}] service path, {a.lines:,} lines, {size / a.lines:.0f} bytes/line, {size / 2**20:.0f} MiB")
            print(f"  end to end:  {a.lines / r['cpu']:>9,.0f} lines/s per core   ({r['cpu']:.1f} s CPU)")
            print(f"               {a.lines / r['wall']:>9,.0f} lines/s wall       ({r['wall']:.1f} s, includes the "
                  f"{a.window}s join window of the last lines)")
            print(f"  memory:      peak RSS {r['peak'] / 1024:.0f} MiB (+{(r['peak'] - r['rss0']) / 1024:.0f} MiB "
                  f"over {r['rss0'] / 1024:.0f} MiB at start)")
            print(f"  core only:   {core:.1f} µs/line = {1e6 / core:,.0f} lines/s per core "
                  "(parse + join + encode, no I/O)")
            print(f"  joins:       {r['joins']}  bad lines: {r['bad']}")
    finally:
        recv.stdin.close()
        print("\nreceiver got (requests, bytes):", recv.stdout.readline().decode().strip())
        recv.wait(10)


if __name__ == "__main__":
    main()
