"""The official OTLP message classes for the tests' own checks, whatever order pip installed things in.

Mizzen itself imports no `opentelemetry` module at run time (the logsink writes and reads OTLP bytes:
services/mesh/otlp_wire.py, otlp_decode.py). The tests, though, verify its output with the official
`opentelemetry-proto` classes and serve a real TraceService receiver with them. When `xds-protos` was installed
after `opentelemetry-proto` (a plain `pip install -e '.[test]'` does that), its stale copy of those modules owns
the files (DESIGN.md "Known packaging trap"). Then this fetches the official wheel of the installed
opentelemetry-proto version once (pip, into a cache directory) and puts it first on the path of this process
and of the processes it starts. Called from tests/conftest.py before anything imports those modules.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PROBE = Path("opentelemetry/proto/trace/v1/trace_pb2.py")


def _installed_copy() -> Path | None:
    for entry in sys.path:
        candidate = Path(entry or ".") / PROBE
        if candidate.is_file():
            return candidate
    return None


def is_current(path: Path) -> bool:
    return b"scope_spans" in path.read_bytes()  # the stale copy predates ScopeSpans (opentelemetry-proto 0.19)


def ensure_current() -> str | None:
    """Make `import opentelemetry.proto…` load the official classes; returns the directory put first on the
    path, or None when the installed copy is already current (or there is none)."""
    found = _installed_copy()
    if found is None or is_current(found):
        return None
    version = importlib.metadata.version("opentelemetry-proto")
    cache = Path(os.environ.get("MIZZEN_TEST_CACHE", Path(tempfile.gettempdir()) / "mizzen-test-cache"))
    target = cache / f"opentelemetry-proto-{version}"
    if not (target / PROBE).is_file():
        download = cache / f"download-{os.getpid()}"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(download), f"opentelemetry-proto=={version}"], check=True, timeout=300)
        wheel = next(download.glob("opentelemetry_proto-*.whl"))
        staging = cache / f"staging-{os.getpid()}"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(staging)
        # xds-protos also installs an (empty) opentelemetry/__init__.py, which makes `opentelemetry` a regular
        # package: ours must come first and then extend itself with the installed portions (api, sdk, …).
        (staging / "opentelemetry" / "__init__.py").write_text(
            "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
        if not (target / PROBE).is_file():
            staging.rename(target)  # atomic: parallel test runs never see half a copy
    if any(m == "opentelemetry" or m.startswith("opentelemetry.") for m in sys.modules):
        raise RuntimeError("opentelemetry was imported before tests/otlp_classes.ensure_current()")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    return str(target)
