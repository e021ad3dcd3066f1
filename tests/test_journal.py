"""The pulse write-ahead journal: begin/done/resolve, crash tolerance, monotonic ids, durability before send."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.insitu.journal import JournalError, PulseJournal, decode_array, encode_array
from eqprop_hil.runs.rundir import RunError


def _counts(seed: int, shape: tuple[int, int] = (6, 4)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, size=shape).astype(np.int8)


def _entry(seed: int, **extra: object) -> dict:
    return {"edge": seed % 2, "feedback": False, "mode": "matrix", "step": seed, "counts": _counts(seed),
            "cursor": {"epoch": 0, "position": seed}, **extra}


def test_encode_decode_array_round_trip() -> None:
    for a in (_counts(1), np.zeros((256, 64), np.int8), np.linspace(-1, 1, 7, dtype=np.float32)):
        b = decode_array(json.loads(json.dumps(encode_array(a))))
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    zeros = encode_array(np.zeros((256, 64), np.int8))
    assert len(zeros["data"]) < 256 * 64 / 20  # mostly-zero counts compress well
    with pytest.raises(JournalError, match="cannot decode"):
        decode_array({"dtype": "|i1", "shape": [2], "enc": "zlib+base64", "data": "!!!"})


def test_begin_done_pending_resolve(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path) as j:
        ids = [j.begin(_entry(k)) for k in range(4)]
        assert ids == [1, 2, 3, 4]
        j.done(ids[0], {"pulses": 9})
        j.done(ids[2], {"pulses": np.int64(5)})
        pending = j.pending()
        assert [e["id"] for e in pending] == [2, 4]
        assert pending[0]["state"] == "pending" and pending[0]["edge"] == 1 and pending[0]["mode"] == "matrix"
        assert pending[0]["counts"].dtype == np.int8 and np.array_equal(pending[0]["counts"], _counts(1))
        assert pending[1]["cursor"] == {"epoch": 0, "position": 3}
        j.resolve(ids[1], "applied", {"max_abs_delta": 0.001})
        j.resolve(ids[3], "not_applied", {"max_abs_delta": 0.0})
        assert j.pending() == []
        assert j.acknowledged_count() == 2 and j.applied_count() == 3
        assert j.stats()["pulses_acknowledged"] == 14
        with pytest.raises(JournalError, match="no pending entry"):
            j.done(ids[0], {})
        with pytest.raises(JournalError, match="outcome must be"):
            j.resolve(ids[0], "maybe", {})  # type: ignore[arg-type]
        with pytest.raises(JournalError, match="reserved"):
            j.begin({"id": 3})
    with PulseJournal(path, readonly=True) as r:  # the same picture from the file alone
        assert r.stats() == {"begun": 4, "done": 2, "applied": 1, "not_applied": 1, "pending": 0, "next_id": 5,
                             "torn_bytes": 0, "pulses_acknowledged": 14}
        with pytest.raises(JournalError, match="read-only"):
            r.begin(_entry(0))


def test_entry_is_on_disk_when_begin_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.jsonl"
    seen_at_fsync: list[bytes] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:  # what the file holds at the moment it is forced to disk
        seen_at_fsync.append(path.read_bytes())
        real_fsync(fd)

    j = PulseJournal(path)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    jid = j.begin(_entry(7))
    monkeypatch.undo()
    # fsync happened inside begin, after the record was written: the record was durable before begin returned
    assert len(seen_at_fsync) == 1 and seen_at_fsync[0].endswith(b"\n")
    with open(path, "rb") as other:  # another handle sees it: nothing waits in a user-space buffer
        rec = json.loads(other.read().splitlines()[-1])
    assert rec["id"] == jid and rec["state"] == "pending" and rec["hash"]
    assert np.array_equal(decode_array(rec["counts"]), _counts(7))
    j.close()


def test_begin_many_journals_a_whole_step_with_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.jsonl"
    j = PulseJournal(path)
    j.begin(_entry(0))
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    ids = j.begin_many([_entry(1), _entry(2), _entry(3)])
    monkeypatch.undo()
    assert ids == [2, 3, 4] and len(calls) == 1 and j.begin_many([]) == []
    assert [e["id"] for e in PulseJournal(path, readonly=True).pending()] == [1, 2, 3, 4]
    j.close()


def test_torn_final_line_is_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path) as j:
        j.begin(_entry(1))
        j.done(1, {"pulses": 3})
        j.begin(_entry(2))
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": 3, "state": "pending", "edge": 1, "cou')  # killed mid-write
    with PulseJournal(path, readonly=True) as r:
        assert r.torn_tail.startswith(b'{"id": 3') and [e["id"] for e in r.pending()] == [2]
        assert r.next_id == 3
    assert path.read_bytes().endswith(b"cou")  # a reader changes nothing
    with PulseJournal(path) as j:  # a writer cuts the fragment and goes on cleanly
        assert j.stats()["torn_bytes"] > 0
        assert j.begin(_entry(3)) == 3
    assert "torn" in caplog.text
    with PulseJournal(path, readonly=True) as r:
        assert [e["id"] for e in r.pending()] == [2, 3] and r.torn_tail == b""


def test_whole_record_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path) as j:
        j.begin(_entry(1))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with PulseJournal(path) as j:
        assert [e["id"] for e in j.pending()] == [1]
        j.done(1, {"pulses": 1})
    with PulseJournal(path, readonly=True) as r:
        assert r.pending() == [] and r.acknowledged_count() == 1


def test_corruption_in_the_middle_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path) as j:
        j.begin(_entry(1))
        j.begin(_entry(2))
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"garbage", *lines[1:]]))
    with pytest.raises(JournalError, match=r"line 2 is not a journal record: b'garbage'") as e:
        PulseJournal(path, readonly=True)
    assert isinstance(e.value, RunError)


def test_tampered_counts_fail_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path) as j:
        j.begin(_entry(1))
    rec = json.loads(path.read_text())
    rec["counts"] = encode_array(_counts(2))
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(JournalError, match="content hash"):
        PulseJournal(path, readonly=True).pending()


def test_ids_are_monotonic_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path) as j:
        first = [j.begin(_entry(k)) for k in range(3)]
        for jid in first:
            j.done(jid, {"pulses": 1})
    with PulseJournal(path) as j:
        second = [j.begin(_entry(k)) for k in range(2)]
    assert second == [4, 5]
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines() if '"pending"' in line]
    assert ids == sorted(set(ids)) == [1, 2, 3, 4, 5]


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with PulseJournal(path):
        with pytest.raises(JournalError, match="in use by another process"):
            PulseJournal(path)
        PulseJournal(path, readonly=True).close()  # readers are welcome
    PulseJournal(path).close()  # released on close


@pytest.mark.parametrize("fsync", [True, False])
def test_sigkill_right_after_begin_leaves_a_pending_entry(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "journal.jsonl"
    child = textwrap.dedent(f"""
        import os, signal, numpy as np
        from eqprop_hil.insitu.journal import PulseJournal
        j = PulseJournal({str(path)!r}, fsync={fsync})
        j.done(j.begin({{"edge": 0, "mode": "matrix", "counts": np.full((3, 2), -2, np.int8)}}), {{"pulses": 12}})
        j.begin({{"edge": 1, "mode": "matrix", "counts": np.arange(6, dtype=np.int8).reshape(2, 3)}})
        os.kill(os.getpid(), signal.SIGKILL)  # dies before sending the command (or getting its acknowledgement)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with PulseJournal(path) as j:  # the lock died with the process: a resuming trainer can open it
        pending = j.pending()
        assert [e["id"] for e in pending] == [2] and pending[0]["edge"] == 1
        assert np.array_equal(pending[0]["counts"], np.arange(6, dtype=np.int8).reshape(2, 3))
        assert j.acknowledged_count() == 1
        assert j.begin({"edge": 0, "counts": np.zeros((3, 2), np.int8)}) == 3
