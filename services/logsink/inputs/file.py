"""Tailing access-log files: rotation (rename + new file, or copytruncate), truncation, and offsets remembered
across restarts, so each line is exported once.

- A file is identified by (device, inode) plus a fingerprint of its first bytes (inodes get reused).
- Rotation: when the path names a new file, the old one is read to its end (its last line counts even without
  a newline), then the new one from its start. Rotated files still holding unexported lines are remembered in
  the offsets file and found again by inode in the same directory after a restart.
- Truncation (same inode, smaller than our position): start again from 0.
- Offsets are committed only up to the first line whose span has not been exported yet (lines finish out of
  order: the join holds some of them), and saved atomically under the data dir.
- Kubelet's CRI log format (`<time> stdout F <line>`, with `P` partial pieces) and Docker's json-file wrapper
  are unwrapped, so a sidecar's container log can be tailed directly.
- A line longer than the limit is skipped up to its newline without buffering it, and dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..identity import Source
from ..parse import BadLine
from ..pipeline import Pipeline

log = logging.getLogger("mizzen.logsink.file")

FP_BYTES = 1024
READ_CHUNK = 1 << 20
_CRI = re.compile(rb"^\S+ (?:stdout|stderr) ([FP])(?: |$)")


def parse_file_spec(spec: str) -> tuple[str, Path]:
    """`[PROXY=]PATH`: an optional proxy identity (Istio node id or `<name>.<namespace>`) for the lines."""
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head:
        return head, Path(tail)
    return "", Path(spec)


class CriJoiner:
    """Undo kubelet's CRI log format; `P` pieces are joined up to their `F` piece."""

    __slots__ = ("parts", "start")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.start = -1

    def feed(self, raw: bytes, start: int) -> tuple[bytes | None, int]:
        """(line or None while a partial line is pending, offset where the logical line began)."""
        if raw[:1] == b"{":
            return raw, start
        m = _CRI.match(raw)
        if m is None:
            return raw, start
        content = raw[m.end():]
        if m.group(1) == b"P":
            if not self.parts:
                self.start = start
            self.parts.append(content)
            return None, start
        if self.parts:
            self.parts.append(content)
            line, first = b"".join(self.parts), self.start
            self.parts = []
            return line, first
        return content, start


class _Entry:
    """One line in flight, and its ack token: calling it marks the line done and moves the committed offset."""

    __slots__ = ("start", "done", "tail")

    def __init__(self, start: int, tail: FileTail):
        self.start = start
        self.done = False
        self.tail = tail

    def __call__(self) -> None:
        self.done = True
        # Only the oldest line's end moves the committed offset (after every advance the head is not done).
        entries = self.tail.entries
        if entries and entries[0] is self:
            self.tail.advance()


_new_entry = object.__new__  # `_Entry` without an __init__ frame, for the per-line loop


class FileTail:
    """One open file (the current one at a path, or a rotated one being read to its end)."""

    def __init__(self, path: Path, src: Source, fd: int, st: os.stat_result, offset: int, fp: bytes, rotated: bool):
        self.path = path  # the name it had when opened
        self.src = src
        self.fd = fd
        self.dev, self.ino = st.st_dev, st.st_ino
        self.pos = offset  # next byte to read
        self.line_start = offset  # where `buf` begins
        self.buf = b""
        self.skipping = 0  # bytes of an over-long line skipped so far
        self.skip_head = b""
        self.entries: deque[_Entry] = deque()
        self.committed = offset
        self.fp = fp
        self.rotated = rotated
        self.cri = CriJoiner()

    def advance(self) -> None:
        entries = self.entries
        while entries and entries[0].done:
            entries.popleft()
        self.committed = entries[0].start if entries else self.line_start if not self.cri.parts else self.cri.start

    @property
    def finished(self) -> bool:
        """A rotated file read to its end whose every line is done."""
        return self.rotated and self.fd < 0 and not self.entries

    def state(self) -> dict:
        return {"dev": self.dev, "ino": self.ino, "offset": self.committed, "fp": self.fp.hex(),
                "rotated": self.rotated}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fingerprint(fd: int) -> bytes:
    head = os.pread(fd, FP_BYTES, 0)
    return hashlib.blake2b(head, digest_size=8).digest() + len(head).to_bytes(2, "big")


