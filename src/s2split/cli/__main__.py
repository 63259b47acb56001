"""``python -m s2split.cli``, which ran the command line before it became a
package: the same as ``python -m s2split``."""

import sys

from .parser import main

if __name__ == "__main__":
    sys.exit(main())
