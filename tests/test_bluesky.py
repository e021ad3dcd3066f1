"""The documents of a real (tiny, software-engine) training run, checked with Bluesky's own tools: event-model's
JSON schemas, RunRouter, event pages, a headless BestEffortCallback, LiveTable, a RemoteDispatcher subscribed
over loopback during the run, and a replay of the run directory's documents.jsonl."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import event_model  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from bluesky.callbacks import LiveTable  # noqa: E402
from bluesky.callbacks.best_effort import BestEffortCallback  # noqa: E402
from bluesky.callbacks.zmq import RemoteDispatcher  # noqa: E402

from eqprop_hil.config import resolve  # noqa: E402
from eqprop_hil.runs.rundir import RunDir  # noqa: E402
from eqprop_hil.session import DOCUMENTS_FILE, run_training  # noqa: E402
from eqprop_hil.telemetry import read_documents  # noqa: E402

WAIT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dispatched:
    """A RemoteDispatcher on its own thread, as a Bluesky user runs it; stops itself at the stop document."""

    def __init__(self, address: str) -> None:
        self.docs: list[tuple[str, dict]] = []
        self.error: BaseException | None = None
        self.dispatcher = RemoteDispatcher(address, deserializer=json.loads)
        self.dispatcher.subscribe(self._collect)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _collect(self, name: str, doc: dict) -> None:
        self.docs.append((name, doc))
        if name == "stop":  # end dispatcher.start() the asyncio way: cancel its polling task
            for task in asyncio.all_tasks(self.dispatcher.loop):
                task.cancel()

    def _run(self) -> None:
        try:
            self.dispatcher.start()
        except asyncio.CancelledError:
            pass  # the normal end: _collect cancelled the polling task at the stop document
        except BaseException as e:  # surfaced by the test
            self.error = e


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, dict]]]:
    """Train 2 epochs of a 64-16-10 C-EP network on 60 digits, published on loopback while a RemoteDispatcher
    listens; returns the run directory and what the dispatcher received."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    cfg = resolve("digits-cep", overrides={
        "model": {"sizes": [64, 16, 10]},
        "rule": {"t1": 10, "t2": 4},
        "train": {"data_limit": 60, "epochs": 2, "batch_size": 10},
        "telemetry": {"address": address, "every_samples": 20, "wait_for_subscribers": 1, "wait_timeout_s": WAIT_S},
    })
    listener = Dispatched(address.removeprefix("tcp://"))  # connects before the publisher binds: zmq retries
    run = RunDir.create(tmp_path_factory.mktemp("bluesky") / "run", cfg.to_dict())
    run_training(cfg, run, progress=False)
    listener.thread.join(WAIT_S)
    assert not listener.thread.is_alive() and listener.error is None, listener.error
    return run.path, listener.docs


def _saved(run_path: Path) -> list[tuple[str, dict]]:
    return list(read_documents(run_path / DOCUMENTS_FILE))


def test_every_document_passes_event_model_schemas(tiny_run) -> None:
    run_path, _ = tiny_run
    docs = _saved(run_path)
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    start = docs[0][1]
    assert docs[0][0] == "start" and docs[-1][0] == "stop"
    assert (start["plan_type"], start["plan_name"], start["scan_id"]) == ("generator", "hil_train", 1)
    assert start["hints"]["dimensions"] == [[["samples"], "primary"]]
    descriptors = {d["name"]: d for n, d in docs if n == "descriptor"}
    assert set(descriptors) == {"primary", "eval"}
    for d in descriptors.values():
        (obj, keys), = d["object_keys"].items()
        assert sorted(keys) == sorted(d["data_keys"]) and d["hints"][obj]["fields"]
        for key, spec in d["data_keys"].items():
            assert {"source", "dtype", "shape"} <= set(spec), key
    assert "test_accuracy" in descriptors["eval"]["data_keys"]
    assert "test_accuracy" not in descriptors["primary"]["data_keys"]
    stop = docs[-1][1]
    counted = Counter(descriptors_name for descriptors_name in
                      (next(k for k, v in descriptors.items() if v["uid"] == d["descriptor"])
                       for n, d in docs if n == "event"))
    assert stop["exit_status"] == "success" and stop["num_events"] == dict(counted)
    assert counted["eval"] == 2 and counted["primary"] >= 2


def test_remote_dispatcher_received_the_run_once_in_order(tiny_run) -> None:
    run_path, received = tiny_run
    assert [(n, d["uid"]) for n, d in received] == [(n, d["uid"]) for n, d in _saved(run_path)]


def test_run_router_and_event_pages_take_the_replayed_run(tiny_run) -> None:
    run_path, _ = tiny_run
    seen: list[tuple[str, dict]] = []

    def collect(name: str, doc: dict) -> None:  # RunRouter hands events on as event pages
        if name == "event_page":
            seen.extend(("event", e) for e in event_model.unpack_event_page(doc))
        else:
            seen.append((name, doc))

    def factory(name: str, start: dict) -> tuple[list, list]:
        return [collect], []

    router = event_model.RunRouter([factory])
    for name, doc in _saved(run_path):
        router(name, doc)  # raises on a start twice or an event of an unknown descriptor
    assert [(n, d["uid"]) for n, d in seen] == [(n, d["uid"]) for n, d in _saved(run_path)]
    eval_uid = next(d["uid"] for n, d in seen if n == "descriptor" and d["name"] == "eval")
    evals = [d for n, d in seen if n == "event" and d["descriptor"] == eval_uid]
    page = event_model.pack_event_page(*evals)
    assert [e["data"]["test_accuracy"] for e in event_model.unpack_event_page(page)] == \
        [e["data"]["test_accuracy"] for e in evals]


def test_best_effort_callback_plots_the_learning_curve_headless(tiny_run, capsys) -> None:
    run_path, _ = tiny_run
    docs = _saved(run_path)
    n_primary = sum(1 for n, d in docs if n == "event" and d["data"].keys() >= {"running_accuracy"})
    plt.close("all")
    bec = BestEffortCallback()
    for name, doc in docs:
        bec(name, doc)
    axes = {ax.get_ylabel(): ax for num in plt.get_fignums() for ax in plt.figure(num).axes}
    assert {"running_accuracy", "loss", "test_accuracy"} <= set(axes)
    assert [len(line.get_xdata()) for line in axes["running_accuracy"].lines] == [n_primary]
    assert [len(line.get_xdata()) for line in axes["test_accuracy"].lines] == [2]
    assert "hil_train" in capsys.readouterr().out  # the table's water mark: plan_type plan_name uid scan_id
    plt.close("all")


def test_live_table_prints_the_primary_stream(tiny_run, capsys) -> None:
    run_path, _ = tiny_run
    table = LiveTable(["running_accuracy", "loss"])
    for name, doc in _saved(run_path):
        table(name, doc)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|") and "seq_num" not in line]
    n_primary = sum(1 for n, d in _saved(run_path) if n == "event" and "running_accuracy" in d["data"])
    assert len(rows) == n_primary and "generator hil_train" in out
