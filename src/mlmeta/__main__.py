"""``python -m mlmeta ...`` runs the command-line interface (see :mod:`mlmeta.cli`)."""

import sys

from mlmeta.cli import main

if __name__ == "__main__":
    sys.exit(main())
