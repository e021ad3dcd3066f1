"""In-situ training: EP, C-EP and C-VF run on an instrument through the :class:`NeuronArray` interface.

The instrument settles; the controller reads the states back, computes each edge's increment, turns it into
pulses with the calibration (per-device step sizes, stochastic rounding, a per-step cap) and sends them in one
of three modes (ARCHITECTURE.md "Update modes"):

- ``matrix``: a signed pulse count per device, exact to the pulse quantum;
- ``outer``: each C-EP increment ``c (s' s'^T - s s^T) = c (s' - s) s'^T + c s (s' - s)^T`` is sent as two rank-1
  stochastic pulse trains (rows, columns, bit length): O(rows + cols) bytes, correct in expectation;
- ``local``: the instrument applies the rule itself during the nudged phase; one round trip per sample where the
  instrument offers :class:`SampleRunner`.

Where the instrument offers :class:`StepRunner`, a nudged step is one round trip: the previous step's pulses, one
step of the dynamics and every layer's state travel in one compound command (target-mode nudge: the board adds
``beta (y - o_t)`` itself). Otherwise the step is driven piece by piece (nudge current, settle, read, pulses).
The increments and their encoding as pulses live in hil/insitu/pulses.py.

Hardware is batch 1: a minibatch of ``B`` is processed sample by sample with the per-step rate ``eta / B``, so
that the sum over a minibatch matches the batch-mean update of the software engine to first order (the
hardware presets use ``batch_size = 1``, so that the software engine runs the very same per-sample rule).
Every pulse command is journaled (write-ahead) before it is sent and marked done on acknowledgement.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any

import numpy as np
import torch

from eqprop_hil.drivers.errors import LinkError
from eqprop_hil.drivers.interface import NeuronArray, SampleRunner, StepRunner
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.insitu.calibration import Calibration, CalibrationError, EdgeCalibration
from eqprop_hil.config import ConfigError, RunConfig
from eqprop_hil.insitu.journal import PulseJournal
from eqprop_hil.insitu import pulses
from eqprop_hil.engine.model import Network
from eqprop_hil.insitu.recovery import Guard, GuardedArray, RedoSample, RollBack, board_instance, entries_since
from eqprop_hil.engine.rules import BatchResult
from eqprop_hil.runs.rundir import RunDir

log = logging.getLogger(__name__)


def open_insitu(cfg: RunConfig, run: RunDir, *, resume: bool = False) -> "InSituLearner":
    """Open the instrument named by ``cfg.instrument.resource`` and wrap it in a learner."""
    from eqprop_hil.drivers import open_array

    icfg = cfg.instrument
    lim = icfg.limits
    limits = Limits(
        max_input_volts=lim.max_input_volts, max_nudge_amperes=lim.max_nudge_amperes,
        max_pulses_per_device=lim.max_pulses_per_device, max_bit_length=lim.max_bit_length,
        pulse_budget=lim.pulse_budget or None,
    )
    array = open_array(icfg.resource, limits=limits, timeout_s=icfg.timeout_s)
    try:
        calibration = Calibration.load(icfg.calibration) if icfg.calibration else None
        journal = PulseJournal(run.journal_path, fsync=not icfg.resource.startswith("sim://"))
        # Resuming from a checkpoint: the instrument holds the checkpoint's weights plus the updates journaled
        # after it, which the resume undoes; programming the initial weights would lose that state.
        program = not (resume and run.checkpoints())
        if resume and program:  # no (good) checkpoint: the run restarts from its initial weights and sample 0
            run.rewind_metrics(0)
        return InSituLearner(cfg, array, calibration, journal, resume=resume, program_initial=program)
    except BaseException:
        array.close()
        raise


def nominal_calibration(array: NeuronArray, net: Network, weight_range: float) -> Calibration:
    """What to use without a calibration file: the instrument's declared device parameters, and a mapping that
    puts ``weight_range`` times each edge's initial weight bound at the device's nominal upper bound."""
    desc = array.describe()
    dev = desc.get("device", {})
    dw = float(dev.get("dw_min", 0.001))
    w_max = float(dev.get("w_max", 0.6))
    asym = float(dev.get("up_down", 0.0))
    edges = []
    topo = array.topology()
    for e, (i, j) in enumerate(topo["edges"]):
        bound = float(net.W[e].abs().max())
        scale = weight_range * bound / w_max
        for fb in ([False, True] if topo["feedback"] == "untied" and i >= 1 else [False]):
            edges.append(EdgeCalibration(edge=e, feedback=fb, scale=scale, dw_up=dw * (1 + asym), dw_down=dw * (1 - asym),
                                         w_max=w_max, w_min=float(dev.get("w_min", -w_max))))
    return Calibration(instrument=dict(array.identity()), topology=dict(topo), edges=edges,
                       report={"source": "nominal device parameters from the instrument's description"})


class InSituLearner:
    """The hardware counterpart of :class:`eqprop_hil.engine.rules.Learner` (same interface, used by hil/train.py)."""

    def __init__(self, cfg: RunConfig, array: NeuronArray, calibration: Calibration | None, journal: PulseJournal,
                 *, resume: bool = False, program_initial: bool = True) -> None:
        self.cfg, self.journal = cfg, journal
        self.guard = Guard(array, journal)
        self.attach(array)
        self._applied: list[tuple[int, dict]] = []  # pulse commands of the sample in progress known to have run
        self._ckpt_params: dict | None = None
        self._ckpt_ids: list[int] = []  # journal positions of the kept checkpoints (compaction keeps after the older)
        # Test hooks (tests/test_crash_resume.py): EQPROP_HIL_CRASH_AT="sample:step:edge" kills this process
        # with SIGKILL right after that pulse command was sent and acknowledged but before the journal's done;
        # "sample:step:edge:unsent" right after it was journaled, before it was sent; "eval:N" right after the
        # N-th test sample this process evaluated (free phase only).
        crash = os.environ.get("EQPROP_HIL_CRASH_AT", "")
        self._crash_eval = int(crash[5:]) if crash.startswith("eval:") else None
        self._crash_unsent = crash.endswith(":unsent")
        crash = crash.removesuffix(":unsent")
        self._crash_at = tuple(int(v) for v in crash.split(":")) if crash and self._crash_eval is None else None
        self._evaluated = 0  # test samples evaluated by this process (for the "eval:N" hook)
        self.rule = cfg.rule
        if self.rule.name not in ("ep", "cep", "cvf"):
            raise ConfigError(f"rule {self.rule.name!r} does not run on an instrument; use ep, cep or cvf")
        if cfg.model.readout != "state" or cfg.model.bias:
            raise ConfigError("on an instrument the model needs readout = 'state' and bias = false (the boards have no "
                              "learnable biases); see the digits-hw presets")
        self.mode = cfg.instrument.update_mode
        self.lr_gain = 1.0
        if cfg.instrument.use_recommended_gain:
            cfg = self._with_recommended_gain(cfg, calibration)
            self.cfg = cfg
        topo = array.topology()
        if [int(n) for n in cfg.model.sizes] != list(topo["sizes"]):  # before allocating: a huge model fails here
            raise ConfigError(f"model.sizes = {list(cfg.model.sizes)} does not fit the instrument, wired as sizes="
                              f"{list(topo['sizes'])}; start the emulator with matching options or change [model]")
        self.net = Network(cfg.model, seed=cfg.train.seed, dtype=torch.float64)  # initial weights, conventions
        self._check_topology(topo)
        if self.mode == "local" and self.rule.lr_half_life:
            raise ConfigError("rule.lr_half_life changes the rates at every sample, which the board's own rule "
                              "cannot follow in local mode; use train.lr_final (a per-epoch schedule) instead")
        if self.mode == "local" and self.rule.name == "ep":
            raise ConfigError("update_mode 'local' applies updates during the nudged phase: use rule cep or cvf")
        self.matrices = [(e, False) for e in range(len(self.net.edges))] + [
            (e, True) for e in range(len(self.net.edges)) if self.net.B[e] is not None
        ]
        self.calibration = calibration or nominal_calibration(array, self.net, cfg.instrument.weight_range)
        if calibration is not None:
            calibration.check_topology(array.topology())
        self.eta = [lr / cfg.train.batch_size for lr in self.rule.edge_lrs(len(self.net.edges))]
        top = len(self.net.sizes) - 1
        # With feedback gain g < 1 the error reaching a layer below the output is scaled by g per feedback hop:
        # dividing those edges' rates by g restores the learning speed (REFERENCE.md section 9).
        self.eta = [eta / self.lr_gain ** (top - j) for eta, (_, j) in zip(self.eta, self.net.edges)]
        self.base_eta, self.rate_scale = list(self.eta), 1.0
        self.cap = cfg.instrument.limits.max_pulses_per_device
        self.samples_seen = 0
        self.counters = {"pulses_sent": 0, "pulse_commands": 0, "clipped": 0}
        self.transimpedance = float(array.describe().get("transimpedance_ohms", 1e4))
        self._steps: dict[tuple[int, bool], tuple[Any, Any]] = {}
        self.encoder: pulses.PulseEncoder | None = None  # built by _setup from the calibrated step sizes
        # Program the initial weights even on resume when there is no checkpoint: replaying from the start needs
        # them. A reboot during the set-up loses the volatile settings: set up again until the boot is stable.
        self.guard.boot = self.guard.read_boot()
        self._check_settle_time()
        if program_initial:  # a fresh run (or one without a checkpoint) owns whatever instance answers now
            self.guard.bind()
        else:  # resume: the instance is checked against the checkpoint's in _roll_back, before anything is sent
            self.guard.instance = board_instance(array)
        self._setup(program=program_initial)
        self._settings_back()
        self.guard.sync()
        if resume and program_initial:  # no checkpoint to roll back to: the initial weights were programmed anew
            self._settle_pending()
            self.guard.sync()

    # ------------------------------------------------------------------ set-up
    def _check_settle_time(self) -> None:
        """Refuse a settle the link's timeout cannot wait for (rule.t1, rule.t2 against instrument.timeout_s):
        it would otherwise time out, be redone, and time out again. The board's time per step is measured with
        a short settle in FREE (states only; weights untouched)."""
        longest = max(self.rule.t1, self.rule.t2)
        if longest <= 2000:
            return
        import time as _time

        a, probe = self.dev, 200
        key = "rule.t1" if self.rule.t1 >= self.rule.t2 else "rule.t2"
        a.reset()
        a.set_phase("FREE")
        t0 = _time.perf_counter()
        try:
            a.settle(probe)
        except RedoSample as e:
            raise ConfigError(f"{key} = {longest} steps: even {probe} steps outlast instrument.timeout_s = "
                              f"{self.cfg.instrument.timeout_s:g} s on this instrument ({e}); lower {key} or raise "
                              "instrument.timeout_s") from e
        per_step = (_time.perf_counter() - t0) / probe
        a.set_phase("HOLD")
        need = per_step * longest
        if need > 0.5 * self.cfg.instrument.timeout_s:
            raise ConfigError(f"{key} = {longest} steps takes about {need:.3g} s on this instrument ({1e6 * per_step:.3g}"
                              f" us per step, measured), more than half of instrument.timeout_s = "
                              f"{self.cfg.instrument.timeout_s:g} s: lower {key} or raise instrument.timeout_s")

    def attach(self, array: Any) -> None:
        """Drive ``array`` from now on (at construction; a benchmark attaches a timing proxy of the same driver):
        the recovery layer and the sample loop both go through it."""
        self.array = array
        self.guard.array = array
        self.dev = GuardedArray(array, self.guard)  # what the sample loop drives: retried, or redone on a fault
        self._runner = isinstance(array, SampleRunner)
        self._stepper = isinstance(array, StepRunner)
        # The analog board counts LEARn:SAMPle? in its executed pulse commands; the FPGA's TRAIN_SAMPLE is not
        # counted (protocols/fpga_serial.md: only pulse, outer, STEP and APPLY_SPARSE commands are).
        self._local_counted = self._runner and hasattr(array, "pulse_commands_executed")

    def _with_recommended_gain(self, cfg: RunConfig, calibration: Calibration | None) -> RunConfig:
        if calibration is None or calibration.recommended_gain is None:
            raise ConfigError("use_recommended_gain needs a calibration file with a recommended gain (hil calibrate)")
        g = float(calibration.recommended_gain)
        self.lr_gain = g
        log.info("feedback gain %.3g on every edge, from the calibration", g)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gamma=g))

    def _check_topology(self, topo: dict) -> None:
        want = (self.net.sizes, [tuple(e) for e in self.net.edges], self.cfg.model.feedback, self.cfg.model.activation)
        have = (list(topo["sizes"]), [tuple(e) for e in topo["edges"]], topo["feedback"], topo["activation"])
        if want != have:
            raise ConfigError(
                f"the instrument is wired as sizes={have[0]} edges={have[1]} feedback={have[2]} activation={have[3]}, "
                f"the config wants sizes={want[0]} edges={want[1]} feedback={want[2]} activation={want[3]}; "
                f"start the emulator with matching options (sim://analog?sizes=...) or change [model]"
            )

    def _settings_back(self) -> None:
        """After a reboot: volatile settings again (gains, learning), until no reboot interrupts them."""
        for _ in range(self.guard.retries + 1):
            if not (self.guard.rebooted() or self.guard.restarted):
                return
            self.guard.check_instance("after a reboot")  # a new instance's weights are not the run's
            self.guard.restarted = False
            self._setup(program=False)
        raise LinkError("the instrument keeps rebooting while its settings are applied; check its power")

    def _setup(self, *, program: bool) -> None:
        a = self.dev
        a.reset()
        for e, g in enumerate(self.net.gamma):
            a.set_feedback_gain(e, g)
        for e, fb in self.matrices:
            c = self.calibration.edge(e, fb)
            if fb:
                a.set_weight_scale(e, c.scale, feedback=True)
            else:
                a.set_weight_scale(e, c.scale)
            shape = tuple(self._weights_sw(e, fb).shape)
            self._steps[(e, fb)] = c.step_arrays(shape)
        if self.mode != "local":
            self.encoder = pulses.PulseEncoder(self.mode, self._steps, cap=self.cap,
                                               bit_length=self.cfg.instrument.bit_length, seed=self.cfg.train.seed,
                                               counters=self.counters)
        if self.mode == "local":
            a.set_local_learning(True, eta=self.eta, beta=abs(self.rule.beta))
        if program:
            for e, fb in self.matrices:
                self._program(e, fb, self._weights_sw(e, fb))

    def _weights_sw(self, e: int, fb: bool) -> np.ndarray:
        t = self.net.B[e] if fb else self.net.W[e]
        return t.detach().numpy().astype(np.float32)

    def _program(self, e: int, fb: bool, w: np.ndarray) -> None:
        residual = self.dev.program_weights(e, w, feedback=fb, tolerance=self.cfg.instrument.program_tolerance)
        # Devices whose own bounds (device-to-device spread) lie inside the target cannot reach it: write-verify
        # reports the worst one. Training adapts to such devices, so this is information, not a failure.
        log.info("edge %d%s programmed: max residual %.4g (tolerance %.4g)", e, " (feedback)" if fb else "",
                 residual, self.cfg.instrument.program_tolerance)

    # ------------------------------------------------------------------ one sample
    def _drive(self, x: np.ndarray) -> None:
        a = self.dev
        a.reset()
        a.set_input(x * self.cfg.instrument.input_volts)
        a.set_phase("FREE")
        a.settle(self.rule.t1)

    def _free_output(self, x: np.ndarray) -> np.ndarray:
        if self._runner:
            out = self.dev.infer(x * self.cfg.instrument.input_volts, self.rule.t1)
        else:
            self._drive(x)
            out = self.dev.read_state(len(self.net.sizes) - 1)[0]
            self.dev.set_phase("HOLD")
        self._evaluated += 1
        if self._evaluated == self._crash_eval:  # the "eval:N" test hook
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    def _local_runner_sample(self, x: np.ndarray, y: np.ndarray, beta: float) -> np.ndarray:
        """One local-mode sample in one command. Where the board counts it as a pulse command (the analog
        board's ``LEARn:SAMPle?``, protocols/analog_board.md 3.5) it is journaled and sent exactly once like
        one, so the executed-command counter and the journal stay reconciled; its updates cannot be undone, so
        a sample that ran but whose answer was lost is redone from the last checkpoint."""
        volts = x * self.cfg.instrument.input_volts
        if not self._local_counted:
            return self.dev.train_sample(volts, y, beta, self.rule.t1, self.rule.t2)
        entry = {"sample": self.samples_seen, "step": 0, "edge": -1, "feedback": False, "mode": "local"}
        [jid] = self.journal.begin_many([{**entry, "executed_before": self.guard.expected}])
        out: list[np.ndarray] = []

        def fire() -> dict:
            out.append(self.array.train_sample(volts, y, beta, self.rule.t1, self.rule.t2))
            return {"pulses": 0}

        if self.guard.send(jid, entry, fire) is None or not out:
            raise RollBack(f"sample {self.samples_seen}: the local-mode sample ran but its answer was lost")
        self.counters["pulse_commands"] += 1
        return out[-1]

    def _beta(self) -> float:
        if self.rule.beta_sign == "random":
            rng = np.random.default_rng([self.cfg.train.seed, 0xBE7A, self.samples_seen])
            return -self.rule.beta if rng.random() < 0.5 else self.rule.beta
        return self.rule.beta

    def _nudge(self, o: np.ndarray, y: np.ndarray, beta: float) -> None:
        """Explicit current nudge: I = beta (y - o_t) / R, so the board adds R I = beta (y - o_t) volts."""
        self.dev.set_nudge_current(beta * (y - o) / self.transimpedance)

    def _target_nudge(self, beta: float) -> bool:
        """Whether the board may apply the nudge itself (target mode, ``beta (y - o_t)`` at every step): a
        positive beta, and the largest current it can amount to, ``beta * 2 V / R`` (outputs and targets lie
        within +-1 V), within the nudge limit. Otherwise the host sends each step's current, checked."""
        worst = abs(beta) * 2.0 / self.transimpedance
        return beta > 0 and worst <= self.array.limits.max_nudge_amperes

    def _sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Train on one sample; returns the free-phase output (volts)."""
        beta = self._beta()
        if self.mode == "local":
            if self._runner:
                return self._local_runner_sample(x, y, beta)
            self._drive(x)
            out = self.dev.read_state(len(self.net.sizes) - 1)[0]
            self.dev.set_nudge_target(y, beta)
            self.dev.set_phase("NUDGE")
            self.dev.settle(self.rule.t2)
            self.dev.nudge_off()
            self.dev.set_phase("HOLD")
            return out
        if self._stepper:
            return self._sample_compound(x, y, beta)
        a = self.dev
        self._drive(x)
        s = a.read_state()
        s_free = s
        a.set_phase("NUDGE")
        for t in range(self.rule.t2):
            self._nudge(s[-1], y, beta)
            a.settle(1)
            s_new = a.read_state()
            if self.rule.name != "ep":
                self._send(self._commands(s, s_new, beta, t), step=t)
            s = s_new
        a.nudge_off()
        a.set_phase("HOLD")
        if self.rule.name == "ep":
            self._send(self._ep_commands(s_free, s, beta), step=self.rule.t2)
        return s_free[-1]

    def _sample_compound(self, x: np.ndarray, y: np.ndarray, beta: float) -> np.ndarray:
        """:meth:`_sample` with compound steps: nudged step t sends step t-1's pulses, runs one step and reads
        every state in one round trip. The last step's pulses go with no step of the dynamics. Nothing moves
        between commands: the next sample's reset (``infer`` starts with one), an evaluation's, or the driver's
        ``close`` leaves NUDGE and turns the nudge off."""
        a = self.dev
        if self._runner:  # reset, clamp, t1 free steps in one round trip; the states stay for the read
            a.infer(x * self.cfg.instrument.input_volts, self.rule.t1)
        else:
            self._drive(x)
        s = s_free = a.read_state()
        target = self._target_nudge(beta)
        if target:
            a.set_nudge_target(y, beta)
        a.set_phase("NUDGE")
        pending: list[dict] = []
        for t in range(self.rule.t2):
            if not target:
                self._nudge(s[-1], y, beta)
            s_new = self._advance(pending, step=t - 1)
            pending = self._commands(s, s_new, beta, t) if self.rule.name != "ep" else []
            s = s_new
        if self.rule.name == "ep":
            pending = self._ep_commands(s_free, s, beta)
        if pending:  # the last step's pulses, and no step of the dynamics
            self._compound(pending, step=self.rule.t2 - 1 if self.rule.name != "ep" else self.rule.t2, steps=0)
        return s_free[-1]

    def _advance(self, pending: list[dict], *, step: int) -> list[np.ndarray]:
        """One step of the dynamics and every layer's state: with ``pending`` pulses in one compound command,
        without them as a settle and a read (an empty compound step would be a pulse command with no pulses)."""
        if pending:
            return self._compound(pending, step=step)
        self.dev.settle(1)
        return self.dev.read_state()

    def _compound(self, commands: list[dict], *, step: int, steps: int = 1) -> list[np.ndarray]:
        """:meth:`_compound_once` for ``commands``; a matrix may appear once per compound step, so a second
        command for it (outer mode's second rank-1 term) goes first on its own, also before the dynamics step."""
        seen: set[tuple[int, bool]] = set()
        first, extra = [], []
        for c in commands:
            key = (c["edge"], c["feedback"])
            (extra if key in seen else first).append(c)
            seen.add(key)
        self._send(extra, step=step)
        return self._compound_once(first, step=step, steps=steps)

    # ------------------------------------------------------------------ increments -> pulses (hil/insitu/pulses.py)
    def _decay(self) -> float:
        """rule.lr_half_life's smooth decay, as the software engine applies it (per training sample)."""
        half_life = self.rule.lr_half_life
        return 0.5 ** (self.samples_seen / half_life) if half_life else 1.0

    def _commands(self, s: list[np.ndarray], s_new: list[np.ndarray], beta: float, step: int) -> list[dict]:
        feedback = [self.net.B[e] is not None for e in range(len(self.net.edges))]
        eta = [v * self._decay() for v in self.eta]
        if not all(np.isfinite(v).all() for v in s_new):  # a non-finite increment never becomes a pulse
            raise LinkError(f"sample {self.samples_seen} step {step}: non-finite states read back (NaN or inf); "
                            "no increment computed, nothing sent")
        inc = pulses.continual_increments(self.rule.name, self.net.edges, feedback, eta, s, s_new, beta)
        return self.encoder.commands(inc, sample=self.samples_seen, step=step)

    def _ep_commands(self, s0: list[np.ndarray], sb: list[np.ndarray], beta: float) -> list[dict]:
        lrs = [self._decay() * self.rate_scale * lr / self.cfg.train.batch_size
               for lr in self.rule.edge_lrs(len(self.net.edges))]
        inc = pulses.ep_increments(self.net.edges, lrs, s0, sb, beta)
        return self.encoder.commands(inc, sample=self.samples_seen, step=self.rule.t2)

    def _send(self, commands: list[dict], *, step: int) -> None:
        """Journal (write-ahead), then send, each pulse command of one step, exactly once (hil/insitu/recovery.py).
        Each entry records the instrument's executed-command count it will find (commands run in id order): a
        resume without a checkpoint settles a pending entry with it (see _settle_pending)."""
        if not commands:
            return
        base, before = {"sample": self.samples_seen, "step": step}, self.guard.expected
        ids = self.journal.begin_many([{**base, **c, "executed_before": before + k} for k, c in enumerate(commands)])
        for jid, c in zip(ids, commands):
            crash = self._crash_at == (self.samples_seen, step, c["edge"])
            if crash and self._crash_unsent:
                os.kill(os.getpid(), signal.SIGKILL)
            ack = self.guard.send(jid, c, lambda c=c: self._fire(c, crash=crash))
            self._applied.append((jid, c))
            self.counters["pulses_sent"] += pulses.pulses_of(ack)
            self.counters["pulse_commands"] += 1

    def _compound_once(self, commands: list[dict], *, step: int, steps: int = 1) -> list[np.ndarray]:
        """One compound step (journaled as one pulse command): apply ``commands``, run ``steps`` steps in the
        current phase, return every layer's state. An executed step whose answer was lost (the counter settled
        it) has states nobody read: the sample is redone from its start, its pulses undone first."""
        # "edge": the first update's, as journal readers (and the crash hook) address commands by (sample, step, edge)
        entry = {"sample": self.samples_seen, "step": step, "edge": commands[0]["edge"],
                 **pulses.step_entry(commands, steps), "executed_before": self.guard.expected}
        [jid] = self.journal.begin_many([entry])
        crash = self._crash_at is not None and any(self._crash_at == (self.samples_seen, step, c["edge"])
                                                   for c in commands)
        if crash and self._crash_unsent:  # the test hook: journaled, never sent
            os.kill(os.getpid(), signal.SIGKILL)
        states: list[list[np.ndarray]] = []

        def fire() -> dict:
            res, s = self.array.step([pulses.as_update(c) for c in commands], steps)
            states[:] = [s]
            if crash:  # the test hook: sent and acknowledged, not yet marked done in the journal
                os.kill(os.getpid(), signal.SIGKILL)
            return res

        ack = self.guard.send(jid, {"mode": "step", "updates": commands}, fire)
        self._applied.extend((jid, c) for c in commands)
        self.counters["pulses_sent"] += pulses.pulses_of(ack)
        self.counters["pulse_commands"] += 1
        if not states or ack is None:
            raise RedoSample(f"compound step {jid}: executed, but its states were lost with the answer")
        return states[0]

    def _fire(self, c: dict, *, crash: bool = False) -> dict:
        """One pulse command on the wire (journaled by the caller)."""
        if c["mode"] == "matrix":
            res = self.array.apply_pulses(c["edge"], c["counts"], feedback=c["feedback"])
        else:
            res = self.array.apply_outer(c["edge"], c["rows"], c["cols"], c["bit_length"], feedback=c["feedback"])
        if crash:  # the test hook: sent and acknowledged, not yet marked done in the journal
            os.kill(os.getpid(), signal.SIGKILL)
        return res

    def _robust_sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """:meth:`_sample`, redone from its start after a reboot or a settle whose fate is unknown: the volatile
        settings are applied again and the sample's acknowledged pulses undone first (hil/insitu/recovery.py)."""
        self._applied = []
        for _ in range(self.guard.retries + 1):
            self.guard.restarted = False
            try:
                out = self._sample(x, y)
                if not (self.guard.restarted or self.guard.sample_rebooted()):
                    return out
                why = "the instrument rebooted during the sample"
            except RedoSample as e:
                why = str(e)
            self.guard.check_instance(f"sample {self.samples_seen}")
            if self.mode == "local":
                raise RollBack(f"sample {self.samples_seen}: {why}; the board's own updates of a local-mode sample "
                               "cannot be undone: re-programming the last checkpoint's weights and redoing from there")
            self.guard.stats["redos"] += 1
            log.warning("sample %d redone: %s", self.samples_seen, why)
            self._settings_back()
            self.guard.undo(self._applied, self._fire, {"sample": self.samples_seen, "step": -1})
        raise LinkError(f"sample {self.samples_seen} failed {self.guard.retries + 1} times; check the link")

    # ------------------------------------------------------------------ learner interface
    def set_rate_scale(self, factor: float) -> None:
        """Every rate at ``factor`` times its configured value (the loop's schedule, train.lr_final); in local
        mode the board gets the new rates (and gets them again with the other settings after a reboot)."""
        self.rate_scale = float(factor)
        self.eta = [v * self.rate_scale for v in self.base_eta]
        if self.mode == "local":
            self.dev.set_local_learning(True, eta=self.eta, beta=abs(self.rule.beta))

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        xs, ys = x.double().numpy(), y.double().numpy()
        outs = []
        for b in range(len(xs)):
            outs.append(self._robust_sample(xs[b], ys[b]))
            self.samples_seen += 1
        return self._result(np.stack(outs), ys)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        xs, ys = x.double().numpy(), y.double().numpy()
        for _ in range(self.guard.retries + 1):  # a reboot (gains lost) during the chunk: settings back, again
            self.guard.restarted = False
            out = np.stack([self._free_output(v) for v in xs])
            if not (self.guard.restarted or self.guard.rebooted()):
                return self._result(out, ys)
            self._settings_back()
        raise LinkError("evaluation: the instrument keeps rebooting; check its power")

    @staticmethod
    def _result(out: np.ndarray, y: np.ndarray) -> BatchResult:
        loss = 0.5 * ((out - y) ** 2).sum(axis=1)
        pred = out.argmax(axis=1)
        return BatchResult(float(loss.mean()), int((pred == y.argmax(axis=1)).sum()), torch.from_numpy(pred))

    def parameters_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Weights read back from the instrument (the truth), by the software network's names. First the board
        must still be the run's instance (a blank board's weights must never become a checkpoint) and its
        executed-command counter must agree with the journal (:meth:`Guard.reconcile`)."""
        self.guard.check_instance("checkpoint")
        self.guard.reconcile("checkpoint")
        return {f"{'B' if fb else 'W'}{e}": torch.from_numpy(self.dev.read_weights(e, feedback=fb).copy())
                for e, fb in self.matrices}

    def load_parameters_from_checkpoint(self, params: dict[str, torch.Tensor]) -> None:
        """Resume, part 1: remember the checkpoint's weights; :meth:`load_state_dict` (called next by the loop,
        with the journal position and the instrument's pulse-command count at the checkpoint) rolls back."""
        self._ckpt_params = params

    def _roll_back(self, params: dict[str, torch.Tensor], first_id: int | None, executed: int | None,
                   instance: str | None) -> None:
        """Bring the instrument back to the checkpoint, then the data feed replays from its cursor.

        The board must be the instance the checkpoint was taken on: another one (restarted, swapped) holds
        other weights and its counter proves nothing, so its weights are re-programmed from the checkpoint and
        the driver rebound. On the same instance every pulse command journaled after the checkpoint is settled
        first: acknowledged ones ran; of the pending ones (a crash between send and acknowledgement) the
        instrument's executed-command counter says how many ran, and they ran in id order. A counter the journal
        cannot explain stops the run (:class:`ReconcileError`, both counts named). Matrix commands that ran are
        undone with negated counts, exact on ideal devices (hil/insitu/recovery.py); outer-mode trains are drawn
        on the device and local-mode updates are the board's own, so those modes (and a journal compacted past
        the checkpoint) re-program the checkpoint's weights instead: exact to the programming tolerance."""
        from eqprop_hil.insitu.recovery import ReconcileError

        now_instance = board_instance(self.array)
        same = instance is None or now_instance is None or now_instance == instance
        if not same:
            log.warning("resume: the instrument is instance %s, the checkpoint was taken on instance %s: its weights "
                        "are not the run's; re-programming the checkpoint's weights", now_instance, instance)
        reprogram_all = not same
        ran = -1
        if same and first_id is not None and executed is not None and first_id >= self.journal.compacted_below:
            since = entries_since(self.journal.path, first_id)
            known = [(jid, e) for jid, e, state in since if state in ("done", "applied")]
            pending = [(jid, e) for jid, e, state in since if state == "pending"]
            now = self.guard.executed()
            if instance is None and now < executed:  # no instance ids: a counter that went back is another board
                log.warning("resume: the instrument's executed-command counter reads %d, at the checkpoint it read "
                            "%d: another (or a restarted) instrument; re-programming the checkpoint's weights",
                            now, executed)
                reprogram_all = True
            elif not executed + len(known) <= now <= executed + len(known) + len(pending):
                raise ReconcileError(
                    f"resume: the instrument reports {now} executed pulse commands; at the checkpoint it reported "
                    f"{executed}, and the journal has {len(known)} commands known to have run since and {len(pending)} "
                    f"pending, so it should report {executed + len(known)} to {executed + len(known) + len(pending)}; "
                    "an update may have been lost or doubled: the run stops (check the instrument and the journal)")
            else:
                ran = now - executed - len(known)
        if ran >= 0:
            for k, (jid, _) in enumerate(pending):
                self.journal.resolve(jid, "applied" if k < ran else "not_applied", {
                    "policy": "resume: executed-command counter", "executed_counter": now,
                    "at_checkpoint": executed, "acknowledged_since": len(known), "pending_that_ran": ran})
            self.guard.expected = now
            applied = [(jid, c) for jid, e in sorted(known + pending[:ran], key=lambda t: t[0])
                       for c in pulses.expand_entry(e)]  # a compound step: its updates
            if self.mode == "matrix" and all(c.get("mode") == "matrix" for _, c in applied):
                self.guard.undo(applied, self._fire, {"sample": -1, "step": -1, "resume": True})
        if same and not reprogram_all:
            self._settle_pending()  # a journal compacted past the checkpoint: pending entries by the counter
        for entry in self.journal.pending():
            self.journal.resolve(entry["id"], "not_applied",
                                 {"policy": "another instance: rolled back by re-programming the checkpoint's weights"})
        if not same:  # a blank board: settings first (the weight mapping), then the weights, then the counters
            self.guard.bind()
            self._setup(program=False)
            self._settings_back()
        for e, fb in self.matrices:
            target = params[f"{'B' if fb else 'W'}{e}"].numpy()
            if np.max(np.abs(self.dev.read_weights(e, feedback=fb) - target)) > 0:
                self._program(e, fb, target)
        self.guard.sync()
        self.guard.check_instance("resume")
        self._ckpt_ids = [first_id] if first_id is not None else []

    def recover(self, error: RollBack, has_checkpoint: bool) -> None:
        """Before the session redoes the run from its last checkpoint (hil/session.py): a lost instance is
        rebound and set up again; without a checkpoint the initial weights are programmed and the run restarts
        from sample 0 (pending journal entries settled as not applied: the weights were written over)."""
        for entry in self.journal.pending():
            self.journal.resolve(entry["id"], "not_applied", {"policy": f"redo from the checkpoint: {error}"[:300]})
        if has_checkpoint:
            return  # load_state_dict -> _roll_back re-programs and rebinds
        self.guard.bind()
        self.samples_seen = 0
        self.counters = {"pulses_sent": 0, "pulse_commands": 0, "clipped": 0}
        self._setup(program=True)
        self._settings_back()
        self.guard.sync()

    def finish(self) -> dict:
        """At the end of a run: the same instance, and the board's counter equal to the journal's. Returns the
        figures (written to ``reconciliation.json`` so that an outside check can redo the comparison)."""
        self.guard.check_instance("end of run")
        executed = self.guard.reconcile("end of run")
        board0, journal0 = self.guard.base
        return {"instance": self.guard.instance, "board_executed": executed, "journal_applied":
                self.journal.applied_count(), "reference_board": board0, "reference_journal": journal0,
                "rollbacks": self.guard.stats["rollbacks"]}

    def _settle_pending(self) -> None:
        """Resume without a checkpoint: the weights were re-programmed, nothing is undone, but the journal must
        still say which pending commands ran (the crash came between send and ``done``). Commands run in id
        order and nothing ran after them, so entry ``p`` ran iff the instrument's executed-command counter is
        past ``p["executed_before"]``; a counter outside the pending entries' range (another instrument) proves
        nothing, and they are marked not applied (the re-programming made their fate irrelevant to the weights)."""
        pending = self.journal.pending()
        if not pending:
            return
        now = self.guard.executed()
        befores = [p.get("executed_before") for p in pending]
        fits = None not in befores and befores[0] <= now <= befores[-1] + 1
        if not fits:
            log.warning("resume: executed-command counter %d does not fit the %d pending journal entries (counts "
                        "%s); marking them not applied, the initial weights were programmed anew", now,
                        len(pending), befores)
        for entry, before in zip(pending, befores):
            ran = fits and now > before
            self.journal.resolve(entry["id"], "applied" if ran else "not_applied", {
                "policy": "resume without a checkpoint: executed-command counter" if fits else
                "resume without a checkpoint: counter does not fit, initial weights programmed anew",
                "executed_counter": now, "executed_before": before})

    def state_dict(self) -> dict:
        """Called at every checkpoint (after :meth:`parameters_for_checkpoint` reconciled the counts). The
        journal is compacted below the previous checkpoint's position: the kept checkpoints need nothing older."""
        ids = self._ckpt_ids
        if ids:
            freed = self.journal.compact(ids[-1])
            if freed:
                log.info("journal compacted below id %d (%d bytes archived)", ids[-1], freed)
        self._ckpt_ids = [*ids[-1:], self.journal.next_id]
        return {"samples_seen": self.samples_seen, "counters": dict(self.counters),
                "journal_next_id": self.journal.next_id, "executed_pulse_commands": self.guard.expected,
                "instance": self.guard.instance, "reconcile_base": list(self.guard.base)}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen = int(state["samples_seen"])
        self.counters.update(state["counters"])
        # The pulse budget is per run, the driver counts per session: a resumed session gets what is left.
        budget = self.array.limits.pulse_budget
        if budget is not None:
            left = max(0, budget - int(self.counters["pulses_sent"]))
            self.array.limits = dataclasses.replace(self.array.limits, pulse_budget=left)
        if self._ckpt_params is not None:
            params, self._ckpt_params = self._ckpt_params, None
            self._roll_back(params, state.get("journal_next_id"), state.get("executed_pulse_commands"),
                            state.get("instance"))

    def recovery_stats(self) -> dict:
        """What the resilience layer did (hil/insitu/recovery.py Guard.stats)."""
        return dict(self.guard.stats)

    def stats(self) -> dict:
        return {"pulses_sent": self.counters["pulses_sent"], "pulse_commands": self.counters["pulse_commands"]}

    def snapshot(self) -> dict:
        snap = self.array.snapshot()
        snap["calibration"] = {"edges": [{"edge": c.edge, "feedback": c.feedback, "scale": c.scale, "dw_up": c.dw_up,
                                          "dw_down": c.dw_down} for c in self.calibration.edges],
                               "source": self.calibration.report.get("source", "file")}
        snap["update_mode"] = self.mode
        return snap

    def close(self) -> None:
        """Leave the instrument safe (the driver's close: HOLD, nudge off, inputs 0) and close the journal."""
        try:
            self.array.close()
        finally:
            self.journal.close()

