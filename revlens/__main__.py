"""``python -m revlens`` (and ``torchrun ... -m revlens``): the `revlens` command line."""

import sys

from revlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
