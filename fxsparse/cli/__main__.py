"""``python -m fxsparse.cli``: the ``fxsparse`` command, for environments without its script."""
import sys

from fxsparse.cli import main

sys.exit(main())
