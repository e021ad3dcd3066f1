"""One import name: the four folders install as ``eqprop_hil`` and its sub-packages, nothing generic at top level.

The outside check installs the project the normal way (a built wheel, not editable) next to an outside project's
own ``protocols`` package and imports the emulator fixture, the drivers and the CLI from a clean interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = re.compile(r"^\s*(from|import)\s+(hil|drivers|protocols|mock_instruments)\b", re.M)


def test_no_source_file_imports_a_generic_top_level_name() -> None:
    offenders = []
    for folder in ("hil", "drivers", "protocols", "mock_instruments", "tests", "benchmarks", "examples", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in OLD_NAMES.finditer(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert offenders == []


@pytest.mark.slow
def test_wheel_installs_under_one_name_beside_an_outside_protocols_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = wheels.glob("eqprop_hil-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist() if not name.split("/")[0].endswith(".dist-info")}
        zf.extractall(tmp_path / "site")  # a wheel unpacked is a plain (non-editable) install
    assert tops == {"eqprop_hil"}
    outside = tmp_path / "outside" / "protocols"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("WHO = 'the outside project'\n")
    code = ("import protocols; assert protocols.WHO == 'the outside project'\n"
            "import eqprop_hil.mock_instruments.pytest_plugin, eqprop_hil.drivers.analog_board, eqprop_hil.cli\n"
            "from eqprop_hil.protocols.errors import EqpropError\n"
            "from eqprop_hil.config import preset_names\n"
            "assert 'digits-hw' in preset_names(), preset_names()\n"
            "print('ok', eqprop_hil.drivers.analog_board.__file__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "outside"), str(tmp_path / "site")])}
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {env['PYTHONPATH'].split(os.pathsep)!r}\n" + code],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "site") in done.stdout
