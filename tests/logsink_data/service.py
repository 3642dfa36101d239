"""Run the logsink as a real process (`python -m mizzen.services.logsink`) for tests, and stop it by pid."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout

from mizzen.services.mesh import procs

REPO = Path(__file__).resolve().parents[2]


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    """`name{a="1",b="2"}` → ("name", {"a": "1", "b": "2"})."""
    name, _, rest = key.partition("{")
    labels = {}
    for part in rest.rstrip("}").split('",'):
        if "=" in part:
            k, _, v = part.partition("=")
            labels[k] = v.strip('"')
    return name, labels


class LogsinkProc:
    def __init__(self, workdir: Path, args: list[str], name: str = "logsink", python: str | None = None):
        """`python`: another interpreter (a fresh venv) that runs its installed mizzen, not this checkout."""
        self.python = python
        self.workdir = workdir
        self.args = args
        self.name = name
        self.admin_port = procs.free_port()
        self.proc: procs.Proc | None = None
        self.runs = 0

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        if self.python is None:
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        else:
            env.pop("PYTHONPATH", None)  # and cwd outside the checkout: `-m` must find the installed package
        env["MIZZEN_DATA_DIR"] = str(self.workdir / "data")
        argv = [self.python or sys.executable, "-m", "mizzen.services.logsink", "--admin", f"127.0.0.1:{self.admin_port}",
                "--log-level", "info", *self.args]
        self.runs += 1
        cwd = str(REPO) if self.python is None else str(self.workdir)
        self.proc = procs.spawn(f"{self.name}-{self.runs}", argv, self.workdir, env=env, cwd=cwd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with ClientSession(timeout=ClientTimeout(total=1)) as s:
            while True:
                if not self.proc.alive():
                    raise RuntimeError(f"logsink exited with {self.proc.popen.returncode}:\n{self.proc.log_text()}")
                try:
                    async with s.get(self.admin + "/healthz/ready") as r:
                        if r.status == 200:
                            return
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                if loop.time() > deadline:
                    raise TimeoutError(f"logsink not ready:\n{self.proc.log_text()}")
                await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop by pid in a thread, so the test's event loop (and its OTLP receiver) keeps serving meanwhile."""
        if self.proc is None:
            return None
        rc = await asyncio.to_thread(self.proc.stop, timeout, sig)
        return rc

    async def metrics(self) -> dict[str, float]:
        """`/metrics` as {"name{labels}": value}."""
        async with ClientSession(timeout=ClientTimeout(total=5)) as s, s.get(self.admin + "/metrics") as r:
            text = await r.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample of /metrics by name and exact label set (label order does not matter)."""
        for key, value in (await self.metrics()).items():
            n, ls = parse_key(key)
            if n == name and ls == labels:
                return value
        return None

    def log_text(self) -> str:
        return "\n".join((self.workdir / f"{self.name}-{i}.log").read_text(errors="replace")
                         for i in range(1, self.runs + 1) if (self.workdir / f"{self.name}-{i}.log").exists())