def _fp_matches(fd: int, fp: bytes) -> bool:
    """Does the file still start with the bytes we fingerprinted (as many as there were then)?"""
    if len(fp) != 10:
        return False
    n = int.from_bytes(fp[8:], "big")
    head = os.pread(fd, n, 0)
    return len(head) == n and hashlib.blake2b(head, digest_size=8).digest() == fp[:8]


@dataclass
class PathWatch:
    path: Path
    src: Source
    current: FileTail | None = None
    draining: list[FileTail] | None = None

    def tails(self) -> Iterator[FileTail]:
        yield from self.draining or ()
        if self.current is not None:
            yield self.current


class FileInput:
    def __init__(
        self,
        specs: list[str],
        pipeline: Pipeline,
        shipper,
        state_path: Path,
        poll_interval: float = 0.1,
        max_line_bytes: int = 1 << 20,
    ):
        self.pipeline = pipeline
        self.shipper = shipper
        self.state_path = state_path
        self.poll_interval = poll_interval
        self.max_line_bytes = max_line_bytes
        self.watches: list[PathWatch] = []
        for spec in specs:
            proxy, path = parse_file_spec(spec)
            self.watches.append(PathWatch(path.absolute(), Source("file", proxy or str(path.absolute()))))
        self._saved = self._load_state()
        self._last_saved: dict | None = None

    # ---- state --------------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, list[dict]]:
        try:
            return orjson.loads(self.state_path.read_bytes()).get("files", {})
        except FileNotFoundError:
            return {}
        except (orjson.JSONDecodeError, AttributeError, OSError) as e:
            log.warning("ignoring unreadable offsets file %s: %s", self.state_path, e)
            return {}

    def save_state(self) -> None:
        files = {str(w.path): [t.state() for t in w.tails() if not t.finished] for w in self.watches}
        for path, entries in self._saved.items():  # paths no longer configured keep their entries
            files.setdefault(path, entries)
        if files == self._last_saved:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"files": files}, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.state_path)
        self._last_saved = files

    # ---- opening ------------------------------------------------------------------------------------------
    def _open_at_start(self, w: PathWatch) -> None:
        """First look at a path: resume where the saved offsets say, find rotated files by inode."""
        saved = self._saved.pop(str(w.path), [])
        w.draining = []
        try:
            fd = os.open(w.path, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1
        st = os.fstat(fd) if fd >= 0 else None
        for entry in saved:
            same = st is not None and (st.st_dev, st.st_ino) == (entry["dev"], entry["ino"])
            if same and not entry.get("rotated") and _fp_matches(fd, bytes.fromhex(entry["fp"])):
                offset = entry["offset"] if st.st_size >= entry["offset"] else 0
                w.current = FileTail(w.path, w.src, fd, st, offset, bytes.fromhex(entry["fp"]), False)
                continue
            old = self._find_by_inode(w.path.parent, entry["dev"], entry["ino"], bytes.fromhex(entry["fp"]))
            if old is not None:
                ofd, opath, ost = old
                w.draining.append(FileTail(opath, w.src, ofd, ost, entry["offset"], bytes.fromhex(entry["fp"]), True))
                log.info("resuming rotated file %s at %d", opath, entry["offset"])
        if w.current is None and fd >= 0:
            w.current = FileTail(w.path, w.src, fd, st, 0, _fingerprint(fd), False)

    @staticmethod
    def _find_by_inode(directory: Path, dev: int, ino: int, fp: bytes) -> tuple[int, Path, os.stat_result] | None:
        with contextlib.suppress(OSError):
            for e in os.scandir(directory):
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == (dev, ino):
                        fd = os.open(e.path, os.O_RDONLY)
                        if _fp_matches(fd, fp):
                            return fd, Path(e.path), os.fstat(fd)
                        os.close(fd)
        return None

    # ---- reading ------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        for w in self.watches:
            self._open_at_start(w)
        while not stop.is_set():
            busy = False
            for w in self.watches:
                busy |= await self._poll(w, stop)
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval)

    async def _poll(self, w: PathWatch, stop: asyncio.Event) -> bool:
        busy = False
        for t in list(w.draining or ()):
            if t.fd >= 0:
                busy |= await self._read(t, stop, final=True)
                if t.fd < 0:
                    log.info("finished rotated file %s", t.path)
            if t.finished:
                w.draining.remove(t)
        try:
            st = os.stat(w.path)
        except FileNotFoundError:
            st = None
        cur = w.current
        if cur is not None and st is not None and (st.st_dev, st.st_ino) == (cur.dev, cur.ino):
            if st.st_size < cur.pos or (cur.pos and not _fp_matches(cur.fd, cur.fp)):
                # copytruncate: smaller than our position, or rewritten from the start since we last looked
                log.warning("%s was truncated (size %d, offset %d); reading it from the start", w.path, st.st_size,
                            cur.pos)
                self._restart(cur)
            return await self._read(cur, stop, final=False) or busy
        if cur is not None and st is None:
            # The path is gone (rotated, new file not created yet): keep reading what we have.
            return await self._read(cur, stop, final=False) or busy
        if cur is not None:
            # The path names another file now: finish the old one, then switch.
            cur.rotated = True
            w.draining.append(cur)
            await self._read(cur, stop, final=True)
            w.current = None
            busy = True
        if st is not None:
            try:
                fd = os.open(w.path, os.O_RDONLY)
            except FileNotFoundError:
                return busy
            w.current = FileTail(w.path, w.src, fd, os.fstat(fd), 0, _fingerprint(fd), False)
            log.info("reading %s from the start", w.path)
            busy = await self._read(w.current, stop, final=False) or busy
        return busy

    def _restart(self, t: FileTail) -> None:
        t.pos = t.line_start = t.committed = 0
        t.buf = b""
        t.skipping = 0
        t.entries.clear()
        t.cri = CriJoiner()
        t.fp = _fingerprint(t.fd)

    async def _read(self, t: FileTail, stop: asyncio.Event, final: bool) -> bool:
        """Read what is there now; True when anything was read."""
        got_any = False
        while t.fd >= 0:
            if t.fp[8:] != FP_BYTES.to_bytes(2, "big") and t.pos <= FP_BYTES and not t.rotated:
                t.fp = _fingerprint(t.fd)  # a young file: fingerprint as much of its head as exists
            data = os.pread(t.fd, READ_CHUNK, t.pos)
            if not data:
                if final:
                    if t.skipping:
                        self._too_long(t, t.skipping, t.skip_head)
                        t.skipping = 0
                        t.line_start = t.pos
                    if t.buf:
                        self._line(t, t.buf, t.line_start, t.pos)
                        t.buf = b""
                        t.line_start = t.pos
                    t.advance()
                    t.close()
                break
            got_any = True
            t.pos += len(data)
            self._consume(t, data)
            t.advance()
            # Backpressure: wait while the exporter is behind, and let other tasks run between chunks.
            await self.shipper.wait_room()
            await asyncio.sleep(0)
            if stop.is_set():
                break
        return got_any

    def _consume(self, t: FileTail, data: bytes) -> None:
        base = t.pos - len(data)  # file offset of data[0]
        if t.skipping:
            # Inside an over-long line (it began at t.line_start): drop bytes up to its newline.
            i = data.find(b"\n")
            if i < 0:
                t.skipping += len(data)
                return
            self._too_long(t, t.skipping + i, t.skip_head)
            t.skipping = 0
            data = data[i + 1:]
            t.line_start = base + i + 1
            t.buf = b""
        start = t.line_start
        entries = t.entries
        src = t.src
        feed = self.pipeline.feed_line
        # Lines found with `find` (memchr) rather than `bytes.split`, whose one-byte separator loop costs ~5
        # instructions per byte: about 4,000 per line here.
        find = data.find
        head = t.buf  # the first line's beginning, read with the previous chunk (it holds no newline)
        pos = 0
        i = find(b"\n")
        while i >= 0:
            raw = data[pos:i]
            if head:
                raw = head + raw
                head = b""
            end = start + len(raw) + 1
            if raw[:1] == b"{" and raw[-1:] == b"}":
                # the usual case (a plain JSON line), `_line` inline
                entry = _new_entry(_Entry)
                entry.start = start
                entry.done = False
                entry.tail = t
                entries.append(entry)
                feed(raw, src, entry)
            else:
                self._line(t, raw, start, end)
            start = end
            pos = i + 1
            i = find(b"\n", pos)
        rest = head + data[pos:] if head else data[pos:]
        t.line_start = start
        if len(rest) > self.max_line_bytes:
            t.skipping = len(rest)
            t.skip_head = rest[:16384]
            t.buf = b""
        else:
            t.buf = rest

    def _line(self, t: FileTail, raw: bytes, start: int, end: int) -> None:
        if raw[:1] == b"{" and raw[-1:] == b"}":
            line, first = raw, start  # the usual case: a plain JSON line
        else:
            if raw[-1:] == b"\r":
                raw = raw[:-1]
            if not raw.strip():
                return
            line, first = t.cri.feed(raw, start)
            if line is None:
                return
        entry = _Entry(first, t)
        t.entries.append(entry)
        self.pipeline.feed_line(line, t.src, entry)

    def _too_long(self, t: FileTail, total: int, head: bytes) -> None:
        entry = _Entry(t.line_start, t)
        t.entries.append(entry)
        err = BadLine(f"line too long: {total} bytes (limit {self.max_line_bytes})", "too_long", size=total)
        self.pipeline.stats.lines[t.src.input] += 1
        self.pipeline.bad_line(head, err, t.src, entry)

    def close(self) -> None:
        for w in self.watches:
            for t in w.tails():
                t.close()


