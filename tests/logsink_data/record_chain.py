"""Records `chain/{a,b,c}.jsonl`: real Envoy sidecars (see meshrig.py) logging an A→B→C request chain in
Istio's default JSON format. Run from the repo root: `python -m tests.logsink_data.record_chain`.

Calls, in order: GET /ok (200 everywhere), GET /missing (C answers 404), POST /fail (C answers 503),
a call to `down` (nothing listens: UF,URX after Istio's default retries), and one TCP echo from A to C:9000.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from tests.logsink_data.meshrig import MeshRig

OUT = Path(__file__).parent / "chain"


async def record(workdir: Path) -> None:
    rig = MeshRig(workdir)
    await rig.start()
    try:
        for method, path, body in (("GET", "/ok", None), ("GET", "/missing", None), ("POST", "/fail", b"x" * 10)):
            status, _ = await rig.call_b(method, path, body)
            print(method, path, status)
            await asyncio.sleep(0.05)
        print("down", await rig.call_down())
        await asyncio.sleep(0.05)
        print("tcp", await rig.tcp_echo(b"ping\n"))
        await rig.wait_lines("a", 5)
        await rig.wait_lines("b", 6)
        await rig.wait_lines("c", 4)
    finally:
        await rig.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(record(Path(tmp)))
        OUT.mkdir(exist_ok=True)
        for pod in ("a", "b", "c"):
            shutil.copy(Path(tmp) / f"{pod}.log", OUT / f"{pod}.jsonl")
            print(f"--- {pod}.jsonl")
            print((OUT / f"{pod}.jsonl").read_text())


if __name__ == "__main__":
    main()
