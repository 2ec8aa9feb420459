"""Entry point: ``python -m benchmarks [--quick] [--only ...] [--repeats N] [--out DIR]``."""

import sys

from .cli import main

sys.exit(main())
