"""Dead letters: every bad line, with its reason, kept where a person can look at it and replay it.

One JSON object per bad line: `{"time", "reason", "kind", "field", "input", "proxy", "line", "line_bytes"}`;
`line` is the original text (invalid UTF-8 replaced), cut to `max_line_bytes` with `"truncated": true`.
Sinks: a file (appended) and/or a NATS subject (published by the service's event loop).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import IO

import orjson

from .identity import Source
from .parse import BadLine


def dead_letter_entry(raw: bytes, err: BadLine, src: Source | None, max_line_bytes: int = 16384) -> bytes:
    d = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": err.reason,
        "kind": err.kind,
        "field": err.field or None,
        "input": src.input if src else None,
        "proxy": (src.proxy or None) if src else None,
        "line_bytes": err.size if err.size is not None else len(raw),
        "line": raw[:max_line_bytes].decode("utf-8", errors="replace"),
    }
    if len(raw) > max_line_bytes or (err.size or 0) > len(raw):
        d["truncated"] = True
    return orjson.dumps(d)


class DeadLetters:
    def __init__(self, path: Path | None = None, max_line_bytes: int = 16384, keep_for_nats: bool = False):
        self.path = path
        self.max_line_bytes = max_line_bytes
        self._fh: IO[bytes] | None = None
        self.count = 0
        # Entries waiting for the NATS publisher (bounded: a dead NATS must not grow memory without end).
        self.outbox: deque[bytes] | None = deque(maxlen=100_000) if keep_for_nats else None

    def write(self, raw: bytes, err: BadLine, src: Source | None) -> None:
        entry = dead_letter_entry(raw, err, src, self.max_line_bytes)
        self.count += 1
        if self.path is not None:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the process's life
            self._fh.write(entry + b"\n")
        if self.outbox is not None:
            self.outbox.append(entry)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
