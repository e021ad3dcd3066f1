"""Test-session settings. One torch thread: the suite runs many small tensor operations, where a second thread
costs far more in synchronisation than it gains (measured up to 30x slower on 2 shared cores)."""

import torch

torch.set_num_threads(1)
