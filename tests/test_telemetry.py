"""Telemetry over real ZeroMQ on loopback: document order and decoding, late joiners (welcome on the joiner's own
topic, re-send, snapshot) without duplicates on the wire, CURVE and token refusal, the loopback warning,
malformed messages, and `hil monitor` end to end. Bluesky's own callbacks: tests/test_bluesky.py."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from eqprop_hil.drivers.timeouts import zmq_ms
from eqprop_hil.telemetry import (
    TelemetryError,
    TelemetryPublisher,
    TelemetryRefused,
    TelemetrySubscriber,
    TelemetryTimeout,
    decode_message,
    encode_document,
    fetch_snapshot,
    is_loopback_endpoint,
    to_jsonable,
    warn_if_exposed,
)
from eqprop_hil.protocols.errors import EqpropError, ValueRangeError

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAIT_S = 10.0  # bound on every wait for something that must happen
KEYS = {"epoch": {"dtype": "integer"}, "samples": {"dtype": "integer"},
        "running_accuracy": {"dtype": "number", "units": "fraction"}, "pulses_sent": {"dtype": "integer"}}
LIVE = b"eqprop-hil "  # the live topic a plain subscription (b"") is registered as


def _subscribed_live(xpub: zmq.Socket) -> None:
    """Drain a raw XPUB's subscription messages until the live one arrives (welcome topics come first)."""
    while True:
        assert xpub.poll(zmq_ms(60.0)), "no live subscription arrived"
        if xpub.recv() == b"\x01" + LIVE:
            return


def _take(sub: TelemetrySubscriber, n: int) -> list[tuple[str, dict]]:
    out = []
    for _ in range(n):
        item = sub.receive(timeout_s=WAIT_S)
        assert item is not None, f"only {out} arrived"
        out.append(item)
    return out


@pytest.fixture
def raw_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_documents_arrive_in_order_and_decode() -> None:
    with TelemetryPublisher(resend_start_every_s=None) as pub, TelemetrySubscriber(pub.address, dedupe=False) as sub:
        assert pub.address.startswith("tcp://127.0.0.1:") and not pub.address.endswith(":0")
        assert pub.wait_for_subscribers(1, WAIT_S)
        uid = pub.start("r1", config={"lr": np.float32(0.5), "sizes": (64, 256, 10), "bad": float("nan")},
                        instrument={"identity": {"serial": "SIM0001"}})
        pub.describe(KEYS)
        for i in range(3):
            assert pub.event({"epoch": np.int64(1), "samples": 20 * (i + 1),
                              "running_accuracy": [float("nan"), 0.5, 0.75][i], "pulses_sent": 100 * i}) == i + 1
        pub.stop("success")
        docs = _take(sub, 6)
    assert [n for n, _ in docs] == ["start", "descriptor", "event", "event", "event", "stop"]
    start, desc, stop = docs[0][1], docs[1][1], docs[5][1]
    assert start["uid"] == uid and start["run_name"] == "r1"
    assert start["config"] == {"lr": 0.5, "sizes": [64, 256, 10], "bad": None}  # numpy -> JSON, NaN -> null
    assert start["instrument"]["identity"]["serial"] == "SIM0001"
    assert desc["run_start"] == uid and desc["data_keys"]["running_accuracy"]["units"] == "fraction"
    assert desc["name"] == "primary" and all(v["source"] for v in desc["data_keys"].values())
    events = [d for n, d in docs if n == "event"]
    assert [e["seq_num"] for e in events] == [1, 2, 3]
    assert [e["data"]["running_accuracy"] for e in events] == [None, 0.5, 0.75]
    assert all(e["descriptor"] == desc["uid"] for e in events)
    assert stop["exit_status"] == "success" and stop["run_start"] == uid and stop["num_events"] == {"primary": 3}


