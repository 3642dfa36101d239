"""`python -m mizzen.services.logsink …` (same as `mizzen logsink …`)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:], command="logsink"))
