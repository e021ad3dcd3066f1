"""Shared machinery of the conformance suites: checks counted per spec section, printed at the end of the run.

Each suite walks its protocol document (``protocols/*.md``) section by section; ``Checks`` counts every check it
makes under the section it belongs to, so the summary says how much of each section a run proved. With
``EQPROP_HIL_CONFORMANCE_REPORT=FILE`` the counts are also written as JSON.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

COUNTS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # suite -> section -> checks passed


class Checks:
    """``check("1.3", condition, "what failed")``: an assertion counted under its spec section."""

    def __init__(self, suite: str) -> None:
        self.suite = suite

    def __call__(self, section: str, condition: object, message: str = "") -> None:
        assert condition, f"[{self.suite} section {section}] {message}"
        COUNTS[self.suite][section] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 - pytest hook
    if not COUNTS:
        return
    terminalreporter.section("conformance checks per spec section")
    for suite, sections in sorted(COUNTS.items()):
        total = sum(sections.values())
        parts = ", ".join(f"{s}: {n}" for s, n in sorted(sections.items(), key=lambda kv: [int(x) for x in kv[0].split(".")]))
        terminalreporter.write_line(f"{suite}: {total} checks ({parts})")
    path = os.environ.get("EQPROP_HIL_CONFORMANCE_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({s: dict(v) for s, v in COUNTS.items()}, f, indent=1, sort_keys=True)


@pytest.fixture(scope="session")
def conformance_counts() -> dict[str, dict[str, int]]:
    return COUNTS
