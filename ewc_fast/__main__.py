"""``python -m ewc_fast …`` — same as the ``ewc-fast`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
