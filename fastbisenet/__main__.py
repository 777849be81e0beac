"""``python -m fastbisenet`` (also what ``torchrun -m fastbisenet`` runs)."""

import sys

from fastbisenet.cli import main

if __name__ == "__main__":
    sys.exit(main())
