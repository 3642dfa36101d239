"""`mizzen bench [--quick]`: run the benchmark suite (bench/suite.py) of this source checkout."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None, command: str = "bench") -> int:
    # the suite lives beside the services in a checkout (it is not installed: it needs the tests' real parts)
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "suite.py").exists():
        print(f"mizzen bench: no bench/suite.py under {root}; run it from a source checkout", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.suite import main as suite_main

    return suite_main(argv)
