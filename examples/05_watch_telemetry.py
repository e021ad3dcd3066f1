"""Watch a run's live telemetry from your own script: a ZeroMQ subscriber printing JSON documents.

What a lab user learns: ``hil train --telemetry tcp://127.0.0.1:5556`` publishes a run as documents (start with
the config and instrument snapshot, a descriptor of the data keys, events, stop with the exit status); a
``TelemetrySubscriber`` receives them as ``(name, dict)`` pairs, so a lab dashboard or a logger is a loop of a
few lines. Here a tiny run is published by hand so the script stands alone; a late subscriber still learns what
is running from the snapshot socket.

    python examples/05_watch_telemetry.py
"""

from eqprop_hil.telemetry import TelemetryPublisher, TelemetrySubscriber, fetch_snapshot


def show(name: str, doc: dict) -> None:
    if name == "start":
        print(f"start      run {doc['run_name']!r}, config {doc['config']}, instrument {doc['instrument']}")
    elif name == "descriptor":
        print(f"descriptor {len(doc['data_keys'])} data keys, test_accuracy in {doc['data_keys']['test_accuracy']['units']!r}")
    elif name == "event":
        d = doc["data"]
        print(f"event {doc['seq_num']}    epoch {d['epoch']}: test accuracy {100 * d['test_accuracy']:.0f} %, "
              f"{d['pulses_sent']} pulses")
    else:
        print(f"stop       exit status {doc['exit_status']!r}, {doc['num_events']['primary']} events")


with TelemetryPublisher("tcp://127.0.0.1:0") as pub:  # port 0: a free loopback port
    print(f"publishing on {pub.address}, snapshots on {pub.snapshot_address}")
    with TelemetrySubscriber(pub.address, timeout_s=5.0) as sub:
        if not pub.wait_for_subscribers(1, timeout_s=5.0):  # PUB drops what is sent before anyone listens
            raise SystemExit("the subscriber never connected")
        pub.start("example-run", config={"rule": {"name": "cep", "beta": 0.2}}, instrument={"model": "ANALOG-EP-1"})
        for epoch in (1, 2, 3):
            pub.event({"kind": "eval", "epoch": epoch, "test_accuracy": 0.5 + 0.1 * epoch, "pulses_sent": 1000 * epoch})
        for name, doc in sub.documents(until_stop=False):  # raises TelemetryTimeout if the publisher goes quiet
            show(name, doc)
            if name == "event" and doc["seq_num"] == 3:
                break
        late = fetch_snapshot(pub.snapshot_address, timeout_s=5.0)  # what a subscriber joining now would get
        print(f"late joiner's snapshot: run {late['start']['run_name']!r}, last event {late['event']['seq_num']}")
        pub.stop("success")
        for name, doc in sub.documents(until_stop=True):
            show(name, doc)
