"""Shared-token access control of the emulated instruments (``protocols/analog_board.md`` section 1.1,
``protocols/fpga_serial.md`` section 7.1): the token's form, its constant-time comparison, and the SCPI line.

An instrument exposed to a lab network should not obey whoever connects. A server started with a token
answers nothing but the authentication command until a connection has given the token; the token is compared
with :func:`hmac.compare_digest`, so the time a refusal takes says nothing about how much of a guess was right.
The token travels in clear text: it keeps out the careless and the curious on a trusted network, not an
eavesdropper (use a VPN or SSH tunnel across untrusted ones).

    >>> check_token("s3cret-token")
    's3cret-token'
    >>> auth_query("s3cret-token")
    'SYST:AUTH? "s3cret-token"'
"""

from __future__ import annotations

import hmac
import os
import re

from eqprop_hil.protocols.errors import ValueRangeError

TOKEN_ENV = "EQPROP_HIL_TOKEN"  # where drivers look for the token when none is passed as token=
MAX_TOKEN_CHARS = 255  # the FPGA's str field carries at most 255 bytes
AUTH_REFUSED_CODE = -203  # SCPI "Command protected"
AUTH_REFUSED_LINE = b'-203,"Command protected; send SYST:AUTH? \\"<token>\\" first"'

# SYSTem:AUTHenticate "<token>" (set form, no reply) or SYSTem:AUTHenticate? "<token>" (answers 1).
_AUTH = re.compile(rb'^\s*:?SYST(?:EM)?:AUTH(?:ENTICATE)?(\?)?\s+"([^"]*)"\s*$', re.IGNORECASE)
_TOKEN_CHARS = re.compile(r"[!#-~]+")  # printable ASCII without space and double quote


def check_token(token: object, what: str = "token") -> str:
    """Return ``token`` if it is a usable shared token: 1..255 printable ASCII characters, no space or ``"``."""
    if not isinstance(token, str) or not token:
        raise ValueRangeError(f"{what} must be a non-empty string, got {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
        raise ValueRangeError(
            f"{what} must be 1..{MAX_TOKEN_CHARS} printable ASCII characters without spaces or double quotes "
            f"(got {len(token)} characters); e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return token


def token_or_env(token: str | None) -> str | None:
    """The token a driver uses: ``token`` if given, else ``$EQPROP_HIL_TOKEN`` if set and non-empty, else None."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
        if token is None:
            return None
        return check_token(token, f"${TOKEN_ENV}")
    return check_token(token)


def tokens_match(given: bytes | str, expected: str) -> bool:
    """Constant-time comparison of a received token with the expected one."""
    raw = given.encode("utf-8", "replace") if isinstance(given, str) else bytes(given)
    return hmac.compare_digest(raw, expected.encode("ascii"))


def auth_query(token: str) -> str:
    """The SCPI query a driver sends first: ``SYST:AUTH? "<token>"`` (answered ``1``)."""
    return f'SYST:AUTH? "{check_token(token)}"'


def parse_auth_message(message: bytes) -> tuple[bool, bytes] | None:
    """``(is_query, token bytes)`` if ``message`` is an authentication command, else None."""
    match = _AUTH.match(message)
    if match is None:
        return None
    return match.group(1) is not None, match.group(2)


def is_auth_header(message: bytes) -> bool:
    """True for anything that starts like an authentication command (so a malformed one is refused, not run)."""
    return re.match(rb"^\s*:?SYST(?:EM)?:AUTH", message, re.IGNORECASE) is not None
