"""The one exception tree of the project, rooted in :class:`EqpropError`.

It lives in ``protocols`` because every other package may import ``protocols`` (see ARCHITECTURE.md), so
``drivers``, ``mock_instruments`` and ``hil`` all derive their errors from the same root and a user can catch
everything eqprop-hil raises with one ``except EqpropError``.
"""

from __future__ import annotations


class EqpropError(Exception):
    """Root of every error eqprop-hil raises on purpose."""


class ProtocolError(EqpropError, ValueError):
    """Bytes or text that do not follow a wire format; the message quotes the offending input."""


class FrameError(ProtocolError):
    """A serial frame that cannot be decoded: bad COBS, CRC mismatch, wrong length or version."""


class BlockError(ProtocolError):
    """A malformed IEEE 488.2 definite-length block (bad header, truncated, wrong element size)."""


class ScpiError(ProtocolError):
    """A SCPI line that cannot be parsed (unknown header, missing or extra parameter, bad number)."""


class ValueRangeError(EqpropError, ValueError):
    """A value outside the range the spec or the configured limits allow; nothing was sent or applied."""
