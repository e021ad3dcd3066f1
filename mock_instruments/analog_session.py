"""Per-connection state and the duplicate-request cache of the emulated analog board (protocol 2).

``protocols/analog_board.md`` section 1.4 splits the board's state: the error queue, the event status register,
its enable mask and the integrity mode belong to one connection (:class:`Session`), so a new controller never
sees another's errors; the weights, settings, counters, the instance id and the duplicate-request cache
(:class:`RequestCache`, section 4.2) belong to the board, so a retransmission over a new connection is still
recognised and answered from the cache instead of being executed twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque

from eqprop_hil.protocols.scpi import format_error_entry
from eqprop_hil.protocols.scpi_tags import CACHE_DEPTH, REQUEST_CONFLICT, REQUEST_STALE, newer

log = logging.getLogger(__name__)

ERROR_QUEUE_DEPTH = 32
ESR_OPC, ESR_QYE, ESR_DDE, ESR_EXE, ESR_CME, ESR_PON = 0x01, 0x04, 0x08, 0x10, 0x20, 0x80


def esr_bit(code: int) -> int:
    """Which event-status bit an error sets (IEEE 488.2: command, execution, device-specific, query)."""
    if -199 <= code <= -100:
        return ESR_CME
    if -299 <= code <= -200:
        return ESR_EXE
    if -499 <= code <= -400:
        return ESR_QYE
    return ESR_DDE


class Session:
    """What one connection owns: error queue (FIFO of 32), ESR, ESE, integrity mode. A power cycle of the board
    resets it (``boot`` tells the firmware whether it has seen the current boot)."""

    def __init__(self) -> None:
        self.boot = -1
        self.reset()

    def reset(self) -> None:
        self.errors: deque[str] = deque()
        self.esr = ESR_PON
        self.ese = 0
        self.integrity = False  # CRC-32 required on every message of this connection (spec 1.2)

    def push_error(self, code: int, detail: str = "") -> None:
        """Append to the FIFO error queue; when full, the newest entry becomes -350 Queue overflow."""
        self.esr |= esr_bit(code)
        entry = format_error_entry(code, detail)
        log.debug("error queued: %s", entry)
        if len(self.errors) >= ERROR_QUEUE_DEPTH:
            self.errors[-1] = format_error_entry(-350)
        else:
            self.errors.append(entry)


class RequestCache:
    """The last ``depth`` tagged messages a board executed: request id -> (digest, reply). Spec 4.2.

    :meth:`lookup` says what to do with an arriving id: ``("replay", reply)`` for a repeat with the same digest,
    ``("refuse", code)`` for a conflict (131) or a stale id (132), ``("run", None)`` for a new one.
    """

    def __init__(self, depth: int = CACHE_DEPTH) -> None:
        self.depth = int(depth)
        self.clear()

    def clear(self) -> None:
        self._entries: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.newest: int | None = None

    def lookup(self, rid: int, digest: int) -> tuple[str, bytes | int | None]:
        entry = self._entries.get(rid)
        if entry is not None:
            if entry[0] == digest:
                return "replay", entry[1]
            return "refuse", REQUEST_CONFLICT
        if self.newest is not None and not newer(rid, self.newest):
            return "refuse", REQUEST_STALE
        return "run", None

    def store(self, rid: int, digest: int, reply: bytes) -> None:
        self._entries[rid] = (digest, bytes(reply))
        self.newest = rid
        while len(self._entries) > self.depth:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
