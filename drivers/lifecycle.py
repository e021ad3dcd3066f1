"""Close callbacks for drivers: release what was started for a link when the link is closed.

``open_array("sim://...")`` starts an emulator and then opens the real driver on it; the emulator must stop
when the user closes the array, without the driver knowing anything about emulators. A driver inherits
:class:`CloseCallbacks`; its own ``close`` is wrapped automatically (``__init_subclass__``) so that the
registered callbacks run once, after the driver has released its link, even if that ``close`` raised.

    class FpgaArray(CloseCallbacks):
        def close(self) -> None:
            ...release the serial port...

    array.add_close_callback(emulator.stop)   # runs after array.close()
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class CloseCallbacks:
    """Mixin: ``add_close_callback(fn)``; callbacks run in reverse order of registration, once, after close."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The close this class resolves to (its own, or a sibling base's listed before this mixin).
        close = getattr(cls, "close", None)
        if close is not None and not getattr(close, "_runs_close_callbacks", False):
            cls.close = _wrap_close(close)  # type: ignore[method-assign]

    def add_close_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` after this object's ``close()`` has released the link (once, last in first out)."""
        if not callable(callback):
            raise TypeError(f"close callback must be callable, got {callback!r}")
        self.__dict__.setdefault("_close_callbacks", []).append(callback)

    def run_close_callbacks(self) -> None:
        """Run and forget the registered callbacks; every one runs even if an earlier one raised."""
        callbacks = self.__dict__.pop("_close_callbacks", [])
        first_error: BaseException | None = None
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception as e:  # keep going: a failed emulator stop must not leak the next resource
                log.warning("close callback %r failed: %s", callback, e)
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        """Release the link; subclasses override this (their override still runs the callbacks)."""
        self.run_close_callbacks()


CloseCallbacks.close._runs_close_callbacks = True  # type: ignore[attr-defined]


def _wrap_close(close: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(close)
    def wrapped(self: CloseCallbacks, *args: Any, **kwargs: Any) -> Any:
        try:
            return close(self, *args, **kwargs)
        finally:
            self.run_close_callbacks()

    wrapped._runs_close_callbacks = True  # type: ignore[attr-defined]
    return wrapped
