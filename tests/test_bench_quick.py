"""`mizzen bench --quick` as a CI smoke test: it runs every part against real processes, writes a results
JSON (machine, versions, date), prints the table, draws the plots and compares with the previous results file.
Times are not asserted (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.exclusive  # simulated clients by the thousand: the machine to itself (conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def run_bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mizzen", "bench", "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_bench_quick_runs_and_reports(tmp_path):
    r = run_bench(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(tmp_path.glob("results-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["quick"] is True and res["date"] and res["machine"]["cpus"] >= 1
    assert res["versions"]["python"] and res["versions"].get("grpcio")
    assert {row["services"] for row in res["translation"]} == {100, 1000}
    assert all(row["endpoint_change_cpu_s"] is not None for row in res["translation"])  # incremental path taken
    push = res["push"]
    assert {(row["kind"], row["api"], row["workers"]) for row in push} >= {("full", "sotw", 1), ("full", "delta", 1),
                                                                           ("endpoint", "delta", 1), ("full", "sotw", 2)}
    for row in push:
        assert "error" not in row, row
        assert row["converged"] == row["N"], row
        assert row["bytes_per_push"] > 0, row  # every case really pushed
    floored = [row for row in push if "floor_p99" in row]  # the gRPC fan-out floor ran beside the gateway
    assert floored and all(row["floor_p99"] > 0 and row["vs_floor"] > 0 for row in floored), push
    assert res["apply"][0]["until_envoy_s"] is not None  # the real Envoy got all ServiceEntries
    ca_row = res["ca"][0]
    assert "error" not in ca_row, ca_row
    assert ca_row["grpc_per_core"] > 0 and ca_row["errors"] == 0  # real signings over gRPC/TLS
    assert ca_row["agents"] == 50 and ca_row["agent_errors"] == 0  # every agent got its certificate
    for png in res["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| services | one proxy |" in r.stdout and "Goals (reported, not asserted)" in r.stdout

    # a second run compares with the first
    r2 = run_bench(tmp_path, "--only", "translation")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert f"Compared with {files[0].name}" in r2.stdout
    assert "translation (100,) one_proxy_cpu_s" in r2.stdout
