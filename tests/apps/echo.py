"""Moved: the echo app is `services/demo/echo.py` (`python -m mizzen.services.demo.echo …`). This shim keeps
`python tests/apps/echo.py …` working for anything that still runs it by this path."""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "services" / "demo" / "echo.py"), run_name="__main__")
