"""Where a sweep runs: a local Ray started for it (the default) or an existing cluster (``--address``).

Ray is an optional extra; every entry point calls :func:`require_ray` first, so a missing install gives one clear
error instead of an ImportError deep in a trial.
"""

from __future__ import annotations

import logging
import os
import socket
from types import ModuleType

from eqprop_hil.protocols.errors import EqpropError

INSTALL_HINT = "pip install -c constraints.txt -e '.[cluster]'"
# The local Ray of one sweep holds only small result dictionaries: a small object store (Ray's minimum is 75 MiB)
# instead of Ray's default 30 % of the machine's memory.
LOCAL_OBJECT_STORE_BYTES = 96 * 1024 * 1024


class ClusterError(EqpropError):
    """A sweep or a cluster run that cannot start: Ray missing, a cluster unreachable, a bench unknown."""


def require_ray() -> ModuleType:
    """Import Ray (the ``cluster`` extra) or say how to install it."""
    try:
        import ray
        import ray.tune  # noqa: F401  (the sweep needs Tune; import errors of its dependencies surface here)
    except ImportError as e:
        raise ClusterError(f"Ray (with Tune) is not installed: {e}. Install the cluster extra: {INSTALL_HINT}") from e
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Attach this process to Ray; returns True when it started a local instance (the caller shuts it down).

    ``address`` None or "" starts a local Ray for this process only: no dashboard, a small object store, usage
    statistics off, ``num_cpus`` CPUs (default: all). Ray 2.60 enables its token authentication by default, so
    even the local instance's ports (which Ray binds on the node address, not on loopback) refuse callers
    without the token. ``address`` ("HOST:PORT" or "auto") joins an existing cluster as a driver. A process that
    is already connected (a test's cluster, a notebook) is reused as it is.
    """
    ray = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a lab PC
    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
            return False
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            logging_level=logging.WARNING, log_to_driver=log_to_driver,
        )
        return True
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ClusterError(f"cannot connect to {where}: {e}. Check the address (`ray status` on the head node "
                           "prints it) and that this host has the cluster's auth token") from e


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an address where nothing listens at once (Ray itself would retry for minutes before giving up)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"nothing answers at {address} ({e}): is the head node running (`ray start --head`), and "
                           "is this its GCS address (`ray status` on the head prints it)?") from e


def shutdown(started: bool) -> None:
    """Stop the local Ray that :func:`connect` started (an existing cluster is left running)."""
    if started:
        import ray

        ray.shutdown()


def node_id() -> str:
    """The Ray node this process runs on (empty outside Ray): trials record it to show where they ran."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001  (a record field; never fail a run over it)
        return ""
