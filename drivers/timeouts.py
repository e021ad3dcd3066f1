"""The one place that converts timeouts between libraries.

The project's APIs take seconds (float). pyvisa wants milliseconds (int, or None for infinite), pyserial
seconds (float or None), ZeroMQ milliseconds (int, -1 for infinite).
"""

from __future__ import annotations


def visa_ms(seconds: float | None) -> float | None:
    """Seconds -> pyvisa's ``timeout`` attribute (milliseconds; None waits forever)."""
    return None if seconds is None else max(1, int(round(seconds * 1000)))


def serial_s(seconds: float | None) -> float | None:
    """Seconds -> pyserial's ``timeout`` (seconds; None blocks forever, 0 never blocks)."""
    return None if seconds is None else float(seconds)


def zmq_ms(seconds: float | None) -> int:
    """Seconds -> ZeroMQ's RCVTIMEO/SNDTIMEO/poll timeout (milliseconds; -1 waits forever)."""
    return -1 if seconds is None else max(0, int(round(seconds * 1000)))
