"""``python -m weightslab``: the command line (see :mod:`weightslab.cli`)."""

import sys

from .cli import main

sys.exit(main())
