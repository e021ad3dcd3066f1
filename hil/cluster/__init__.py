"""Beyond one machine: sweeps and shared benches on Ray (the optional ``cluster`` extra).

- :mod:`eqprop_hil.cluster.runtime`: connect to a cluster, or start a local Ray for one sweep.
- :mod:`eqprop_hil.cluster.bench`: benches as custom resources (``bench:NAME``) and the bench description file
  whose instrument and limits a run on that bench uses.
- :mod:`eqprop_hil.cluster.trial`: one trial = one ordinary run (``eqprop_hil.session.run_training`` with a
  ``RunDir``), with its start/end times, host and process recorded.
- :mod:`eqprop_hil.cluster.sweep`: grid / random search over config keys and seeds with Ray Tune (optional ASHA
  early stopping), ``results.jsonl``, a summary table and ``results.png``.
- :mod:`eqprop_hil.cluster.submit`: ``hil train --cluster ADDRESS --bench NAME``.

Nothing here is imported by the rest of the package; Ray is imported only inside these modules.
"""
