"""``python -m zckpt``: the same as the ``zckpt`` console script."""

import sys

from zckpt.cli._main import main

sys.exit(main())
