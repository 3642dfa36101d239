"""`mizzen logsink …` / `python -m mizzen.services.logsink …`: run the service, or `convert` log files offline.

    mizzen logsink [--file [PROXY=]PATH]... [--http HOST:PORT] [--nats [URL]] [--subject SUBJ]
                   [--als HOST:PORT] [--otlp-endpoint HOST:PORT] [--otlp-protocol grpc|http] …
    mizzen logsink convert FILE... [-o OUT] [--dead-letter FILE] [--config DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..mesh import settings
from ..mesh.bus import ACCESSLOG_PREFIX

DEFAULT_ADMIN = "127.0.0.1:15085"


def _env(*names: str, default: str | None = None) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return default


def _headers(items: list[str]) -> dict[str, str]:
    out = {}
    env = _env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    for item in ([x for x in env.split(",") if x] if env else []) + items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"logsink: bad header {item!r}, expected KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def service_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Turn Envoy JSON access logs into OpenTelemetry traces (OTLP). "
        "Subcommand: `convert FILE... [-o OUT]` for offline conversion.",
    )
    p.add_argument("--file", action="append", default=[], metavar="[PROXY=]PATH",
                   help="tail an access-log file (repeatable); PROXY names the sidecar (Istio node id or name.ns)")
    p.add_argument("--http", metavar="HOST:PORT", default=_env("MIZZEN_LOGSINK_HTTP"),
                   help="accept NDJSON batches on POST /v1/accesslog [$MIZZEN_LOGSINK_HTTP]")
    p.add_argument("--http-room-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long an HTTP batch waits for a lagging exporter before 503 [%(default)s]")
    p.add_argument("--nats", nargs="?", const="", default=None, metavar="URL",
                   help="consume mizzen.accesslog.<proxy> from NATS JetStream (URL default $MIZZEN_NATS_URL)")
    p.add_argument("--subject", default=ACCESSLOG_PREFIX + ">", help="NATS subject filter [%(default)s]")
    p.add_argument("--durable", default=_env("MIZZEN_LOGSINK_DURABLE", default="mizzen-logsink"),
                   help="JetStream durable consumer name [%(default)s]")
    p.add_argument("--partitions", type=int, default=int(_env("MIZZEN_LOGSINK_PARTITIONS", default="0")),
                   metavar="N", help="scale out: read mizzen.accesslog._p<k>.<proxy> (k = hash of the request id "
                   "mod N, see mesh/accesslog.py) sharing the N partitions with the other replicas "
                   "[$MIZZEN_LOGSINK_PARTITIONS; 0 = one consumer of mizzen.accesslog.>]")
    p.add_argument("--replica-id", default=_env("MIZZEN_REPLICA_ID", default=""),
                   help="this replica's name in the partition leases [host-pid]")
    p.add_argument("--lease", type=float, default=10.0, metavar="SECONDS",
                   help="partition lease: a replica that stops renewing loses its partitions after this "
                   "[%(default)s]")
    p.add_argument("--ack-wait", type=float, default=60.0, metavar="SECONDS",
                   help="JetStream redelivers a message not acked within this (must exceed the join window "
                   "plus export time) [%(default)s]")
    p.add_argument("--redis-url", default=_env("MIZZEN_LOGSINK_REDIS"), metavar="URL",
                   help="name workloads from the running stack: the registry's Pods and WorkloadEntries by IP, "
                   "read from this Redis and kept current by its NATS events (--nats URL, else $MIZZEN_NATS_URL) "
                   "[$MIZZEN_LOGSINK_REDIS]")
    p.add_argument("--als", metavar="HOST:PORT", default=_env("MIZZEN_LOGSINK_ALS"),
                   help="serve Envoy's gRPC Access Log Service (envoy.service.accesslog.v3) [$MIZZEN_LOGSINK_ALS]")
    p.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                   help="OTLP receiver [$MIZZEN_OTLP_ENDPOINT, $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
                   "$OTEL_EXPORTER_OTLP_ENDPOINT; localhost:4317 for grpc, localhost:4318 for http]")
    p.add_argument("--otlp-protocol", choices=["grpc", "http", "http/protobuf"], default=None,
                   help="OTLP transport [$MIZZEN_OTLP_PROTOCOL, $OTEL_EXPORTER_OTLP_PROTOCOL; grpc]")
    p.add_argument("--otlp-header", action="append", default=[], metavar="KEY=VALUE",
                   help="header/metadata on every export (repeatable) [$OTEL_EXPORTER_OTLP_HEADERS]")
    p.add_argument("--admin", default=_env("MIZZEN_LOGSINK_ADMIN", default=DEFAULT_ADMIN), metavar="HOST:PORT",
                   help="/healthz/ready and /metrics [%(default)s]; 'off' to disable")
    p.add_argument("--data-dir", default=None, help="state (file offsets) lives under DIR/logsink [$MIZZEN_DATA_DIR]")
    p.add_argument("--dead-letter", default=None, metavar="FILE",
                   help="bad lines with their reasons [DATA_DIR/logsink/dead-letters.jsonl]")
    p.add_argument("--dead-letter-subject", default=None, metavar="SUBJ",
                   help="also publish bad lines to this NATS subject (with --nats)")
    p.add_argument("--join-window", type=float, default=5.0, metavar="SECONDS",
                   help="how long a line waits for the other side of its call [%(default)s]")
    p.add_argument("--max-pending", type=int, default=100_000,
                   help="memory bound: lines the join holds (about 2 KiB each) [%(default)s]")
    p.add_argument("--batch-size", type=int, default=512, help="spans per OTLP export [%(default)s]")
    p.add_argument("--export-queue", type=int, default=64,
                   help="batches waiting for export before inputs are held back [%(default)s]")
    p.add_argument("--max-line-bytes", type=int, default=1 << 20, help="longer lines are dead-lettered")
    p.add_argument("--no-istio-metrics", action="store_true",
                   help="do not derive istio_requests_total etc. from the logs")
    p.add_argument("--poll-interval", type=float, default=0.1, help="file polling interval in seconds")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds to keep retrying exports at shutdown [%(default)s]")
    p.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="progress on stderr: lines, spans, bad lines, rate [auto: when stderr is a terminal]")
    p.add_argument("--log-level", default=_env("MIZZEN_LOG_LEVEL", default="info"))
    return p


def convert_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert access-log files to OpenTelemetry traces as OTLP/JSON (an ExportTraceServiceRequest), "
        "offline. Prints `lines: N, spans: N, traces: N, bad lines: N` on stderr.",
    )
    p.add_argument("files", nargs="+", metavar="[PROXY=]FILE", help="access-log files ('-' for stdin)")
    p.add_argument("-o", "--output", default="-", help="output file ['-' = stdout]")
    p.add_argument("--dead-letter", default=None, metavar="FILE", help="write bad lines with their reasons here")
    p.add_argument("--join-window", type=float, default=5.0, metavar="SECONDS",
                   help="join window in log time [%(default)s]")
    p.add_argument("--max-line-bytes", type=int, default=1 << 20)
    p.add_argument("--config", action="append", default=[], metavar="DIR|FILE",
                   help="Kubernetes/Istio YAML (as proxy-config --config reads): name workloads by their Pods' and "
                   "WorkloadEntries' IPs (repeatable)")
    p.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="progress on stderr: lines, spans, bad lines, rate [auto: when stderr is a terminal]")
    return p


def run_convert(argv: list[str], prog: str) -> int:
    from .convert import convert

    a = convert_parser(prog).parse_args(argv)
    from .inputs.file import parse_file_spec

    missing = [f for f in a.files if f != "-" and not parse_file_spec(f)[1].exists()]
    if missing:
        print(f"{prog}: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    dead = Path(a.dead_letter) if a.dead_letter else None
    workloads = None
    if a.config:
        from .workloads import load_config

        try:
            workloads = load_config(a.config)
        except ValueError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
    from .progress import Progress

    progress = Progress.for_stream(sys.stderr, a.progress)
    kw = dict(workloads=workloads, progress=progress)
    if a.output == "-":
        summary = convert(a.files, sys.stdout.buffer, dead, a.join_window, a.max_line_bytes, **kw)
    else:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            summary = convert(a.files, fh, dead, a.join_window, a.max_line_bytes, **kw)
    print(summary, file=sys.stderr)
    return 0


def settings_from_args(a: argparse.Namespace):
    from .app import Settings

    protocol = a.otlp_protocol or _env("MIZZEN_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL", default="grpc")
    protocol = "http" if protocol.startswith("http") else protocol
    endpoint = a.otlp_endpoint or _env("MIZZEN_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                       "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        endpoint = "localhost:4317" if protocol == "grpc" else "localhost:4318"
    data_dir = settings.data_dir(a.data_dir)
    nats_url = None
    if a.nats is not None:
        nats_url = a.nats or settings.nats_url()
    return Settings(
        files=a.file,
        http=a.http,
        nats_url=nats_url,
        subject=a.subject,
        durable=a.durable,
        partitions=a.partitions,
        replica=a.replica_id,
        lease=a.lease,
        ack_wait=a.ack_wait,
        als=a.als,
        redis_url=a.redis_url,
        events_nats_url=nats_url or settings.nats_url(),
        progress=a.progress,
        otlp_endpoint=endpoint,
        otlp_protocol=protocol,
        otlp_headers=_headers(a.otlp_header),
        admin=None if a.admin in ("off", "", "0") else a.admin,
        data_dir=data_dir,
        dead_letter=Path(a.dead_letter) if a.dead_letter else data_dir / "logsink" / "dead-letters.jsonl",
        dead_letter_subject=a.dead_letter_subject,
        window=a.join_window,
        max_pending=a.max_pending,
        batch_size=a.batch_size,
        export_queue=a.export_queue,
        http_room_timeout=a.http_room_timeout,
        max_line_bytes=a.max_line_bytes,
        istio_metrics=not a.no_istio_metrics,
        poll_interval=a.poll_interval,
        shutdown_grace=a.shutdown_grace,
    )


def main(argv: list[str] | None = None, command: str = "logsink") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"mizzen {command}"
    if argv and argv[0] == "convert":
        return run_convert(argv[1:], f"{prog} convert")
    a = service_parser(prog).parse_args(argv)
    s = settings_from_args(a)
    if not (s.files or s.http or s.nats_url or s.als):
        print(f"{prog}: no input: give --file, --http, --nats or --als (or `convert FILE...`)", file=sys.stderr)
        return 2

    from ..mesh.service import run_service, setup_logging
    from .app import LogSink

    setup_logging(a.log_level)
    run_service(LogSink(s).run)
    return 0
