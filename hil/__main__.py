"""``python -m eqprop_hil ...`` is the ``hil`` command."""

import sys

from eqprop_hil.cli import main

sys.exit(main())
