"""Ctrl-C that finishes the current transaction: the first SIGINT (or SIGTERM) only asks the loop to stop at
the next safe point (after the batch in flight, with the instrument left safe and a checkpoint written); a
second SIGINT within two seconds aborts at once with KeyboardInterrupt."""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

ABORT_WINDOW_S = 2.0


class GracefulInterrupt:
    """Context manager installing the two-stage handler (main thread only; elsewhere it is a no-op)."""

    def __init__(self, abort_window_s: float = ABORT_WINDOW_S) -> None:
        self.abort_window_s = abort_window_s
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.requested and signum == signal.SIGINT and now - self._first_at <= self.abort_window_s:
            raise KeyboardInterrupt
        self.requested, self._first_at = True, now
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: finishing the current step and saving a checkpoint "
            f"(Ctrl-C again within {self.abort_window_s:.0f} s aborts at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
