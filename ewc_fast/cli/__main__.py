"""``python -m ewc_fast.cli …`` — same as ``ewc-fast …`` and ``python -m ewc_fast …``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
