"""eqprop-hil: train physical neural networks in situ with (Continual) Equilibrium Propagation.

The repository's ``hil/`` folder is this package; ``drivers/``, ``protocols/`` and ``mock_instruments/`` install as
its sub-packages (``eqprop_hil.drivers`` ...). Nothing heavy is imported here, so ``eqprop_hil.protocols`` or the
emulators load without torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eqprop-hil")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
