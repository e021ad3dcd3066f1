"""Bad input where a byte or a value enters (issue 5 item 3), beyond what the driver and data tests already
cover: instrument replies to both drivers (infinities, garbage, wrong lengths), config files and data sets.
Each gets a typed error naming the problem, and nothing more reaches the instrument once it is detected.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.drivers.errors import ReplyError
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil import cli
from eqprop_hil.data import encode_idx
from eqprop_hil.mock_instruments.launch import start_emulator
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import EqpropError, ProtocolError
from eqprop_hil.protocols.framing import DELIMITER, FrameReader, encode_frame
from eqprop_hil.protocols.ieee_block import encode_block
from tests.test_analog_transcript import NOERR, R, T, init_script, scripted

# ---------------------------------------------------------------------------------------------- analog replies
# Each script ends where the driver must stop: the responder fails the test if anything else is sent.


@pytest.mark.parametrize("reply,message", [
    (encode_block(np.float32([0.5, np.inf])), "NaN or infinity"),
    (encode_block(np.float32([-np.inf, 0.5])), "NaN or infinity"),
    (encode_block(np.float32([0.5])), "expected 2"),
])
def test_analog_blocks_with_infinities_or_wrong_sizes(reply: bytes, message: str) -> None:
    script = init_script() + [(T(1, b"STAT? 2"), R(1, reply))]
    with scripted(script, retries=0, timeout_s=0.3) as board:
        with pytest.raises(ReplyError, match=message):
            board.read_state(2)


@pytest.mark.parametrize("script,message", [
    # the topology is read tagged (spec 4.3): the 8th opening message, id 3 after the bootstrap's newest (-4 here)
    (init_script()[:7] + [(init_script()[7][0], R((3 - 7) % (1 << 32), b"2,two,2"))], "not a list of integers"),
    # a garbled instance id: the driver reconnects once (draining the queue), then reports it
    (init_script()[:2] + [(b"SYST:INST?", b"garbage"), (b"SYST:ERR?", NOERR)], "16 hex digits"),
    # a garbled error-queue entry while a revision 1 board is told apart
    ([(b"SYST:PROT?", None), (b"*IDN?", b"EQPROP-HIL,ANALOG-EP-1,T0001,0.2.0"), (b"SYST:ERR?", b"garbage"),
      (b"SYST:ERR?", NOERR)], "not an error-queue entry"),
])
def test_analog_garbage_at_open(script: list, message: str) -> None:
    with pytest.raises(ReplyError, match=message):
        with scripted(script, retries=0, timeout_s=0.3):
            ...  # opening is the test: the garbage arrives during the driver's handshake


def test_analog_description_that_is_not_json() -> None:
    script = init_script() + [(T(1, b"SYST:DESC?"), R(1, b"#15{oops"))]
    with scripted(script, retries=0) as board:
        with pytest.raises(ReplyError, match="not UTF-8 JSON"):
            board.describe()


# ---------------------------------------------------------------------------------------------- FPGA replies
class ScriptedFpga:
    """A fake FPGA on loopback TCP: answers SYNC and TOPOLOGY properly, then one scripted raw body per request."""

    def __init__(self, bad_body: bytes, status: int = 0) -> None:
        self.requests: list[int] = []
        self.bad_body, self.status = bad_body, status
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.resource = f"socket://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _reply(self, frame) -> bytes:
        op = m.Opcode(frame.opcode)
        if op == m.Opcode.SYNC:
            body = m.encode_response(op, max_payload=4096, cache_depth=16)
        elif op == m.Opcode.TOPOLOGY:
            body = m.encode_response(op, sizes=np.array([2, 3]), edges=np.array([0, 1]), feedback=0, activation="tanh")
        else:
            body = self.bad_body
        return DELIMITER + encode_frame(frame.seq, frame.opcode | m.RESPONSE_BIT, m.encode_envelope(self.status, 1, body))

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        reader = FrameReader()
        with conn:
            while data := conn.recv(65536):
                for frame in reader.feed(data):
                    self.requests.append(frame.opcode)
                    conn.sendall(self._reply(frame))

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize("call,body,error,message", [
    ("read_weights", b"\x06\x00" + np.float32([0, 1, np.nan, 0, 0, 0]).tobytes(), ProtocolError, "NaN or infinity"),
    ("read_weights", b"\x06\x00" + np.float32([0, 1, np.inf, 0, 0, 0]).tobytes(), ProtocolError, "NaN or infinity"),
    ("read_weights", b"\x06\x00" + bytes(10), ProtocolError, "ends inside field"),  # truncated array
    ("read_weights", b"\x04\x00" + bytes(16), EqpropError, "returned 4 values"),  # well formed, wrong length
    ("read_state", b"\x02\x00" + bytes(4), EqpropError, "returned 2 values"),
    ("read_state", b"\x05\x00" + bytes(10) + b"junk", ProtocolError, "trailing"),
])
def test_fpga_bad_replies_are_typed_and_end_the_exchange(call: str, body: bytes, error: type, message: str) -> None:
    fake = ScriptedFpga(body)
    try:
        with FpgaArray(fake.resource, timeout_s=0.5, retries=0) as array:
            with pytest.raises(error, match=message):
                getattr(array, call)(0) if call == "read_weights" else array.read_state()
            sent = array.stats["frames_sent"]
            assert fake.requests[-1] in (m.Opcode.READ_WEIGHTS, m.Opcode.READ_STATE)
            assert len(fake.requests) == sent, "a frame was sent after the bad reply"
    finally:
        fake.close()


# ---------------------------------------------------------------------------------------------- config and data
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("body,message", [
    ("[instrument]\nresurce = 'x'\n", "resurce"),
    ("[train]\nepochs = '3'\n", "train.epochs"),
    ("[instrument.limits]\nmax_pulses_per_device = 200\n", r"max_pulses_per_device = 200: must be in 1\.\.127"),
    ("[instrument]\nbit_length = 300\n", "bit_length = 300"),
    ("[instrument.limits]\nmax_bit_length = 15\n", "exceeds instrument.limits.max_bit_length = 15"),
    ("[instrument]\ninput_volts = 2.0\n", "input_volts = 2 V .* exceeds instrument.limits.max_input_volts = 1 V"),
    ("[instrument.limits]\nmax_nudge_amperes = -1e-4\n", "max_nudge_amperes"),
    ("[instrument.limits]\nmax_input_volts = nan\n", "max_input_volts"),
    ("[instrument.limits]\npulse_budget = -5\n", "pulse_budget"),
    ("[instrument]\ntimeout_s = 0.0\n", "timeout_s"),
])
def test_bad_config_is_refused_before_the_instrument_is_touched(tmp_path: Path, body: str, message: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with start_emulator("sim://analog?sizes=64,16,10&device=ideal") as emu:
        cfg = _write(tmp_path / "bad.toml", f'[model]\nsizes = [64, 16, 10]\nbias = false\n{body}')
        args = ["train", "--config", str(cfg), "--instrument", emu.resource, "--run-dir", str(tmp_path / "run")]
        assert cli.main(args) == 1
        assert pytest.importorskip("re").search(message, capsys.readouterr().err)
        assert emu.server.counters["connections"] == 0  # nothing was sent: nobody even connected


def test_truncated_idx_dataset_is_refused_before_the_instrument_is_touched(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "idx"
    data.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        (data / f"{split}-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((n, 8, 8), np.uint8)))
        (data / f"{split}-labels-idx1-ubyte").write_bytes(encode_idx(np.arange(n, dtype=np.uint8) % 10))
    images = data / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])
    with start_emulator("sim://analog?sizes=64,16,10&device=ideal") as emu:
        cfg = _write(tmp_path / "ok.toml", "[model]\nsizes = [64, 16, 10]\nbias = false\n")
        args = ["train", "--config", str(cfg), "--instrument", emu.resource, "--dataset", f"idx:{data}",
                "--run-dir", str(tmp_path / "run")]
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert "truncated idx data" in err and str(images) in err
        assert emu.server.counters["connections"] == 0
