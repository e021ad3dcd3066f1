"""Environment variables: one prefix, ``EQPROP_HIL_``, for every setting read from the environment.

Settings that must stay out of ``ps`` and shell history (tokens) come from here. Names used before the prefix
was unified still work for one release, with a deprecation warning naming the new one.
"""

from __future__ import annotations

import os
import warnings

PREFIX = "EQPROP_HIL_"
# new name -> the old name it replaces
DEPRECATED = {
    "EQPROP_HIL_TELEMETRY_TOKEN": "HIL_TELEMETRY_TOKEN",
    "EQPROP_HIL_TELEMETRY_SERVER_KEY": "HIL_TELEMETRY_SERVER_KEY",
    "EQPROP_HIL_BENCHES": "HIL_BENCHES",
}
_warned: set[str] = set()


def setting(name: str) -> str | None:
    """``$EQPROP_HIL_<name>`` if set and non-empty, else its deprecated old name (warned once), else None."""
    key = name if name.startswith(PREFIX) else PREFIX + name
    value = os.environ.get(key)
    if value:
        return value
    old = DEPRECATED.get(key)
    if old and os.environ.get(old):
        if old not in _warned:
            _warned.add(old)
            warnings.warn(f"the environment variable {old} is deprecated; set {key} instead", FutureWarning,
                          stacklevel=2)
        return os.environ[old]
    return None
