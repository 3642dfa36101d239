"""Offline conversion: access-log files → one OTLP/JSON document (an `ExportTraceServiceRequest`), no stack
needed. Files are merged by each line's end time (sidecars write a line when the request ends), so the join
sees both sides of a call close together however many files they are spread over; the join window is then
measured in log time."""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .deadletter import DeadLetters
from .identity import Source
from .inputs.file import iter_file_lines, parse_file_spec
from .metrics import Stats
from .otlp_json import JsonWriter
from .parse import BadLine, Record, parse_line
from .pipeline import Pipeline


@dataclass
class Summary:
    lines: int
    spans: int
    traces: int
    bad: int

    def __str__(self) -> str:
        return f"lines: {self.lines}, spans: {self.spans}, traces: {self.traces}, bad lines: {self.bad}"


def _iter_source(path: Path, max_line_bytes: int) -> Iterator[tuple[bytes, BadLine | None]]:
    if str(path) == "-":
        for raw in sys.stdin.buffer:
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield raw, None
        return
    yield from iter_file_lines(path, max_line_bytes)


def _stream(idx: int, src: Source, path: Path, max_line_bytes: int) -> Iterator[tuple]:
    """(sort key, file index, sequence, src, raw, record | BadLine) for each line of one file."""
    last = 0
    for seq, (raw, err) in enumerate(_iter_source(path, max_line_bytes)):
        if err is None:
            try:
                rec = parse_line(raw, src)
            except BadLine as e:
                err = e
            except RecursionError:
                err = BadLine("JSON nested too deeply", "not_json")
        if err is not None:
            yield last, idx, seq, src, raw, err
        else:
            last = rec.end_ns
            yield last, idx, seq, src, raw, rec


def convert(specs: list[str], out: IO[bytes], dead_letter: Path | None = None, window: float = 5.0,
            max_line_bytes: int = 1 << 20, max_records: int = 200_000, workloads=None,
            progress=None) -> Summary:
    stats = Stats()
    dead = DeadLetters(dead_letter)
    writer = JsonWriter(out)
    pipeline = Pipeline(lambda body, n, tokens: writer.add(body), dead=dead, stats=stats, window=window,
                        max_records=max_records, max_line_bytes=max_line_bytes, workloads=workloads)
    pipeline.traces = set()
    pipeline.json_mode = True
    streams = []
    for i, spec in enumerate(specs):
        proxy, path = parse_file_spec(spec)
        src = Source("file", proxy or (str(path.absolute()) if str(path) != "-" else ""))
        streams.append(_stream(i, src, path, max_line_bytes))
    try:
        for n, (_key, _i, _seq, src, raw, item) in enumerate(heapq.merge(*streams, key=lambda t: t[:3])):
            stats.lines[src.input] += 1
            if isinstance(item, Record):
                now = item.end_ns / 1e9
                pipeline.add_record(item, raw, None, now)
                if n % 64 == 0:
                    pipeline.tick(now)
                    if progress is not None and n % 8192 == 0:
                        progress.update(stats)
            else:
                pipeline.bad_line(raw, item, src, None)
        pipeline.flush()
        if progress is not None:
            progress.done(stats)
    finally:
        writer.close()
        dead.close()
    return Summary(stats.lines_total, stats.spans, len(pipeline.traces), stats.bad_total)
