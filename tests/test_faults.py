"""Fault injection: off by default, reproducible from its seed, rates honoured, strict configuration."""

from __future__ import annotations

import math

import pytest

from eqprop_hil.mock_instruments.faults import KINDS, FaultConfig, FaultInjector, ResponsePlan, query_keys
from eqprop_hil.protocols.errors import EqpropError, ValueRangeError

REPLY = b'EQPROP-HIL,ANALOG-EP-1,SIM0001,0.1.0\n'


def test_default_config_is_disabled_and_never_touches_data() -> None:
    injector = FaultInjector()
    assert not FaultConfig().enabled and not injector.enabled
    for _ in range(200):
        assert injector.before_command() == "run"
        assert injector.on_request(b"*IDN?\n") == b"*IDN?\n"
        assert injector.on_response(REPLY) == ResponsePlan(REPLY, 0.0, False)
    assert all(injector.counts[kind] == 0 for kind in KINDS)
    assert injector.counts["commands"] == injector.counts["requests"] == injector.counts["responses"] == 200


def _run(config: FaultConfig, n: int = 300) -> tuple[list, dict[str, int]]:
    injector = FaultInjector(config)
    trace = []
    for i in range(n):
        trace.append(injector.on_request(b"STAT:READ? %d\n" % i))
        trace.append(injector.before_command())
        trace.append(injector.on_response(REPLY))
    return trace, injector.counts


def test_same_seed_same_faults_other_seed_other_faults() -> None:
    cfg = FaultConfig(seed=7, corrupt_rate=0.2, drop_rate=0.1, truncate_rate=0.1, delay_rate=0.1, delay_s=0.05,
                      close_rate=0.05, busy_rate=0.1, power_cycle_rate=0.05, corrupt_request_rate=0.1)
    first, counts = _run(cfg)
    second, _ = _run(cfg)
    other, _ = _run(FaultConfig(**{**cfg.__dict__, "seed": 8}))
    assert first == second
    assert first != other
    assert all(counts[kind] > 0 for kind in KINDS), counts


@pytest.mark.parametrize("kind", KINDS)
def test_each_rate_is_honoured_statistically(kind: str) -> None:
    extra = {"delay_s": 0.01} if kind == "delay" else {}
    n, rate = 4000, 0.25
    _, counts = _run(FaultConfig(seed=1, **{f"{kind}_rate": rate}, **extra), n)
    # Binomial(n, rate): 5 standard deviations either side.
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(counts[kind] - n * rate) < 5 * sd, counts
    assert sum(counts[k] for k in KINDS if k != kind) == 0


def test_rate_one_always_fires_and_effects_are_as_documented() -> None:
    inj = FaultInjector(FaultConfig(corrupt_rate=1.0))
    for _ in range(50):
        plan = inj.on_response(REPLY)
        assert plan.data is not None and len(plan.data) == len(REPLY) and not plan.close
        diff = [a ^ b for a, b in zip(plan.data, REPLY)]
        assert sum(bin(d).count("1") for d in diff) == 1  # exactly one bit flipped
        assert plan.data[-1:] == b"\n"  # the terminator is spared
    assert FaultInjector(FaultConfig(drop_rate=1.0)).on_response(REPLY) == ResponsePlan(None, 0.0, False)
    assert FaultInjector(FaultConfig(close_rate=1.0)).on_response(REPLY) == ResponsePlan(None, 0.0, True)
    trunc = FaultInjector(FaultConfig(truncate_rate=1.0))
    for _ in range(50):
        data = trunc.on_response(REPLY).data
        assert data is not None and len(data) < len(REPLY) and REPLY.startswith(data)
    assert FaultInjector(FaultConfig(delay_rate=1.0, delay_s=0.2)).on_response(REPLY) == ResponsePlan(REPLY, 0.2)
    assert FaultInjector(FaultConfig(busy_rate=1.0)).before_command() == "busy"
    both = FaultInjector(FaultConfig(busy_rate=1.0, power_cycle_rate=1.0))
    assert both.before_command() == "power_cycle"  # a power cycle takes precedence over busy
    req = FaultInjector(FaultConfig(corrupt_request_rate=1.0)).on_request(b"*RST\n")
    assert req != b"*RST\n" and len(req) == 5 and req.endswith(b"\n")


def test_from_query_reads_fault_keys_and_ignores_the_others() -> None:
    cfg = FaultConfig.from_query(
        {"sizes": "4,6,3", "fault_drop": "0.05", "fault_delay": "0.5", "fault_delay_s": "0.2",
         "fault_power_cycle_rate": "0.01", "fault_seed": "3"}
    )
    assert cfg == FaultConfig(seed=3, drop_rate=0.05, delay_rate=0.5, delay_s=0.2, power_cycle_rate=0.01)
    assert cfg.enabled
    assert FaultConfig.from_query(cfg.to_query()) == cfg
    assert FaultConfig.from_query({}) == FaultConfig()
    assert "fault_corrupt_request" in query_keys() and "fault_seed" in query_keys()


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"fault_drop": "1.5"}, "drop_rate"),
        ({"fault_busy": "-0.1"}, "busy_rate"),
        ({"fault_close": "nan"}, "close_rate"),
        ({"fault_drop": "often"}, "fault_drop='often'"),
        ({"fault_seed": "1.5"}, "fault_seed='1.5'"),
        ({"fault_seed": "-1"}, "seed"),
        ({"fault_dropp": "0.1", "fault_xyz": "1"}, "fault_dropp, fault_xyz"),
        ({"fault_delay_s": "0.2"}, "delay_rate"),
        ({"fault_delay": "0.2"}, "delay_s"),
        ({"fault_delay": "0.2", "fault_delay_s": "inf"}, "delay_s"),
        ({"fault_drop": "0.1", "fault_drop_rate": "0.2"}, "given twice"),
    ],
)
def test_from_query_rejects_bad_keys_and_values_naming_them(params: dict, needle: str) -> None:
    with pytest.raises(ValueRangeError) as info:
        FaultConfig.from_query(params)
    assert needle in str(info.value)
    assert isinstance(info.value, EqpropError) and isinstance(info.value, ValueError)


def test_constructor_validates_types() -> None:
    with pytest.raises(ValueRangeError, match="corrupt_rate"):
        FaultConfig(corrupt_rate="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueRangeError, match="seed"):
        FaultConfig(seed=True)
