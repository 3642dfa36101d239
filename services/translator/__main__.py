"""`python -m mizzen.services.translator` / `mizzen translator`."""

from __future__ import annotations

import sys

from ..mesh.service import run_service, setup_logging
from .app import parser, serve


def main(argv: list[str] | None = None, command: str = "translator") -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    run_service(lambda stop: serve(args, stop), name="mizzen-translator")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