def test_late_subscriber_is_welcomed_on_its_own_topic_and_nobody_sees_a_duplicate() -> None:
    with TelemetryPublisher(resend_start_every_s=None) as pub:
        uid = pub.start("late", config={})
        pub.event({"epoch": 0, "samples": 10})  # describes stream "primary" from the first event
        pub.event({"epoch": 0, "samples": 20})
        with TelemetrySubscriber(pub.address, dedupe=False) as sub:  # what is on the wire, duplicates included
            first = _take(sub, 3)
            assert [n for n, _ in first] == ["start", "descriptor", "event"]
            assert first[0][1]["uid"] == uid and first[2][1]["data"]["samples"] == 20
            with TelemetrySubscriber(pub.address, dedupe=False) as second:  # its welcome is for it alone
                assert [n for n, _ in _take(second, 3)] == ["start", "descriptor", "event"]
            pub.event({"epoch": 1, "samples": 30})
            pub.stop("abort", "user pressed Ctrl-C")
            rest = _take(sub, 2)
            assert [n for n, _ in rest] == ["event", "stop"]
            assert rest[0][1]["seq_num"] == 3 and rest[1][1]["reason"] == "user pressed Ctrl-C"
            assert sub.receive(timeout_s=0.2) is None  # nothing repeated
        with TelemetrySubscriber(pub.address) as after:  # joins after the stop: still learns how the run ended
            assert [n for n, _ in _take(after, 4)] == ["start", "descriptor", "event", "stop"]


def test_a_plain_subscription_gets_live_documents_only(raw_ctx: zmq.Context) -> None:
    """What Bluesky's RemoteDispatcher does (SUB to b""): one frame per document, never a replay."""
    with TelemetryPublisher(resend_start_every_s=0.05) as pub:
        pub.start("plain")
        pub.event({"epoch": 1})
        sub = raw_ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(pub.address)
        assert pub.wait_for_subscribers(1, WAIT_S)
        with TelemetrySubscriber(pub.address):  # another joiner's welcome must not reach `sub`
            time.sleep(0.3)  # several resend periods
            pub.event({"epoch": 2})
            pub.stop()
            frames = []
            while sub.poll(zmq_ms(1.0)):
                frames.append(sub.recv_multipart())
    assert all(len(f) == 1 and f[0].startswith(LIVE) for f in frames)
    assert [decode_message(f)[1] for f in frames] == ["event", "stop"]


def test_late_subscriber_gets_start_from_the_periodic_resend() -> None:
    with TelemetryPublisher(resend_start_every_s=0.05, welcome_subscribers=False) as pub:
        uid = pub.start("resent", config={"epochs": 3})
        desc_uid = pub.describe({"epoch": {"dtype": "integer"}})
        pub.event({"epoch": 1})
        with TelemetrySubscriber(pub.address) as sub:
            got: dict[str, dict] = {}
            while len(got) < 2:  # it may join between a re-sent start and its descriptor: either order is fine
                name, doc = _take(sub, 1)[0]
                assert name in ("start", "descriptor") and name not in got  # never the old event, never twice
                got[name] = doc
            assert got["start"]["uid"] == uid and got["start"]["config"] == {"epochs": 3}
            assert got["descriptor"]["uid"] == desc_uid
            pub.stop()
            assert _take(sub, 1)[0][0] == "stop"  # duplicates from the re-send were dropped on the way
        assert pub.subscriptions >= 1


def test_snapshot_reports_the_run_so_far() -> None:
    with TelemetryPublisher(resend_start_every_s=None, welcome_subscribers=False) as pub:
        assert fetch_snapshot(pub.snapshot_address, timeout_s=WAIT_S) == []
        uid = pub.start("snap", config={"a": 1})
        pub.event({"epoch": 1, "test_accuracy": 0.25}, "eval")
        pub.event({"epoch": 2, "test_accuracy": 0.5}, "eval")
        pub.event({"samples": 7})
        snap = fetch_snapshot(pub.snapshot_address, timeout_s=WAIT_S)
        assert [n for n, _ in snap] == ["start", "descriptor", "descriptor", "event", "event"]
        assert snap[0][1]["uid"] == uid and snap[0][1]["config"] == {"a": 1}
        assert [d["name"] for n, d in snap if n == "descriptor"] == ["eval", "primary"]
        assert snap[3][1]["seq_num"] == 2 and snap[3][1]["data"]["test_accuracy"] == 0.5  # the last per stream
        assert snap[4][1]["data"] == {"samples": 7}
        pub.stop("fail", "link lost")
        with TelemetrySubscriber(pub.address, snapshot_address=pub.snapshot_address) as sub:
            assert sub.snapshot()[-1][1]["reason"] == "link lost"


