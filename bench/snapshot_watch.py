"""Snapshot API latency: from `POST` of a change to the registry returning, to a `mizzen.v1.SnapshotService`
subscriber holding the new version, on a real control plane (NATS, Redis, registry, translator, xds_gateway as
processes on this machine).

    python bench/snapshot_watch.py [--changes 30] [--subscribers 1]

Each change edits one VirtualService's timeout (a new RDS version for the watched proxy); the next change is
made only after every subscriber got the previous one. Prints p50/p95/max of the latency as the slowest
subscriber saw it. This prints what is, it does not assert.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mizzen.services.cli import resources  # noqa: E402
from mizzen.services.cli import watch as watch_cli  # noqa: E402
from mizzen.services.mesh.stack import Stack  # noqa: E402

BASE = """
apiVersion: v1
kind: Pod
metadata: {name: app-1, namespace: default, labels: {app: app}}
spec: {serviceAccountName: default, containers: [{name: app, image: app}]}
status: {podIP: 10.77.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: default}
spec:
  selector: {app: cart}
  ports: [{name: http, port: 9090, protocol: TCP}]
"""
VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: cart, namespace: default}}
spec:
  hosts: [cart]
  http: [{{timeout: {t}s, route: [{{destination: {{host: cart}}}}]}}]
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--subscribers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), log_level="warning")
        try:
            stack.start(services=("registry", "translator", "xds-gateway"))

            doc = Path(tmp) / "change.yaml"

            def apply(text: str) -> None:  # in-process, so the clock starts when the registry has committed
                doc.write_text(text)
                with contextlib.redirect_stdout(io.StringIO()):
                    rc = resources.main(["-f", str(doc), "--server", stack.registry_url], command="apply")
                if rc:
                    raise SystemExit(f"apply failed ({rc})")

            apply(BASE + "---" + VS.format(t=1))
            revisions: list[list[tuple[int, float]]] = [[] for _ in range(args.subscribers)]
            cond = threading.Condition()

            def follow(i: int) -> None:
                for snap in watch_cli.watch(stack.xds_address, "app-1.default", names_only=True):
                    with cond:
                        revisions[i].append((snap.revision, time.perf_counter()))
                        cond.notify_all()

            for i in range(args.subscribers):
                threading.Thread(target=follow, args=(i,), daemon=True).start()
            with cond:
                cond.wait_for(lambda: all(revisions), timeout=60)
            latencies = []
            for n in range(args.changes):
                before = [len(r) for r in revisions]
                apply(VS.format(t=2 + n))
                t0 = time.perf_counter()
                def arrived(before=before) -> bool:
                    return all(len(r) > b for r, b in zip(revisions, before, strict=True))

                with cond:
                    ok = cond.wait_for(arrived, timeout=60)
                if not ok:
                    raise SystemExit(f"change {n}: not every subscriber got a new version within 60 s")
                latencies.append(max(r[-1][1] for r in revisions) - t0)
            ms = sorted(x * 1000 for x in latencies)
            print(f"snapshot watch latency after `mizzen apply` returns ({args.changes} changes, "
                  f"{args.subscribers} subscriber(s)): p50 {statistics.median(ms):.1f} ms, "
                  f"p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
