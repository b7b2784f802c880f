"""``python -m excb`` is the same as the ``excb`` command."""

import sys

from excb.cli import main

sys.exit(main())
