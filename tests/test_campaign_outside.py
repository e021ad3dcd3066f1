"""The outside campaign's seeded CI subset (tools/campaign.py --subset): emulators as their own processes, the
fault proxy between driver and emulator on both transports, an emulator killed and restarted on its address
behind a gateway that hides it (matrix mode), a trainer SIGKILL followed by a flipped bit in the latest checkpoint
(outer mode, which used to be unresumable: "cannot undo outer-mode command").

Every trial must end with nothing lost or doubled (the board's executed-command counter equals what the journal
says it applied), nothing pending, and the fault-free run's weights (ideal devices; a few float32 ulps where a
checkpoint was re-programmed; outer mode's device-drawn trains differ after a redo, so only its counts are
compared). The full campaign (>= 1,000 faults) is ``python tools/campaign.py --out FILE``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _campaign():
    spec = importlib.util.spec_from_file_location("campaign", ROOT / "tools" / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["campaign"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_outside_campaign_subset_loses_and_doubles_nothing(tmp_path) -> None:
    out = tmp_path / "campaign.json"
    assert _campaign().main(["--subset", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = [r for r in doc["rows"] if r["fault"] != "none"]
    assert len(rows) == 2 and {r["transport"] for r in rows} == {"analog", "fpga"}
    for r in rows:
        assert r["injected"] >= 5, r
        assert r["exit"] == 0, r
        assert r["journal_pending"] == 0, r
        assert r["lost"] == 0 and r["doubled"] == 0, r
        assert r["executed"] == r["journal_expected"], r
        assert r["mismatched"] == (None if r["mode"] == "outer" else 0), r  # outer: trains redrawn on a redo
    kinds = {k for r in rows for k in r["injected_by_kind"]}
    assert {"emulator_kill", "checkpoint_flip", "duplicate", "duplicate_reply", "flip"} <= kinds, kinds
