"""Start and stop the whole control plane as real processes: used by `mizzen up` and by the tests, so both
run the stack the same way. Every process is tracked by pid and stopped by `Stack.stop()`."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import procs


def _workers(extra: list[str]) -> int:
    """How many worker processes `--workers N` in a service's flags asks for (0: one per core)."""
    if "--workers" in extra:
        i = extra.index("--workers")
        if i + 1 < len(extra):
            n = int(extra[i + 1])
            return n if n > 0 else (os.cpu_count() or 1)
    return 1


@dataclass
class ServiceSpec:
    module: str
    http_port_flag: str  # flag that sets the /healthz/ready port
    extra: list[str] = field(default_factory=list)
    http_value: str = "{port}"  # how that flag spells the port


@dataclass
class Stack:
    work_dir: Path
    nats_url: str | None = None
    redis_url: str | None = None
    redis_data_dir: Path | None = None
    registry_port: int = 0
    xds_port: int = 0
    ca_port: int = 0
    xds_tls_port: int = 0  # > 0: the gateway also serves xDS over TLS there (needs certauth in the stack)
    ca_data_dir: Path | None = None  # where certauth keeps the CA (<dir>/ca); default work_dir
    log_level: str = "info"
    otlp_endpoint: str = "localhost:4317"
    procs: dict[str, procs.Proc] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)
    extras: dict[str, list[str]] = field(default_factory=dict)  # per-service extra flags, kept for restarts
    workers: dict[str, int] = field(default_factory=dict)  # gateway worker processes (each its own /metrics)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every service (e.g. MIZZEN_TRACING)
    _infra: list[procs.Proc] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    @property
    def xds_tls_address(self) -> str:
        return f"127.0.0.1:{self.xds_tls_port}"

    def xds_token_file(self) -> Path:
        """The gateway's own workload token (istio-system/xds-gateway), issued with the CA's token key."""
        from mizzen.services.certauth import tokens

        path = self.work_dir / "xds-gateway.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        token = tokens.issue(self.ca_dir, "istio-system", "xds-gateway", 365 * 24 * 3600)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return path

    @property
    def ca_address(self) -> str:
        return f"127.0.0.1:{self.ca_port}"

    @property
    def ca_dir(self) -> Path:
        """The data dir certauth runs with (its CA files are under `<ca_dir>/ca`; `mizzen token --data-dir`)."""
        return self.ca_data_dir or self.work_dir

    @property
    def trust_bundle_path(self) -> Path:
        return self.ca_dir / "ca" / "trust-bundle.pem"

    # ---- infrastructure ----
    def start_infra(self) -> None:
        if self.nats_url is None:
            p = procs.start_nats(self.log_dir, store_dir=self.work_dir / "nats")
            self._infra.append(p)
            self.procs["nats"] = p
            self.nats_url = p.meta["url"]
        if self.redis_url is None:
            p = procs.start_redis(self.log_dir, data_dir=self.redis_data_dir or (self.work_dir / "redis"))
            self._infra.append(p)
            self.procs["redis"] = p
            self.redis_url = p.meta["url"]
        self.registry_port = self.registry_port or procs.free_port()
        self.xds_port = self.xds_port or procs.free_port()
        self.ca_port = self.ca_port or procs.free_port()

    def restart_infra(self, name: str, kill: bool = True) -> None:
        """Kill (or, with kill=False, stop with SIGTERM) NATS or Redis and start it again on the same port
        (Redis keeps its AOF data; a SIGTERM lets it flush the last second of writes first)."""
        old = self.procs[name]
        port = old.meta["port"]
        if kill:
            old.kill()
        else:
            old.stop()
        self._infra.remove(old)
        if name == "nats":
            p = procs.start_nats(self.log_dir, port=port, store_dir=self.work_dir / "nats")
        else:
            p = procs.start_redis(self.log_dir, port=port, data_dir=self.redis_data_dir or (self.work_dir / "redis"))
        self._infra.append(p)
        self.procs[name] = p

    # ---- services ----
    def _spec(self, name: str) -> ServiceSpec:
        """`name` is a service, or a service and a replica suffix (`translator-2`, `xds-gateway-b`)."""
        for base in ("translator", "xds-gateway"):
            if name.startswith(base + "-") and name != base:
                name = base
        common = ["--nats-url", str(self.nats_url), "--redis-url", str(self.redis_url), "--log-level", self.log_level]
        if name == "registry":
            return ServiceSpec("mizzen.services.registry", "--port", common)
        if name == "translator":
            return ServiceSpec("mizzen.services.translator", "--http-port", common)
        if name == "xds-gateway":
            flags = common + ["--port", str(self.xds_port)]
            if self.xds_tls_port:
                flags += ["--tls-port", str(self.xds_tls_port), "--ca", self.ca_address,
                          "--ca-root-cert", str(self.trust_bundle_path), "--token-file", str(self.xds_token_file())]
            return ServiceSpec("mizzen.services.xds_gateway", "--http-port", flags)
        if name == "certauth":
            return ServiceSpec("mizzen.services.certauth", "--http-port",
                               ["--data-dir", str(self.ca_dir), "--port", str(self.ca_port),
                                "--log-level", self.log_level])
        if name == "logsink":
            # access logs arrive over NATS (mizzen.accesslog.<proxy>, JetStream) and from files the caller names
            return ServiceSpec("mizzen.services.logsink", "--admin",
                               ["--nats", str(self.nats_url), "--redis-url", str(self.redis_url),
                                "--data-dir", str(self.work_dir),
                                "--otlp-endpoint", self.otlp_endpoint, "--log-level", self.log_level],
                               http_value="127.0.0.1:{port}")
        raise KeyError(name)

    def start_service(self, name: str, wait: bool = True, extra: list[str] | None = None) -> procs.Proc:
        """Start one service; a restart without `extra` reuses the flags it was last started with."""
        spec = self._spec(name)
        extra = self.extras.get(name, []) if extra is None else extra
        self.extras[name] = extra
        workers = _workers(extra)
        self.workers[name] = workers
        if name == "registry":
            port = self.registry_port
        else:
            port = self.http_ports.get(name) or procs.free_port_run(workers)
        self.http_ports[name] = port
        argv = [sys.executable, "-m", spec.module, *spec.extra, spec.http_port_flag,
                spec.http_value.format(port=port), *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        p = procs.spawn(name, argv, self.log_dir, env=env)
        self.procs[name] = p
        if wait:
            self.wait_ready(name)
        return p

    def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        """Wait for /healthz/ready (of every worker, for a gateway running several)."""
        deadline = time.monotonic() + timeout
        p = self.procs[name]
        for w in range(self.workers.get(name, 1)):
            url = f"http://127.0.0.1:{self.http_ports[name] + w}/healthz/ready"
            while True:
                if not p.alive():
                    raise RuntimeError(f"{name} exited with {p.popen.returncode}:\n{p.log_text()[-3000:]}")
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready within {timeout}s:\n{p.log_text()[-3000:]}")
                time.sleep(0.05)

    def stop_service(self, name: str, kill: bool = False) -> None:
        p = self.procs.pop(name)
        if kill:
            p.kill()
        else:
            p.stop()

    def restart_service(self, name: str, kill: bool = True) -> procs.Proc:
        self.stop_service(name, kill=kill)
        return self.start_service(name)

    def start(self, services: tuple[str, ...] = ("registry", "translator", "xds-gateway")) -> Stack:
        self.start_infra()
        # all at once, then wait for each: every service copes with the others arriving in any order (it must
        # survive their restarts anyway), and their Python start-ups overlap instead of adding up
        for s in services:
            self.start_service(s, wait=False)
        for s in services:
            self.wait_ready(s)
        return self

    def stop(self) -> None:
        for name in [n for n in self.procs if n not in ("nats", "redis")]:
            with contextlib.suppress(Exception):
                self.procs.pop(name).stop()
        for p in reversed(self._infra):
            with contextlib.suppress(Exception):
                p.stop()
        self._infra.clear()
        self.procs.clear()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
