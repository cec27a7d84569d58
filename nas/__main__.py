"""`python -m nas ...` (and `accelerate launch -m nas ...`) run the CLI."""

import sys

from nas.cli import main

sys.exit(main())
