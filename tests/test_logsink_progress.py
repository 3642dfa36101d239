"""Progress on a terminal: `convert` (and the service) show lines, spans, bad lines and the rate on stderr when
it is a TTY — a real pseudo-terminal here — and print nothing extra when it is not (pipes, files)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time

from tests.logsink_data.bad_lines import MAX_LINE, interleaved
from tests.logsink_data.service import REPO

PROGRESS = re.compile(rb"lines: ([\d,]+)  spans: ([\d,]+)  bad lines: ([\d,]+)  ([\d,]+) lines/s")


def _input(tmp_path, copies: int = 300):
    lines, good = interleaved()
    bad = len(lines) - len(good)
    path = tmp_path / "in.log"
    path.write_bytes(b"\n".join(lines) + b"\n")
    # a longer input: the good lines again with new request ids (each a new span)
    more = [g.replace(b"-4000-8000-", b"-4000-9%03x-" % (c % 4096)) for c in range(copies) for g in good]
    with open(path, "ab") as fh:
        fh.write(b"\n".join(more) + b"\n")
    return path, len(lines) + len(more), len(good) + len(more), bad


def convert_argv(tmp_path, path) -> list[str]:
    return [sys.executable, "-m", "mizzen.services.logsink", "convert", str(path), "--max-line-bytes", str(MAX_LINE),
            "-o", str(tmp_path / "out.json")]


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            return out
        if not chunk:
            return out
        out += chunk


def test_convert_shows_progress_on_a_terminal(tmp_path):
    path, total, spans, bad = _input(tmp_path)
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(convert_argv(tmp_path, path), cwd=REPO, stderr=slave, stdout=subprocess.DEVNULL)
        os.close(slave)
        slave = -1
        text = _read_all(master)
        assert p.wait(120) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    shown = PROGRESS.findall(text)
    assert shown, text[-500:]
    last = shown[-1]
    assert int(last[0].replace(b",", b"")) == total and int(last[1].replace(b",", b"")) == spans
    assert int(last[2].replace(b",", b"")) == bad
    assert b"\r" in text  # rewritten in place
    assert f"lines: {total}, spans: {spans}".encode() in text  # the summary still ends it


def test_no_progress_when_not_a_terminal(tmp_path):
    path, total, spans, bad = _input(tmp_path)
    r = subprocess.run(convert_argv(tmp_path, path), cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0
    assert not PROGRESS.search(r.stderr) and b"\r" not in r.stderr
    assert r.stderr.decode().strip().splitlines()[-1].startswith(f"lines: {total}, spans: {spans}")


def test_service_progress_when_forced(tmp_path):
    path, total, spans, bad = _input(tmp_path, copies=20)
    log = tmp_path / "err.log"
    with open(log, "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "mizzen.services.logsink", "--file", str(path), "--admin", "off",
                              "--max-line-bytes", str(MAX_LINE), "--otlp-endpoint", "127.0.0.1:1", "--progress", "always", "--join-window", "0.1",
                              "--data-dir", str(tmp_path / "data"), "--shutdown-grace", "1"],
                             cwd=REPO, stderr=err, stdout=subprocess.DEVNULL)
        try:
            for _ in range(200):
                m = PROGRESS.findall(log.read_bytes())
                if m and int(m[-1][0].replace(b",", b"")) == total:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(log.read_bytes()[-500:])
        finally:
            p.terminate()
            p.wait(60)
