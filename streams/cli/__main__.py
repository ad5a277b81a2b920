"""`python -m streams.cli ...` is `reid-stream ...`."""

import sys

from streams.cli import main

sys.exit(main())
