"""`python -m headprune ...`: the command line, as the `headprune` command."""

import sys

from .cli import main

sys.exit(main())
