"""Declarative SCPI settings in PyMeasure style: each declared once with its commands, validator and unit.

A :class:`ScpiProperty` on a driver class turns attribute access into a query (``board.compliance_amperes``) and
assignment into a validated set (``board.compliance_amperes = 5e-5``). The validator runs before anything is
sent, so a bad value raises :class:`~eqprop_hil.drivers.errors.LimitError` and the wire stays silent. Docstrings start with
Control / Measure / Set / Get and end with the unit in parentheses; a test walks every property to hold that.
The owner supplies ``_query(command) -> str`` and ``_set(command)`` (which drains the error queue).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from eqprop_hil.drivers.errors import LimitError, ReplyError

Validator = Callable[[Any], Any]


def strict_range(lo: float, hi: float) -> Validator:
    """Accept a finite real number in [lo, hi]; anything else raises LimitError naming the range."""

    def check(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError) as e:
            raise LimitError(f"expected a number in [{lo:g}, {hi:g}], got {value!r}") from e
        if isinstance(value, bool) or not lo <= number <= hi:  # NaN fails the comparison too
            raise LimitError(f"{value!r} outside [{lo:g}, {hi:g}]")
        return number

    check.__doc__ = f"number in [{lo:g}, {hi:g}]"
    return check


def strict_discrete_set(choices: Iterable[str]) -> Validator:
    """Accept exactly one of ``choices`` (case-insensitive strings), returned upper-case."""
    allowed = tuple(c.upper() for c in choices)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.upper() not in allowed:
            raise LimitError(f"{value!r} is not one of {', '.join(allowed)}")
        return value.upper()

    check.__doc__ = f"one of {allowed}"
    return check


def strict_bool(value: Any) -> bool:
    """Accept True or False only (not 1, 0 or "ON": a typo should not switch learning on)."""
    if not isinstance(value, bool):
        raise LimitError(f"expected True or False, got {value!r}")
    return value


def parse_bool(reply: str) -> bool:
    if reply.strip() not in ("0", "1"):
        raise ReplyError(f"expected 0 or 1, got {reply!r}")
    return reply.strip() == "1"


def parse_float(reply: str) -> float:
    try:
        return float(reply)
    except ValueError as e:
        raise ReplyError(f"expected a number, got {reply!r}") from e


def parse_int(reply: str) -> int:
    try:
        return int(reply)
    except ValueError as e:
        raise ReplyError(f"expected an integer, got {reply!r}") from e


def parse_word(reply: str) -> str:
    word = reply.strip()
    if not word.replace("_", "").isalnum():
        raise ReplyError(f"expected a SCPI mnemonic, got {reply!r}")
    return word


class ScpiProperty:
    """One instrument setting or reading.

    ``invalid`` is a value the validator must reject (the property-rule test sends it and checks that nothing
    reached the wire); ``cache`` names an attribute of the owner updated after a successful set.
    """

    def __init__(
        self,
        doc: str,
        get_command: str | None = None,
        set_command: str | None = None,
        *,
        parse: Callable[[str], Any] = parse_float,
        validator: Validator | None = None,
        fmt: Callable[[Any], str] = str,
        invalid: Any = None,
        cache: str | None = None,
    ) -> None:
        if set_command is not None and validator is None:
            raise TypeError(f"settable property {set_command!r} needs a validator")
        self.__doc__ = doc
        self.get_command = get_command
        self.set_command = set_command
        self.parse = parse
        self.validator = validator
        self.fmt = fmt
        self.invalid = invalid
        self.cache = cache
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if self.get_command is None:
            raise AttributeError(f"{self.name} is write-only")
        return self.parse(obj._query(self.get_command))

    def __set__(self, obj: Any, value: Any) -> None:
        if self.set_command is None or self.validator is None:
            raise AttributeError(f"{self.name} is read-only")
        checked = self.validator(value)
        obj._set(f"{self.set_command} {self.fmt(checked)}")
        if self.cache:
            setattr(obj, self.cache, checked)


def declared_properties(cls: type) -> dict[str, ScpiProperty]:
    """Every ScpiProperty of a class and its bases, by attribute name."""
    found: dict[str, ScpiProperty] = {}
    for klass in reversed(cls.__mro__):
        found.update({k: v for k, v in vars(klass).items() if isinstance(v, ScpiProperty)})
    return found
