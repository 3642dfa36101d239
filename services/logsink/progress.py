"""A one-line progress display on a terminal (`\\r`-rewritten): lines, spans, bad lines and the rate. Off when
stderr is not a TTY (pipes, log files, CI), so scripted output stays exactly as it was."""

from __future__ import annotations

import time
from typing import IO


class Progress:
    def __init__(self, stream: IO[str], interval: float = 0.5):
        self.stream = stream
        self.interval = interval
        self.t0 = time.monotonic()
        self.last = 0.0
        self.last_lines = 0
        self.last_t = self.t0
        self.shown = False

    @staticmethod
    def for_stream(stream: IO[str], mode: str = "auto") -> Progress | None:
        if mode == "never":
            return None
        if mode == "auto":
            try:
                if not stream.isatty():
                    return None
            except (AttributeError, ValueError):
                return None
        return Progress(stream)

    def update(self, stats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        lines = stats.lines_total
        dt = now - self.last_t
        rate = (lines - self.last_lines) / dt if dt > 0 else 0.0
        if force:
            total = now - self.t0
            rate = lines / total if total > 0 else 0.0
        self.last, self.last_t, self.last_lines = now, now, lines
        self.stream.write(f"\r\x1b[Klines: {lines:,}  spans: {stats.spans:,}  bad lines: {stats.bad_total:,}  "
                          f"{rate:,.0f} lines/s")
        self.stream.flush()
        self.shown = True

    def done(self, stats) -> None:
        self.update(stats, force=True)
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
