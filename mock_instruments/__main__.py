"""``python -m mock_instruments analog|fpga [options]``: run an emulated instrument until interrupted."""

import sys

from eqprop_hil.mock_instruments.cli import main

sys.exit(main())
