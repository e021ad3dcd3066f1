"""Every script in examples/ runs as a lab user would run it (``python examples/NAME.py`` from the repo root,
in a fresh interpreter, against the emulators over the real transports) and prints the line it promises.

The whole file is marked slow and each script has a bounded timeout: together they take about 15 s on 2 cores.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 60  # per script; the slowest (03, a short training run) takes about 7 s

# script -> lines its output must contain (regular expressions); "{out}" scripts get an output folder argument
EXPECTED: dict[str, list[str]] = {
    "01_first_contact.py": [r"identity: \{'vendor': 'EQPROP-HIL'", r"topology: sizes \[16, 32, 4\]",
                            r"layer 2 \( 4 neurons\)", r"closed: the board was left in HOLD"],
    "02_pulse_response.py": [r"devices fitted 16 \(stuck 0\)", r"step up +0\.00\d+ +step down +0\.00\d+",
                             r"plot: .*pulse_response\.png"],
    "03_train_in_situ.py": [r"final test accuracy \d+\.\d+ % after 1 of 1 epochs", r"epoch 1: train acc",
                            r"journal: (\d+) pulse commands begun, \1 acknowledged, 0 pending"],
    "04_fpga_local_learning.py": [r"accuracy after 200 samples: ", r"per training sample: 1\.0 round trips"],
    "05_watch_telemetry.py": [r"start +run 'example-run'", r"event 3 +epoch 3", r"late joiner's snapshot: run",
                              r"stop +exit status 'success', 3 events"],
    "06_custom_emulator.py": [r"stuck devices: \d+%", r"LimitError: input drive of 5 V",
                              r"OutOfRangeError \(an InstrumentError\): code \d+",
                              r"weights and scale unchanged: True; physics counters changed: none"],
}
TAKES_OUT_DIR = {"02_pulse_response.py", "03_train_in_situ.py"}


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, f"examples/{name}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def test_every_example_is_tested_and_documented() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED), "add each new example to EXPECTED (and remove deleted ones)"
    for name in scripts:
        source = (EXAMPLES / name).read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(source))
        assert doc and "learns" in doc, f"{name}: the docstring must say what a lab user learns from it"
        assert len(source.splitlines()) <= 65, f"{name} is {len(source.splitlines())} lines; keep examples short"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    proc = run_example(name, *([str(tmp_path)] if name in TAKES_OUT_DIR else []))
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for pattern in EXPECTED[name]:
        assert re.search(pattern, proc.stdout), f"{name}: no line matching {pattern!r} in\n{proc.stdout}"
    if name == "02_pulse_response.py":
        png = tmp_path / "pulse_response.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "03_train_in_situ.py":
        (run,) = tmp_path.glob("03_train_in_situ-*")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1] and 0.0 <= records[0]["test_accuracy"] <= 1.0
        assert (run / "plots" / "learning_curves.png").is_file()
    if name == "04_fpga_local_learning.py":  # it must actually learn its four patterns, not just run
        before = float(re.search(r"accuracy before training: ([\d.]+)", proc.stdout).group(1))
        after = float(re.search(r"accuracy after 200 samples: ([\d.]+)", proc.stdout).group(1))
        assert after >= 0.9 and after > before, proc.stdout

