"""Errors raised by the host side of a link. All derive from :class:`eqprop_hil.protocols.errors.EqpropError`."""

from __future__ import annotations

from eqprop_hil.protocols.errors import EqpropError, ValueRangeError


class DriverError(EqpropError):
    """Root of driver errors."""


class InstrumentError(DriverError):
    """The instrument refused or failed a command and said why (SCPI error queue entry or FPGA status code)."""

    def __init__(self, code: int, message: str, command: str = "") -> None:
        self.code = code
        self.message = message
        self.command = command
        where = f" after {command!r}" if command else ""
        super().__init__(f"instrument error {code}, {message!r}{where}")


class LinkError(DriverError):
    """The link failed and bounded retries did not recover it (timeouts, lost connection, garbage replies)."""


class ReplyError(DriverError, ValueError):
    """A reply arrived but is not what the command promises (wrong length, NaN in a block, unparseable)."""


class DeviceRestarted(DriverError):
    """The instrument rebooted since the last command (boot counter changed): neuron states and the
    retransmission cache are gone; weights are non-volatile. Re-read weights before trusting a pending update."""


class AccessDenied(DriverError):
    """The instrument refused this controller: it requires a shared token and none, or a wrong one, was given
    (``token=`` or ``$EQPROP_HIL_TOKEN``). Nothing was executed."""


class LimitError(ValueRangeError, DriverError):
    """A value that would drive the hardware outside the configured safety limits; nothing was sent."""


class InstanceChanged(DeviceRestarted):
    """The instrument is not the instance this driver was bound to: it was power-cycled, restarted or swapped, so
    the weights the run built are gone (a blank or foreign board answers). The board refused the fenced command
    and nothing was executed. Never train on: re-program from the last checkpoint and call
    ``rebind_instance()``, or stop. ``expected`` and ``actual`` are the two instance ids (hex strings)."""

    def __init__(self, expected: str, actual: str, command: str = "") -> None:
        self.expected = expected
        self.actual = actual
        self.command = command
        where = f" ({command!r} refused, not executed)" if command else ""
        super().__init__(f"instrument instance changed: bound to {expected}, the board is now {actual}{where}; "
                         "its weights are not the run's: re-program from the last checkpoint, or stop")


class ProtocolVersionError(DriverError):
    """The instrument speaks another revision of the protocol than this driver (``supported`` versus ``found``);
    nothing state-changing was sent. Update the driver or the firmware."""
