"""``python -m sparsegen train | sample | reconstruct | andor | eval | report`` (see :mod:`sparsegen.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
