"""`python -m vibevoice_pool` is the `vibevoice-pool` command."""

import sys

from vibevoice_pool.cli import main

if __name__ == "__main__":
    sys.exit(main())
