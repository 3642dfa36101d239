"""Shared fixtures: private NATS and Redis servers on free loopback ports, started and stopped per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.mesh import procs

FIXTURES = Path(__file__).parent / "fixtures"
SEED_MESH = FIXTURES / "seed-mesh"


@pytest.fixture
def nats_server(tmp_path):
    p = procs.start_nats(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def redis_server(tmp_path):
    p = procs.start_redis(tmp_path / "logs", data_dir=tmp_path / "redis-data")
    try:
        yield p
    finally:
        p.stop()


def is_root() -> bool:
    return os.geteuid() == 0
