"""Defaults every service and the CLI share, with their environment fallbacks."""

from __future__ import annotations

import os
from pathlib import Path

REGISTRY_PORT = 15080
XDS_PORT = 15010
XDS_TLS_PORT = 15012
CA_PORT = 8060
# Config-change pushes an xds_gateway builds and sends at once: a change reaching 2,000 proxies together would
# otherwise hold 2,000 responses in memory while slow clients drain them (bench/xds_floor.py keeps the same cap).
XDS_PUSH_SLOTS = 64

DOMAIN_SUFFIX = "cluster.local"
ROOT_NAMESPACE = "istio-system"
TRUST_DOMAIN = "cluster.local"

# Envoy sidecar ports, as Istio.
PROXY_ADMIN_PORT = 15000
PROXY_OUTBOUND_PORT = 15001
PROXY_INBOUND_PORT = 15006
PROXY_AGENT_PORT = 15020
PROXY_HEALTH_PORT = 15021
PROXY_PROMETHEUS_PORT = 15090
PROXY_UID = 1337


def env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value else default


def registry_url(flag: str | None = None) -> str:
    return (flag or env("MIZZEN_SERVER", f"http://127.0.0.1:{REGISTRY_PORT}")).rstrip("/")


def nats_url(flag: str | None = None) -> str:
    return flag or env("MIZZEN_NATS_URL", "nats://127.0.0.1:4222")


def redis_url(flag: str | None = None) -> str:
    return flag or env("MIZZEN_REDIS_URL", "redis://127.0.0.1:6379/0")


def data_dir(flag: str | None = None) -> Path:
    return Path(flag or env("MIZZEN_DATA_DIR", str(Path.home() / ".mizzen")))


def ca_address(flag: str | None = None) -> str:
    return flag or env("MIZZEN_CA", f"127.0.0.1:{CA_PORT}")
