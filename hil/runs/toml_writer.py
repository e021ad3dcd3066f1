"""A small TOML writer (the stdlib's ``tomllib`` only reads): str, int, float, bool, lists, nested tables.

Used for the resolved ``config.toml`` of a run, which a user reads and ``tomllib`` loads back unchanged (the
tests check the round trip, property-based). Lists of tables become ``[[name]]`` sections; tables inside arrays
become inline tables. TOML has no null: a None value is written as a comment so a reader still sees it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from eqprop_hil.protocols.errors import EqpropError


class TomlWriteError(EqpropError, ValueError):
    """A value TOML cannot represent (None inside an array, an integer beyond 64 bits, an arbitrary object)."""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # used with fullmatch: "$" would also accept a trailing newline
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_key(key: object, where: str) -> str:
    if not isinstance(key, str):
        raise TomlWriteError(f"TOML keys must be strings, got {key!r} at {where or 'top level'}")
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, where: str) -> str:
    """One inline TOML value (scalars, arrays, inline tables)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise TomlWriteError(f"TOML integers are 64-bit; {value} at {where} does not fit")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest repr that round-trips: 1e-05, 0.1, 3.0
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return "[" + ", ".join(_toml_value(v, f"{where}[{i}]") for i, v in enumerate(items)) + "]"
    if isinstance(value, dict):
        parts = [f"{_toml_key(k, where)} = {_toml_value(v, f'{where}.{k}')}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(parts) + "}"
    if value is None:
        raise TomlWriteError(f"TOML has no null: {where} is None inside an array")
    raise TomlWriteError(f"cannot write {type(value).__name__} {value!r} at {where} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, dict) for v in value)


def _toml_table(table: dict, prefix: list[str], lines: list[str]) -> None:
    where = ".".join(prefix)
    simple = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)]
    for key, value in simple:
        k = _toml_key(key, where)
        if value is None:  # keep the information visible to a reader; loading falls back to the default
            lines.append(f"# {k} = None (TOML has no null)")
        else:
            lines.append(f"{k} = {_toml_value(value, f'{where}.{key}' if where else key)}")
    for key, value in table.items():
        path = prefix + [_toml_key(key, where)]
        if isinstance(value, dict):
            lines.extend(["", "[" + ".".join(path) + "]"])
            _toml_table(value, path, lines)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", "[[" + ".".join(path) + "]]"])
                _toml_table(item, path, lines)


def toml_dumps(data: dict) -> str:
    """TOML text for a nested dict of str/int/float/bool/lists/tables; ``tomllib.loads`` gives ``data`` back.

    None values are written as a comment (TOML has no null), so loading falls back to the field's default.
    """
    if not isinstance(data, dict):
        raise TomlWriteError(f"a TOML document is a table (dict), got {type(data).__name__}")
    lines: list[str] = []
    _toml_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"