def iter_file_lines(path: Path, max_line_bytes: int = 1 << 20) -> Iterator[tuple[bytes, BadLine | None]]:
    """All lines of a file (CRI/Docker-unwrapped), for offline conversion; over-long lines come back as
    (head, BadLine)."""
    cri = CriJoiner()
    with open(path, "rb") as fh:
        buf = b""
        skipping = 0
        head = b""
        while True:
            data = fh.read(READ_CHUNK)
            if not data:
                break
            if skipping:
                i = data.find(b"\n")
                if i < 0:
                    skipping += len(data)
                    continue
                yield head, BadLine(f"line too long: {skipping + i} bytes (limit {max_line_bytes})", "too_long",
                                    size=skipping + i)
                skipping = 0
                data = data[i + 1:]
            chunk = buf + data if buf else data
            lines = chunk.split(b"\n")
            buf = lines.pop()
            for raw in lines:
                if raw[-1:] == b"\r":
                    raw = raw[:-1]
                if len(raw) > max_line_bytes:
                    yield raw[:16384], BadLine(f"line too long: {len(raw)} bytes (limit {max_line_bytes})", "too_long",
                                              size=len(raw))
                elif raw.strip():
                    line, _ = cri.feed(raw, 0)
                    if line is not None:
                        yield line, None
            if len(buf) > max_line_bytes:
                skipping, head, buf = len(buf), buf[:16384], b""
        if skipping:
            yield head, BadLine(f"line too long: {skipping} bytes (limit {max_line_bytes})", "too_long",
                                size=skipping)
        elif buf.strip():
            line, _ = cri.feed(buf.rstrip(b"\r"), 0)
            if line is not None:
                yield line, None
