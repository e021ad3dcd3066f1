"""The command line as a user meets it, in subprocesses where exit codes, signals and terminals matter:
--version, -v/-q after the subcommand, argparse-style range errors, the default preset under --config, a failed
start that keeps no run directory and says why in one line, Ctrl-C / SIGTERM in the first epoch (exit 130 / 143,
a summary that agrees with `hil report`), --resume with --epochs and of a finished run, progress bars only on a
terminal, output paths, and a README that names only presets that exist."""

from __future__ import annotations

import fcntl
import http.server
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import tomllib
from pathlib import Path

import pytest

from eqprop_hil import __version__
from eqprop_hil.cli import main
from eqprop_hil.config import DEFAULT_PRESET, preset_names

ROOT = Path(__file__).resolve().parents[1]
HIL = [sys.executable, "-m", "eqprop_hil"]
TINY = '[model]\nsizes = [64, 16, 10]\n[rule]\nt1 = 10\nt2 = 4\n[train]\nbatch_size = 10\n'
SIM = "sim://analog?sizes=64,16,10&activation=sigmoid4&device=soft_bounds&seed=0"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "EQPROP_HIL_", "HIL_TELEMETRY"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def hil(*args: str, cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HIL, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    return path


def test_version_and_verbosity_after_the_subcommand(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("hil")  # the console script of this environment
    for cmd in ([str(script), "--version"], [*HIL, "--version"]):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=_env())
        assert done.returncode == 0 and __version__ in done.stdout, done.stderr
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text('name = "x"\n', encoding="utf-8")
    loud, quiet = hil("report", str(run), "-vv", cwd=tmp_path), hil("report", str(run), "-q", cwd=tmp_path)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert " DEBUG report of " in loud.stderr and "DEBUG" not in quiet.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "-1", "argument --epochs: must be >= 1, got -1"),
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--data-limit", "-5", "argument --data-limit: must be >= 0 (0 = the whole data set), got -5"),
])
def test_out_of_range_options_are_usage_errors_naming_the_flag(flag: str, value: str, message: str,
                                                                tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "TrainConfig(" not in err
    assert not (tmp_path / "runs").exists()


def test_a_config_file_value_out_of_range_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[train]\nepochs = -1\n", encoding="utf-8")
    done = hil("train", "--config", "bad.toml", cwd=tmp_path)
    assert done.returncode == 1 and "train.epochs = -1: must be >= 1" in done.stderr
    assert "TrainConfig(" not in done.stderr and not (tmp_path / "runs").exists()


def test_config_without_preset_is_merged_over_the_default_preset(tmp_path: Path, tiny: Path) -> None:
    done = hil("train", "--config", str(tiny), "--instrument", "software", "--epochs", "1", "--data-limit", "20",
               "--run-dir", "runs/c", "--telemetry", "tcp://0.0.0.0:0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # stderr is a pipe here: no progress bar
    assert done.stderr.count("NOT loopback") == 1  # one warning for both telemetry sockets
    saved = tomllib.loads((tmp_path / "runs/c/config.toml").read_text(encoding="utf-8"))
    preset = tomllib.loads((ROOT / "hil/presets" / f"{DEFAULT_PRESET}.toml").read_text(encoding="utf-8"))
    assert saved["name"] == DEFAULT_PRESET and saved["rule"]["lr"] == preset["rule"]["lr"]
    assert saved["model"]["sizes"] == [64, 16, 10] and saved["model"]["bias"] is False


class _Http(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


def test_failed_starts_keep_no_run_directory_and_say_why_once(tmp_path: Path, tiny: Path) -> None:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        cases = {
            "refused": (["--instrument", "TCPIP0::127.0.0.1::1::SOCKET"], "never connected"),
            "http": (["--instrument", f"TCPIP0::127.0.0.1::{web.server_address[1]}::SOCKET"],
                     "is not an eqprop-hil instrument"),
            "data": (["--dataset", "idx:" + str(tmp_path / "nowhere")], "nowhere"),
        }
        for name, (args, message) in cases.items():
            done = hil("train", "--config", str(tiny), *args, "--run-dir", f"runs/{name}", cwd=tmp_path)
            assert done.returncode == 1, (name, done.stderr)
            errors = [line for line in done.stderr.splitlines() if line.startswith("hil train: error:")]
            assert len(errors) == 1 and message in errors[0], (name, done.stderr)
            assert "WARNING" not in done.stderr and "reconnect" not in done.stderr, (name, done.stderr)
            assert "was not kept" in done.stderr and not (tmp_path / "runs" / name).exists(), name
    finally:
        web.shutdown()


def _start_and_signal(tmp_path: Path, args: list[str], sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Start `hil train`, wait until its loop runs (the run's descriptors are written), send ``sig``."""
    run = tmp_path / "runs" / "sig"
    proc = subprocess.Popen([*HIL, "train", *args, "--run-dir", "runs/sig"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        docs = run / "documents.jsonl"
        # two descriptor documents (primary, eval); events name their descriptor too, so count document names
        while not (docs.exists() and docs.read_text(encoding="utf-8").count('["descriptor",') >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        time.sleep(0.5)  # some samples into the first epoch
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run


def _report(tmp_path: Path, run: Path) -> dict[str, str]:
    done = hil("report", str(run), "--no-plots", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return {line[:27].strip(): line[27:].strip() for line in done.stdout.splitlines()}


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_then_resume_with_more_epochs_then_complete(tmp_path: Path, tiny: Path) -> None:
    done, run = _start_and_signal(tmp_path, ["--config", str(tiny), "--instrument", SIM, "--data-limit", "500",
                                             "--epochs", "3"], signal.SIGINT)
    assert done.returncode == 130, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert "nan" not in line and re.search(r"interrupted in epoch 1 of 3 after \d+ samples", line), line
    report = _report(tmp_path, run)
    assert report["status"].startswith("interrupted") and report["epochs"] == "0 of 3"
    rate = re.search(r"([\d.]+) samples/s", line).group(1)
    pulses = re.search(r"pulses sent (\d+)", line).group(1)
    assert report["samples/s"] == rate and report["pulses sent"] == pulses  # one set of figures

    resumed = hil("train", "--resume", str(run), "--epochs", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "after 1 of 1 epochs" in resumed.stdout
    assert tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))["train"]["epochs"] == 1
    report = _report(tmp_path, run)
    assert report["epochs"] == "1 of 1" and report["status"] == "finished"
    assert report["pulses sent"] == re.search(r"pulses sent (\d+)", resumed.stdout).group(1)

    # complete: said at once, without connecting (this instrument address refuses every connection)
    again = hil("train", "--resume", str(run), "--instrument", "TCPIP0::127.0.0.1::1::SOCKET", cwd=tmp_path)
    assert again.returncode == 0 and "already complete (1 of 1 epochs)" in again.stdout, again.stderr
    assert tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))["instrument"]["resource"] == SIM


@pytest.mark.slow
def test_sigterm_in_training_exits_143_after_a_checkpoint(tmp_path: Path, tiny: Path) -> None:
    # many epochs: the software engine finishes the preset's 5 in a few seconds, before the signal could land
    done, run = _start_and_signal(tmp_path, ["--config", str(tiny), "--instrument", "software", "--data-limit",
                                             "1500", "--batch-size", "1", "--epochs", "200"], signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert "SIGTERM" in done.stderr and "--resume" in done.stderr
    assert list((run / "checkpoint").glob("ckpt-*.pt"))


def test_sigterm_outside_training_exits_143(tmp_path: Path) -> None:
    proc = subprocess.Popen([*HIL, "monitor", "tcp://127.0.0.1:1"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # imported and waiting
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err


def _stderr_on_a_terminal(args: list[str], cwd: Path, **env: str) -> bytes:
    """Run with stderr on a pty (a terminal, as tqdm sees it); returns what was written there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([*HIL, *args], cwd=cwd, env=_env(**env), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 240)
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=240)
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks)


@pytest.mark.slow
def test_progress_bars_on_a_terminal_unless_tqdm_disable(tmp_path: Path, tiny: Path) -> None:
    args = ["train", "--config", str(tiny), "--instrument", "software", "--epochs", "1", "--data-limit", "60"]
    tty = _stderr_on_a_terminal([*args, "--run-dir", "runs/a"], tmp_path)
    assert b"\r" in tty and b"sample" in tty
    disabled = _stderr_on_a_terminal([*args, "--run-dir", "runs/b"], tmp_path, TQDM_DISABLE="1")
    assert b"\r" not in disabled.replace(b"\r\n", b"\n")


def test_telemetry_security_options_reach_the_config(tmp_path: Path) -> None:
    from eqprop_hil.cli import build_parser
    from eqprop_hil.cli.train import overrides

    argv = ["train", "--telemetry", "tcp://0.0.0.0:5556", "--telemetry-curve-key", "server.key_secret",
            "--telemetry-token-file", "token.txt", "--telemetry-wait", "1", "-v"]
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    assert overrides(args)["telemetry"] == {"address": "tcp://0.0.0.0:5556", "curve_secret_key_file": "server.key_secret",
                                            "token_file": "token.txt", "wait_for_subscribers": 1}
    assert args.verbose == 1


def test_output_paths_follow_one_convention(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text('[model]\nsizes = [12, 8, 4]\n[rule]\nt1 = 30\nt2 = 4\n[train]\nbatch_size = 2\n',
                                        encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["gdu", "--config", "tiny.toml", "--plot", "missing/gdu.png"])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert main(["gdu", "--config", "tiny.toml"]) == 0
    (out_dir,) = (tmp_path / "runs").iterdir()
    assert out_dir.name.endswith("-gdu") and {p.name for p in out_dir.iterdir()} == {"gdu.png", "gdu.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tiny.toml"]  # nothing in the working directory
    assert main(["train", "--run-dir", "missing/run", "--instrument", "software"]) == 1
    assert "the directory missing does not exist" in capsys.readouterr().err and not (tmp_path / "missing").exists()


def test_readme_names_only_presets_that_exist_and_honest_durations() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:digits|ep|cep|cvf|fre|gdu)-[\w-]*)`", readme))
    assert named and named <= set(preset_names()), named - set(preset_names())
    assert "about a minute" not in readme
