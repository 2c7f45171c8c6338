"""``python -m lp_fx.tools.cli``: the ``lp-fx`` command line (torchrun starts it this way)."""

import sys

from lp_fx.tools.cli import main

sys.exit(main())
