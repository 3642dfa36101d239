"""A real certauth process for tests: started on free loopback ports, ready when /healthz/ready answers,
always stopped by the `with` block (also on failure)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mizzen.services.mesh import procs


@dataclass
class CertAuthProcess:
    data_dir: Path
    log_dir: Path
    extra: list[str] = field(default_factory=list)
    name: str = "certauth"
    port: int = 0
    http_port: int = 0
    proc: procs.Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def trust_bundle(self) -> str:
        return (self.data_dir / "ca" / "trust-bundle.pem").read_text()

    def start(self, timeout: float = 60.0) -> CertAuthProcess:
        self.port = self.port or procs.free_port()
        self.http_port = self.http_port or procs.free_port()
        argv = [sys.executable, "-m", "mizzen.services.certauth", "--data-dir", str(self.data_dir),
                "--port", str(self.port), "--http-port", str(self.http_port), *self.extra]
        self.proc = procs.spawn(self.name, argv, self.log_dir, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/healthz/ready"
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"certauth exited {self.proc.popen.returncode}:\n{self.proc.log_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return self
            time.sleep(0.05)
        raise TimeoutError(f"certauth not ready:\n{self.proc.log_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = self.proc.stop()
        self.proc = None
        return rc

    def log_text(self) -> str:
        return (self.log_dir / f"{self.name}.log").read_text() if (self.log_dir / f"{self.name}.log").exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return r.read().decode()


@contextlib.contextmanager
def certauth(data_dir: Path, log_dir: Path, *extra: str, name: str = "certauth") -> Iterator[CertAuthProcess]:
    p = CertAuthProcess(Path(data_dir), Path(log_dir), list(extra), name=name)
    try:
        yield p.start()
    finally:
        p.stop()
