"""Live telemetry and run documents in Bluesky's document model.

- :mod:`.documents`: compose a run with event-model (streams ``primary`` and ``eval``), JSON encoding, the
  ``documents.jsonl`` log and its replay;
- :mod:`.wire`: Bluesky's 0MQ message format (one frame ``prefix name json``), endpoints, CURVE keys;
- :mod:`.publisher`: the XPUB/ROUTER publisher with late-joiner remedies that never duplicate a live document;
- :mod:`.subscriber`: a deduplicating subscriber and the snapshot request (used by ``hil monitor``).

A Bluesky user needs only ``RemoteDispatcher(address, deserializer=json.loads)``; see docs/scripting.md.
"""

from eqprop_hil.telemetry.documents import (
    DOCUMENT_NAMES, EVAL_DATA_KEYS, EXIT_STATUSES, PRIMARY_DATA_KEYS, PULSES_KEY, Document, DocumentLog, RunDocuments,
    TelemetryError, encode_document, read_documents, to_jsonable, validate_document,
)
from eqprop_hil.telemetry.publisher import TelemetryPublisher
from eqprop_hil.telemetry.subscriber import TelemetryRefused, TelemetrySubscriber, TelemetryTimeout, fetch_snapshot
from eqprop_hil.telemetry.wire import (
    DEFAULT_PREFIX, MAX_MESSAGE_BYTES, decode_message, encode_message, is_loopback_endpoint, load_key, warn_if_exposed,
)

__all__ = [
    "DEFAULT_PREFIX", "DOCUMENT_NAMES", "EVAL_DATA_KEYS", "EXIT_STATUSES", "MAX_MESSAGE_BYTES", "PRIMARY_DATA_KEYS",
    "PULSES_KEY", "Document", "DocumentLog", "RunDocuments", "TelemetryError", "TelemetryPublisher",
    "TelemetryRefused", "TelemetrySubscriber", "TelemetryTimeout", "decode_message", "encode_document",
    "encode_message", "fetch_snapshot", "is_loopback_endpoint", "load_key", "read_documents", "to_jsonable",
    "validate_document", "warn_if_exposed",
]