def _handshake_outcome(ctx: zmq.Context, address: str, server_key: bytes | None) -> tuple[int, zmq.Socket]:
    """Connect a raw SUB (optionally with a CURVE server key) and wait for its handshake to end either way."""
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    if server_key is not None:
        sock.curve_serverkey = server_key
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.subscribe(b"")
    monitor = sock.get_monitor_socket()
    sock.connect(address)
    ends = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH}
    while monitor.poll(zmq_ms(WAIT_S)):
        event = recv_monitor_message(monitor)["event"]
        if event in ends:
            sock.disable_monitor()
            monitor.close()
            return event, sock
    raise AssertionError(f"no handshake outcome within {WAIT_S} s")


def test_curve_subscriber_without_the_server_key_receives_nothing(raw_ctx: zmq.Context) -> None:
    server_public, server_secret = zmq.curve_keypair()
    with TelemetryPublisher(curve_secret_key=server_secret, resend_start_every_s=None) as pub:
        assert pub.public_key == server_public
        pub.start("secure", config={"secret": "weights"})
        pub.event({"epoch": 1})
        plain_event, plain = _handshake_outcome(raw_ctx, pub.address, None)
        wrong_event, wrong = _handshake_outcome(raw_ctx, pub.address, zmq.curve_keypair()[0])
        assert plain_event != zmq.EVENT_HANDSHAKE_SUCCEEDED and wrong_event != zmq.EVENT_HANDSHAKE_SUCCEEDED
        with TelemetrySubscriber(pub.address, server_public_key=server_public) as good, \
                TelemetrySubscriber(pub.address, timeout_s=0.5) as keyless:
            assert [n for n, _ in _take(good, 3)] == ["start", "descriptor", "event"]  # welcomed
            pub.stop()
            assert _take(good, 1)[0][0] == "stop"
            assert keyless.receive() is None
            with pytest.raises(TelemetryTimeout, match="CURVE"):
                next(keyless.documents())
        assert plain.poll(zmq_ms(0.1)) == 0 and wrong.poll(zmq_ms(0.1)) == 0  # the welcome never reached them either
        assert pub.subscriptions == 1  # only the keyed subscriber got through
        with pytest.raises(TelemetryTimeout):
            fetch_snapshot(pub.snapshot_address, timeout_s=0.5)
        assert fetch_snapshot(pub.snapshot_address, server_public_key=server_public.decode(),
                              timeout_s=WAIT_S)[-1][1]["exit_status"] == "success"


