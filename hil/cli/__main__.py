"""``python -m eqprop_hil.cli ...`` is the ``hil`` command too."""

import sys

from eqprop_hil.cli import main

sys.exit(main())
