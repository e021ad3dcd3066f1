"""Host side of each link: one :class:`~eqprop_hil.drivers.interface.NeuronArray` interface, a driver per link kind, and
:func:`open_array`, which picks the driver from the resource string."""

from eqprop_hil.drivers.open import open_array

__all__ = ["open_array"]
