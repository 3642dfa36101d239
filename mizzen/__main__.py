import sys

from mizzen.services.cli.main import main

sys.exit(main())
