"""Training on an instrument: the in-situ learner, its calibration, recovery from faults and the pulse journal."""
