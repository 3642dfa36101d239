"""The gateway as a service: `mizzen xds-gateway` runs it, /healthz/ready waits for NATS and Redis, /metrics
is served, SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request

from mizzen.services.mesh import procs

from .test_xds_support import REPO, wait_ready


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_ready_only_with_nats_and_redis_then_clean_sigterm(tmp_path, redis_server):
    nats_port, grpc_port, http_port = procs.free_port(), procs.free_port(), procs.free_port()
    argv = [sys.executable, "-m", "mizzen.services.cli.main", "xds-gateway", "--port", str(grpc_port),
            "--http-port", str(http_port), "--redis-url", redis_server.meta["url"], "--replica-id", "svc-test"]
    env = dict(os.environ, PYTHONPATH=str(REPO), MIZZEN_NATS_URL=f"nats://127.0.0.1:{nats_port}")
    gw = procs.spawn("gw-service", argv, tmp_path / "logs", env=env, cwd=str(REPO))
    nats = None
    try:
        deadline = time.monotonic() + 20
        while http_status(http_port, "/metrics") != 200 and time.monotonic() < deadline:
            assert gw.alive(), gw.log_text()[-2000:]
            time.sleep(0.1)
        assert http_status(http_port, "/metrics") == 200
        for _ in range(5):  # NATS is not there yet: not ready, and no ADS port
            assert http_status(http_port, "/healthz/ready") == 503
            time.sleep(0.2)
        nats = procs.start_nats(tmp_path / "logs", port=nats_port, jetstream=False)
        wait_ready(http_port, gw, timeout=30)
        procs.wait_port("127.0.0.1", grpc_port, timeout=5)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        assert "mizzen_xds_connected_proxies" in text and "mizzen_xds_push_latency_seconds" in text
        os.kill(gw.pid, signal.SIGTERM)
        assert gw.popen.wait(15) == 0
        assert '"msg":"stopped"' in gw.log_text()
    finally:
        gw.stop()
        if nats is not None:
            nats.stop()
