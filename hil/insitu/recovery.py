"""The resilience layer of in-situ training: every fault of a link or an instrument ends in a decision, not a guess.

A pulse command is the one operation that must run exactly once (it wears devices and cannot be read back
cheaply), so it gets its own rule; everything else is made safe by replaying a whole training sample:

- **pulse commands** (:meth:`Guard.send`): after any failure (timeout, closed link, garbage or busy answer,
  reboot) ask the instrument how many pulse commands it has *executed* (a non-volatile counter: the analog
  board's ``PULSe:COUNt?``, the FPGA's COUNTERS opcode) and compare with the count this host expects: one more
  means it ran (journal ``applied``), the same means it did not (resend, bounded). The verdict and its evidence
  go to the journal (:meth:`eqprop_hil.insitu.journal.PulseJournal.resolve`).
- **idempotent operations** (settings, reads, inference): retried in place, bounded; the drivers already retry
  link errors, this adds busy answers and command errors caused by a corrupted request (nothing executed).
- **non-idempotent operations** (``settle``) and **reboots** (a boot counter that changed, or
  :class:`DeviceRestarted`): the sample is redone from its start (:class:`RedoSample`); the learner first
  re-applies the volatile settings and undoes the sample's acknowledged pulses with negated counts.
  Counter-based stochastic rounding makes the redo draw exactly the pulses of the first attempt.

Undoing with negated counts is exact on ideal devices (each pulse moves a weight by exactly ``dw_min``, up to
float64 round-off); on real devices potentiation and depression steps differ and bounds saturate, so an undo
leaves a residual of the order of the asymmetry times the pulses undone. That is the price of a reboot
mid-sample; a bench user who cannot afford it re-programs from the last checkpoint instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from eqprop_hil.drivers.errors import DeviceRestarted, DriverError, InstanceChanged, InstrumentError, LinkError, ReplyError
from eqprop_hil.insitu.journal import PulseJournal
from eqprop_hil.protocols.scpi_integrity import INTEGRITY_ERROR

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY = 140  # analog board: "device busy; command not executed" (protocols/analog_board.md section 2)


class RedoSample(Exception):
    """The sample in progress cannot be trusted (reboot, or a non-idempotent step whose fate is unknown)."""


class RollBack(DriverError):
    """The instrument's state since the last checkpoint cannot be repaired in place: another instance answers
    (restarted, power-cycled or swapped: its weights are not the run's), or a sample of a mode whose updates
    cannot be undone (outer, local) was interrupted. The session re-programs the last good checkpoint's weights
    and redoes the run from there (hil/session.py); never train on. ``instance_changed``: the weights are gone."""

    def __init__(self, message: str, *, instance_changed: bool = False) -> None:
        super().__init__(message)
        self.instance_changed = instance_changed


class ReconcileError(DriverError):
    """The board's executed-command counter and the journal disagree in a way the journal cannot explain: an
    update may have been lost or doubled, so the run stops. The message names both counts."""


def board_instance(array: Any) -> str | None:
    """The instance id the board reports now (a fresh query where the driver is fenced), or None for a board
    or driver without instance identity."""
    query = getattr(array, "instance_id", None)
    if callable(query):
        return str(query())
    try:
        ident = array.identity()
    except Exception:  # an identity query that fails here is retried by the caller's own next command
        return None
    value = ident.get("instance") if isinstance(ident, dict) else None
    return str(value) if value else None


def transient(error: BaseException) -> bool:
    """Errors after which nothing of the failed command is known to have happened twice: worth a retry.

    Busy (140) and command errors (-1xx: a request corrupted on the wire fails to parse) change nothing on the
    instrument by the spec; link and reply errors may have executed, which the caller decides.
    """
    if isinstance(error, InstrumentError):  # INTEGRITY_ERROR: CRC of a request wrong, nothing executed (spec 1.2)
        return error.code in (BUSY, INTEGRITY_ERROR) or -199 <= error.code <= -100
    return isinstance(error, (LinkError, ReplyError, DeviceRestarted))


class Guard:
    """Bounded retries, the executed-pulse-command bookkeeping and the reboot probe of one instrument.

    ``stats`` counts what happened (for the campaign's report): retries in place, pulse commands resent,
    found applied, samples redone, reboots seen, undo commands sent.
    """

    def __init__(self, array: Any, journal: PulseJournal, *, retries: int = 8, backoff_s: float = 0.002) -> None:
        self.array, self.journal = array, journal
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self.stats = dict.fromkeys(("retries", "resent", "found_applied", "found_not_applied", "redos", "reboots",
                                    "undo_commands", "rollbacks"), 0)
        self.expected = 0  # pulse commands the instrument should have executed (its counter's value)
        self.boot: int | None = None
        self.restarted = False  # a reboot was seen while sending pulses: the sample must be redone
        self.instance: str | None = None  # the power-up instance the run's weights live on (None: not reported)
        self.base = (0, 0)  # (board counter, journal applied count) when the counter was last taken as reference
        self._offered: dict[str, bool] = {}

    # ------------------------------------------------------------------ instance identity and reconciliation
    def bind(self) -> None:
        """Take the board's current instance as the run's (at open, and after its weights were re-programmed)."""
        rebind = getattr(self.array, "rebind_instance", None)
        self.instance = str(rebind()) if callable(rebind) else board_instance(self.array)

    def instance_lost(self) -> str:
        """'' while the board is the bound instance; else a sentence naming both ids. Asked after every
        recovery: a bridge or gateway can hide a restart behind a link that never dropped."""
        if self.instance is None:
            return ""
        now = self.retry(lambda: board_instance(self.array), "instance id")
        return "" if now in (None, self.instance) else (
            f"the instrument is instance {now}, the run's weights were on instance {self.instance}")

    def check_instance(self, where: str) -> None:
        lost = self.instance_lost()
        if lost:
            raise RollBack(f"{where}: {lost}", instance_changed=True)

    def reconcile(self, where: str) -> int:
        """Compare the board's executed-command counter with the journal; a difference stops the run
        (:class:`ReconcileError` naming both counts). Returns the counter."""
        now = self.executed()
        board0, journal0 = self.base
        journal_says = board0 + self.journal.applied_count() - journal0
        if not now == self.expected == journal_says:
            raise ReconcileError(
                f"reconciliation at {where}: the instrument reports {now} executed pulse commands, the journal "
                f"accounts for {journal_says} ({self.journal.applied_count()} applied in the journal, reference "
                f"{board0} on the board and {journal0} in the journal) and this session expects {self.expected}; "
                "an update may have been lost or doubled: the run stops (check the instrument and the journal)")
        return now

    # ------------------------------------------------------------------ probes of the instrument
    def _offers(self, name: str) -> bool:
        """Whether the driver has attribute ``name``, asked of its class where it can be: ``hasattr`` on a SCPI
        property is a round trip. Cached per name (a driver's attributes do not change while it is open)."""
        known = self._offered.get(name)
        if known is None:
            cls = type(self.array)
            known = self._offered[name] = hasattr(cls, name) or hasattr(self.array, name)
        return known

    def executed(self) -> int:
        """The instrument's non-volatile count of executed pulse commands (matrix and outer)."""
        if self._offers("pulse_commands_executed"):  # analog board: PULSe:COUNt?
            return self.retry(lambda: self.array.pulse_commands_executed, "PULS:COUN?")
        c = self.retry(self.array.counters, "COUNTERS")  # FPGA array
        return int(c["physics_pulse_commands"]) + int(c.get("physics_outer_commands", 0))

    def read_boot(self) -> int | None:
        """The boot counter, where the instrument reports one without being asked (FPGA: in every response)
        or on request (analog board: ``SYSTem:BOOT?``)."""
        if self._offers("boot_count"):
            return self.retry(lambda: self.array.boot_count, "SYST:BOOT?")
        link = getattr(self.array, "link", None)
        return getattr(link, "boot", None)

    def sync(self) -> None:
        """Take the instrument's counters as the reference (at start-up and after every recovery)."""
        self.expected = self.executed()
        self.boot = self.read_boot()
        self.base = (self.expected, self.journal.applied_count())

    def sample_rebooted(self) -> bool:
        """:meth:`rebooted` at the end of a training sample, without the round trip where fencing already
        answers it: on a bound, fenced board every state-changing command carries the instance id, a reboot
        draws a new one, and the next command (this sample's or the next sample's first) is refused with
        InstanceChanged, which rolls back to the checkpoint. Unfenced drivers are polled as before."""
        if self.instance is not None and hasattr(self.array, "bound_instance"):
            return False
        return self.rebooted()

    def rebooted(self) -> bool:
        """True once per reboot that happened since the last :meth:`sync` / :meth:`rebooted`."""
        boot = self.read_boot()
        changed = self.boot is not None and boot is not None and boot != self.boot
        self.boot = boot
        if changed:
            self.stats["reboots"] += 1
        return changed

    # ------------------------------------------------------------------ idempotent operations
    def retry(self, operation: Callable[[], T], what: str) -> T:
        """Run an idempotent operation, retrying transient failures in place (bounded, with backoff). A reboot
        (FPGA: DeviceRestarted) is retried too, and flags ``restarted`` for the learner."""
        for attempt in range(self.retries + 1):
            try:
                return operation()
            except InstanceChanged as e:  # refused, nothing executed: the weights are gone, retrying cannot help
                raise RollBack(f"{what}: {e}", instance_changed=True) from e
            except DeviceRestarted:  # the link syncs again by itself; the sample around this must be redone
                self.stats["reboots"] += 1
                self.restarted = True
                continue
            except (LinkError, ReplyError, InstrumentError) as e:
                if not transient(e) or attempt == self.retries:
                    raise LinkError(f"{what}: still failing after {attempt + 1} attempts: {e}") from e
                self.stats["retries"] += 1
                log.info("%s failed (%s); retry %d", what, e, attempt + 1)
                time.sleep(self.backoff_s * 2 ** min(attempt, 6))
        raise LinkError(f"{what}: unreachable")  # the loop returns or raises

    def once(self, operation: Callable[[], T], what: str) -> T:
        """A non-idempotent operation (settle): any transient failure makes the sample untrustworthy."""
        try:
            return operation()
        except InstanceChanged as e:
            raise RollBack(f"{what}: {e}", instance_changed=True) from e
        except (LinkError, ReplyError, InstrumentError, DeviceRestarted) as e:
            if not transient(e):
                raise
            self.restarted = self.restarted or isinstance(e, DeviceRestarted)
            raise RedoSample(f"{what}: {e}") from e

    # ------------------------------------------------------------------ pulse commands, exactly once
    def send(self, jid: int, command: dict, fire: Callable[[], dict]) -> dict | None:
        """Send journaled pulse command ``jid`` until it is known to have executed exactly once; returns the
        acknowledgement, or None when the counter showed it ran but its acknowledgement was lost.

        When the instrument rebooted, the command's fate is still settled (counter, then resend) and
        ``restarted`` is set for the learner to redo the sample; :class:`LinkError` after ``retries`` resends.
        """
        restarted, ack = False, None
        for attempt in range(self.retries + 1):
            try:
                ack = fire()
            except InstanceChanged as e:  # fenced: the board refused it, nothing executed
                self.journal.resolve(jid, "not_applied", {"error": str(e)[:300], "policy": "refused: instance changed"})
                raise RollBack(f"pulse command {jid}: {e}", instance_changed=True) from e
            except (LinkError, ReplyError, InstrumentError, DeviceRestarted) as e:
                if not transient(e):
                    self.journal.resolve(jid, "not_applied", {"error": str(e), "policy": "refused by the instrument"})
                    raise
                restarted = restarted or isinstance(e, DeviceRestarted)
                lost = self.instance_lost()
                if lost:  # the counter belongs to another power-up: it proves nothing about this command
                    self.journal.resolve(jid, "not_applied", {"error": f"{type(e).__name__}: {e}"[:300],
                                                               "policy": f"instance changed ({lost}); the run "
                                                               "re-programs the checkpoint's weights"})
                    raise RollBack(f"pulse command {jid}: {lost}", instance_changed=True) from e
                now = self.executed()
                evidence = {"error": f"{type(e).__name__}: {e}"[:300], "executed_counter": now,
                            "expected_before": self.expected, "attempt": attempt + 1}
                if now == self.expected + 1:
                    self.expected = now
                    self.stats["found_applied"] += 1
                    self.journal.resolve(jid, "applied", {**evidence, "verdict": "counter advanced by one"})
                    break
                if now != self.expected:
                    self.journal.resolve(jid, "not_applied", {**evidence, "verdict": "counter inconsistent"})
                    raise ReconcileError(f"pulse command {jid}: the instrument's executed-command counter reads {now}, "
                                         f"the journal expects {self.expected} or {self.expected + 1}; stop and "
                                         "reconcile") from e
                self.stats["found_not_applied"] += 1
                if attempt == self.retries:
                    self.journal.resolve(jid, "not_applied", {**evidence, "verdict": "never executed, gave up"})
                    raise LinkError(f"pulse command {jid} did not execute after {attempt + 1} attempts: {e}") from e
                self.stats["resent"] += 1
                time.sleep(self.backoff_s * 2 ** min(attempt, 6))
                continue
            self.expected += 1
            self.journal.done(jid, {"pulses": int(ack["pulses"]), **({"attempts": attempt + 1} if attempt else {})})
            break
        if restarted:
            self.stats["reboots"] += 1
            self.restarted = True  # the learner redoes the sample once this command's fate is settled
        return ack

    def undo(self, applied: list[tuple[int, dict]], fire: Callable[[dict], dict], base: dict) -> None:
        """Send the negation of each applied matrix command (newest first), journaled as ``undo_of``; each is
        removed from ``applied`` once undone, so a reboot during the undo loses nothing."""
        for jid, c in reversed(applied):
            if c["mode"] != "matrix":
                raise RollBack(f"outer-mode command {jid} cannot be undone (its pulse trains are drawn on the "
                               "device): re-programming the last checkpoint's weights and redoing from there")
            neg = {"edge": c["edge"], "feedback": c["feedback"], "mode": "matrix",
                   "counts": (-c["counts"].astype(np.int16)).astype(np.int8)}
            [uid] = self.journal.begin_many([{**base, **neg, "undo_of": jid, "executed_before": self.expected}])
            self.stats["undo_commands"] += 1
            self.send(uid, neg, lambda: fire(neg))
            applied.pop()


def entries_since(path: Any, first_id: int) -> list[tuple[int, dict, str]]:
    """``(id, entry with arrays decoded, last state)`` of every journal command with ``id >= first_id``, in id
    order: what was sent after a checkpoint, for the resume reconciliation."""
    import json

    from eqprop_hil.insitu.journal import decode_array, is_encoded_array

    out: dict[int, list] = {}
    for line in open(path, "rb").read().split(b"\n"):
        try:
            rec = json.loads(line)
            jid, state = int(rec["id"]), rec["state"]
        except (ValueError, KeyError, TypeError):
            continue  # blank, or a torn last line (PulseJournal reported it on open)
        if jid < first_id:
            continue
        if state == "pending":
            out[jid] = [{k: (decode_array(v) if is_encoded_array(v) else v) for k, v in rec.items()}, state]
        elif jid in out:
            out[jid][1] = state
    return [(jid, entry, state) for jid, (entry, state) in sorted(out.items())]


class GuardedArray:
    """The instrument as the learner drives it: idempotent operations retried in place through a :class:`Guard`,
    ``settle`` and ``train_sample`` run once (a failure redoes the sample). Pulse commands do not pass here:
    the learner sends them through :meth:`Guard.send` with their journal ids."""

    ONCE = frozenset({"settle", "settle_time", "train_sample"})

    def __init__(self, array: Any, guard: Guard) -> None:
        self._array, self._guard = array, guard

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._array, name)
        if not callable(attr):
            return attr
        run = self._guard.once if name in self.ONCE else self._guard.retry
        return lambda *args, **kwargs: run(lambda: attr(*args, **kwargs), name)
