"""Train an emulated analog board in situ with C-EP from Python, then read the run records back.

What a lab user learns: ``hil train`` is three calls (resolve a config, create a run directory, run_training),
so a script can sweep settings or train inside a notebook. The preset ``digits-hw`` is overridden to a small
subset of the 8x8 digits (200 samples) and one epoch, a smoke run whose
accuracy is still low (the full preset trains 3 epochs on 1437 samples); everything the run records (metrics.jsonl, the pulse journal,
checkpoints, the instrument snapshot, learning curves) is then read with the same API ``hil report`` uses.

    python examples/03_train_in_situ.py [OUT_DIR]      (default runs/examples)
"""

import sys
import tempfile
from pathlib import Path

from eqprop_hil.config import resolve
from eqprop_hil.runs.rundir import RunDir
from eqprop_hil.session import run_training

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples")
out_dir.mkdir(parents=True, exist_ok=True)

cfg = resolve("digits-hw", overrides={
    "train": {"data_limit": 200, "epochs": 1, "batch_size": 5},
    "instrument": {"resource": "sim://analog?sizes=64,256,10&device=soft_bounds&seed=0", "update_mode": "matrix"},
})
print(f"config {cfg.name}: sizes {cfg.model.sizes}, rule {cfg.rule.name} (t1={cfg.rule.t1}, t2={cfg.rule.t2}, "
      f"beta={cfg.rule.beta}), {cfg.instrument.update_mode} updates on {cfg.instrument.resource}")

run = RunDir.create(tempfile.mkdtemp(prefix="03_train_in_situ-", dir=out_dir), cfg.to_dict())
summary = run_training(cfg, run, progress=False)  # opens the instrument, trains, leaves it safe, closes it
print(summary.line())

for record in run.read_metrics():  # one JSON object per epoch
    print(f"epoch {record['epoch']}: train acc {record['train_accuracy']:.3f}, test acc {record['test_accuracy']:.3f}, "
          f"{record['samples_per_second']:.1f} samples/s, {record['pulses_sent']} pulses")
with run.journal(readonly=True) as journal:  # the pulse write-ahead log
    stats = journal.stats()
print(f"journal: {stats['begun']} pulse commands begun, {stats['done']} acknowledged, {stats['pending']} pending, "
      f"{stats['pulses_acknowledged']} pulses")
snapshot = run.read_snapshot()
print(f"instrument: {snapshot['identity']['model']} serial {snapshot['identity']['serial']}, "
      f"device {snapshot['describe']['device']['model']}, calibration from {snapshot['calibration']['source']!r}")
print(f"checkpoints: {[p.name for p in run.checkpoints()]}; plots: {[p.name for p in run.plots_dir.iterdir()]}")
