"""``python -m ubsmoe.cli``: the ``ubsmoe`` command."""

import sys

from ubsmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
