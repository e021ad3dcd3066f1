"""Emulators for other projects' CI: the pytest fixture factories and markers, run in an outside test project
(a subprocess pytest session with only the installed plugin), and the light install: importing the emulators,
the drivers and the plugin never imports torch, matplotlib or scikit-learn."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "matplotlib", "sklearn", "tqdm", "event_model")

OUTSIDE_TESTS = '''
import sys

import numpy as np
import pytest
import pyvisa

from eqprop_hil.drivers import open_array


def test_factory_topology_device_noise(make_analog_board):
    board = make_analog_board(sizes=(5, 7, 2), device="soft_bounds", noise=0.01, seed=3)
    rm = pyvisa.ResourceManager("@py")  # a plain pyvisa client, as another project's test would use
    inst = rm.open_resource(board.resource, read_termination="\\n", write_termination="\\n", timeout=5000)
    try:
        assert inst.query("*IDN?").startswith("EQPROP-HIL,")
    finally:
        inst.close()
        rm.close()
    with open_array(board.resource) as array:
        assert array.topology()["sizes"] == [5, 7, 2]
        assert array.describe()["device"]["model"] == "soft_bounds"
        array.set_input(np.full(5, 0.5))
        array.set_phase("FREE")
        array.settle(5)
        first, second = array.read_state()[1], array.read_state()[1]
        assert not np.array_equal(first, second)  # 10 mV of read noise on every read


def test_faults_reach_the_wire(make_analog_board):
    board = make_analog_board(faults={"delay": 1.0, "delay_s": 0.01})
    with open_array(board.resource) as array:
        array.read_state()
    assert board.faults.delay_rate == 1.0


def test_fpga_factory_over_tcp(make_fpga_array):
    fpga = make_fpga_array(sizes=(3, 4, 2), transport="tcp")
    assert fpga.resource.startswith("socket://")
    with open_array(fpga.resource) as array:
        assert array.topology()["sizes"] == [3, 4, 2]


@pytest.mark.analog_board(sizes=(6, 2), seed=1)
def test_marker_sets_the_board(analog_resource):
    with open_array(analog_resource) as array:
        assert array.topology()["sizes"] == [6, 2]


@pytest.mark.fpga_array(sizes=(2, 3, 2))
def test_marker_sets_the_fpga(fpga_resource):
    with open_array(fpga_resource) as array:
        assert array.topology()["sizes"] == [2, 3, 2]


def test_a_misspelt_setting_is_refused(make_analog_board):
    with pytest.raises(Exception, match="adc_bitz"):
        make_analog_board(adc_bitz=8)


def test_nothing_heavy_was_imported():
    heavy = [m for m in %r if m in sys.modules]
    assert not heavy, heavy
'''


def test_outside_project_uses_the_fixture_factories_and_markers(tmp_path: Path) -> None:
    (tmp_path / "test_outside.py").write_text(OUTSIDE_TESTS % (HEAVY,), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers",
                           "test_outside.py"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "7 passed" in done.stdout


def test_emulators_drivers_and_plugin_import_nothing_heavy() -> None:
    code = textwrap.dedent(f"""
        import sys
        import eqprop_hil.mock_instruments.pytest_plugin
        from eqprop_hil.mock_instruments.launch import start_emulator
        from eqprop_hil.drivers import open_array
        import eqprop_hil.protocols
        with start_emulator("sim://analog?sizes=4,6,3&device=ideal") as emulator:
            with open_array(emulator.resource) as array:
                array.read_state()
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        print("light")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "light", done.stderr


def test_the_base_install_is_light_and_the_quick_start_installs_everything() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert base == {"numpy", "pyvisa", "pyvisa-py", "pyserial", "pyzmq", "cobs", "numba"}  # numba: kernels.py
    extras = project["optional-dependencies"]
    assert any(d.startswith("pytest") for d in extras["emulators"])
    assert {"torch", "matplotlib", "scikit-learn", "tqdm", "event-model"} <= {
        d.split(">")[0].strip() for d in extras["train"]}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start"):readme.index("## What you can do")]
    assert "pip install -c constraints.txt -e '.[train]' && hil train" in quick
    assert "eqprop-hil[emulators]" in readme
