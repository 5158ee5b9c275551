"""``python -m zckpt.cli``: the same as the ``zckpt`` console script."""

import sys

from zckpt.cli._main import main

sys.exit(main())