def test_snapshot_token_refused_then_accepted(raw_ctx: zmq.Context) -> None:
    with TelemetryPublisher(token="s3cret", resend_start_every_s=None) as pub:
        pub.start("tok", config={})
        for token in (None, "wrong", ""):
            with pytest.raises(TelemetryRefused, match="token"):
                fetch_snapshot(pub.snapshot_address, token=token, timeout_s=WAIT_S)
        dealer = raw_ctx.socket(zmq.DEALER)  # a malformed request gets an error reply, not silence
        dealer.linger = 0
        dealer.connect(pub.snapshot_address)
        dealer.send_multipart([b"", b"\x80not json"])
        assert dealer.poll(zmq_ms(WAIT_S))
        empty, body = dealer.recv_multipart()
        reply = json.loads(body)
        assert empty == b"" and reply["ok"] is False and "malformed request" in reply["error"]
        assert fetch_snapshot(pub.snapshot_address, token="s3cret", timeout_s=WAIT_S)[0][1]["run_name"] == "tok"


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:0", True), ("tcp://127.0.0.2:5556", True), ("tcp://localhost:0", True),
    ("tcp://[::1]:0", True), ("ipc:///tmp/x", True), ("inproc://x", True), ("tcp://*:0", False),
    ("tcp://0.0.0.0:0", False), ("tcp://192.168.1.5:0", False), ("tcp://eth0:0", False),
    ("tcp://[::]:0", False), ("epgm://eth0;239.1.1.1:5555", False),
])
def test_loopback_classification(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


def test_non_loopback_bind_warns_once_naming_what_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="eqprop_hil.telemetry"):
        assert warn_if_exposed(["tcp://0.0.0.0:0", "tcp://0.0.0.0:1"], curve=False, token=True) is True
        assert warn_if_exposed(["tcp://127.0.0.1:0"], curve=False, token=False) is False
    (record,) = caplog.records  # one line for both sockets
    assert "NOT loopback" in record.getMessage() and "curve_secret_key_file" in record.getMessage()
    assert "token" not in record.getMessage().split("add", 1)[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eqprop_hil.telemetry"):
        with TelemetryPublisher("tcp://0.0.0.0:0", resend_start_every_s=None) as pub:
            assert pub.address.startswith("tcp://0.0.0.0:")
    assert sum("NOT loopback" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueRangeError):
        is_loopback_endpoint("127.0.0.1:5556")


def test_other_loopback_address_binds_without_warning(caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("127.0.0.2 is not usable on this host")
    with caplog.at_level(logging.WARNING, logger="eqprop_hil.telemetry"):
        with TelemetryPublisher("tcp://127.0.0.2:0", resend_start_every_s=None) as pub:
            assert pub.address.startswith("tcp://127.0.0.2:") and pub.snapshot_address.startswith("tcp://127.0.0.2:")
            with TelemetrySubscriber(pub.address) as sub:
                pub.start("lo2")
                assert _take(sub, 1)[0][1]["run_name"] == "lo2"
    assert not caplog.records and "warning" not in capsys.readouterr().err


MALFORMED = [
    ([b"eqprop-hil event \xff\xfe{"], r"\\xff\\xfe\{"),  # not UTF-8
    ([b"eqprop-hil start"], "separated by spaces"),
    ([b"eqprop-hil", b"start", b"{}"], "3 frames"),
    ([b'eqprop-hil bogus {"uid":"u","time":1}'], "unknown document kind 'bogus'"),
    ([b"eqprop-hil start [1, 2]"], "not a JSON object"),
    ([b'eqprop-hil start {"uid":"u","time":NaN}'], "NaN"),
    ([b'eqprop-hil event {"uid":"u","time":1,"descriptor":"d","data":{},"timestamps":{}}'], "seq_num"),
    ([b'eqprop-hil stop {"uid":"u","time":1,"run_start":"r","reason":"","num_events":{},"exit_status":"ok"}'],
     "exit_status|'ok'"),
    ([b'eqprop-hil descriptor {"uid":"u","time":1,"run_start":"r","data_keys":{"x":{"dtype":"number","shape":[]}}}'],
     "source"),  # event-model's schema: a data key needs its source
    ([b"eqprop-hil event " + b"x" * 500], r"\.\.\.\(517 bytes\)"),
]


@pytest.mark.parametrize("frames, match", MALFORMED)
def test_malformed_messages_raise_typed_errors_quoting_the_bytes(frames: list[bytes], match: str) -> None:
    with pytest.raises(TelemetryError, match=match) as info:
        decode_message(frames)
    assert isinstance(info.value, EqpropError) and "malformed telemetry message" in str(info.value)


def test_subscriber_survives_a_malformed_message_on_the_wire(raw_ctx: zmq.Context) -> None:
    xpub = raw_ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind("tcp://127.0.0.1:0")
    with TelemetrySubscriber(xpub.getsockopt_string(zmq.LAST_ENDPOINT)) as sub:
        _subscribed_live(xpub)
        xpub.send(LIVE + b"start \x00\x01garbage")
        xpub.send(LIVE + b"start " + encode_document({"uid": "u1", "time": 1.0, "run_name": "ok"}))
        with pytest.raises(TelemetryError, match=r"garbage"):
            sub.receive(timeout_s=WAIT_S)
        assert sub.receive(timeout_s=WAIT_S) == ("start", {"uid": "u1", "time": 1.0, "run_name": "ok"})


class Mode(enum.Enum):
    MATRIX = "matrix"


@dataclasses.dataclass
class Cfg:
    sizes: tuple[int, ...]
    mode: Mode
    out: pathlib.Path


def test_json_encoding_of_numpy_dataclasses_and_non_finite_values() -> None:
    value = {"w": np.array([[1.0, np.inf], [np.nan, -2.5]], dtype=np.float32), "n": np.int16(3), "b": np.bool_(True),
             "cfg": Cfg((4, 6), Mode.MATRIX, pathlib.Path("runs/x")), 5: {"s": {2, 1}}, "f": -math.inf}
    assert to_jsonable(value) == {"w": [[1.0, None], [None, -2.5]], "n": 3, "b": True,
                                  "cfg": {"sizes": [4, 6], "mode": "matrix", "out": "runs/x"}, "5": {"s": [1, 2]},
                                  "f": None}
    assert b"NaN" not in encode_document({"x": float("nan")})
    with pytest.raises(TelemetryError, match=r"\$\.bad"):
        to_jsonable({"bad": object()})
    with pytest.raises(TelemetryError, match="complex"):
        to_jsonable(np.array([1j]))


def test_publisher_misuse_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueRangeError):
        TelemetryPublisher(resend_start_every_s=0)
    with pytest.raises(ValueRangeError):
        TelemetryPublisher(curve_secret_key="short")
    pub = TelemetryPublisher(resend_start_every_s=None)
    with TelemetrySubscriber(pub.address) as sub:
        assert pub.wait_for_subscribers(1, WAIT_S)
        with pytest.raises(TelemetryError, match="before start"):
            pub.describe(KEYS)
        with pytest.raises(TelemetryError, match="without an open run"):
            pub.stop()
        pub.start("m")
        with pytest.raises(TelemetryError, match="still open"):
            pub.start("again")
        pub.describe({"x": {"dtype": "number"}})
        with pytest.raises(TelemetryError, match=r"\['y'\]"):
            pub.event({"x": 1.0, "y": 2.0})
        with pytest.raises(TelemetryError, match="no JSON form"):
            pub.event({"x": object()})
        with pytest.raises(ValueRangeError):
            pub.stop("crashed")
        pub.close()
        with pytest.raises(TelemetryError, match="closed"):
            pub.event({"x": 1.0})
        assert [n for n, _ in _take(sub, 2)] == ["start", "descriptor"]
        assert sub.receive(timeout_s=0.2) is None  # none of the refused calls leaked a document


def test_context_manager_stops_an_open_run_as_failed() -> None:
    pub = TelemetryPublisher(resend_start_every_s=None)
    sub = TelemetrySubscriber(pub.address)
    try:
        assert pub.wait_for_subscribers(1, WAIT_S)
        with pytest.raises(RuntimeError), pub:
            pub.start("crash")
            raise RuntimeError("instrument on fire")
        name, stop = _take(sub, 2)[1]
        assert name == "stop" and stop["exit_status"] == "fail" and "instrument on fire" in stop["reason"]
    finally:
        sub.close()


def _monitor(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("HIL_TELEMETRY_TOKEN", "EQPROP_HIL_TELEMETRY_TOKEN"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "eqprop_hil", "monitor", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _publish_run(pub: TelemetryPublisher, status: str = "success", reason: str = "") -> None:
    pub.start("digits-test", config={"epochs": 2}, instrument={"identity": {"serial": "SIM0001"}})
    pub.event({"epoch": 1, "samples": 1000, "running_accuracy": 0.625, "samples_per_second": 512.25,
               "pulses_sent": 123456})
    pub.event({"epoch": 1, "samples": 1437, "test_accuracy": 0.875}, "eval")
    pub.stop(status, reason)


def test_hil_monitor_end_to_end(raw_ctx: zmq.Context) -> None:
    with TelemetryPublisher(resend_start_every_s=None) as pub:
        proc = _monitor(pub.address, "--timeout", "30")
        try:
            assert pub.wait_for_subscribers(1, 60), proc.stderr.read() if proc.poll() is not None else "no subscriber"
            _publish_run(pub)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert "run digits-test" in out and "test 87.5 %" in out and "accuracy 62.5 %" in out
    assert "512.2 samples/s" in out or "512.3 samples/s" in out
    assert "pulses 123,456" in out and "samples 1,437" in out
    assert "exit status success" in out


def test_hil_monitor_reports_abort_and_skips_malformed_messages(raw_ctx: zmq.Context) -> None:
    xpub = raw_ctx.socket(zmq.XPUB)  # a hand-driven publisher, so a malformed message can be slipped in
    xpub.linger = zmq_ms(1.0)
    xpub.bind("tcp://127.0.0.1:0")
    proc = _monitor(xpub.getsockopt_string(zmq.LAST_ENDPOINT), "--timeout", "30")
    try:
        _subscribed_live(xpub)
        xpub.send(LIVE + b"event \xde\xad")
        stop = {"uid": "s", "time": 2.0, "run_start": "r", "exit_status": "abort", "reason": "Ctrl-C",
                "num_events": {"primary": 0}}
        xpub.send(LIVE + b"start " + encode_document({"uid": "r", "time": 1.0, "run_name": "hand"}))
        xpub.send(LIVE + b"stop " + encode_document(stop))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "skipped a malformed message" in out and r"\xde\xad" in out
    assert "run hand finished: exit status abort (Ctrl-C)" in out


def test_hil_monitor_once_prints_the_snapshot() -> None:
    with TelemetryPublisher(resend_start_every_s=None, token="t0k") as pub:
        _publish_run(pub, "fail", "link lost")
        runs = {}
        for label, name in (("new", "EQPROP_HIL_TELEMETRY_TOKEN"), ("old", "HIL_TELEMETRY_TOKEN"),
                            ("wrong", "EQPROP_HIL_TELEMETRY_TOKEN")):
            env = {k: v for k, v in os.environ.items() if "TELEMETRY_TOKEN" not in k}
            env[name] = "nope" if label == "wrong" else "t0k"
            runs[label] = subprocess.run([sys.executable, "-m", "eqprop_hil", "monitor", pub.address, "--snapshot",
                                          pub.snapshot_address, "--once", "--timeout", "30"], cwd=ROOT, env=env,
                                         text=True, capture_output=True, timeout=60)
    done, old, refused = runs["new"], runs["old"], runs["wrong"]
    assert done.returncode == 0, done.stderr
    assert old.returncode == 0 and old.stdout == done.stdout, old.stderr
    assert "HIL_TELEMETRY_TOKEN is deprecated; set EQPROP_HIL_TELEMETRY_TOKEN" in old.stderr
    assert "deprecated" not in done.stderr
    assert "run digits-test" in done.stdout and "SIM0001" in done.stdout and "test 87.5 %" in done.stdout
    assert "exit status fail (link lost)" in done.stdout
    assert refused.returncode == 1 and "refused" in refused.stderr


def test_monitor_does_not_import_torch() -> None:
    code = ("import sys, eqprop_hil.cli; eqprop_hil.cli.build_parser(['monitor', 'tcp://127.0.0.1:1']); "
            "import eqprop_hil.cli.monitor; assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr



def test_curve_from_zmq_auth_certificate_files_as_bluesky_uses_them(tmp_path: pathlib.Path) -> None:
    """[telemetry] curve_secret_key_file / --telemetry-curve-key take zmq.auth certificates (Bluesky's curve_config
    files); a subscriber passes the public .key file."""
    import zmq.auth

    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    with pytest.raises(ValueRangeError, match="no secret key"):
        TelemetryPublisher(curve_secret_key=pathlib.Path(public_file))
    with pytest.raises(ValueRangeError, match="does not exist"):
        TelemetryPublisher(curve_secret_key=tmp_path / "missing.key_secret")
    with TelemetryPublisher(curve_secret_key=pathlib.Path(secret_file), resend_start_every_s=None) as pub:
        assert pub.public_key == zmq.auth.load_certificate(public_file)[0]
        with TelemetrySubscriber(pub.address, server_public_key=public_file) as sub:
            assert pub.wait_for_subscribers(1, WAIT_S)
            pub.start("curve-files")
            pub.stop()
            assert [n for n, _ in _take(sub, 2)] == ["start", "stop"]
