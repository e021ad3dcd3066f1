"""Watch a run's live telemetry from your own script: a ZeroMQ subscriber printing JSON documents.

What a lab user learns: ``hil train --telemetry tcp://127.0.0.1:5556`` publishes a run as documents (start with
the config and instrument snapshot, one descriptor per stream (``primary``: training progress, ``eval``: test
accuracy), events, stop with the exit status), Bluesky documents built with event-model. A
``TelemetrySubscriber`` receives them as ``(name, dict)`` pairs, so a lab dashboard or a logger is a loop of a
few lines (a Bluesky user instead points ``RemoteDispatcher(address, deserializer=json.loads)`` at the same
address: docs/scripting.md). Here a tiny run is published by hand so the script stands alone; a late subscriber
still learns what is running from the snapshot socket.

    python examples/05_watch_telemetry.py
"""

from eqprop_hil.telemetry import TelemetryPublisher, TelemetrySubscriber, fetch_snapshot


def show(name: str, doc: dict) -> None:
    if name == "start":
        print(f"start      run {doc['run_name']!r}, config {doc['config']}, instrument {doc['instrument']}")
    elif name == "descriptor":
        print(f"descriptor stream {doc['name']!r}: {sorted(doc['data_keys'])}, "
              f"test_accuracy in {doc['data_keys']['test_accuracy']['units']!r}")
    elif name == "event":
        d = doc["data"]
        print(f"event {doc['seq_num']}    epoch {d['epoch']}: test accuracy {100 * d['test_accuracy']:.0f} %, "
              f"{d['pulses_sent']} pulses")
    else:
        print(f"stop       exit status {doc['exit_status']!r}, {doc['num_events']['eval']} events")


with TelemetryPublisher("tcp://127.0.0.1:0") as pub:  # port 0: a free loopback port
    print(f"publishing on {pub.address}, snapshots on {pub.snapshot_address}")
    with TelemetrySubscriber(pub.address, timeout_s=5.0) as sub:
        if not pub.wait_for_subscribers(1, timeout_s=5.0):  # PUB drops what is sent before anyone listens
            raise SystemExit("the subscriber never connected")
        pub.start("example-run", config={"rule": {"name": "cep", "beta": 0.2}}, instrument={"model": "ANALOG-EP-1"})
        pub.describe({"epoch": {"dtype": "integer", "units": "epochs"},
                      "test_accuracy": {"dtype": "number", "units": "fraction"},
                      "pulses_sent": {"dtype": "integer", "units": "pulses"}}, name="eval")
        for epoch in (1, 2, 3):  # every event carries exactly the described keys
            pub.event({"epoch": epoch, "test_accuracy": 0.5 + 0.1 * epoch, "pulses_sent": 1000 * epoch}, "eval")
        for name, doc in sub.documents(until_stop=False):  # raises TelemetryTimeout if the publisher goes quiet
            show(name, doc)
            if name == "event" and doc["seq_num"] == 3:
                break
        late = fetch_snapshot(pub.snapshot_address, timeout_s=5.0)  # what a subscriber joining now would get
        start, last = late[0][1], late[-1][1]  # [(name, doc), ...]: start, descriptors, last event per stream
        print(f"late joiner's snapshot: run {start['run_name']!r}, last event {last['seq_num']}")
        pub.stop("success")
        for name, doc in sub.documents(until_stop=True):
            show(name, doc)
